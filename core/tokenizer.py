"""Tokenizers behind one small interface: bytes, any Hugging Face `tokenizer.json`, a byte-level BPE trained here.

A tokenizer has `name` (recorded with every corpus cache and suffix automaton), `encode`, `decode`,
`decode_bytes`, the special ids `bos_id`, `eos_id`, `pad_id`, `vocab_size`, and `bytes_per_id`: an int32
table of length `vocab_size` giving how many bytes of text each id stands for (0 for specials). Bits per
byte are counted with it (`n_bytes`), never with a rule about id ranges.

`data.tokenizer` names one (`get_tokenizer`):
- "byte": ids 0-255 are bytes, then BOS, EOS, PAD (259 ids);
- "hf:PATH": a `tokenizer.json` (PATH is the file or its directory) through the `tokenizers` package; the
  special ids come from a `specials.json` next to it (written by `scripts/hf.py import`), else from
  `tokenizer_config.json` / `config.json` next to it, else from the usual names (<s>, </s>, <|endoftext|>, ...);
- "bpe:N": a byte-level BPE of N ids (N-3 learned + BOS, EOS, PAD) trained once on the corpus's training
  split and cached next to the corpus cache (`core.data.trained_bpe`); it needs the data config, so callers
  pass `cfg.data` rather than the string.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

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


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()
SPECIAL_NAMES = {  # fallbacks when no file names the special tokens
    "bos": ("<s>", "<|begin_of_text|>", "<|bos|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|eos|>", "<eos>", "<|im_end|>"),
    "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>"),
}


class HFTokenizer(Tokenizer):
    """Any `tokenizer.json` through the `tokenizers` package.

    `bytes_per_id` is read off the vocabulary: a byte-level BPE (GPT-2, Llama 3, Qwen) maps each character of
    a token back to its byte; a SentencePiece-style vocabulary counts "▁" as a space and <0xNN> as one byte;
    special tokens count 0. Byte-level vocabularies decode exactly (a multi-byte character cut between two
    tokens is rejoined), others through the tokenizer's own decoder.
    """

    def __init__(self, path, *, specials: dict | None = None, encode_special_tokens: bool = False,
                 name_prefix: str = "hf"):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer.json at {path}")
        text = file.read_text(encoding="utf-8")
        try:
            self.tk = _Tok.from_str(text)
        except Exception as e:  # the Rust side raises a plain Exception for a malformed file
            raise UserError(f"cannot read {file}: {str(e).splitlines()[0][:200]}") from None
        self.tk.encode_special_tokens = encode_special_tokens  # True: a special's text in the input is text
        self.file = file
        self.name = f"{name_prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        spec = json.loads(text)
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self.special_ids = frozenset(i for i, t in added.items() if t.get("special"))
        self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
            spec.get("pre_tokenizer"))
        self.token_bytes: list[bytes] = [b""] * self.vocab_size
        for tok, i in vocab.items():
            if i in self.special_ids:
                continue
            if i in added:  # a non-special added token stands for its literal text
                self.token_bytes[i] = added[i]["content"].encode("utf-8")
            elif self.byte_level:
                ok = all(c in BYTE_DECODER for c in tok)
                self.token_bytes[i] = bytes(BYTE_DECODER[c] for c in tok) if ok else tok.encode("utf-8")
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                self.token_bytes[i] = bytes([int(tok[3:5], 16)])
            else:
                self.token_bytes[i] = tok.replace("\u2581", " ").replace("##", "").encode("utf-8")
        self.bytes_per_id = np.array([len(b) for b in self.token_bytes], np.int32)
        ids = self._special_ids(file.parent, vocab, specials)
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    def _special_ids(self, where: Path, vocab: dict, given: dict | None) -> dict:
        """bos/eos/pad ids: given, else specials.json, tokenizer_config.json, config.json, the usual names.
        A missing bos falls back to eos, a missing pad to eos (only prompts padding and empty prompts use them)."""
        out = dict(given or {})
        sj = where / "specials.json"
        if sj.is_file():
            out = {**json.loads(sj.read_text()), **out}
        tc = where / "tokenizer_config.json"
        if tc.is_file():
            cfg = json.loads(tc.read_text())
            for k in ("bos", "eos", "pad"):
                v = cfg.get(f"{k}_token")
                v = v.get("content") if isinstance(v, dict) else v
                if f"{k}_id" not in out and isinstance(v, str) and v in vocab:
                    out[f"{k}_id"] = vocab[v]
        mc = where / "config.json"
        if mc.is_file():
            cfg = json.loads(mc.read_text())
            for k in ("bos", "eos", "pad"):
                v = cfg.get(f"{k}_token_id")
                v = v[0] if isinstance(v, list) and v else v
                if f"{k}_id" not in out and isinstance(v, int) and 0 <= v < self.vocab_size:
                    out[f"{k}_id"] = v
        for k, names in SPECIAL_NAMES.items():
            if f"{k}_id" not in out:
                hit = next((vocab[n] for n in names if n in vocab), None)
                if hit is not None:
                    out[f"{k}_id"] = hit
        eos = out.get("eos_id")
        if eos is None:
            raise UserError(f"tokenizer at {where} names no end-of-sequence token (no specials.json, "
                            f"tokenizer_config.json eos_token or config.json eos_token_id)")
        return {"bos": int(out.get("bos_id", eos)), "eos": int(eos), "pad": int(out.get("pad_id", eos))}

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")  # the tokenizer reads text, not bytes
        return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, np.int32)

    def decode_bytes(self, ids) -> bytes:
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).ravel() if 0 <= i < self.vocab_size]
        if self.byte_level:
            return b"".join(self.token_bytes[i] for i in ids)
        return self.tk.decode(ids, skip_special_tokens=True).encode("utf-8")


BPE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


def train_bpe(texts, vocab_size: int) -> str:
    """A byte-level BPE of `vocab_size` ids trained on an iterable of strings, as tokenizer.json text: the 256
    byte symbols, vocab_size - 259 merges, then BOS, EOS and PAD (the last three ids). The `tokenizers`
    trainer is deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(BPE_SPECIALS):
        raise UserError(f"a byte-level BPE needs at least {256 + len(BPE_SPECIALS)} ids; got {vocab_size}")
    tk = _Tok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tk.train_from_iterator(texts, trainer)
    tk.add_special_tokens(list(BPE_SPECIALS))
    return tk.to_str()


class BPETokenizer(HFTokenizer):
    """A byte-level BPE trained here (`train_bpe`): any text round-trips (a special's text in the input is
    encoded as text, never as the special)."""

    def __init__(self, file):
        super().__init__(file, encode_special_tokens=True, name_prefix="bpe")
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (vocab[t] for t in BPE_SPECIALS)


TOKENIZERS = {"byte": ByteTokenizer}  # plus the parametrised kinds "hf:PATH" and "bpe:N"


def check_tokenizer_spec(spec: str) -> None:
    """UserError unless `spec` names a tokenizer kind ("byte", "hf:PATH", "bpe:N"); nothing is loaded."""
    kind, sep, arg = spec.partition(":")
    if spec in TOKENIZERS or (kind == "hf" and arg) or (kind == "bpe" and arg.isdigit()):
        if kind == "bpe" and int(arg) < 256 + len(BPE_SPECIALS):
            raise UserError(f"data.tokenizer {spec!r}: a byte-level BPE needs at least 259 ids")
        return
    raise UserError(f"unknown tokenizer {spec!r}; valid: {', '.join(sorted(TOKENIZERS))}, hf:PATH (a "
                    f"tokenizer.json or its directory), bpe:N (a byte-level BPE of N ids trained on the corpus)")


def tokenizer_vocab_size(spec: str) -> int:
    """Ids the tokenizer can produce, without training anything (bpe:N is N)."""
    check_tokenizer_spec(spec)
    if spec.startswith("bpe:"):
        return int(spec[4:])
    return get_tokenizer(spec).vocab_size


def document_separator_id(spec: str) -> int:
    """The id core/data.py writes after every document (the tokenizer's EOS), without training anything: a
    trained bpe:N puts BOS, EOS, PAD last (`train_bpe`), so its EOS is N - 2."""
    check_tokenizer_spec(spec)
    if spec.startswith("bpe:"):
        return int(spec[4:]) - len(BPE_SPECIALS) + BPE_SPECIALS.index("<|eos|>")
    return get_tokenizer(spec).eos_id


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(path: str, mtime: int) -> HFTokenizer:
    del mtime  # part of the cache key: an edited file is read again
    return HFTokenizer(path)


def get_tokenizer(spec="byte") -> Tokenizer:
    """The tokenizer a config names: `spec` is the `data.tokenizer` string or the DataConfig itself (a trained
    BPE needs the data config: its sources and cache directory)."""
    data = None
    if not isinstance(spec, str):
        data, spec = spec, spec.tokenizer
    check_tokenizer_spec(spec)
    if spec in TOKENIZERS:
        return TOKENIZERS[spec]()
    kind, _, arg = spec.partition(":")
    if kind == "hf":
        path = Path(arg).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"data.tokenizer {spec!r}: no tokenizer.json at {path}")
        return _hf_tokenizer(str(path.resolve()), file.stat().st_mtime_ns)
    if data is None:
        raise UserError(f"tokenizer {spec!r} is trained on the corpus: pass the data config, not its name")
    from core.data import trained_bpe  # core.data imports this module

    return trained_bpe(data, int(arg))
