"""The training loop: a jitted, donated step that is a pure function of (state, batch), periodic validation
in bits per byte, async orbax checkpoints, resume, and a stop on non-finite loss.

The driver's fault handling (docs/ARCHITECTURE.md, "Faults and checkpoint integrity"): SIGTERM / SIGINT save the
current step and stop (Stopped, exit 128 + signal); a resume starts from the newest intact checkpoint
(core.checkpoint.resume); the run directory is checked writable before anything is built; a non-finite loss
or parameter stops the run naming the step, and a failed save names the last good checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from core import checkpoint, compile_cache, faults
from core.config import Config, load_config, save_config, to_dict
from core.data import Corpus, eval_batches, get_batch, prefix_lengths
from core.errors import ArgumentParser, UserError, cli
from core.mesh import batch_sharding, batch_shards, make_mesh, param_shardings
from core.tokenizer import get_tokenizer
from models.contract import count_params
from models.registry import build_model

LN2 = math.log(2.0)


class NonFiniteLoss(RuntimeError):
    pass


class Stopped(Exception):
    """SIGTERM / SIGINT stopped the run after saving its current step; rerunning the same command resumes."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _StopSignals:
    """While active (main thread only), the first SIGTERM or SIGINT only sets `signum`: the loop saves the
    current step and stops at the next step boundary. A second one acts as it would have (kills / interrupts)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for s, old in self._old.items():
            signal.signal(s, old)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            for s, old in self._old.items():
                signal.signal(s, old)
        return False


def lr_schedule(cfg) -> optax.Schedule:
    warmup = max(1, min(cfg.warmup_steps, cfg.steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def optimizer_groups(model, params):
    """The model's per-component optimizer groups (`model.optimizer_groups(params)`: labels like the params
    and {label: (lr multiplier, eps multiplier)}), or None: one AdamW for everything (every model without
    the hook, and DLCM without muP)."""
    hook = getattr(model, "optimizer_groups", None)
    return None if hook is None else hook(params)


def make_optimizer(cfg, decay_mask, groups=None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. `decay_mask` is the model's `model.decay_mask(params)`: a pytree of
    bools like the parameters, True where weight decay applies. `groups` (from `optimizer_groups`): one
    AdamW per component through optax.multi_transform, each with the schedule times its lr multiplier and
    eps 1e-8 times its eps multiplier (DLCM's decoupled muP); the clipping stays global."""
    if groups is None:
        return optax.chain(
            optax.clip_by_global_norm(cfg.grad_clip),
            optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
        )
    labels, mults = groups
    schedule = lr_schedule(cfg)

    def group(name, lr_mult, eps_mult):
        mask = jax.tree.map(lambda lab, m: m if lab == name else optax.MaskedNode(), labels, decay_mask)
        return optax.adamw(lambda step: schedule(step) * lr_mult, b1=cfg.b1, b2=cfg.b2, eps=1e-8 * eps_mult,
                           weight_decay=cfg.weight_decay, mask=mask)

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.multi_transform({name: group(name, *m) for name, m in mults.items()}, labels),
    )


def loss_terms(logits_BxLxV, targets_BxL, weights_BxL):
    """Summed cross-entropy (nats) over weighted targets, and the weight sum."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights_BxL), jnp.sum(weights_BxL)


def target_weights(targets_BxL, prefix_len_B):
    """Prefix-LM: logits at position i predict token i+1, which is a target iff i+1 >= prefix."""
    b, l = targets_BxL.shape
    w = jnp.ones((b, l), jnp.float32)
    if prefix_len_B is not None:
        w = w * ((jnp.arange(l)[None, :] + 1) >= prefix_len_B[:, None])
    return w


@dataclass
class Trainer:
    cfg: Config
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    param_sh: dict
    abstract_params: dict

    def _forward(self, params, tokens_BxL1, prefix_len_B, rng=None):
        model = nnx.merge(self.graphdef, params)
        inputs, targets = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
        # Stochastic models (DLCM's sampled boundaries) use the key in training; evaluation passes none.
        logits, aux = model(inputs, prefix_len_B, rng=rng)
        weights = target_weights(targets, prefix_len_B)
        nll_sum, n = loss_terms(logits, targets, weights)
        return nll_sum, n, aux, targets, weights

    def build_steps(self):
        prefix = self.cfg.train.objective == "prefix"
        data_sh = batch_sharding(self.mesh)
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def train_step(state, tokens_BxL1, prefix_len_B):
            rng = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state["step"])

            def loss_fn(params):
                nll_sum, n, aux, _, _ = self._forward(params, tokens_BxL1, prefix_len_B if prefix else None, rng)
                ce = nll_sum / jnp.maximum(n, 1.0)
                aux_losses = [v for k, v in aux.items() if k.startswith("loss_")]
                total = ce + sum(aux_losses) if aux_losses else ce
                return total, (ce, aux)

            (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = self.tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics = {"loss": ce, "total_loss": loss, "grad_norm": optax.tree.norm(grads),
                       **{k: v for k, v in aux.items()}}
            return {"params": params, "opt": opt_state, "step": state["step"] + 1}, metrics

        tok = get_tokenizer(self.cfg.data)

        def eval_step(params, tokens_BxL1):
            nll_sum, _, _, targets, weights = self._forward(params, tokens_BxL1, None)
            n_bytes = jnp.sum(weights * tok.n_bytes(targets))  # specials (EOS) carry no bytes
            return nll_sum, n_bytes

        state_sh = self.state_shardings()
        self.train_step = jax.jit(train_step, donate_argnums=0, in_shardings=(state_sh, data_sh, data_sh),
                                  out_shardings=(state_sh, repl))
        self.eval_step = jax.jit(eval_step, in_shardings=(self.param_sh, data_sh), out_shardings=repl)

    def state_shardings(self):
        abstract_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                       self.abstract_params, self.param_sh)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 (multi_transform: other groups' slots)
        opt_sh = optax.tree_map_params(self.tx, lambda x, s: x if masked(x) else s, abstract_opt, self.param_sh,
                                       transform_non_params=lambda _: repl, is_leaf=masked)
        return {"params": self.param_sh, "opt": opt_sh, "step": repl}

    def init_state(self, params) -> dict:
        """The step-0 train state, every leaf committed to its sharding in `state_shardings()`: an uncommitted
        leaf (a plain `jnp.zeros` step counter) is another jit cache key than the committed output of a step,
        so the second step would compile `train_step` all over again (measured: a second full compile)."""
        sh = self.state_shardings()
        params = jax.device_put(params, sh["params"])
        return {"params": params, "opt": jax.jit(self.tx.init, out_shardings=sh["opt"])(params),
                "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"])}


def init_model(model_cfg, *, seed: int = 0):
    """`build_model(model_cfg, seed)` with its initialisation compiled as ONE program (the module structure
    comes from an abstract `nnx.eval_shape` build). Built eagerly, every initialiser op of every layer is
    dispatched, and on a cold start compiled, one at a time: the largest part of the time to the first step
    of the tiny configs; as one program it is one compilation, and a hit in the persistent compilation cache
    on a warm start. Same RNG streams and draws; XLA may fuse the initialisers' arithmetic differently, so
    values can differ from the eager ones by an ulp (a resumed run restores its parameters, so resume stays
    bit-identical)."""
    def build():
        return build_model(model_cfg, seed=seed)

    graphdef, _ = nnx.split(nnx.eval_shape(build))
    init = jax.jit(lambda: nnx.split(build())[1]).lower()
    # XLA:CPU's default LLVM pipeline spends ~10 s (loaded 2-core machine) on the initialisers' unrolled
    # threefry and erf_inv code; at level 1 it is ~3 s with the same values (checked: equal to the default
    # level's, at most an ulp from eager), and this program runs once.
    opts = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
    return nnx.merge(graphdef, init.compile(opts)())


def build_trainer(cfg: Config, model, mesh) -> tuple[Trainer, dict]:
    """The run's Trainer (its jitted steps built) and the model's parameters as a pure dict: the optimizer of
    `make_optimizer` with the model's decay mask and its own `optimizer_groups` (DLCM's muP groups), the parameter
    shardings of `core.mesh`. The training loop, the tests, scripts/bench_train.py and scripts/profile_train.py
    build the trainer only here, so they train, time and test the step a run uses. `model` may be abstract
    (`nnx.eval_shape`) when only the shardings are wanted."""
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(cfg.train, model.decay_mask(params), optimizer_groups(model, params))
    trainer = Trainer(cfg, graphdef, tx, mesh, param_shardings(model, mesh),
                      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    trainer.build_steps()
    return trainer, params


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def check_writable(run_dir: Path) -> None:
    """UserError unless run_dir (or, before it exists, its nearest existing ancestor) is writable: a read-only
    file system or directory is known before anything is compiled (access(2): EROFS holds for root too).
    Nothing is written."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"run directory {run_dir} cannot be created: {probe} is not a directory")
    for d in (probe, run_dir / "checkpoints"):
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            raise UserError(f"run directory {run_dir} is not writable ({d}); use a writable --run-dir")


def _trim_metrics(path: Path, start: int) -> None:
    """On resume from `start`, drop records of later steps that a killed run logged (they are logged again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > start:
                continue
        except ValueError:  # a line cut by the kill
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _unreadable(sources) -> str | None:
    """The first file of the corpus that cannot be read (for the error message)."""
    from core.data import resolve_sources
    for _, path in resolve_sources(sources):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError:
            return str(path)
    return None


def prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Validate an existing run directory against cfg. Returns True when resuming."""
    check_writable(run_dir)
    saved_path = run_dir / "config.toml"
    if not saved_path.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"run directory {run_dir} is not empty and holds no config.toml")
        return False
    saved = load_config(saved_path)
    if saved.model.arch != cfg.model.arch:
        raise UserError(f"run directory {run_dir} holds a {saved.model.arch!r} run; this config is "
                        f"{cfg.model.arch!r} (use another --run-dir)")
    if to_dict(saved)["model"] != to_dict(cfg)["model"]:
        diff = [k for k, v in to_dict(cfg)["model"].items() if to_dict(saved)["model"].get(k) != v]
        raise UserError(f"run directory {run_dir} holds a model with different settings ({', '.join(diff)})")
    return True


def train(cfg: Config, run_dir: Path, *, log=print) -> dict:
    """Train (or resume) cfg in run_dir. Returns a summary dict. Raises Stopped after a SIGTERM / SIGINT
    (the current step saved), NonFiniteLoss / checkpoint.NonFiniteParams when the run diverges, and
    checkpoint.SaveFailed when a checkpoint cannot be written."""
    with _StopSignals() as stop:
        return _train(cfg, run_dir, log=log, stop=stop)


def _train(cfg: Config, run_dir: Path, *, log, stop) -> dict:
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    resuming = prepare_run_dir(cfg, run_dir)
    tok = get_tokenizer(cfg.data)  # the name and vocabulary size were checked with the config
    try:
        corpus = Corpus.open(cfg.data, tok)
    except OSError as e:  # a file in data.sources that cannot be read (the partial token cache is removed)
        raise UserError(f"cannot read the corpus: {_unreadable(cfg.data.sources) or e.filename}: "
                        f"{e.strerror or e}; every file matched by data.sources must be readable") from None
    mesh = make_mesh(cfg.mesh)
    shards = batch_shards(mesh)
    if cfg.data.batch_size % shards or cfg.data.batch_size % jax.process_count():
        raise UserError(f"data.batch_size {cfg.data.batch_size} must divide by data*fsdp = {shards} "
                        f"and by the process count {jax.process_count()}")
    check_process_rows(mesh, cfg.data.batch_size)
    val = eval_batches(corpus.val, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                       n_batches=cfg.train.eval_batches)
    get_batch(corpus.train, seed=0, step=0, batch_size=1, seq_len=cfg.data.seq_len)  # size check

    model = init_model(cfg.model, seed=cfg.train.seed)
    n_params = count_params(model)
    trainer, params = build_trainer(cfg, model, mesh)
    state_sh = trainer.state_shardings()
    del model
    state = trainer.init_state(params)

    lead = jax.process_index() == 0
    if not lead:
        log = lambda *_: None  # noqa: E731  (one process speaks and writes the run's text files)
    mngr, start = None, 0
    if resuming and (run_dir / "checkpoints").is_dir():  # restored first: a checkpoint that cannot be resumed
        # is refused before any write; a damaged newest step falls back to the one before (one line each)
        # Each process restores its own shards straight into the state's shardings (no device_put afterwards:
        # moving an array off one process's devices is a cross-host transfer, which CPU/gloo does not have).
        mngr, start, restored = checkpoint.resume(run_dir, state, cfg, keep=cfg.train.keep_checkpoints, log=log,
                                                  shardings=state_sh)
        if restored is not None:  # also step 0 of an imported run (scripts/hf.py): its params, a fresh optimizer
            state = restored
    # Only now, with the config, corpus, model and checkpoint known good, does the run directory get written.
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        save_config(cfg, run_dir / "config.toml")
    if mngr is None:
        mngr = checkpoint.manager(run_dir, keep=cfg.train.keep_checkpoints)
    if start:
        log(f"resumed from step {start} in {run_dir}")
    if resuming and lead:
        _trim_metrics(run_dir / "metrics.jsonl", start)
    end = cfg.train.steps if not cfg.train.stop_after else min(cfg.train.steps, cfg.train.stop_after)

    log(f"{cfg.name}: {cfg.model.arch}, {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"{len(corpus.train) / 1e6:.1f}M train / {len(corpus.val) / 1e6:.2f}M val tokens, steps {start}->{end}")
    metrics_f = open(run_dir / "metrics.jsonl" if lead else os.devnull, "a")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    schedule = lr_schedule(cfg.train)
    data_sh = batch_sharding(mesh)

    def device_batch(step):
        kw = dict(seed=cfg.train.seed, step=step, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                  process_index=jax.process_index(), process_count=jax.process_count())
        toks = get_batch(corpus.train, **kw)
        pre = prefix_lengths(**kw)
        if jax.process_count() == 1:
            return jax.device_put(toks, data_sh), jax.device_put(pre, data_sh)
        return (jax.make_array_from_process_local_data(data_sh, toks),
                jax.make_array_from_process_local_data(data_sh, pre))

    def evaluate(params, step) -> float:
        tot, nb = 0.0, 0.0
        for i, b in enumerate(val):
            s, n = trainer.eval_step(params, jax.device_put(b, data_sh))
            tot, nb = tot + float(s), nb + float(n)
            if i == 0:
                faults.pause("eval", step, lambda: stop.signum is not None)
        return tot / max(nb, 1.0) / LN2

    summary = {"name": cfg.name, "arch": cfg.model.arch, "params": int(n_params), "start_step": start}
    pending = None  # (step, metrics) of the step dispatched last: read one step late so the host never stalls
    t_first = None
    t_window, n_window = time.perf_counter(), 0
    last = {}

    def finish(step_done, m):
        nonlocal last, t_first
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            # The loss of step s is computed from the state saved as step s - 1: that checkpoint (and any later)
            # led to the divergence, so it is set aside and is not what a rerun resumes from.
            try:
                mngr.wait_until_finished()
            except Exception:  # a failed save is not what this message is about
                pass
            moved = checkpoint.set_aside(run_dir, step_done - 1) if lead else []
            note = (f"checkpoint{'s' if len(moved) > 1 else ''} {', '.join(map(str, moved))} (the state that "
                    f"diverged) moved to {checkpoint.DAMAGED}/; " if moved else "")
            raise NonFiniteLoss(f"non-finite loss {m['loss']} / grad-norm {m['grad_norm']} at step {step_done}; "
                                f"stopped; {note}last good checkpoint: {checkpoint._last_good(run_dir)}")
        if t_first is None:
            t_first = time.perf_counter() - t_start
            summary["time_to_first_step_s"] = round(t_first, 2)
        last = m
        return m

    saved = start  # the newest step saved (or being saved) by this process
    try:
        step = start
        while step < end:
            if stop.signum is not None:  # preemption: save this step, then stop
                if pending is not None:
                    finish(*pending)
                    pending = None
                if step > saved:
                    checkpoint.save(mngr, step, state, cfg)
                    saved = step
                checkpoint.wait(mngr)
                name = signal.Signals(stop.signum).name
                raise Stopped(stop.signum, f"stopped by {name} at step {step}: checkpoint {saved} saved in "
                                           f"{run_dir}; rerun the same command to resume")
            toks, pre = device_batch(step)
            state, m = trainer.train_step(state, toks, pre)
            step += 1
            n_window += 1
            faults.pause("step", step, lambda: stop.signum is not None)
            if pending is not None:
                finish(*pending)
            pending = (step, m)
            is_log = step % cfg.train.log_every == 0 or step == end
            is_eval = step % cfg.train.eval_every == 0 or step == end
            is_ckpt = step % cfg.train.checkpoint_every == 0 or step == end
            if is_log or is_eval or is_ckpt:
                m = finish(*pending)  # the checkpoint below must never hold a non-finite step
                pending = None
                record = {"step": step, "loss": m["loss"], "lr": float(schedule(step - 1)),
                          "grad_norm": m["grad_norm"]}
                record.update({k: v for k, v in m.items() if k not in record and k != "total_loss"})
                if is_log:
                    dt = time.perf_counter() - t_window
                    tps = n_window * tokens_per_step / max(dt, 1e-9)
                    record["tokens_per_s"] = tps
                    eta = (end - step) * dt / max(n_window, 1)
                    log(f"step {step:6d} | loss {m['loss']:.4f} | lr {record['lr']:.2e} | "
                        f"grad-norm {m['grad_norm']:.3f} | {tps:,.0f} tok/s | eta {_fmt_eta(eta)}")
                    t_window, n_window = time.perf_counter(), 0
                if is_eval:
                    t_e = time.perf_counter()
                    record["val_bpb"] = evaluate(state["params"], step)
                    summary["val_bpb"] = record["val_bpb"]
                    log(f"step {step:6d} | val bits/byte {record['val_bpb']:.4f}")
                    t_window += time.perf_counter() - t_e
                if is_ckpt:
                    checkpoint.save(mngr, step, state, cfg)
                    saved = step
                metrics_f.write(json.dumps(record) + "\n")
                metrics_f.flush()
        if pending is not None:
            finish(*pending)
        checkpoint.wait(mngr)  # a failed last save is an error of this run
    finally:
        try:
            mngr.wait_until_finished()
            mngr.close()
        except Exception:  # already reported (or being raised) as SaveFailed
            pass
        metrics_f.close()
    summary.update({"final_step": end, "loss": last.get("loss"), "wall_s": round(time.perf_counter() - t_start, 2)})
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_process_rows(mesh, batch_size: int) -> None:
    """Multi-host: each process reads rows [i B/P, (i+1) B/P) of the global batch (core.data.get_batch); the
    mesh must place exactly those rows on the process's devices (data x fsdp spans the processes)."""
    p, n = jax.process_index(), jax.process_count()
    if n == 1:
        return
    local = batch_size // n
    idx = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = {r for s in idx.values() for r in range(*s[0].indices(batch_size))}
    if rows != set(range(p * local, (p + 1) * local)):
        raise UserError(f"mesh {dict(mesh.shape)} does not split the batch rows by process ({n} processes): "
                        f"data*fsdp must be a multiple of the process count")


def distributed_settings(mesh_cfg, *, coordinator=None, num_processes=None, process_id=None, auto=False,
                         environ=os.environ):
    """(coordinator, num_processes, process_id) for jax.distributed.initialize, or None for a single process.

    Each setting comes from the command line, else the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), else the config's [mesh] section; `auto` (--distributed) initialises
    with whatever is given and lets JAX detect the rest (TPU VM, SLURM, Open MPI)."""
    def pick(cli, env, conf, cast, unset):
        if cli is not None:
            return cli
        if environ.get(env, "") != "":
            try:
                return cast(environ[env])
            except ValueError:
                raise UserError(f"{env} must be an integer; got {environ[env]!r}") from None
        return conf if conf != unset else None

    coord = pick(coordinator, "JAX_COORDINATOR_ADDRESS", mesh_cfg.coordinator, str, "")
    num = pick(num_processes, "JAX_NUM_PROCESSES", mesh_cfg.num_processes, int, 0)
    pid = pick(process_id, "JAX_PROCESS_ID", mesh_cfg.process_id, int, -1)
    if not (auto or coord or (num or 0) > 1):
        if pid not in (None, 0):
            raise UserError(f"process id {pid} given without a coordinator (mesh.coordinator, "
                            f"JAX_COORDINATOR_ADDRESS or --coordinator)")
        return None
    if num is not None and num < 1 or pid is not None and (pid < 0 or num is not None and pid >= num):
        raise UserError(f"need 0 <= process id < number of processes; got {pid} of {num}")
    return coord, num, pid


def init_distributed(coordinator, num_processes, process_id) -> None:
    """jax.distributed.initialize; settings it rejects are the user's mistake (one line, exit 2)."""
    if coordinator is not None and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise UserError(f"--coordinator must be host:port; got {coordinator!r}")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives across processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as e:  # missing or inconsistent settings (e.g. no process count outside a cluster)
        raise UserError(f"distributed setup: {e}") from None


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m train", description="Train a model from a TOML config.")
    p.add_argument("config", help="configs/<name>.toml")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--run-dir", default=None, help="default: runs/<config name>")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (auto-detected on TPU/SLURM, or give the "
                        "three options below)")
    p.add_argument("--coordinator", default=None,
                   help="host:port of process 0 (else JAX_COORDINATOR_ADDRESS, else mesh.coordinator)")
    p.add_argument("--num-processes", type=int, default=None, help="else JAX_NUM_PROCESSES, mesh.num_processes")
    p.add_argument("--process-id", type=int, default=None, help="else JAX_PROCESS_ID, mesh.process_id")
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="persistent XLA compilation cache (default: $LMARCH_COMPILE_CACHE, else "
                        "~/.cache/lmarch/jax; 'off' disables it)")
    args = p.parse_intermixed_args(argv)  # overrides may follow --run-dir
    if not (args.distributed or args.coordinator is not None) and (args.num_processes is not None
                                                                     or args.process_id is not None):
        raise UserError("--num-processes and --process-id need --coordinator (or --distributed)")
    # The config is checked first: a mistake in it ends every process at once, before any of them waits on
    # the coordinator.
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    dist = distributed_settings(cfg.mesh, coordinator=args.coordinator, num_processes=args.num_processes,
                                process_id=args.process_id, auto=args.distributed)
    if dist is not None:
        init_distributed(*dist)
    compile_cache.enable(args.compile_cache)
    try:
        summary = train(cfg, run_dir)
    except (NonFiniteLoss, checkpoint.NonFiniteParams, checkpoint.SaveFailed) as e:
        print(f"error: {e}", file=sys.stderr)  # not a user error: the run diverged or the disk failed (exit 1)
        return 1
    except Stopped as e:  # preempted: the current step is saved
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    print(json.dumps(summary))
    return 0
