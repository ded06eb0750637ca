"""Training throughput and MFU of the real train step (same jitted function as `python -m train`).

    python scripts/bench_train.py configs/decoder_small.toml [overrides] --steps 20 --out bench_train.json

Model FLOPs per token come from the model (`model.flops_per_token(seq_len)`, part of the model contract: for
attention models 6 * (non-embedding params + head) + 12 * layers * seq_len * d_attn, causal attention counted
in full as in the PaLM appendix). MFU divides achieved model FLOP/s by the device's peak dense bf16
FLOP/s (known devices, or --peak-tflops).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v5p": 459.0}


@cli
def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from core.config import load_config
    from core.mesh import batch_sharding, batch_shards, make_mesh, param_shardings
    from models.contract import count_params
    from models.registry import build_model
    from train.loop import Trainer, make_optimizer, optimizer_groups

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0; got {args.steps} and {args.warmup}")
    cfg = load_config(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh)
    if cfg.data.batch_size % batch_shards(mesh):
        raise UserError(f"data.batch_size {cfg.data.batch_size} must divide by data*fsdp = {batch_shards(mesh)}")
    model = build_model(cfg.model, seed=0)
    n_params = count_params(model)
    fpt = float(model.flops_per_token(cfg.data.seq_len))
    graphdef, _ = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(cfg.train, model.decay_mask(params), optimizer_groups(model, params))
    trainer = Trainer(cfg, graphdef, tx, mesh, param_shardings(model, mesh),
                      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    trainer.build_steps()
    sh = trainer.state_shardings()
    params = jax.device_put(params, sh["params"])
    state = {"params": params, "opt": jax.jit(tx.init, out_shardings=sh["opt"])(params),
             "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    b, l = cfg.data.batch_size, cfg.data.seq_len
    data_sh = batch_sharding(mesh)
    toks = jax.device_put(rng.integers(0, 256, (b, l + 1)).astype(np.int32), data_sh)
    pre = jax.device_put(np.full((b,), l // 2, np.int32), data_sh)
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = trainer.train_step(state, toks, pre)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tps = b * l / step_s
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    n_dev = mesh.size
    mfu = (tps * fpt) / (peak * 1e12 * n_dev) if peak else None
    row = {"config": cfg.name, "arch": cfg.model.arch, "params": int(n_params), "device": kind, "devices": n_dev,
           "dtype": cfg.model.dtype, "batch": b, "seq_len": l, "step_ms_median": step_s * 1e3,
           "tokens_per_s": tps, "model_tflops_per_s": tps * fpt / 1e12, "mfu": mfu, "compile_s": compile_s,
           "loss": float(m["loss"])}
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps([row], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
