"""Training throughput and MFU of the real train step (same jitted function as `python -m train`), optionally
side by side with the PyTorch/transformers model of the same shape.

    python scripts/bench_train.py configs/decoder_tiny.toml [overrides] --steps 20 --out bench_train.json
    python scripts/bench_train.py configs/decoder_tiny.toml --torch-ref [--torch-python .venv-torch/bin/python]
        [--rounds 5 --steps 4 --threads 0] [--baseline /tmp/base]

Model FLOPs per token come from the model (`model.flops_per_token(seq_len)`, part of the model contract: for
attention models 6 * (non-embedding params + head) + 12 * layers * seq_len * d_attn, causal attention counted
in full as in the PaLM appendix). MFU divides achieved model FLOP/s by the device's peak dense bf16
FLOP/s (known devices, or --peak-tflops); on CPU, where no peak is known, `matmul_frac` divides it by the
machine's measured fp32 matmul FLOP/s instead (a 1024^3 product, scripts/profile_train.py).

--baseline TREE runs the same config's train step from another checkout (e.g. `git worktree add /tmp/base
main`) in a worker process, alternated with ours round by round like the torch reference (a code change is
then measured under the same load, in one run). --baseline-config CONFIG makes that worker (of --baseline, or
of this tree) train another config: two architectures' tokens/s side by side.

--torch-ref runs the reference in the separate torch environment (torch and transformers are not project
dependencies; see scripts/bench_torch_mamba.py for installing them) as a worker process that this script
drives: rounds alternate `--steps` of ours with `--steps` of the reference, so both see the same machine
load, and the table gives median step times and their ratio. The reference of the same shape:
- decoder: `LlamaForCausalLM` (d_model, layers, heads / KV heads, head_dim, SwiGLU width, vocab, RMSNorm eps,
  RoPE base, tied embeddings; SDPA attention, causal);
- mamba: `MambaForCausalLM` (d_model, layers, d_state, d_conv, expand, dt_rank, tied), when the config has
  no MLPs (MambaForCausalLM has none);
- samba: its Mamba part as a `MambaForCausalLM` of samba's Mamba layers (the SWA and MLP layers have no
  transformers counterpart), so the ratio there is a bound on the Mamba layers only;
- dlcm: none (ours alone).
The reference trains like ours: fp32, next-token cross-entropy on the same [B, L+1] batch, AdamW with
global-norm clipping, `--threads` torch threads (0: every core, as XLA uses).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --jax-worker TREE: this file runs the train step of another source tree (--baseline), so that tree's
# packages must win the imports.
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--jax-worker" else str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402  (standard library only: runs in the torch venv)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v5p": 459.0}


# ---- the PyTorch side (runs in the torch environment) -------------------------------------------------------
def torch_spec(arch: str, m: dict) -> dict | None:
    """The transformers model of the same shape as our model config `m` (a dict), or None where none applies."""
    if arch == "decoder":
        return {"kind": "llama", "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
                "intermediate_size": m["hidden"], "num_hidden_layers": m["n_layers"],
                "num_attention_heads": m["n_heads"], "num_key_value_heads": m["kv_heads"], "head_dim": m["hd"],
                "rms_norm_eps": m["norm_eps"], "rope_theta": m["rope_base"],
                "tie_word_embeddings": m["tie_embeddings"]}
    if arch in ("mamba", "samba") and not (arch == "mamba" and m.get("mlp")):
        layers = m["n_layers"] if arch == "mamba" else (m["n_layers"] + 1) // 2
        return {"kind": "mamba", "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
                "num_hidden_layers": layers, "state_size": m["d_state"], "conv_kernel": m["d_conv"],
                "expand": m["expand"], "time_step_rank": m["dt_rank"] or -(-m["d_model"] // 16),
                "tie_word_embeddings": m["tie_embeddings"], "mamba_part_of": arch}
    return None


def torch_worker(spec: dict) -> int:
    """Build the reference, then for each stdin line N train N steps and print their times (JSON)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings")
        cfg = LlamaConfig(**{k: spec[k] for k in keys}, max_position_embeddings=spec["seq_len"],
                          rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
                          attention_bias=False, mlp_bias=False, use_cache=False)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    else:
        from transformers import MambaConfig, MambaForCausalLM
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand",
                "time_step_rank", "tie_word_embeddings")
        cfg = MambaConfig(**{k: spec[k] for k in keys}, use_cache=False, pad_token_id=0, bos_token_id=0,
                          eos_token_id=1)
        model = MambaForCausalLM(cfg)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(spec["b1"], spec["b2"]),
                            weight_decay=spec["weight_decay"])
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 256, (spec["batch"], spec["seq_len"] + 1), generator=g)

    def step():
        logits = model(input_ids=toks[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        return float(loss.detach())

    step()  # warm-up
    print(json.dumps({"ready": True, "params": int(params), "threads": torch.get_num_threads(),
                      "impl": f"transformers {type(model).__name__} (torch {torch.__version__})"}), flush=True)
    return serve_steps(step)


def serve_steps(step) -> int:
    """The worker side of the protocol: for each stdin line N run `step()` N times and print their times
    (JSON); N <= 0 or the end of stdin stops. `step` returns once its step has finished."""
    for line in sys.stdin:
        n = int(line)
        if n <= 0:
            break
        times = []
        for _ in range(n):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)
    return 0


class TorchRef:
    """The reference as a worker process (the torch environment's Python, or a baseline tree's train step)."""

    def __init__(self, python: str, spec: dict | None = None, *, argv: list | None = None):
        argv = argv or ["--torch-worker", json.dumps(spec)]
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise UserError(f"the reference did not start ({python} {argv[0]} {argv[1][:80]})")
        self.info = json.loads(line)

    def steps(self, n: int) -> list:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.write("0\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def jax_worker(argv: list) -> int:
    """The train step of the source tree on sys.path[0] (see --baseline): same protocol as torch_worker."""
    import jax

    from core import compile_cache
    from core.config import load_config
    from scripts.profile_train import setup

    compile_cache.enable(None)
    cfg = load_config(argv[0], argv[1:])
    model, trainer, state, toks, pre = setup(cfg)
    t = time.perf_counter()
    state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)
    compile_s, first_loss = time.perf_counter() - t, float(m["loss"])
    for _ in range(3):
        state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)
    print(json.dumps({"ready": True, "params": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
                      "impl": f"{cfg.name} ({sys.path[0]})", "compile_s": compile_s, "config": cfg.name,
                      "tokens": cfg.data.batch_size * cfg.data.seq_len, "flops_per_token": float(model.flops_per_token(
                          cfg.data.seq_len)), "first_loss": first_loss}),
          flush=True)

    def step():
        nonlocal state
        state, m = trainer.train_step(state, toks, pre)
        jax.block_until_ready(m)
    return serve_steps(step)


def default_torch_python() -> str | None:
    for p in (os.environ.get("LMARCH_TORCH_PYTHON"), ROOT / ".venv-torch/bin/python",
              ROOT.parent / ".venv-torch/bin/python", Path("/work/.venv-torch/bin/python")):
        if p and Path(p).exists():
            return str(p)
    return None


# ---- our side --------------------------------------------------------------------------------------------------
@cli
def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--torch-worker":
        return torch_worker(json.loads(sys.argv[2]))
    if argv is None and len(sys.argv) > 3 and sys.argv[1] == "--jax-worker":
        return jax_worker(sys.argv[3:])
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20, help="timed steps (per round with --torch-ref)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--torch-ref", action="store_true", help="alternate with the transformers model of the same shape")
    p.add_argument("--torch-python", default=None, help="the torch environment's python (default: "
                   "$LMARCH_TORCH_PYTHON, else .venv-torch/bin/python)")
    p.add_argument("--rounds", type=int, default=5, help="--torch-ref: alternating rounds")
    p.add_argument("--threads", type=int, default=0, help="--torch-ref: torch threads (0: every core)")
    p.add_argument("--baseline", default=None, metavar="TREE", help="alternate with this source tree's train step")
    p.add_argument("--baseline-config", default=None, metavar="CONFIG",
                   help="the baseline worker trains this config instead (e.g. samba vs decoder tokens/s in one run)")
    p.add_argument("--compile-cache", default=None, metavar="DIR|off", help="see core/compile_cache.py")
    p.add_argument("--out", default=None)
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise UserError(f"--steps and --rounds must be >= 1 and --warmup >= 0; got {args.steps}, {args.rounds} "
                        f"and {args.warmup}")

    import jax

    from core import compile_cache
    from core.config import load_config
    from core.mesh import batch_shards, make_mesh
    from models.contract import count_params
    from scripts.profile_train import setup

    compile_cache.enable(args.compile_cache)
    if args.compile_cache:  # the --baseline worker reads it from the environment (cold compiles compared cold)
        os.environ["LMARCH_COMPILE_CACHE"] = args.compile_cache
    cfg = load_config(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh)
    if cfg.data.batch_size % batch_shards(mesh):
        raise UserError(f"data.batch_size {cfg.data.batch_size} must divide by data*fsdp = {batch_shards(mesh)}")
    b, l = cfg.data.batch_size, cfg.data.seq_len
    ref = None
    if args.torch_ref:
        m = cfg.model
        shape = {k: getattr(m, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "norm_eps", "rope_base",
                                            "tie_embeddings", "d_state", "d_conv", "expand", "dt_rank", "mlp")
                 if hasattr(m, k)}
        shape.update({k: getattr(m, k) for k in ("kv_heads", "hd", "hidden") if hasattr(type(m), k)})
        spec = torch_spec(m.arch, shape)
        if spec is None:
            print(f"(no transformers reference for arch {m.arch!r}: ours alone)")
        else:
            python = args.torch_python or default_torch_python()
            if python is None or not Path(python).exists():
                raise UserError(f"--torch-ref needs the torch environment's python: {python or 'none found'} "
                                f"(give --torch-python or set LMARCH_TORCH_PYTHON)")
            t = cfg.train
            spec.update(batch=b, seq_len=l, lr=t.lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                        grad_clip=t.grad_clip, threads=args.threads)
            ref = TorchRef(python, spec)

    base = None
    if args.baseline or args.baseline_config:
        tree = Path(args.baseline or ROOT)
        if not (tree / "scripts/profile_train.py").is_file():
            raise UserError(f"--baseline {tree}: not a source tree of this project (no scripts/profile_train.py)")
        if args.baseline_config and not Path(args.baseline_config).is_file():
            raise UserError(f"--baseline-config {args.baseline_config}: no such file")
        worker_cfg = [args.baseline_config] if args.baseline_config else [args.config, *args.overrides]
        base = TorchRef(sys.executable, argv=["--jax-worker", str(tree.resolve()), *worker_cfg])

    model, trainer, state, toks, pre = setup(cfg)
    n_params = count_params(model)
    fpt = float(model.flops_per_token(l))
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)
    compile_s, first_loss = time.perf_counter() - t0, float(m["loss"])
    for _ in range(args.warmup):
        state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)

    ours, theirs, based = [], [], []
    load = [os.getloadavg()[0]]  # a 2-core machine's other jobs move both sides' step times (torch's most)
    for _ in range(args.rounds if ref or base else 1):
        for _ in range(args.steps):
            t = time.perf_counter()
            state, m = trainer.train_step(state, toks, pre)
            jax.block_until_ready(m)
            ours.append(time.perf_counter() - t)
        if base:
            based += base.steps(args.steps)
        if ref:
            theirs += ref.steps(args.steps)
    load.append(os.getloadavg()[0])
    for w in (ref, base):
        if w:
            w.close()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    matmul = None
    if jax.default_backend() == "cpu":
        from scripts.profile_train import matmul_flops_per_s
        matmul = matmul_flops_per_s()

    def row(name, arch, params, times, impl, tokens=b * l, flops=fpt):
        step_s = statistics.median(times)
        tps = tokens / step_s
        r = {"config": name, "impl": impl, "arch": arch, "params": int(params), "device": kind,
             "devices": mesh.size, "dtype": cfg.model.dtype, "batch": b, "seq_len": l, "steps": len(times),
             "step_ms_median": step_s * 1e3, "tokens_per_s": tps, "model_tflops_per_s": tps * flops / 1e12,
             "mfu": (tps * flops) / (peak * 1e12 * mesh.size) if peak else None,
             "matmul_frac": tps * flops / matmul if matmul else None, "load_avg": load}
        return r

    rows = [row(cfg.name, cfg.model.arch, n_params, ours, "ours (jax)")]
    rows[0].update(compile_s=compile_s, first_loss=first_loss, loss=float(m["loss"]))
    if base:
        r = row(base.info["config"], "", base.info["params"], based, base.info["impl"], base.info["tokens"],
                base.info["flops_per_token"])
        r.update(compile_s=base.info["compile_s"], first_loss=base.info["first_loss"])
        rows.append(r)
        rows[0]["vs_baseline"] = rows[0]["tokens_per_s"] / r["tokens_per_s"]
    if ref:
        r = row(cfg.name, spec["kind"], ref.info["params"], theirs, ref.info["impl"])
        r["threads"] = ref.info["threads"]
        r["note"] = ("the Mamba layers of samba only; FLOPs per token are ours" if spec.get("mamba_part_of") ==
                     "samba" else "same shape; FLOPs per token are ours")
        rows.append(r)
        ratio = rows[0]["tokens_per_s"] / r["tokens_per_s"]
        rows[0]["vs_torch"] = ratio
    for r in rows:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if ref or base:
        print(f"\n| {cfg.name} | params | step ms (median) | tokens/s | model GFLOP/s | of matmul |\n"
              "|---|---:|---:|---:|---:|---:|")
        for r in rows:
            frac = f"{100 * r['matmul_frac']:.0f}%" if r["matmul_frac"] else "-"
            print(f"| {r['impl']} | {r['params']:,} | {r['step_ms_median']:.0f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['model_tflops_per_s'] * 1e3:.1f} | {frac} |")
        if base:
            print(f"ours / baseline tokens/s: {rows[0]['vs_baseline']:.2f}x (first step's loss {rows[0]['first_loss']:.7f} vs "
                  f"{rows[1]['first_loss']:.7f}; compile {rows[0]['compile_s']:.1f} s vs {rows[1]['compile_s']:.1f} s)")
        if ref:
            print(f"ours / reference tokens/s: {ratio:.2f}x ({len(ours)} + {len(theirs)} steps in {args.rounds} "
                  f"alternating rounds)")
        print(f"load average (1 min) before / after timing: {load[0]:.1f} / {load[1]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
