"""Learning-rate transfer sweep for DLCM's decoupled muP: widths x base learning rates, a short training run
each (the real jitted train step and make_optimizer with the model's muP groups), final training loss and
validation bits per byte in one table.

    python scripts/mup_sweep.py configs/dlcm_tiny.toml --widths 64,128 --lrs 1e-3,3e-3,1e-2,3e-2 \
        --steps 80 --out mup_sweep.json [overrides]

Width w sets d_model = w, d_concept = w * (d_concept / d_model of the config), and the head counts so that
head widths stay those of the config; everything else (depths, mup_base_width, data) comes from the config.
Under muP the best base learning rate should not move with the width.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers; got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise UserError(f"{what} must be positive numbers; got {text!r}")
    return vals


def run_one(cfg, steps: int, log) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from core.data import Corpus, eval_batches, get_batch
    from core.mesh import batch_sharding, make_mesh, param_shardings
    from core.tokenizer import get_tokenizer
    from models.registry import build_model
    from train.loop import LN2, Trainer, make_optimizer, optimizer_groups

    tok = get_tokenizer(cfg.data)
    corpus = Corpus.open(cfg.data, tok)
    mesh = make_mesh(cfg.mesh)
    model = build_model(cfg.model, seed=cfg.train.seed)
    graphdef, _ = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(cfg.train, model.decay_mask(params), optimizer_groups(model, params))
    trainer = Trainer(cfg, graphdef, tx, mesh, param_shardings(model, mesh),
                      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    trainer.build_steps()
    sh = trainer.state_shardings()
    params = jax.device_put(params, trainer.param_sh)
    state = {"params": params, "opt": jax.jit(tx.init, out_shardings=sh["opt"])(params),
             "step": jax.numpy.zeros((), jax.numpy.int32)}
    data_sh = batch_sharding(mesh)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        toks = get_batch(corpus.train, seed=cfg.train.seed, step=step, batch_size=cfg.data.batch_size,
                         seq_len=cfg.data.seq_len)
        pre = np.zeros((cfg.data.batch_size,), np.int32)
        state, m = trainer.train_step(state, jax.device_put(toks, data_sh), jax.device_put(pre, data_sh))
        losses.append(float(m["loss"]))
    tot, nb = 0.0, 0.0
    for b in eval_batches(corpus.val, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                          n_batches=cfg.train.eval_batches):
        s, n = trainer.eval_step(state["params"], jax.device_put(b, data_sh))
        tot, nb = tot + float(s), nb + float(n)
    tail = losses[-max(1, steps // 8):]
    out = {"train_loss": float(np.mean(tail)) if all(map(math.isfinite, tail)) else float("nan"),
           "val_bpb": tot / max(nb, 1.0) / LN2, "wall_s": round(time.perf_counter() - t0, 1)}
    log(f"  d_model {cfg.model.d_model:4d} lr {cfg.train.lr:.0e}: train loss {out['train_loss']:.3f}, "
        f"val {out['val_bpb']:.3f} bits/byte ({out['wall_s']} s)")
    return out


@cli
def main(argv=None) -> int:
    import dataclasses

    from core.config import load_config

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--widths", default="64,128")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default=None)
    args = p.parse_intermixed_args(argv)
    widths = [int(w) for w in _floats(args.widths, "--widths")]
    lrs = _floats(args.lrs, "--lrs")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1; got {args.steps}")
    base = load_config(args.config, args.overrides)
    if base.model.arch != "dlcm":
        raise UserError(f"the sweep is for DLCM's muP; {args.config} is a {base.model.arch!r} model")
    m = base.model
    ratio = m.d_concept / m.d_model
    rows = []
    for w in widths:
        for lr in lrs:
            model = dataclasses.replace(m, d_model=w, d_concept=int(round(w * ratio)), n_heads=max(1, w // m.hd),
                                        n_kv_heads=0, bb_heads=max(1, int(round(w * ratio)) // m.backbone_stack().hd),
                                        bb_kv_heads=0, cross_heads=max(1, w // m.cross_hd), head_dim=m.hd,
                                        bb_head_dim=m.backbone_stack().hd, cross_head_dim=m.cross_hd)
            try:
                model.validate()
            except ValueError as e:
                raise UserError(f"width {w}: {e}") from None
            train = dataclasses.replace(base.train, lr=lr, steps=args.steps,
                                        warmup_steps=max(1, args.steps // 10))
            cfg = dataclasses.replace(base, model=model, train=train)
            rows.append({"d_model": w, "d_concept": model.d_concept, "lr": lr, "mup": model.mup,
                         **run_one(cfg, args.steps, print)})
    print(f"\nval bits/byte after {args.steps} steps (mup={m.mup}, base width {m.mup_base_width}):")
    print("d_model | " + " | ".join(f"lr {lr:.0e}" for lr in lrs))
    for w in widths:
        cells = [r for r in rows if r["d_model"] == w]
        best = min(cells, key=lambda r: r["val_bpb"] if math.isfinite(r["val_bpb"]) else 1e9)
        print(f"{w:7d} | " + " | ".join(f"{r['val_bpb']:.3f}{'*' if r is best else ''}" for r in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
