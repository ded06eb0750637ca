"""Decode benchmark: tokens/s, prefill tokens/s, compile times and the memory roofline of a decode step.

    python scripts/bench_decode.py --out bench_decode.json [--arch decoder | --config FILE.toml]
        [--dtype float32] [--batch 1 8] [--prompt-len 256] [--new-tokens 128] [--repeats 5]

A decode step at small batch reads every weight once plus the context's cache, so its floor is
bytes / read bandwidth. The bandwidth is measured in the same run, between the timed decode runs (a
jitted sum over a 1 GiB array, median of all samples), and `roofline_fraction` = (bytes per step /
bandwidth) / measured time per step. Bytes per step: all parameters, plus per row the cache entries of
the positions in context (cache leaves with an axis after the batch that spans the cache capacity are
per-position; other leaves, like recurrent states or a sliding window ring, are read whole). Random
init; the numbers do not depend on the weights. `--out` writes a list of rows.
"""

from __future__ import annotations

import dataclasses
import json
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

from core.errors import ArgumentParser, UserError, cli  # noqa: E402
from decode.engine import Engine  # noqa: E402
from models.contract import count_params  # noqa: E402
from models.registry import MODEL_CONFIGS, build_model  # noqa: E402

# ~26M parameters at d_model 512, 8 layers, 8 heads, byte vocabulary.
BENCH_MODEL = {"d_model": 512, "n_layers": 8, "n_heads": 8, "vocab_size": 259}


def model_config(args):
    if args.config:
        from core.config import load_config
        cfg = load_config(args.config).model
    else:
        cls = MODEL_CONFIGS[args.arch]
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in BENCH_MODEL.items() if k in names})
    names = {f.name for f in dataclasses.fields(cfg)}
    upd = {k: args.dtype for k in ("dtype", "param_dtype") if k in names}
    return dataclasses.replace(cfg, **upd)


class ReadBandwidth:
    """Bytes/s of a jitted sum over a 1 GiB fp32 array. `sample()` times a few sums; the benchmark samples
    between its timed decode runs, so bandwidth and decode speed are measured side by side on a shared,
    noisy machine, and `median` is the figure the roofline uses."""

    def __init__(self, gib: float = 1.0):
        self.n = int(gib * 2 ** 30) // 4
        self.x = jnp.ones((self.n,), jnp.float32) + 1.0  # materialised, not a broadcast constant
        self.total = jax.jit(jnp.sum)
        self.total(self.x).block_until_ready()
        self.samples: list[float] = []

    def sample(self, repeats: int = 3) -> float:
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.total(self.x).block_until_ready()
            self.samples.append(self.n * 4 / (time.perf_counter() - t0))
        return self.median

    @property
    def median(self) -> float:
        return float(np.median(self.samples))


def step_bytes(model, max_len: int, batch: int, mean_context: float) -> tuple[int, int]:
    """(parameter bytes, cache bytes read per step for the whole batch) at a mean context length."""
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    capacity = model.cache_capacity(max_len)
    kv = 0.0
    for leaf in jax.tree.leaves(cache):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        if capacity in leaf.shape[1:]:  # a per-position axis ([B, S, ...] or heads-first [B, G, S, D])
            nbytes *= min(mean_context, capacity) / capacity
        if leaf.ndim >= 2:  # skip per-row scalars such as lengths
            kv += nbytes
    return params, int(kv)


def bench_one(engine: Engine, model, max_len: int, batch: int, prompt_len: int, new: int, repeats: int, bw: ReadBandwidth, arch: str,
              dtype: str):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=prompt_len) for _ in range(batch)]
    kw = dict(max_new_tokens=new, stop_ids=())
    before = dict(engine.traces)
    t0 = time.perf_counter()
    first = engine.generate(prompts, **kw)  # compiles prefill and the loop
    cold = time.perf_counter() - t0
    assert engine.traces["generate"] - before.get("generate", 0) <= 1
    bw.samples.clear()
    runs = []
    for _ in range(repeats):
        bw.sample()
        runs.append(engine.generate(prompts, **kw))
    bw.sample()
    prefill = float(np.median([r.prefill_s for r in runs]))
    decode = float(np.median([r.decode_s for r in runs]))
    steps = new - 1
    step_s = decode / steps
    pbytes, kvbytes = step_bytes(model, max_len, batch, prompt_len + new / 2)
    floor_s = (pbytes + kvbytes) / bw.median
    return {
        "arch": arch, "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new,
        "tokens_per_s": batch * steps / decode,
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "ms_per_step": 1e3 * step_s,
        "compile_prefill_s": first.prefill_s - prefill,
        "compile_generate_s": first.decode_s - decode,
        "first_call_s": cold,
        "bytes_per_step": pbytes + kvbytes, "param_bytes": pbytes, "cache_bytes_read": kvbytes,
        "roofline_ms_per_step": 1e3 * floor_s,
        "roofline_fraction": floor_s / step_s,
        "read_gb_per_s": bw.median / 1e9,
        "read_gb_per_s_range": [min(bw.samples) / 1e9, max(bw.samples) / 1e9],
        "ms_per_step_range": [1e3 * min(r.decode_s for r in runs) / steps, 1e3 * max(r.decode_s for r in runs) / steps],
    }


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="decoder", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--config", help="TOML run config; its [model] section replaces --arch and the default size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise UserError("--batch, --prompt-len and --repeats must be >= 1 and --new-tokens >= 2")

    cfg = model_config(args)
    model = build_model(cfg, seed=0)
    max_len = args.prompt_len + args.new_tokens + 17  # default verify slack
    engine = Engine(model, max_len=max_len)
    n_params = count_params(model)
    bw = ReadBandwidth()
    meta = {"params": int(n_params), "device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "model": dataclasses.asdict(cfg), "argv": sys.argv[1:]}
    rows = [{**bench_one(engine, model, max_len, b, args.prompt_len, args.new_tokens, args.repeats, bw, cfg.arch, args.dtype), **meta}
            for b in args.batch]

    hdr = ("arch", "dtype", "batch", "tokens_per_s", "ms_per_step", "roofline_ms_per_step", "roofline_fraction",
           "prefill_tokens_per_s", "compile_prefill_s", "compile_generate_s", "read_gb_per_s")
    print(f"{cfg.arch}: {n_params / 1e6:.1f}M params, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})")
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in hdr))
    Path(args.out).write_text(json.dumps(rows, indent=1))  # a list of rows (the stable interface)
    return 0


if __name__ == "__main__":
    sys.exit(main())
