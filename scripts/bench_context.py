"""Decode cost against context length (SAMBA vs the decoder-only LM), length extrapolation, scan memory.

    python scripts/bench_context.py --out FILE.json [--contexts 1024,4096,16384,32768] [--size small|tiny]
        [--dtype bfloat16] [--steps 50] [--plot FILE.png]
    python scripts/bench_context.py --extrapolation RUN_DIR [RUN_DIR ...] --out FILE.json [--lengths 512,2048,8192]
    python scripts/bench_context.py --scan-memory --out FILE.json [--size small] [--seq-lens 1024,4096]

`--out` writes a JSON list of rows (latency rows carry `arch`, `context`, `ms_per_token`, `cache_bytes`).

Latency mode: per-token latency (median over steps of a jitted, donated K=1 extend + commit at batch 1) and
the committed cache's bytes, at each context, for configs/{samba,decoder}_{size}.toml (random init). The
cache state at context C is built by setting lengths = C on a cache whose buffers hold random values instead
of prefilling C tokens. For timing this is the same computation: a decode step's work is fixed by the buffer
shapes (static) and the lengths (which set how many cache blocks the decoder reads; SAMBA reads its whole
W-slot ring and fixed-size states, its masks are data), and no value in the buffers changes control flow.

Extrapolation mode: validation bits per byte of trained runs (core.checkpoint.load_model) at several
sequence lengths, with the model's full forward; bytes are counted with the run's tokenizer. Every length scores the same target tokens: evenly
spaced validation spans of the longest length, cut into windows of each length.

Scan-memory mode: compiled peak temporary memory (XLA memory_analysis) of the gradient of one Mamba layer
and of the whole SAMBA train loss, with the chunked rematerialised scan versus one chunk spanning the whole
sequence (which materialises (B, L, E, N)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from core.config import load_config  # noqa: E402
from core.errors import ArgumentParser, UserError, cli  # noqa: E402
from models.contract import count_params  # noqa: E402
from models.registry import build_model  # noqa: E402

LN2 = math.log(2.0)


def ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def model_config(arch: str, size: str, dtype: str | None):
    path = ROOT / "configs" / f"{arch}_{size}.toml"
    cfg = load_config(path).model
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        cfg.validate()
    return cfg, path.name


def tree_bytes(tree) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ---- latency vs context --------------------------------------------------------------------------------------
def cache_at(model, context: int, headroom: int, seed: int = 0):
    """A cache as after `context` committed tokens: random buffers, lengths = context (see module doc)."""
    cache = model.init_cache(1, context + headroom)
    leaves, tree = jax.tree.flatten(cache.layers)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)]
    return cache._replace(lengths=jnp.full((1,), context, jnp.int32), layers=jax.tree.unflatten(tree, leaves))


def decode_step_fn(model):
    graphdef, params = nnx.split(model)

    def step(params, cache, tok_Bx1):
        m = nnx.merge(graphdef, params)
        logits, cache = m.extend(tok_Bx1, cache)
        cache = m.commit(cache, jnp.ones((tok_Bx1.shape[0],), jnp.int32))
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache

    return params, jax.jit(step, donate_argnums=(1,))


def time_context(model, params, step, context: int, steps: int, warmup: int = 3) -> dict:
    cache = cache_at(model, context, headroom=steps + warmup + 2)
    tok = jnp.zeros((1, 1), jnp.int32)
    t0 = time.perf_counter()
    tok, cache = step(params, cache, tok)
    tok.block_until_ready()
    first_s = time.perf_counter() - t0  # includes compilation when the shapes are new
    for _ in range(warmup - 1):
        tok, cache = step(params, cache, tok)
    tok.block_until_ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok, cache = step(params, cache, tok)
        tok.block_until_ready()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * np.asarray(times)
    return {"context": context, "ms_per_token": float(np.median(ms)), "ms_p10": float(np.percentile(ms, 10)),
            "ms_p90": float(np.percentile(ms, 90)), "first_call_s": first_s,
            # the cache one would allocate for exactly `context` tokens (timing ran with a little headroom)
            "cache_bytes": tree_bytes(jax.eval_shape(lambda: model.init_cache(1, context))),
            "cache_bytes_timed": tree_bytes(cache)}


def run_latency(args) -> dict:
    rows = []
    for arch in ("samba", "decoder"):
        cfg, cfg_file = model_config(arch, args.size, args.dtype)
        model = build_model(cfg, seed=0)
        n_params = count_params(model)
        params, step = decode_step_fn(model)
        for c in args.contexts:
            r = time_context(model, params, step, c, args.steps)
            rows.append({"arch": arch, "config": cfg_file, "dtype": cfg.dtype, "params": n_params, **r})
            print(f"  {arch:8s} context {c:6d}: {r['ms_per_token']:.3f} ms/token, "
                  f"cache {r['cache_bytes'] / 2**20:.2f} MiB", flush=True)
    return {"mode": "latency", "device": device_name(), "size": args.size, "steps": args.steps, "rows": rows}


def print_latency(result: dict) -> None:
    rows = result["rows"]
    by = {(r["arch"], r["context"]): r for r in rows}
    print(f"\nper-token decode latency, batch 1, K=1 extend+commit ({result['device']}, {result['size']} configs)")
    print(f"{'context':>8} | {'samba ms':>9} {'samba MiB':>10} | {'decoder ms':>10} {'decoder MiB':>11} | "
          f"{'dec/samba':>9}")
    contexts = sorted({r["context"] for r in rows})
    for c in contexts:
        s, d = by.get(("samba", c)), by.get(("decoder", c))
        print(f"{c:>8} | {s['ms_per_token']:>9.3f} {s['cache_bytes'] / 2**20:>10.2f} | "
              f"{d['ms_per_token']:>10.3f} {d['cache_bytes'] / 2**20:>11.2f} | "
              f"{d['ms_per_token'] / s['ms_per_token']:>9.2f}")
    s0, s1 = by[("samba", contexts[0])], by[("samba", contexts[-1])]
    print(f"samba latency {contexts[-1]} vs {contexts[0]}: {s1['ms_per_token'] / s0['ms_per_token']:.3f}x "
          f"(cache bytes {'equal' if s0['cache_bytes'] == s1['cache_bytes'] else 'DIFFER'})")


def plot_latency(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for arch in ("samba", "decoder"):
        rs = sorted((r for r in result["rows"] if r["arch"] == arch), key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        a1.plot(x, [r["ms_per_token"] for r in rs], "o-", label=arch)
        a2.plot(x, [r["cache_bytes"] / 2**20 for r in rs], "o-", label=arch)
    for a, title in ((a1, "ms per token (batch 1)"), (a2, "cache MiB per row")):
        a.set_xscale("log", base=2)
        a.set_xlabel("context (tokens)")
        a.set_title(title)
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"decode cost vs context ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ---- length extrapolation ----------------------------------------------------------------------------------
def run_extrapolation(args) -> dict:
    from core.checkpoint import load_model
    from core.data import Corpus
    from core.tokenizer import get_tokenizer

    rows = []
    for run_dir in args.extrapolation:
        cfg, model, step = load_model(run_dir)
        tok = get_tokenizer(cfg.data)
        corpus = Corpus.open(cfg.data, tok)
        graphdef, params = nnx.split(model)

        @jax.jit
        def score(params, batch_BxL1):
            logits, _ = nnx.merge(graphdef, params)(batch_BxL1[:, :-1])
            targets = batch_BxL1[:, 1:]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return jnp.sum(nll), jnp.sum(tok.n_bytes(targets))  # specials carry no bytes (as in train.loop)

        spans = same_token_spans(corpus.val, max(args.lengths), args.eval_tokens)
        for length in args.lengths:
            windows = split_spans(spans, length)
            bs = max(1, args.batch_tokens // length)
            nll, n_bytes = 0.0, 0
            t0 = time.perf_counter()
            for i in range(0, len(windows), bs):
                s, n = score(params, jnp.asarray(windows[i:i + bs]))
                nll, n_bytes = nll + float(s), n_bytes + int(n)
            row = {"run": str(run_dir), "name": cfg.name, "arch": cfg.model.arch, "step": int(step),
                   "train_seq_len": cfg.data.seq_len, "window": getattr(cfg.model, "window", None),
                   "eval_len": length, "bpb": nll / max(n_bytes, 1) / LN2, "tokens": windows.shape[0] * length,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"  {cfg.name:20s} len {length:6d}: {row['bpb']:.4f} bits/byte", flush=True)
    return {"mode": "extrapolation", "device": device_name(), "rows": rows}


def same_token_spans(val: np.ndarray, span_len: int, n_tokens: int) -> np.ndarray:
    """Evenly spaced validation spans of span_len + 1 tokens, about n_tokens target tokens in all.

    Every evaluation length cuts the same spans into windows, so each length scores exactly the same target
    tokens and only the context available to each prediction differs (windows sampled per length would
    compare different text: at 150-600 steps that alone moved bits/byte by several percent).
    """
    from core.data import eval_batches

    return eval_batches(val, batch_size=max(1, n_tokens // span_len), seq_len=span_len, n_batches=1)[0]


def split_spans(spans: np.ndarray, length: int) -> np.ndarray:
    """[S, M+1] spans -> [S * M / length, length + 1] windows (consecutive windows share one token)."""
    m = spans.shape[1] - 1
    if m % length:
        raise UserError(f"evaluation length {length} must divide the longest length {m}")
    idx = np.arange(0, m, length)[:, None] + np.arange(length + 1)[None, :]
    return spans[:, idx].reshape(-1, length + 1)


def print_extrapolation(result: dict) -> None:
    rows = result["rows"]
    lengths = sorted({r["eval_len"] for r in rows})
    print("\nvalidation bits per byte by evaluation length")
    print(f"{'run':24s} {'arch':8s} {'train L':>7} | " + " ".join(f"{n:>8}" for n in lengths))
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = {r["eval_len"]: r for r in rows if r["run"] == run}
        r0 = next(iter(rs.values()))
        print(f"{r0['name'][:24]:24s} {r0['arch']:8s} {r0['train_seq_len']:>7} | "
              + " ".join(f"{rs[n]['bpb']:>8.4f}" if n in rs else f"{'':>8}" for n in lengths))


# ---- scan memory ---------------------------------------------------------------------------------------------
def compiled_bytes(fn, *args) -> dict:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        return {}
    return {"temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes)}


def run_scan_memory(args) -> dict:
    from models.mamba import Mamba

    cfg, cfg_file = model_config("samba", args.size, args.dtype)
    rows = []
    for seq in args.seq_lens:
        b = args.batch
        e, n = cfg.expand * cfg.d_model, cfg.d_state
        blen = b * seq * e * n * 4
        for label, chunk in (("chunked", cfg.scan_chunk), ("one chunk (full L)", seq)):
            for inner in ("assoc", "seq"):
                mix = Mamba(cfg.d_model, d_state=n, d_conv=cfg.d_conv, expand=cfg.expand, scan_chunk=chunk,
                            scan_inner=inner, rngs=nnx.Rngs(0), dtype=jnp.dtype(cfg.dtype),
                            param_dtype=jnp.float32)
                graphdef, params = nnx.split(mix)
                u = jax.ShapeDtypeStruct((b, seq, cfg.d_model), jnp.dtype(cfg.dtype))
                loss = lambda p, u: jnp.sum(nnx.merge(graphdef, p)(u).astype(jnp.float32))
                mem = compiled_bytes(jax.grad(loss, argnums=(0, 1)), params, u)
                row = {"what": "mamba layer grad", "scan": label, "inner": inner, "chunk": chunk, "batch": b,
                       "seq_len": seq, "d_inner": e, "d_state": n, "BxLxExN_fp32_bytes": blen, **mem}
                rows.append(row)
                print(f"  layer L={seq:5d} {label:18s} {inner:5s}: temp {mem.get('temp_bytes', 0) / 2**20:9.1f} MiB "
                      f"(one (B,L,E,N) fp32 tensor: {blen / 2**20:.1f} MiB)", flush=True)
        for label, chunk in (("chunked", cfg.scan_chunk), ("one chunk (full L)", seq)):
            mcfg = dataclasses.replace(cfg, scan_chunk=chunk)
            model = build_model(mcfg, seed=0)
            graphdef, params = nnx.split(model, nnx.Param)
            toks = jax.ShapeDtypeStruct((b, seq + 1), jnp.int32)

            def loss(p, toks):
                logits, _ = nnx.merge(graphdef, p)(toks[:, :-1])
                logp = jax.nn.log_softmax(logits, axis=-1)
                return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

            mem = compiled_bytes(jax.grad(loss), params, toks)
            rows.append({"what": "samba loss grad", "config": cfg_file, "scan": label, "chunk": chunk, "batch": b,
                         "seq_len": seq, "BxLxExN_fp32_bytes": blen, **mem})
            print(f"  model L={seq:5d} {label:18s}      : temp {mem.get('temp_bytes', 0) / 2**20:9.1f} MiB",
                  flush=True)
    return {"mode": "scan_memory", "device": device_name(), "config": cfg_file, "dtype": cfg.dtype, "rows": rows}


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 16384, 32768])
    p.add_argument("--size", choices=("tiny", "small"), default=None,
                   help="configs/{samba,decoder}_SIZE.toml (default: small on accelerators, tiny on CPU)")
    p.add_argument("--dtype", default=None, help="override the configs' compute dtype")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per context")
    p.add_argument("--plot", default=None, help="PNG of latency and cache size vs context (needs matplotlib)")
    p.add_argument("--extrapolation", nargs="+", metavar="RUN_DIR", default=None,
                   help="evaluate validation bits/byte of trained runs at --lengths")
    p.add_argument("--lengths", type=ints, default=[512, 2048, 8192])
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per length")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per evaluation batch")
    p.add_argument("--scan-memory", action="store_true", help="compiled peak memory of the selective scan")
    p.add_argument("--seq-lens", type=ints, default=[1024, 4096])
    p.add_argument("--batch", type=int, default=8, help="batch for --scan-memory")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = "tiny" if jax.default_backend() == "cpu" else "small"
    if args.extrapolation:  # inputs checked before hours of evaluation
        longest = max(args.lengths)
        bad = [n for n in args.lengths if longest % n]
        if bad:
            raise UserError(f"every --lengths value must divide the longest ({longest}); {bad[0]} does not")
        missing = [r for r in args.extrapolation if not (Path(r) / "config.toml").is_file()]
        if missing:
            raise UserError(f"not a run directory (no config.toml): {missing[0]}")
        result = run_extrapolation(args)
        print_extrapolation(result)
    elif args.scan_memory:
        result = run_scan_memory(args)
    else:
        result = run_latency(args)
        print_latency(result)
        if args.plot:
            plot_latency(result, args.plot)
    result["platform"] = platform.platform()
    meta = {k: v for k, v in result.items() if k != "rows"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{**meta, **r} for r in result["rows"]], indent=1))  # a list of rows
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
