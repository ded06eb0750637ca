"""orbax checkpoints of a run, and loading a run's model for decoding or evaluation.

A checkpoint step holds three items:
- "params": the model's parameters (the pure dict of `nnx.state(model, nnx.Param)`), on their own, so a model
  can be loaded without knowing anything about the optimizer;
- "train_state": {"opt": optimizer state, "step": int32}, only needed to resume training (a step without it,
  as `scripts/hf.py import` writes at step 0, resumes with a fresh optimizer state);
- "config": the resolved run config as JSON.

Checkpoints written before the parameters became their own item (items "state" + "config") are refused with
one line; `scripts/convert_checkpoint.py` rewrites such a run in this layout.

Integrity (docs/ARCHITECTURE.md, "Faults and checkpoint integrity"): every step directory gets a manifest
(MANIFEST: each file's size and CRC-32), written inside orbax's temporary directory after the data and before
the commit rename, so a committed step always carries it. Restoring checks it first: a step whose files were
emptied, cut or altered is never loaded; training falls back to the newest intact step (`resume`) and moves the
damaged one aside. A step is saved only when its parameters are all finite.

This module imports nothing from train/ or decode/: loading a model never builds an optimizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from core import faults
from core.config import Config, from_dict, load_config, to_dict
from core.errors import UserError
from models.registry import build_model

# orbax logs every save at INFO through absl; keep the training log readable.
logging.getLogger("absl").setLevel(logging.WARNING)


class _NoOrbaxTracebacks(logging.Filter):
    """orbax logs a failed background save with tracebacks from each of its threads, then raises it to the
    caller, where it becomes one SaveFailed line: drop the log copies."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname.replace("\\", "/"))


logging.getLogger("absl").addFilter(_NoOrbaxTracebacks())


def _drain_pending_tasks_on_failure() -> None:
    """orbax runs each background save in a fresh event loop (`asyncio_utils._run_sync_via_new_loop`): when one
    tensor write fails (a full disk), `asyncio.gather` raises at once and the loop is closed with the other
    writes still in flight. Their exceptions are then never retrieved (asyncio logs a traceback for each) and
    tensorstore, completing them later, schedules callbacks on the closed loop (a printed "Event loop is closed"
    traceback each): a screen of tracebacks after our one SaveFailed line. Wrap that runner so the loop first
    waits for its remaining tasks, collecting their errors, before it closes; the first error still propagates.
    Without that private function (another orbax version), nothing changes: tests/test_faults.py says so."""
    import asyncio

    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:
        return
    if not hasattr(asyncio_utils, "_run_sync_via_new_loop") or getattr(asyncio_utils, "_lmarch_drains", False):
        return

    def run_sync_via_new_loop(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    asyncio_utils._run_sync_via_new_loop = run_sync_via_new_loop
    asyncio_utils._lmarch_drains = True


_drain_pending_tasks_on_failure()


MANIFEST = "MANIFEST.json"
DAMAGED = "damaged_checkpoints"  # where `resume` moves damaged steps (inside the run directory)
TMP_MARK = ".orbax-checkpoint-tmp"


class NonFiniteParams(RuntimeError):
    """The parameters to be saved hold NaN or inf (the run diverged): nothing is saved."""


class SaveFailed(RuntimeError):
    """Writing a checkpoint failed (full disk, file-size limit, I/O error); the earlier steps are untouched."""


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> dict:
    """The items' files (step-level metadata, which orbax rewrites after the commit, is not covered)."""
    return {str(p.relative_to(step_dir)): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.parent != step_dir}


def write_manifest(step_dir: Path) -> None:
    files = {name: [p.stat().st_size, _crc(p)] for name, p in _files(step_dir).items()}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}))
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: Path) -> str | None:
    """None when the step's files match its manifest (or it has none: written before manifests), else what is
    wrong, in a few words."""
    path = Path(step_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"its {MANIFEST} is unreadable"
    for name, (size, crc) in files.items():
        p = Path(step_dir) / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
        if _crc(p) != crc:
            return f"{name} has changed since it was written (CRC-32)"
    return None


def _manifest_callback(directory: Path):
    """orbax calls this in its save thread after the items are written, before the rename that commits the
    step: the manifest becomes part of the committed step."""
    def callback():
        if jax.process_index() != 0:
            return
        tmps = [p for p in directory.glob(f"*{TMP_MARK}*") if p.is_dir() and p.name.split(".")[0].isdigit()]
        if not tmps:  # a storage without temporary directories: the step stays unverified
            return
        step_dir = max(tmps, key=lambda p: p.stat().st_mtime_ns)
        write_manifest(step_dir)
        faults.pause("ckpt-write", int(step_dir.name.split(".")[0]))
    return callback


def manager(run_dir: Path, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    directory = Path(run_dir).resolve() / "checkpoints"
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # a save cut short by a kill leaves a temporary directory: removed
        async_options=ocp.AsyncOptions(post_finalization_callback=_manifest_callback(directory)))
    return ocp.CheckpointManager(directory, options=opts)


def good_steps(run_dir: Path) -> list[int]:
    """Committed steps whose files match their manifest, ascending (no orbax; for messages)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and verify(p) is None)


def _last_good(run_dir: Path) -> str:
    steps = good_steps(run_dir)
    return f"step {steps[-1]}" if steps else "none"


@jax.jit
def _finite_leaves(params):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])


def check_finite(params, step: int, run_dir) -> None:
    ok = jax.device_get(_finite_leaves(params))
    if not ok.all():
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        bad = [p for p, good in zip(paths, ok) if not good]
        raise NonFiniteParams(f"parameters not finite at step {step} ({len(bad)} arrays, first {bad[0]}); not "
                              f"saved; last good checkpoint: {_last_good(run_dir)}")


def _first_line(e: BaseException) -> str:
    """The exception in one line; a long one keeps its head and its tail (where the OS error is)."""
    text = " ".join(str(e).split())
    if len(text) > 320:
        text = text[:120] + " ... " + text[-180:]
    return f"{type(e).__name__}: {text}"


def wait(mngr: ocp.CheckpointManager) -> None:
    """Wait for the save in flight; its failure becomes one clear SaveFailed."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        run_dir = Path(mngr.directory).parent
        raise SaveFailed(f"saving a checkpoint in {run_dir} failed ({_first_line(e)}); last good checkpoint: "
                         f"{_last_good(run_dir)}") from e


def save(mngr: ocp.CheckpointManager, step: int, state: dict, cfg: Config) -> None:
    """Async save of a training state {"params", "opt", "step"} and the config, after checking the parameters
    are finite (NonFiniteParams otherwise). orbax writes to a temporary directory and renames, so a crash never
    leaves a torn step; a failed write raises SaveFailed (here, or from `wait`)."""
    run_dir = Path(mngr.directory).parent
    wait(mngr)  # the previous save's failure is reported as that, not as this step's
    check_finite(state["params"], step, run_dir)
    try:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
            config=ocp.args.JsonSave(to_dict(cfg))), force=True)
    except Exception as e:
        raise SaveFailed(f"saving checkpoint {step} in {run_dir} failed ({_first_line(e)}); last good checkpoint: "
                         f"{_last_good(run_dir)}") from e


def _abstract(tree, shardings=None):
    """Shape, dtype and sharding of every leaf: the leaf's own sharding, or the one in `shardings` (a tree like
    `tree`), which is where orbax then places each process's shards of the restored arrays."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


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


def restore(mngr: ocp.CheckpointManager, step: int, target: dict, shardings: dict | None = None) -> dict:
    """The training state {"params", "opt", "step"} saved at `step`, shaped like `target` and sharded like
    `shardings` (a tree like `target`, e.g. `Trainer.state_shardings()`), else like `target`'s own leaves.

    Every process reads only its own shards, straight into the target shardings, whatever mesh wrote them: the
    restored arrays need no further `device_put` (which, for an array that lives on one process's devices,
    would be a cross-host transfer: unsupported on CPU, slow elsewhere)."""
    check_layout(mngr, step, Path(mngr.directory).parent)
    params = ocp.args.StandardRestore(_abstract(target["params"], shardings and shardings["params"]))
    if "train_state" not in item_names(mngr, step):  # imported weights (scripts/hf.py): a fresh optimizer
        out = mngr.restore(step, args=ocp.args.Composite(params=params))
        return {"params": out["params"], "opt": target["opt"], "step": target["step"]}
    rest = {"opt": target["opt"], "step": target["step"]}
    rest_sh = None if shardings is None else {"opt": shardings["opt"], "step": shardings["step"]}
    out = mngr.restore(step, args=ocp.args.Composite(
        params=params, train_state=ocp.args.StandardRestore(_abstract(rest, rest_sh))))
    return {"params": out["params"], **out["train_state"]}


def set_aside(run_dir: Path, first: int) -> list[int]:
    """Move committed steps >= first to run_dir/damaged_checkpoints/ (a diverged state); returns them."""
    run_dir = Path(run_dir)
    ck = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= first) \
        if ck.is_dir() else []
    for s in steps:
        _move_aside(run_dir, s)
    return steps


def _move_aside(run_dir: Path, step: int) -> None:
    """Move checkpoints/<step> to damaged_checkpoints/<step> (replacing an older copy there)."""
    dest = run_dir / DAMAGED / str(step)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(exist_ok=True)
    os.replace(run_dir / "checkpoints" / str(step), dest)


def check_config(mngr: ocp.CheckpointManager, step: int, cfg: Config, where) -> None:
    """UserError unless the checkpoint's own config item describes the same model as cfg (a checkpoint copied
    from another run is refused before any array is read)."""
    try:
        raw = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # no readable config item: the arrays' shapes are checked by the restore itself
        return
    want = to_dict(cfg)["model"]
    got = dict(raw.get("model", {})) if isinstance(raw, dict) else {}
    if got.get("arch") != want["arch"]:
        raise UserError(f"checkpoint {step} in {where} is of a {got.get('arch')!r} model; this config is "
                        f"{want['arch']!r}: refused")
    try:
        got = to_dict(from_dict({"model": got}, "saved"))["model"]
    except UserError as e:
        raise UserError(f"checkpoint {step} in {where} has a model config this code cannot read ({e}): refused") \
            from None
    diff = [k for k in want if got.get(k) != want[k]]
    if diff:
        raise UserError(f"checkpoint {step} in {where} is of a model with other settings "
                        f"({', '.join(f'{k}={got.get(k)!r}' for k in diff)}); this config has "
                        f"{', '.join(f'{k}={want[k]!r}' for k in diff)}: refused")


def resume(run_dir: Path, target: dict, cfg: Config, *, keep: int, log=print, shardings: dict | None = None):
    """(manager, step, state) from the newest intact checkpoint of run_dir (restored into `shardings`, see
    `restore`), or (manager, 0, None) when there is none yet. A damaged step (manifest mismatch, or orbax cannot
    read it) is reported in one line, moved to run_dir/damaged_checkpoints/ (by process 0 when there are
    several), and the next older step is tried. A checkpoint of another model is a UserError:
    nothing of it is loaded. Raises UserError if checkpoints exist and none is intact."""
    run_dir = Path(run_dir)
    ck = run_dir / "checkpoints"
    steps = sorted((int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) \
        if ck.is_dir() else []
    damaged = []
    found, state = 0, None
    for s in steps:
        problem = verify(ck / str(s))
        if problem is None:
            mngr = manager(run_dir, keep=keep)
            try:
                check_layout(mngr, s, run_dir)
                check_config(mngr, s, cfg, run_dir)
                state = restore(mngr, s, target, shardings)
                found = s
            except UserError:
                raise
            except Exception as e:  # orbax could not read it: damaged in a way the manifest did not see
                problem = f"orbax cannot read it: {_first_line(e)[:200]}"
            finally:
                mngr.close()
        if problem is None:
            break
        damaged.append(s)
        log(f"checkpoint {s} in {run_dir} is damaged ({problem}); moved to {DAMAGED}/, trying the step before it")
    if damaged and not found:
        raise UserError(f"no intact checkpoint in {run_dir} (damaged: {', '.join(map(str, damaged))}); move the "
                        f"run directory aside to start over")
    if damaged:  # several processes (multi-host) saw the same damage: the first moves it, the others wait
        ocp.multihost.sync_global_processes(f"lmarch_resume_checked_{found}")
        if jax.process_index() == 0:
            for s in damaged:
                _move_aside(run_dir, s)
        ocp.multihost.sync_global_processes(f"lmarch_resume_moved_{found}")
        log(f"resuming from step {found}, the newest intact checkpoint")
    return manager(run_dir, keep=keep), found, state


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
        ck = run_dir / "checkpoints"
        if step is None:
            for step in sorted(steps, reverse=True):
                problem = verify(ck / str(step))
                if problem is None:
                    break
                print(f"warning: checkpoint {step} in {run_dir} is damaged ({problem}); skipped", file=sys.stderr)
            else:
                raise UserError(f"no intact checkpoint in {run_dir} (damaged: {sorted(steps)})")
        elif step not in steps:
            raise UserError(f"no checkpoint at step {step} in {run_dir}; available: {sorted(steps)}")
        elif (problem := verify(ck / str(step))) is not None:
            raise UserError(f"checkpoint {step} in {run_dir} is damaged ({problem}); intact steps: "
                            f"{good_steps(run_dir) or 'none'}")
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
