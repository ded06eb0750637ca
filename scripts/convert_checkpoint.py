"""Rewrite a run whose checkpoints predate the separate "params" item into the current layout.

    python scripts/convert_checkpoint.py OLD_RUN_DIR NEW_RUN_DIR

Checkpoints written before core/checkpoint.py saved the parameters as their own item hold two items,
"state" ({"params", "opt", "step"}) and "config". This reads every step of OLD_RUN_DIR and writes it to
NEW_RUN_DIR as "params", "train_state" and "config" (nothing is lost: training resumes bit-identically from
the converted run), and copies the run's other files. Parameter names of that time are mapped to today's
(LEGACY_NAMES: the attention layer and its norm became the block's generic "mixer"), in the parameters and in
the optimizer's moments alike. OLD_RUN_DIR is only read. NEW_RUN_DIR must not exist;
it is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402

# today's parameter name -> the name in checkpoints written before the model contract (decoder-style blocks)
LEGACY_NAMES = {"mixer": "attn", "mixer_norm": "attn_norm"}


def rename_keys(tree, names: dict):
    """The pytree with every dict key in `names` renamed, inside tuples and NamedTuples (optimizer states) too."""
    if isinstance(tree, dict):
        return {names.get(k, k): rename_keys(v, names) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(rename_keys(v, names) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(rename_keys(v, names) for v in tree)
    return tree


def convert(old: Path, new: Path) -> list[int]:
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from core import checkpoint
    from core.config import load_config
    from models.registry import build_model
    from train.loop import make_optimizer, optimizer_groups

    if not (old / "config.toml").is_file() or not (old / "checkpoints").is_dir():
        raise UserError(f"not a run directory with checkpoints: {old}")
    if new.exists():
        raise UserError(f"{new} already exists; convert into a new run directory")
    cfg = load_config(old / "config.toml")
    src = checkpoint.manager(old, create=False)
    try:
        steps = sorted(src.all_steps())
        if not steps:
            raise UserError(f"run directory has no checkpoints: {old}")
        stale = [s for s in steps if checkpoint.item_names(src, s) != {"state", "config"}]
        if stale:
            raise UserError(f"checkpoint {stale[0]} in {old} is not of the old layout ('state' + 'config'); "
                            f"nothing to convert")
        model = build_model(cfg.model, seed=0)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # The optimizer state's tree does not depend on the decay mask (the mask only gates the decay term).
        opt = jax.eval_shape(make_optimizer(cfg.train, model.decay_mask(params), optimizer_groups(model, params)).init,
                             params)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params, "opt": opt, "step": jax.ShapeDtypeStruct((), jnp.int32)})
        legacy = {v: k for k, v in LEGACY_NAMES.items()}

        def read(step):
            """The old "state" item under today's names (saved with today's names, or with the legacy ones)."""
            errors = []
            for names in ({}, LEGACY_NAMES):
                try:
                    out = src.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(rename_keys(target, names))))
                    return rename_keys(out["state"], legacy if names else {})
                except Exception as e:  # orbax raises assorted types for a structure mismatch
                    errors.append(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            raise UserError(f"checkpoint {step} in {old} does not match the model of its config.toml: {errors[-1]}")

        new.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{new.name}.tmp-", dir=new.parent))
        try:
            for f in old.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            dst = checkpoint.manager(tmp, keep=max(len(steps), cfg.train.keep_checkpoints))
            try:
                for step in steps:
                    checkpoint.save(dst, step, read(step), cfg)
                    dst.wait_until_finished()
            finally:
                dst.close()
            os.rename(tmp, new)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        src.close()
    return steps


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path, help="run directory with old-layout checkpoints (only read)")
    p.add_argument("new", type=Path, help="new run directory (must not exist)")
    args = p.parse_args(argv)
    steps = convert(args.old, args.new)
    print(f"converted steps {steps} of {args.old} into {args.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
