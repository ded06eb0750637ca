"""Tokenizers behind one small interface (a trained BPE can be added to TOKENIZERS later)."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Ids 0-255 are raw bytes; BOS, EOS and PAD follow. Any text or byte string round-trips."""

    name = "byte-v1"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """Specials are dropped; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def n_bytes(self, ids: np.ndarray) -> np.ndarray:
        """Bytes each id stands for (0 for specials); used for bits-per-byte."""
        return (np.asarray(ids) < 256).astype(np.int32)


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str = "byte") -> ByteTokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()
