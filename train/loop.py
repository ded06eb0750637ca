"""The training loop: a jitted, donated step that is a pure function of (state, batch), periodic validation
in bits per byte, async orbax checkpoints, resume, and a stop on non-finite loss."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from core import checkpoint, compile_cache
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


def lr_schedule(cfg) -> optax.Schedule:
    warmup = max(1, min(cfg.warmup_steps, cfg.steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg, decay_mask) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. `decay_mask` is the model's `model.decay_mask(params)`: a pytree of
    bools like the parameters, True where weight decay applies."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
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

        tok = get_tokenizer(self.cfg.data.tokenizer)

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
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_sh,
                                       transform_non_params=lambda _: repl)
        return {"params": self.param_sh, "opt": opt_sh, "step": repl}

    def init_state(self, params) -> dict:
        """The step-0 train state, every leaf committed to its sharding in `state_shardings()`: an uncommitted
        leaf (a plain `jnp.zeros` step counter) is another jit cache key than the committed output of a step,
        so the second step would compile `train_step` all over again (measured: a second full compile)."""
        sh = self.state_shardings()
        params = jax.device_put(params, sh["params"])
        return {"params": params, "opt": jax.jit(self.tx.init, out_shardings=sh["opt"])(params),
                "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"])}


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Validate an existing run directory against cfg. Returns True when resuming."""
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
    """Train (or resume) cfg in run_dir. Returns a summary dict."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    resuming = prepare_run_dir(cfg, run_dir)
    tok = get_tokenizer(cfg.data.tokenizer)  # the name and vocabulary size were checked with the config
    corpus = Corpus.open(cfg.data, tok)
    mesh = make_mesh(cfg.mesh)
    shards = batch_shards(mesh)
    if cfg.data.batch_size % shards or cfg.data.batch_size % jax.process_count():
        raise UserError(f"data.batch_size {cfg.data.batch_size} must divide by data*fsdp = {shards} "
                        f"and by the process count {jax.process_count()}")
    val = eval_batches(corpus.val, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                       n_batches=cfg.train.eval_batches)
    get_batch(corpus.train, seed=0, step=0, batch_size=1, seq_len=cfg.data.seq_len)  # size check

    model = build_model(cfg.model, seed=cfg.train.seed)
    n_params = count_params(model)
    graphdef, _ = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(cfg.train, model.decay_mask(params))
    trainer = Trainer(cfg, graphdef, tx, mesh, param_shardings(model, mesh),
                      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    trainer.build_steps()
    state_sh = trainer.state_shardings()
    del model
    state = trainer.init_state(params)

    lead = jax.process_index() == 0
    if not lead:
        log = lambda *_: None  # noqa: E731  (one process speaks and writes the run's text files)
    mngr, start = None, 0
    if resuming and (run_dir / "checkpoints").is_dir():  # restored first: a checkpoint that cannot be resumed
        mngr = checkpoint.manager(run_dir, keep=cfg.train.keep_checkpoints)  # is refused before any write
        try:
            if mngr.latest_step() is not None:
                start = mngr.latest_step()
                state = jax.device_put(checkpoint.restore(mngr, start, state), state_sh)
        except BaseException:
            mngr.close()
            raise
    # Only now, with the config, corpus, model and checkpoint known good, does the run directory get written.
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        save_config(cfg, run_dir / "config.toml")
    if mngr is None:
        mngr = checkpoint.manager(run_dir, keep=cfg.train.keep_checkpoints)
    if start:
        log(f"resumed from step {start} in {run_dir}")
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

    def evaluate(params) -> float:
        tot, nb = 0.0, 0.0
        for b in val:
            s, n = trainer.eval_step(params, jax.device_put(b, data_sh))
            tot, nb = tot + float(s), nb + float(n)
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
            raise NonFiniteLoss(f"non-finite loss {m['loss']} / grad-norm {m['grad_norm']} at step {step_done}; "
                                f"stopped, last good checkpoint: {mngr.latest_step()}")
        if t_first is None:
            t_first = time.perf_counter() - t_start
            summary["time_to_first_step_s"] = round(t_first, 2)
        last = m
        return m

    try:
        step = start
        while step < end:
            toks, pre = device_batch(step)
            state, m = trainer.train_step(state, toks, pre)
            step += 1
            n_window += 1
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
                    record["val_bpb"] = evaluate(state["params"])
                    summary["val_bpb"] = record["val_bpb"]
                    log(f"step {step:6d} | val bits/byte {record['val_bpb']:.4f}")
                    t_window += time.perf_counter() - t_e
                if is_ckpt:
                    checkpoint.save(mngr, step, state, cfg)
                metrics_f.write(json.dumps(record) + "\n")
                metrics_f.flush()
        if pending is not None:
            finish(*pending)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        metrics_f.close()
    summary.update({"final_step": end, "loss": last.get("loss"), "wall_s": round(time.perf_counter() - t_start, 2)})
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="persistent XLA compilation cache (default: $LMARCH_COMPILE_CACHE, else "
                        "~/.cache/lmarch/jax; 'off' disables it)")
    args = p.parse_intermixed_args(argv)  # overrides may follow --run-dir
    distributed = args.distributed or args.coordinator is not None
    if not distributed and (args.num_processes is not None or args.process_id is not None):
        raise UserError("--num-processes and --process-id need --coordinator (or --distributed)")
    # The config is checked first: a mistake in it ends every process at once, before any of them waits on
    # the coordinator.
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    if distributed:
        init_distributed(args.coordinator, args.num_processes, args.process_id)
    compile_cache.enable(args.compile_cache)
    try:
        summary = train(cfg, run_dir)
    except NonFiniteLoss as e:  # not a user error: the run itself diverged (exit 1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
