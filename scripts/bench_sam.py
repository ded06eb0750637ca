"""Suffix-automaton benchmark: static build, memory, memory-mapped load, dynamic extend and lookup costs.

    python scripts/bench_sam.py [--source train|stdlib] [--tokens N] [--out bench.json]

`train` is the default corpus's training split through core.data; `stdlib` is every *.py file of the
running Python's standard library read directly (about 31.5M byte tokens on 3.11), EOS between files.
The build and the load each run in a fresh interpreter, so peak RSS and load time are not polluted by
this process (or by JAX, which core.data pulls in).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402  (no JAX: core.errors imports only the standard library)

EOS = 257


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def stdlib_tokens() -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in ("site-packages", "dist-packages") or not path.is_file():
            continue
        parts.append(np.frombuffer(path.read_bytes(), np.uint8).astype(np.uint16))
        parts.append(np.array([EOS], np.uint16))
    return np.concatenate(parts)


def corpus_tokens(source: str) -> tuple[np.ndarray, str]:
    if source in ("auto", "train"):
        try:
            from core.config import DataConfig
            from core.data import Corpus
            from core.tokenizer import get_tokenizer

            corpus = Corpus.open(DataConfig(), get_tokenizer("byte"))
            return np.asarray(corpus.train), "stdlib train split (core.data)"
        except ImportError:
            if source == "train":
                raise
    return stdlib_tokens(), "stdlib *.py (read directly)"


# ------------------------------------------------------------------------------------------- children

def child_build(tokens_path: str, out_dir: str) -> dict:
    from decode.sam import SuffixAutomaton

    tokens = np.load(tokens_path, mmap_mode="r")
    SuffixAutomaton.build(tokens[:1000])  # load compiled kernels outside the timing
    rss0 = rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    sam = SuffixAutomaton.build(tokens)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    n = sam.n_tokens
    res = {"n_tokens": n, "n_states": sam.n_states, "n_edges": sam.n_edges, "build_s": build_s,
           "build_cpu_s": build_cpu_s, "bytes_per_token": sam.nbytes / n,
           "resident_bytes_per_token": (rss_bytes() - rss0) / n, "peak_rss_gb": peak_rss_bytes() / 1e9,
           "array_bytes": {k: int(v.nbytes) for k, v in sam.arrays().items()}}
    t0 = time.perf_counter()
    sam.save(out_dir, tokenizer="byte-v1", corpus_hash="bench")
    res["save_s"] = time.perf_counter() - t0
    return res


def query_stream(n: int) -> np.ndarray:
    """Python code that is not in the indexed corpus: site-packages sources (numpy first)."""
    import numpy

    parts, total = [], 0
    for path in sorted(Path(numpy.__file__).parent.rglob("*.py")):
        data = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int64)
        parts.append(data)
        total += len(data)
        if total >= n:
            break
    return np.concatenate(parts)[:n]


def child_load(out_dir: str, tokens_path: str, dyn_tokens: int, n_lookup: int) -> dict:
    from decode.sam import DynamicMatcher, SuffixAutomaton

    SuffixAutomaton.build(np.arange(100) % 7).longest_suffix_match([1, 2])  # compiled kernels, warm
    t0 = time.perf_counter()
    sam = SuffixAutomaton.load(out_dir, tokenizer="byte-v1", corpus_hash="bench")
    load_s = time.perf_counter() - t0
    tokens = np.load(tokens_path, mmap_mode="r")
    rng = np.random.default_rng(0)
    res = {"load_s": load_s}

    # Static lookup: a cursor advanced one token per Python call, as a drafter does, over code that is
    # not in the corpus. The first pass pays the page faults of the memory map; the second is warm.
    stream = query_stream(n_lookup)
    for tag in ("cold", "warm"):
        cur = sam.cursor()
        total = 0
        t0 = time.perf_counter()
        for t in stream.tolist():
            total += cur.advance(t)[0]
        res[f"lookup_us_per_token_{tag}"] = (time.perf_counter() - t0) / len(stream) * 1e6
    res["mean_static_match_len"] = total / len(stream)
    t0 = time.perf_counter()
    for i in range(0, len(stream), 4):
        cur.advance_many(stream[i:i + 4])
    res["lookup_us_per_token_batch4"] = (time.perf_counter() - t0) / len(stream) * 1e6
    q = [stream[s:s + 64] for s in rng.integers(0, len(stream) - 64, 2000)]
    t0 = time.perf_counter()
    for x in q:
        sam.longest_suffix_match(x)
    res["longest_suffix_match_us_64tok_query"] = (time.perf_counter() - t0) / len(q) * 1e6

    # Dynamic: a request of dyn_tokens tokens, a 1000-token prompt then accepts of 1-4 tokens.
    start = int(rng.integers(0, len(tokens) - dyn_tokens))
    text = np.asarray(tokens[start: start + dyn_tokens]).astype(np.int32)
    chunks = rng.integers(1, 5, dyn_tokens)
    pieces, i = [], 1000
    for c in chunks:
        if i >= len(text):
            break
        pieces.append(text[i:i + c])
        i += c
    # Timings are per repetition; the minimum is the least disturbed by other load on the machine.
    dm = DynamicMatcher()
    reps = 10
    times = []
    for _ in range(reps):
        dm.reset(text[:1000])
        t0 = time.perf_counter()
        for piece in pieces:
            dm.commit(piece)
        times.append(time.perf_counter() - t0)
    res["dyn_commit_us_per_token"] = min(times) / (len(text) - 1000) * 1e6
    res["dyn_commit_us_per_token_median"] = float(np.median(times)) / (len(text) - 1000) * 1e6
    res["dyn_commit_us_per_call"] = min(times) / len(pieces) * 1e6
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dm.reset(text)
        times.append(time.perf_counter() - t0)
    res["dyn_prefill_us_per_token"] = min(times) / len(text) * 1e6
    one = SuffixAutomaton()
    lst = text.tolist()
    times = []
    for _ in range(reps):
        one.clear()
        t0 = time.perf_counter()
        for t in lst:
            one.extend(t)
        times.append(time.perf_counter() - t0)
    res["dyn_extend1_us_per_token"] = min(times) / len(lst) * 1e6
    return res


def run_child(*args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("auto", "train", "stdlib"), default="auto")
    p.add_argument("--tokens", type=int, default=0, help="index the first N tokens (0: all)")
    p.add_argument("--dyn-tokens", type=int, default=4000, help="tokens per simulated request")
    p.add_argument("--lookup-tokens", type=int, default=100_000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        kind, *rest = args._child
        res = child_build(*rest) if kind == "build" else child_load(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(res))
        return 0

    if args.tokens < 0 or args.dyn_tokens < 1001 or args.lookup_tokens < 65:
        raise UserError("--tokens must be >= 0, --dyn-tokens > 1000 (a 1000-token prompt comes first) and "
                        "--lookup-tokens >= 65")
    tokens, source = corpus_tokens(args.source)
    if args.tokens:
        tokens = tokens[: args.tokens]
    with tempfile.TemporaryDirectory(prefix="bench_sam_") as tmp:
        tok_path = Path(tmp) / "tokens.npy"
        np.save(tok_path, np.asarray(tokens, np.uint16))
        del tokens
        build = run_child("build", tok_path, Path(tmp) / "sam")
        load = run_child("load", Path(tmp) / "sam", tok_path, args.dyn_tokens, args.lookup_tokens)
    res = {"source": source, "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], **build, **load}
    rows = [
        ("corpus", source),
        ("tokens indexed", f"{res['n_tokens']:,}"),
        ("states / edges per token", f"{res['n_states'] / res['n_tokens']:.3f} / {res['n_edges'] / res['n_tokens']:.3f}"),
        ("build (wall / cpu)", f"{res['build_s']:.1f} s / {res['build_cpu_s']:.1f} s   (target <= 30 s)"),
        ("array bytes per token", f"{res['bytes_per_token']:.1f} B   (target <= 50)"),
        ("resident growth per token", f"{res['resident_bytes_per_token']:.1f} B"),
        ("peak RSS during build", f"{res['peak_rss_gb']:.2f} GB   (target <= 2.5)"),
        ("save", f"{res['save_s']:.1f} s"),
        ("mmap load", f"{res['load_s'] * 1e3:.1f} ms   (target <= 2 s)"),
        ("static lookup, cursor.advance (cold/warm)",
         f"{res['lookup_us_per_token_cold']:.2f} / {res['lookup_us_per_token_warm']:.2f} us/token"),
        ("static lookup, advance_many(4)", f"{res['lookup_us_per_token_batch4']:.2f} us/token"),
        ("longest_suffix_match, 64-token query", f"{res['longest_suffix_match_us_64tok_query']:.2f} us/call"),
        ("dynamic commit, 1-4 tokens/call (min / median)",
         f"{res['dyn_commit_us_per_token']:.2f} / {res['dyn_commit_us_per_token_median']:.2f} us/token, "
         f"{res['dyn_commit_us_per_call']:.2f} us/call   (target <= 2 us/token)"),
        ("dynamic extend, 1 token/call", f"{res['dyn_extend1_us_per_token']:.2f} us/token"),
        ("dynamic prefill (one call)", f"{res['dyn_prefill_us_per_token']:.3f} us/token"),
        ("mean static match length (numpy sources)", f"{res['mean_static_match_len']:.1f}"),
        ("load average (1 min)", f"{res['loadavg_1m']:.2f} on {res['cpus']} cpus"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'metric':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
