"""Where one training step's time goes: XLA's own per-op profile of the real train step, grouped by source.

    python scripts/profile_train.py configs/decoder_tiny.toml [overrides] [--steps 3] [--top 15] [--out FILE.json]

Runs the jitted `train_step` of `python -m train` (train/loop.py, Trainer) under `jax.profiler.trace`, reads
the XSpace it writes (`jax.profiler.ProfileData`) and adds up the time of every executed XLA op (CPU thunks:
fusions, dots, copies; ops inside loops once per iteration). Each op is attributed through the compiled
HLO's metadata to the source line that emitted it, and so to a group:

  matmul (params)     products with a weight matrix (q/k/v, out, MLP, Mamba projections, the tied head)
  mlp elementwise     the same layers' other ops (SwiGLU's gate, pads and copies around the products)
  attention           scores, masks, softmax and the products with keys/values
  rope / norm         rotary embedding, RMSNorm
  loss                log-softmax and the target gather over the vocabulary
  mamba scan          the selective scan (its recurrence and rematerialisation)
  mamba other         causal conv, dt, gates
  dlcm segments       DLCM's boundary, segment sums/means and gathers
  optimizer           clipping and AdamW (optax)
  other               copies, transposes and what has no source line

and, orthogonally, by kind: ops that contain a dot (matrix products) and the rest. The report also gives the
step's model FLOP/s (`model.flops_per_token`) against the machine's measured fp32 matmul FLOP/s (a large
square matmul timed here), i.e. the fraction of reachable matmul throughput the step achieves.
"""

from __future__ import annotations

import collections
import glob
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402

GROUPS = ("matmul (params)", "mlp elementwise", "attention", "rope / norm", "loss", "embedding", "mamba scan", "mamba other",
          "dlcm segments", "optimizer", "other")

# Walking the op's stack from the innermost frame out, the first frame matching (file suffix, qualified
# function name prefix) decides its group ("" matches any function of the file).
RULES = (
    ("models/layers.py", "tokens_matmul", "matmul (params)"),
    ("models/layers.py", "tied_logits", "matmul (params)"),
    ("models/layers.py", "_silu_mul", "mlp elementwise"),
    ("models/layers.py", "_split", "mlp elementwise"),
    ("models/layers.py", "_rotate_half", "rope / norm"),
    ("models/layers.py", "rotate_pairs", "rope / norm"),
    ("models/layers.py", "rope", "rope / norm"),
    ("models/layers.py", "RMSNorm", "rope / norm"),
    ("models/layers.py", "Projection", "matmul (params)"),
    ("models/layers.py", "SwiGLU", "matmul (params)"),
    ("flax/nnx/nn/linear.py", "", "matmul (params)"),
    ("flax/nnx/nn/", "", "embedding"),
    ("models/base.py", "LM._logits", "matmul (params)"),
    ("models/base.py", "LM._embed", "embedding"),
    ("train/loop.py", "loss_terms", "loss"),
    ("train/loop.py", "target_weights", "loss"),
    ("models/mamba.py", "selective_scan", "mamba scan"),
    ("models/mamba.py", "_seq_", "mamba scan"),
    ("models/mamba.py", "_ssm_step", "mamba scan"),  # the scan's helpers (innermost frames inside its loops)
    ("models/mamba.py", "_sum_n", "mamba scan"),
    ("models/mamba.py", "_at", "mamba scan"),
    ("models/mamba.py", "_put", "mamba scan"),
    ("models/mamba.py", "", "mamba other"),
    ("models/attention.py", "", "attention"),
    ("models/contract.py", "key_visible", "attention"),
    ("models/dlcm.py", "", "dlcm segments"),
    ("optax/", "", "optimizer"),
    ("train/loop.py", "Trainer.build_steps.<locals>.train_step", "optimizer"),
)


def classify(stack: list) -> str:
    """stack: [(file, function, line)] innermost first."""
    for path, fn, _ in stack:
        for suffix, prefix, group in RULES:
            if suffix in path and fn.startswith(prefix):
                return group
    return "other"


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_DOT = re.compile(r"\s(dot|convolution)\(")


def _tables(text: str):
    """The HLO text's FileNames / FunctionNames / FileLocations / StackFrames tables."""
    tabs, cur = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = tabs.setdefault(line, {})
            continue
        if cur is not None:
            m = re.match(r"^(\d+) (.*)$", line)
            if not m:
                cur = None
                continue
            cur[int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in tabs.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tabs.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tabs.get("FileLocations", {}).items():
        d = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = (files.get(int(d.get("file_name_id", 0)), ""), funcs.get(int(d.get("function_name_id", 0)), ""),
                   int(d.get("line", 0)))
    frames = {}
    for k, v in tabs.get("StackFrames", {}).items():
        d = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[k] = (int(d.get("file_location_id", 0)), int(d.get("parent_frame_id", 0)))
    return locs, frames


def parse_hlo(text: str):
    """{instruction name: (stack innermost first, has_dot)} from optimized HLO text; a fusion is attributed
    to its first dot if it has one, else to its own metadata."""
    locs, frames = _tables(text)

    def stack(fid):
        out, seen = [], set()
        while fid and fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            if loc in locs:
                out.append(locs[loc])
            fid = parent
        return out

    comps, cur = {}, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)

    def dot_frame(comp, seen=()):
        for ln in comps.get(comp, []):
            if _DOT.search(ln):
                f = _FRAME.search(ln)
                return int(f.group(1)) if f else -1
            for c in _CALLS.findall(ln):
                if c not in seen:
                    r = dot_frame(c, seen + (comp,))
                    if r is not None:
                        return r
        return None

    info = {}
    for comp, lines in comps.items():
        for ln in lines:
            m = _INSTR.match(ln)
            if not m:
                continue
            name, rest = m.groups()
            f = _FRAME.search(rest)
            fid = int(f.group(1)) if f else 0
            dot = bool(_DOT.search(" " + rest.split(", metadata")[0]))
            for c in _CALLS.findall(rest):
                df = dot_frame(c)
                if df is not None:
                    dot = True
                    if df > 0:
                        fid = df
                    break
            info[name] = (stack(fid), dot)
    return info


def matmul_flops_per_s(n: int = 1024, repeats: int = 5) -> float:
    """The machine's measured fp32 matmul throughput (the best of `repeats` n x n x n products)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def profile(trainer, state, toks, pre, steps: int):
    """(per-op ns summed over `steps` profiled steps, median step seconds, compiled HLO text)."""
    import jax

    state, m = trainer.train_step(state, toks, pre)
    jax.block_until_ready(m)
    hlo = trainer.train_step.lower(state, toks, pre).compile().as_text()
    times = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                t = time.perf_counter()
                state, m = trainer.train_step(state, toks, pre)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
        files = sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))
        pd = jax.profiler.ProfileData.from_file(files[-1])
        per_op = collections.Counter()
        for plane in pd.planes:
            if plane.name != "/host:CPU":
                continue
            for ln in plane.lines:
                if not ("Eigen" in ln.name or "PjRt" in ln.name):
                    continue
                for ev in ln.events:
                    if "::" in ev.name or ev.name.startswith(("$", "while", "conditional", "call")):
                        continue  # executor bookkeeping, waits and control flow (its body's ops count)
                    per_op[ev.name] += ev.duration_ns
    times.sort()
    return per_op, times[len(times) // 2], hlo


def setup(cfg, seed: int = 0):
    """(model, trainer, step-0 state, tokens [B, L+1], prefix lengths [B]) for the real train step of `cfg`
    (train.loop.build_trainer) on a fixed random batch, placed as the training loop places it. Shared with
    scripts/bench_train.py and tests/test_train_speed.py."""
    import jax
    import numpy as np

    from core.mesh import batch_sharding, make_mesh
    from train.loop import build_trainer, init_model

    mesh = make_mesh(cfg.mesh)
    model = init_model(cfg.model, seed=seed)
    trainer, params = build_trainer(cfg, model, mesh)
    state = trainer.init_state(params)
    b, l = cfg.data.batch_size, cfg.data.seq_len
    ds = batch_sharding(mesh)
    toks = jax.device_put(np.random.default_rng(0).integers(0, 256, (b, l + 1)).astype(np.int32), ds)
    pre = jax.device_put(np.full((b,), l // 2, np.int32), ds)
    return model, trainer, state, toks, pre


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1; got {args.steps}")
    from core import compile_cache

    compile_cache.enable()
    from core.config import load_config

    cfg = load_config(args.config, args.overrides)
    model, trainer, state, toks, pre = setup(cfg)
    per_op, step_s, hlo = profile(trainer, state, toks, pre, args.steps)
    info = parse_hlo(hlo)
    groups, kinds, rows = collections.Counter(), collections.Counter(), []
    total = sum(per_op.values()) or 1
    for name, ns in per_op.most_common():
        stk, dot = info.get(name, ([], False))
        g = classify(stk)
        if g == "matmul (params)" and not dot:
            g = "mlp elementwise"  # SwiGLU's gate, a projection's pads and copies: no product
        groups[g] += ns
        kinds["dot" if dot else "non-dot"] += ns
        rows.append({"op": name, "ms_per_step": ns / 1e6 / args.steps, "share": ns / total, "group": g,
                     "dot": dot, "source": f"{Path(stk[0][0]).name}:{stk[0][2]} {stk[0][1]}" if stk else ""})
    tokens = cfg.data.batch_size * cfg.data.seq_len
    fpt = float(model.flops_per_token(cfg.data.seq_len))
    peak = matmul_flops_per_s()
    achieved = tokens * fpt / step_s
    print(f"{cfg.name}: step {step_s * 1e3:.0f} ms (median of {args.steps}), {tokens / step_s:,.0f} tokens/s, "
          f"op time {total / 1e6 / args.steps:.0f} ms/step; model {achieved / 1e9:.1f} GFLOP/s = "
          f"{100 * achieved / peak:.0f}% of the measured matmul {peak / 1e9:.1f} GFLOP/s")
    print("| group | ms/step | share |\n|---|---:|---:|")
    for g in GROUPS:
        if groups[g]:
            print(f"| {g} | {groups[g] / 1e6 / args.steps:.1f} | {100 * groups[g] / total:.1f}% |")
    print(f"| (ops with a dot) | {kinds['dot'] / 1e6 / args.steps:.1f} | {100 * kinds['dot'] / total:.1f}% |")
    print(f"\ntop {args.top} ops\n| op | ms/step | share | group | source |\n|---|---:|---:|---|---|")
    for r in rows[:args.top]:
        print(f"| {r['op']}{' (dot)' if r['dot'] else ''} | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% | "
              f"{r['group']} | {r['source']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "config": cfg.name, "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
            "model_gflops_per_s": achieved / 1e9, "matmul_gflops_per_s": peak / 1e9,
            "fraction_of_matmul": achieved / peak,
            "groups_ms": {g: groups[g] / 1e6 / args.steps for g in GROUPS},
            "dot_share": kinds["dot"] / total, "ops": rows[:100]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
