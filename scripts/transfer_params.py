"""Move trained parameters between machines in small files (e.g. from an accelerator box back to a laptop).

    python scripts/transfer_params.py export RUN_DIR OUT_DIR [--dtype bfloat16] [--chunk-mb 15]
    python scripts/transfer_params.py import OUT_DIR RUN_DIR

`export` writes the latest checkpoint's parameters as raw chunks plus a manifest and the run's config.
`import` rebuilds a run directory whose checkpoint holds those parameters (cast back to the config's
param dtype), a fresh optimizer state and the exported step. It is meant for decoding and evaluation:
resuming training from it restarts Adam's moments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export(run_dir: Path, out: Path, dtype: str, chunk_mb: float) -> None:
    import jax
    import numpy as np
    from flax import nnx
    from models.layers import dtype_of
    from train.checkpoint import load_model

    cfg, model, step = load_model(run_dir)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    blob = bytearray()
    entries = []
    for path, x in flat:
        a = np.asarray(jax.numpy.asarray(x, dtype_of(dtype)))
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        entries.append({"key": key, "shape": list(a.shape), "offset": len(blob), "nbytes": a.nbytes})
        blob += a.view(np.uint8).tobytes() if a.dtype.itemsize else b""
    out.mkdir(parents=True, exist_ok=True)
    size = int(chunk_mb * 2**20)
    n_chunks = 0
    for i in range(0, len(blob), size):
        (out / f"params.{n_chunks:02d}.bin").write_bytes(bytes(blob[i:i + size]))
        n_chunks += 1
    (out / "manifest.json").write_text(json.dumps({"dtype": dtype, "step": step, "chunks": n_chunks,
                                                   "entries": entries}))
    shutil.copy(run_dir / "config.toml", out / "config.toml")
    print(f"exported step {step}: {len(blob) / 2**20:.1f} MiB in {n_chunks} chunks to {out}")


def import_(src: Path, run_dir: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from models.layers import dtype_of
    from models.registry import build_model
    from train import checkpoint
    from train.config import load_config, save_config
    from train.loop import make_optimizer

    man = json.loads((src / "manifest.json").read_text())
    blob = b"".join((src / f"params.{i:02d}.bin").read_bytes() for i in range(man["chunks"]))
    cfg = load_config(src / "config.toml")
    model = build_model(cfg.model, seed=0)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    by_key = {e["key"]: e for e in man["entries"]}
    leaves = []
    src_dt = np.dtype(dtype_of(man["dtype"]))
    for path, x in flat:
        e = by_key["/".join(str(getattr(k, "key", k)) for k in path)]
        a = np.frombuffer(blob[e["offset"]:e["offset"] + e["nbytes"]], dtype=src_dt).reshape(e["shape"])
        leaves.append(jnp.asarray(a, x.dtype))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    run_dir.mkdir(parents=True, exist_ok=False)
    save_config(cfg, run_dir / "config.toml")
    state = {"params": params, "opt": make_optimizer(cfg.train).init(params),
             "step": jnp.asarray(man["step"], jnp.int32)}
    mngr = checkpoint.manager(run_dir)
    checkpoint.save(mngr, man["step"], state, cfg)
    mngr.wait_until_finished()
    mngr.close()
    for name in ("metrics.jsonl", "summary.json"):
        if (src / name).is_file():
            shutil.copy(src / name, run_dir / name)
    print(f"imported step {man['step']} into {run_dir}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("run_dir", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--chunk-mb", type=float, default=15.0)
    i = sub.add_parser("import")
    i.add_argument("src", type=Path)
    i.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "export":
        export(args.run_dir, args.out, args.dtype, args.chunk_mb)
        if (args.run_dir / "metrics.jsonl").is_file():
            shutil.copy(args.run_dir / "metrics.jsonl", args.out / "metrics.jsonl")
    else:
        import_(args.src, args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
