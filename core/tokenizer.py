"""Tokenizers behind one small interface (a trained BPE can be added to TOKENIZERS later).

A tokenizer has `name` (recorded with every corpus cache and suffix automaton), `encode`, `decode`,
`decode_bytes`, the special ids `bos_id`, `eos_id`, `pad_id`, `vocab_size`, and `bytes_per_id`: an int32
table of length `vocab_size` giving how many bytes of text each id stands for (0 for specials). Bits per
byte are counted with it (`n_bytes`), never with a rule about id ranges.
"""

from __future__ import annotations

import jax
import numpy as np

from core.errors import UserError


class Tokenizer:
    """The interface; a subclass sets the attributes and implements encode / decode_bytes."""

    name: str
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    bytes_per_id: np.ndarray  # int32 [vocab_size]

    def encode(self, text: str | bytes) -> np.ndarray:
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Specials are dropped; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def n_bytes(self, ids):
        """Bytes each id stands for (0 for specials), elementwise: a gather from `bytes_per_id`. Works on numpy
        arrays on the host and on jax arrays inside a jitted function alike (bits per byte)."""
        if isinstance(ids, jax.Array):
            return jax.numpy.asarray(self.bytes_per_id)[ids]
        return self.bytes_per_id[np.asarray(ids)]


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are raw bytes; BOS, EOS and PAD follow. Any text or byte string round-trips."""

    name = "byte-v1"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    bytes_per_id = np.array([1] * 256 + [0] * 3, np.int32)  # specials carry no bytes

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str = "byte") -> Tokenizer:
    if name not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {name!r}; valid: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]()
