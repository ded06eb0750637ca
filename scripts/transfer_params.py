"""Move trained parameters between machines in small files (e.g. from an accelerator box back to a laptop).

    python scripts/transfer_params.py export RUN_DIR OUT_DIR [--dtype bfloat16] [--chunk-mb 15]
    python scripts/transfer_params.py import OUT_DIR RUN_DIR

`export` writes the latest checkpoint's parameters as raw chunks plus a manifest and the run's config.
`import` rebuilds a run directory whose checkpoint holds those parameters (cast back to the config's
param dtype), a fresh optimizer state and the exported step. It is meant for decoding and evaluation:
resuming training from it restarts Adam's moments. Neither command writes into an existing non-empty
directory; both build their output under a temporary name and rename it when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402


def _staging(final: Path) -> Path:
    """An empty directory beside `final`, renamed onto it once complete: an error leaves nothing at `final`."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UserError(f"{final} already exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()  # empty (checked by _staging)
    os.rename(tmp, final)


def export(run_dir: Path, out: Path, dtype: str, chunk_mb: float) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from core.checkpoint import load_model
    from models.layers import dtype_of

    if chunk_mb <= 0:
        raise UserError(f"--chunk-mb must be positive; got {chunk_mb}")
    try:
        np_dtype = np.dtype(dtype_of(dtype))
    except ValueError as e:
        raise UserError(f"--dtype: {e}") from None
    cfg, model, step = load_model(run_dir)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    blob = bytearray()
    entries = []
    for path, x in flat:
        a = np.asarray(jax.numpy.asarray(x, np_dtype))
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        entries.append({"key": key, "shape": list(a.shape), "offset": len(blob), "nbytes": a.nbytes})
        blob += a.view(np.uint8).tobytes() if a.dtype.itemsize else b""
    tmp = _staging(out)
    try:
        size = int(chunk_mb * 2**20)
        n_chunks = 0
        for i in range(0, len(blob), size):
            (tmp / f"params.{n_chunks:02d}.bin").write_bytes(bytes(blob[i:i + size]))
            n_chunks += 1
        (tmp / "manifest.json").write_text(json.dumps({"dtype": dtype, "step": step, "chunks": n_chunks,
                                                       "entries": entries}))
        shutil.copy(run_dir / "config.toml", tmp / "config.toml")
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copy(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported step {step}: {len(blob) / 2**20:.1f} MiB in {n_chunks} chunks to {out}")


def import_(src: Path, run_dir: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from core import checkpoint
    from core.config import load_config, save_config
    from models.layers import dtype_of
    from models.registry import build_model
    from train.loop import make_optimizer, optimizer_groups

    if not (src / "manifest.json").is_file() or not (src / "config.toml").is_file():
        raise UserError(f"not an export of scripts/transfer_params.py (needs manifest.json and config.toml): {src}")
    if run_dir.exists():
        raise UserError(f"{run_dir} already exists; import into a new run directory")
    try:
        man = json.loads((src / "manifest.json").read_text())
        chunks = [src / f"params.{i:02d}.bin" for i in range(man["chunks"])]
        src_dt = np.dtype(dtype_of(man["dtype"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{src / 'manifest.json'} is damaged: {e!r}") from None
    missing = [c.name for c in chunks if not c.is_file()]
    if missing:
        raise UserError(f"export {src} is missing {', '.join(missing)}")
    blob = b"".join(c.read_bytes() for c in chunks)
    cfg = load_config(src / "config.toml")
    model = build_model(cfg.model, seed=0)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    by_key = {e["key"]: e for e in man["entries"]}
    leaves = []
    for path, x in flat:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        e = by_key.get(key)
        if e is None or tuple(e["shape"]) != tuple(x.shape) or e["offset"] + e["nbytes"] > len(blob):
            raise UserError(f"export {src} does not match its config.toml at parameter {key}")
        a = np.frombuffer(blob[e["offset"]:e["offset"] + e["nbytes"]], dtype=src_dt).reshape(e["shape"])
        leaves.append(jnp.asarray(a, x.dtype))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    state = {"params": params, "opt": make_optimizer(cfg.train, model.decay_mask(params), optimizer_groups(model, params)).init(params),
             "step": jnp.asarray(man["step"], jnp.int32)}
    tmp = _staging(run_dir)
    try:
        save_config(cfg, tmp / "config.toml")
        mngr = checkpoint.manager(tmp)
        checkpoint.save(mngr, man["step"], state, cfg)
        mngr.wait_until_finished()
        mngr.close()
        for name in ("metrics.jsonl", "summary.json"):
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        _publish(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"imported step {man['step']} into {run_dir}")


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
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
    else:
        import_(args.src, args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
