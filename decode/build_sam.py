"""Index a run's training split into a static suffix automaton.

    python -m decode.build_sam RUN_DIR_OR_CONFIG [--max-tokens N] [--out DIR]

RUN_DIR is a directory holding config.toml (output: RUN_DIR/sam); a config file's run directory is
runs/<config name>, as for training. Documents are separated by EOS, as in the corpus cache. The output
directory is written under a temporary name and renamed, so a failed build leaves nothing behind.

    python -m decode.build_sam RUN_DIR --sources 'docs/**/*.md' notes.txt [--out DIR]

indexes any text files instead (all of each file, no split), tokenized with the run's tokenizer (an imported
Hugging Face model's included); its corpus hash is "files-..." and decode.eval then checks the tokenizer only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from core.errors import ArgumentParser, UserError, cli


def resolve(target: str) -> tuple[Path, Path]:
    """(config path, run directory) for a run directory or a config file."""
    path = Path(target)
    if path.is_dir():
        config = path / "config.toml"
        if not config.is_file():
            raise UserError(f"{path} is a directory without config.toml; pass a run directory or a config file")
        return config, path
    if path.is_file():
        return path, Path()  # run directory comes from the config's name
    raise UserError(f"no such run directory or config file: {path}")


def files_tokens(patterns, tok):
    """All of each file matched by `patterns` (sorted by path), tokenized with EOS after each; and a
    "files-..." hash of the tokenizer and the contents."""
    import hashlib

    import numpy as np

    from core.data import resolve_sources, token_dtype

    h = hashlib.sha256(f"files|{tok.name}".encode())
    parts = []
    for rel, path in resolve_sources(tuple(patterns)):
        data = path.read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        ids = tok.encode(data)
        if len(ids):
            parts += [ids, np.array([tok.eos_id])]
    if not parts:
        raise UserError(f"--sources {' '.join(patterns)}: no text in the matched files")
    return np.concatenate(parts).astype(token_dtype(tok.vocab_size)), "files-" + h.hexdigest()[:26]


def build(target: str, *, max_tokens: int | None = None, out: str | None = None, sources=None,
          log=print) -> Path:
    from core.config import load_config
    from core.data import Corpus
    from core.tokenizer import get_tokenizer
    from decode.sam import SuffixAutomaton

    config, run_dir = resolve(target)
    try:
        cfg = load_config(config)
        tok = get_tokenizer(cfg.data)
        if sources:
            train, key = files_tokens(sources, tok)
        else:
            corpus = Corpus.open(cfg.data, tok)
            train, key = corpus.train, corpus.key
    except UserError as e:
        raise UserError(f"{config}: {e}") from None
    if run_dir == Path():
        run_dir = Path("runs") / cfg.name
    out_dir = Path(out) if out else run_dir / "sam"
    if max_tokens is None:
        max_tokens = cfg.decode.sam_max_tokens  # 0: the whole split
    if max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0 (0 = whole training split); got {max_tokens}")
    n = len(train) if max_tokens == 0 else min(max_tokens, len(train))
    t0 = time.perf_counter()
    sam = SuffixAutomaton.build(train[:n])
    build_s = time.perf_counter() - t0
    try:
        sam.save(out_dir, tokenizer=tok.name, corpus_hash=key)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    log(f"indexed {n:,} of {len(train):,} {'file' if sources else 'training'} tokens ({sam.n_states:,} states, {sam.n_edges:,} edges, "
        f"{sam.nbytes / max(n, 1):.1f} B/token) in {build_s:.1f}s -> {out_dir}")
    return out_dir


@cli
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m decode.build_sam", description=__doc__.split("\n")[0])
    parser.add_argument("target", metavar="RUN_DIR_OR_CONFIG")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="index at most N training tokens (default: decode.sam_max_tokens; 0 = all)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/sam)")
    parser.add_argument("--sources", nargs="+", default=None, metavar="GLOB",
                        help="index these text files (whole) instead of the run's training split")
    args = parser.parse_args(argv)
    build(args.target, max_tokens=args.max_tokens, out=args.out, sources=args.sources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
