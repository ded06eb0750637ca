"""Corpus discovery, a deterministic train/validation split, a token cache (uint16, or uint32 for vocabularies
over 65,536 ids), a trained byte-level BPE cache, and reproducible batches."""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.config import DataConfig
from core.errors import UserError

CACHE_FORMAT = 1


def default_sources() -> list[tuple[str, Path]]:
    """The running Python's standard-library *.py files (no site-packages), as (relative path, path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        if path.is_file():
            files.append((rel.as_posix(), path))
    return sorted(files)


def resolve_sources(patterns: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Globs or file names; the relative path (for the split hash) is taken from the glob's fixed prefix."""
    if not patterns:
        return default_sources()
    files: dict[str, Path] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        base = Path(pattern.split("*")[0].split("?")[0].split("[")[0])
        base = base if base.is_dir() else base.parent
        for name in glob.glob(pattern, recursive=True):
            path = Path(name)
            if path.is_file():
                try:
                    rel = path.resolve().relative_to(base.resolve()).as_posix()
                except ValueError:
                    rel = path.as_posix()
                files.setdefault(rel, path)
    if not files:
        raise UserError(f"data.sources matched no files: {list(patterns)}")
    return sorted(files.items())


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the file's relative path (stable across machines and runs)."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "little")
    return (h % 1_000_000) < int(round(val_fraction * 1_000_000))


def token_dtype(vocab_size: int):
    """The narrowest cache dtype that holds every id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _sources_key(prefix: str, sources) -> str:
    h = hashlib.sha256(prefix.encode())
    for rel, path in sources:
        st = path.stat()
        h.update(f"|{rel}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def trained_bpe(cfg: DataConfig, vocab_size: int):
    """The byte-level BPE of `vocab_size` ids trained on this data config's training split (validation files
    are never seen), trained once and cached under cache_dir/bpe-<key>, keyed like the corpus cache (the
    sources' names, sizes and mtimes, the split, the size). Written to a temp dir and renamed."""
    from core.tokenizer import train_bpe

    sources = resolve_sources(cfg.sources)
    key = _sources_key(f"bpe|{CACHE_FORMAT}|{vocab_size}|{cfg.val_fraction}", sources)
    cache = Path(cfg.cache_dir) / f"bpe-{key}"
    if not (cache / "tokenizer.json").is_file():
        texts = (path.read_bytes().decode("utf-8", errors="replace") for rel, path in sources
                 if not is_validation(rel, cfg.val_fraction))
        text = train_bpe(texts, vocab_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
        try:
            (tmp / "tokenizer.json").write_text(text, encoding="utf-8")
            try:
                os.rename(tmp, cache)
            except OSError:  # another process won the race; its tokenizer is the same
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _bpe_from(str((cache / "tokenizer.json").resolve()))


@functools.lru_cache(maxsize=4)
def _bpe_from(file: str):
    from core.tokenizer import BPETokenizer

    return BPETokenizer(file)


@dataclass
class Corpus:
    train: np.ndarray  # uint16 (uint32 for vocabularies over 65,536 ids) memmap, documents separated by EOS
    val: np.ndarray
    key: str  # content hash of sources + tokenizer + split: identifies the corpus for SAM files
    tokenizer_name: str
    meta: dict

    @classmethod
    def open(cls, cfg: DataConfig, tokenizer) -> "Corpus":
        sources = resolve_sources(cfg.sources)
        cache = Path(cfg.cache_dir) / _sources_key(f"{CACHE_FORMAT}|{tokenizer.name}|{cfg.val_fraction}", sources)
        if not (cache / "meta.json").is_file():
            _tokenize_into(cache, sources, tokenizer, cfg.val_fraction)
        meta = json.loads((cache / "meta.json").read_text())
        arrays = {}
        for split in ("train", "val"):
            n = meta[f"{split}_tokens"]
            dtype = np.dtype(meta.get("dtype", "uint16"))  # caches written before uint32 hold no dtype
            arrays[split] = (np.memmap(cache / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
                             if n else np.zeros((0,), dtype))
        if meta["train_tokens"] == 0:
            raise UserError(f"data.sources gave an empty training split ({len(sources)} files)")
        return cls(arrays["train"], arrays["val"], meta["corpus_hash"], tokenizer.name, meta)


def _tokenize_into(cache: Path, sources, tokenizer, val_fraction: float) -> None:
    """Tokenize every file once, EOS after each document; written to a temp dir and renamed (atomic)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
    try:
        content = hashlib.sha256(f"{tokenizer.name}|{val_fraction}".encode())
        counts = {"train": 0, "val": 0}
        files = {"train": 0, "val": 0}
        outs = {s: open(tmp / f"{s}.bin", "wb") for s in counts}
        dtype = token_dtype(tokenizer.vocab_size)
        eos = np.array([tokenizer.eos_id], dtype)
        for rel, path in sources:
            data = path.read_bytes()
            content.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            ids = tokenizer.encode(data)
            if len(ids) == 0:
                continue
            split = "val" if is_validation(rel, val_fraction) else "train"
            outs[split].write(ids.astype(dtype).tobytes())
            outs[split].write(eos.tobytes())
            counts[split] += len(ids) + 1
            files[split] += 1
        for f in outs.values():
            f.close()
        meta = {"format": CACHE_FORMAT, "tokenizer": tokenizer.name, "dtype": np.dtype(dtype).name, "corpus_hash": content.hexdigest()[:32],
                "train_tokens": counts["train"], "val_tokens": counts["val"],
                "train_files": files["train"], "val_files": files["val"]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process won the race; its cache is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise UserError(f"data.batch_size {batch_size} must divide by the process count {process_count}")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's rows of the global batch of windows (seq_len+1 tokens each).

    The global batch is a pure function of (seed, step), so every topology sees the same data; a process
    reads only its own rows.
    """
    n = len(tokens)
    if n < seq_len + 2:
        raise UserError(f"corpus split has {n} tokens, fewer than data.seq_len+2 = {seq_len + 2}")
    starts = np.random.default_rng([seed, step]).integers(0, n - seq_len - 1, size=batch_size)
    starts = starts[_rows(batch_size, process_index, process_count)]
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[idx], dtype=np.int32)


def prefix_lengths(*, seed: int, step: int, batch_size: int, seq_len: int, process_index: int = 0,
                   process_count: int = 1) -> np.ndarray:
    """Per-row prefix length for the prefix-LM objective, uniform in [1, seq_len-1]."""
    p = np.random.default_rng([seed, step, 1]).integers(1, seq_len, size=batch_size).astype(np.int32)
    return p[_rows(batch_size, process_index, process_count)]


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, n_batches: int) -> list[np.ndarray]:
    """Fixed, evenly spaced validation windows so every evaluation sees the same data."""
    n = len(tokens)
    total = batch_size * n_batches
    span = seq_len + 1
    if n < span + 1:
        raise UserError(f"validation split has {n} tokens, fewer than data.seq_len+2 = {seq_len + 2}")
    starts = np.linspace(0, n - span - 1, total).astype(np.int64)
    idx = starts[:, None] + np.arange(span)[None, :]
    windows = np.asarray(tokens[idx], dtype=np.int32)
    return [windows[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
