"""orbax checkpoints of (params, optimizer state, step) plus the resolved config, and loading a run for decoding."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from models.registry import build_model
from train.config import Config, ConfigError, from_dict, load_config, to_dict

# orbax logs every save at INFO through absl; keep the training log readable.
logging.getLogger("absl").setLevel(logging.WARNING)


def manager(run_dir: Path, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints", options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, cfg: Config) -> None:
    """Async save; orbax writes to a temporary directory and renames, so a crash never leaves a torn step."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(to_dict(cfg))), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, target: dict) -> dict:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return out["state"]


def load_model(run_dir, step: int | None = None, *, dtype: str | None = None):
    """(cfg, model, step) for the latest (or given) checkpoint of a run directory.

    Raises ConfigError for a missing run, a missing step, or a checkpoint whose parameters do not match the
    run's config (a foreign checkpoint).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"not a run directory (no config.toml): {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    if dtype is not None:
        cfg = from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "dtype": dtype}}, cfg.name)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"run directory has no checkpoints: {run_dir}")
    mngr = manager(run_dir, create=False)
    steps = mngr.all_steps()
    if not steps:
        raise ConfigError(f"run directory has no checkpoints: {run_dir}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ConfigError(f"no checkpoint at step {step} in {run_dir}; available: {sorted(steps)}")
    from train.loop import make_optimizer  # the optimizer state's structure is part of the checkpoint

    model = build_model(cfg.model, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    target = {"params": pure, "opt": jax.eval_shape(make_optimizer(cfg.train).init, pure),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    try:
        restored = restore(mngr, step, target)["params"]
    except Exception as e:  # orbax raises assorted types for structure/shape mismatches
        raise ConfigError(f"cannot restore checkpoint {step} from {run_dir} (foreign or damaged): "
                          f"{str(e).splitlines()[0][:200]}") from None
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(params, restored)
    return cfg, nnx.merge(graphdef, params), step
