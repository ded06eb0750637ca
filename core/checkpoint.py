"""orbax checkpoints of a run, and loading a run's model for decoding or evaluation.

A checkpoint step holds three items:
- "params": the model's parameters (the pure dict of `nnx.state(model, nnx.Param)`), on their own, so a model
  can be loaded without knowing anything about the optimizer;
- "train_state": {"opt": optimizer state, "step": int32}, only needed to resume training;
- "config": the resolved run config as JSON.

Checkpoints written before the parameters became their own item (items "state" + "config") are refused with
one line; `scripts/convert_checkpoint.py` rewrites such a run in this layout.

This module imports nothing from train/ or decode/: loading a model never builds an optimizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from core.config import Config, from_dict, load_config, to_dict
from core.errors import UserError
from models.registry import build_model

# orbax logs every save at INFO through absl; keep the training log readable.
logging.getLogger("absl").setLevel(logging.WARNING)


def manager(run_dir: Path, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints", options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, cfg: Config) -> None:
    """Async save of a training state {"params", "opt", "step"} and the config. orbax writes to a temporary
    directory and renames, so a crash never leaves a torn step."""
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        train_state=ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
        config=ocp.args.JsonSave(to_dict(cfg))), force=True)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def item_names(mngr: ocp.CheckpointManager, step: int) -> set[str]:
    """The items stored at a step (read from the step directory; no restore)."""
    step_dir = Path(mngr.directory) / str(step)
    return {p.name for p in step_dir.iterdir() if p.is_dir()} if step_dir.is_dir() else set()


def check_layout(mngr: ocp.CheckpointManager, step: int, where) -> None:
    """UserError unless the step holds the "params" item (one line naming the old layout when it is that)."""
    items = item_names(mngr, step)
    if "params" in items:
        return
    if "state" in items:
        raise UserError(f"checkpoint {step} in {where} predates the separate 'params' checkpoint item (it holds "
                        f"'state' + 'config'); retrain the run, or convert it with "
                        f"scripts/convert_checkpoint.py {where} NEW_RUN_DIR")
    raise UserError(f"checkpoint {step} in {where} holds no 'params' item (items: {sorted(items) or 'none'})")


def restore(mngr: ocp.CheckpointManager, step: int, target: dict) -> dict:
    """The training state {"params", "opt", "step"} saved at `step`, shaped (and sharded) like `target`."""
    check_layout(mngr, step, Path(mngr.directory).parent)
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target["params"])),
        train_state=ocp.args.StandardRestore(_abstract({"opt": target["opt"], "step": target["step"]}))))
    return {"params": out["params"], **out["train_state"]}


def load_model(run_dir, step: int | None = None, *, dtype: str | None = None, mesh=None):
    """(cfg, model, step) for the latest (or given) checkpoint of a run directory. Restores only the "params"
    item: no optimizer is built or read. With `mesh` (core.mesh.make_mesh) the parameters are restored
    straight into their shardings on it (whatever mesh saved them); without, onto the default device.

    Raises UserError for a missing run, a missing step, a checkpoint of the old layout, or a checkpoint whose
    parameters do not match the run's config (a foreign checkpoint).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"not a run directory (no config.toml): {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    if dtype is not None:
        cfg = from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "dtype": dtype}}, cfg.name)
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run directory has no checkpoints: {run_dir}")
    mngr = manager(run_dir, create=False)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise UserError(f"run directory has no checkpoints: {run_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"no checkpoint at step {step} in {run_dir}; available: {sorted(steps)}")
        check_layout(mngr, step, run_dir)
        # Shapes only: the checkpoint replaces every parameter, so a random initialisation would cost compiles
        # and memory for nothing.
        model = nnx.eval_shape(lambda: build_model(cfg.model, seed=0))
        graphdef, params = nnx.split(model, nnx.Param)
        # Every target leaf names its sharding: orbax refuses a checkpoint written on another topology otherwise.
        if mesh is not None:
            from core.mesh import param_shardings

            shardings = param_shardings(model, mesh)
        else:
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                                     nnx.to_pure_dict(params))
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              nnx.to_pure_dict(params), shardings)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax raises assorted types for structure/shape mismatches
            raise UserError(f"cannot restore checkpoint {step} from {run_dir} (foreign or damaged): "
                            f"{str(e).splitlines()[0][:200]}") from None
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(params, restored["params"])
    return cfg, nnx.merge(graphdef, params), step
