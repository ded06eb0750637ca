"""Where the time of a speculative step goes: device work, the size chain, the host callback, the host's Python.

    python scripts/profile_spec.py [--configs configs/decoder_tiny.toml ...] [--runs RUN_DIR ...]
        [--steps 64] [--rounds 7] [--max-draft 4] [--out profile.json] [--ops | --device-ops]

For each model and verify size K (drafts always rejected, batch 1), one process times, alternating rounds
(A, B, C, ... A, B, C ...) and keeping medians of CPU time per step:
- `plain`: a step of the plain generation loop (Engine.generate);
- `device K`: K+1 tokens through extend + acceptance + commit in a jitted fori_loop (no host, no size chain);
- `chain K`: the speculative loop with the host replaced by a traced stub (the size selection, loop
  carry and emitted-array plumbing, but no callback);
- `callback K`: the same with a host callback that returns the stub's answer from numpy (the callback's fixed
  cost);
- `spec K`: Engine.generate_speculative with a drafter of K rejected tokens (everything: the host's Python);
  `spec 0` drafts nothing, so the loop runs plain stretches (1, 2, 4, ... steps per host call);
- `nostretch`: `spec 0` with max_stretch=1: one plain step and one host call per token (the loop before
  plain stretches).
Differences between consecutive rows are the cost of each layer. Per-step times are differences of a
2N-step and an N-step run, so prefill and the request's fixed cost cancel; in CPU time of this process (on
a shared machine a step's wall time is mostly waiting for a core). `--ops`: XLA's own per-op profile of the
whole speculative loop. `--device-ops`: the same for the isolated steps (the plain loop's step and a verify step
of K+1 tokens, no host, no size chain), each op's median time x its count (robust to preemption on a loaded
machine), ops grouped by source line with their shapes, and any cache-sized copy in the optimized HLO.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from core.errors import ArgumentParser, UserError, cli  # noqa: E402
from decode.engine import Engine, _FixedDraft, verify_sizes_for  # noqa: E402
from decode.loops import Loops  # noqa: E402
from decode.speculation import host_callback  # noqa: E402


def _engine(args, src):
    kw = {} if args.spec_options is None else {"spec_compiler_options": json.loads(args.spec_options)}
    if src.endswith(".toml"):
        from core.config import load_config
        from models.registry import build_model

        cfg = load_config(src)
        return cfg.model.arch, Engine(build_model(cfg.model, seed=0), max_len=cfg.decode.max_len,
                                      verify_sizes=verify_sizes_for(args.max_draft), **kw)
    from decode.engine import engine_for_run

    cfg, _, eng = engine_for_run(src, verify_sizes=verify_sizes_for(args.max_draft), **kw)
    return cfg.model.arch, eng


class Probe:
    def __init__(self, engine: Engine, prompt_len: int):
        self.e = engine
        rng = np.random.default_rng(0)
        self.prompt = [rng.integers(1, min(engine.vocab_size, 256), prompt_len).astype(np.int32)]
        self.km = engine.verify_sizes[-1] + 1
        lp = engine._loops
        self.sizes = engine.verify_sizes
        km, pad = self.km, engine.pad_id

        def stub(kk):  # the host's answer, traced: pad inputs, draft length K, live
            def f(shape, emitted):
                b = emitted.shape[0]
                k = jnp.minimum(emitted[:, km], 0) + kk  # K at run time, but opaque to XLA (counts >= 1)
                return jnp.concatenate([jnp.full((b, km), pad, jnp.int32), k[:, None], jnp.ones((b, 1), jnp.int32),
                                        jnp.full((b, 1), 1 << 20, jnp.int32)], 1)
            return f

        def np_stub(shape, emitted):
            def fn(e):
                out = np.zeros(shape.shape, np.int32)
                out[:, :km] = pad
                out[:, km] = self._kk
                out[:, km + 1] = 1
                out[:, km + 2] = 1 << 20  # room
                return out
            return host_callback(fn, shape, emitted)

        self._kk = 0
        mk = dict(max_len=lp.max_len, pad_id=pad, verify_sizes=lp.verify_sizes, prefix_prompt=False)
        # one compile per K for the stub (K is a constant of it; the size chain still runs on a traced length)
        self.chain_loops = {k: Loops(lp.graphdef, lp.params_def, host_call=stub(k), **mk) for k in self.sizes}
        self.cb_loops = Loops(lp.graphdef, lp.params_def, host_call=np_stub, **mk)
        self._device = {}

    def _req(self, n):
        return self.e._prepare(self.prompt, max_new_tokens=n + self.km + 1, stop_ids=(), temperature=0.0, top_k=0,
                               top_p=1.0, seed=0, batch_size=None)

    def plain(self, n):
        self.e.generate(self.prompt, max_new_tokens=n + 1, stop_ids=())

    def spec(self, k, n, max_stretch=None):
        self.e.generate_speculative(self.prompt, [_FixedDraft(k)], max_new_tokens=n + self.km + 1, stop_ids=(),
                                    max_stretch=max_stretch)
        # drafts are rejected (but for chance): each step emits one token; K=0 runs plain stretches

    def device(self, k, n):
        fn = self._device.get(k)
        lp = self.e._loops
        if fn is None:
            def run(params, cache, inputs, draft_len, live, keys, knobs, steps):
                model = lp._model(params)

                def body(i, c):
                    return lp._verify_step(model, c, inputs[:, :k + 1], draft_len, live, keys, knobs, 0)[0]
                return jax.lax.fori_loop(0, steps, body, cache)
            # compiled as the speculative loop is (Engine(spec_compiler_options): YNNPACK fusion off on CPU)
            fn = self._device[k] = jax.jit(run, donate_argnums=(1,), compiler_options=lp.spec_options or None)
        req = self._req(n)
        state, _ = self.e._start(req)
        b = state.cache.lengths.shape[0]
        inputs = np.zeros((b, self.km), np.int32)
        jax.block_until_ready(fn(self.e.params, state.cache, inputs, np.full(b, k, np.int32), np.ones(b, bool),
                                 req.keys_Bx2, req.knobs, np.int32(n)))

    def _loop(self, loops, k, n):
        req = self._req(n)
        state, _ = self.e._start(req)
        b = state.cache.lengths.shape[0]
        self._kk = k
        inputs = np.full((b, self.km), self.e.pad_id, np.int32)
        out = loops.speculate(self.e.params, state.cache, inputs, np.full(b, k, np.int32), np.ones(b, bool),
                              np.full(b, 1 << 20, np.int32), np.int32(n), np.int32(1), req.stop_S, req.keys_Bx2,
                              req.knobs, observe_k=0)
        jax.block_until_ready(out)

    def chain(self, k, n):
        self._loop(self.chain_loops[k], k, n)

    def callback(self, k, n):
        self._loop(self.cb_loops, k, n)


OP_RULES = (
    ("decode/sampling.py", "", "acceptance / sampling"),
    ("decode/loops.py", "Loops._verify_step", "acceptance / sampling"),
    ("decode/loops.py", "", "loop plumbing"),
    ("decode/speculation.py", "", "host callback"),
    ("models/attention.py", "", "attention"),
    ("models/contract.py", "", "attention"),
    ("models/layers.py", "scatter_rows", "cache writes"),
    ("models/layers.py", "", "layers (matmul, norm, rope)"),
    ("flax/", "", "layers (matmul, norm, rope)"),
    ("models/mamba.py", "", "mamba"),
    ("models/dlcm.py", "", "dlcm"),
    ("models/base.py", "", "layers (matmul, norm, rope)"),
)


def op_group(stack) -> str:
    """The group of an op from its source stack (file path, function, line), first rule of OP_RULES that
    matches a frame; "other" when none does."""
    for path, fn, _ in stack:
        for suf, pre, gr in OP_RULES:
            if suf in path and fn.startswith(pre):
                return gr
    return "other"


def op_profile(p: Probe, k: int, steps: int, top: int = 12) -> dict:
    """XLA's per-op CPU time (jax.profiler) of `steps` speculative steps at size k (k = -1: the plain loop),
    grouped by the source line that emitted each op (scripts/profile_train.py's HLO attribution)."""
    import collections
    import glob
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts"))
    from profile_train import parse_hlo

    e = p.e
    req = p._req(steps)
    if k < 0:
        state, _ = e._start(req)
        hlo = e._loops.generate.lower(e.params, state, np.int32(steps), req.stop_S, req.knobs).compile().as_text()
        run = lambda: p.plain(steps)  # noqa: E731
    else:
        state, _ = e._start(req)
        b = state.cache.lengths.shape[0]
        hlo = e._loops.speculate.lower(e.params, state.cache, np.zeros((b, p.km), np.int32), np.zeros(b, np.int32),
                                       np.ones(b, bool), np.zeros(b, np.int32), np.int32(1), np.int32(1), req.stop_S,
                                       req.keys_Bx2, req.knobs, observe_k=0).compile().as_text()
        run = lambda: p.spec(k, steps)  # noqa: E731
    run()
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # the Python tracer costs more than the step
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, profiler_options=opts):
            run()
        wall = time.perf_counter() - t0
        pd = jax.profiler.ProfileData.from_file(sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))[-1])
    per_op = collections.Counter()
    for plane in pd.planes:
        if plane.name != "/host:CPU":
            continue
        for ln in plane.lines:
            for ev in ln.events:
                if "::" in ev.name or ev.name.startswith(("$", "while", "conditional", "call", "cond.")):
                    continue
                per_op[ev.name] += ev.duration_ns
    info = parse_hlo(hlo)
    groups = collections.Counter()
    rows = []
    # XLA ops only; containers (while loops, conditionals) are skipped above, the ops of their bodies count
    per_op = collections.Counter({n: ns for n, ns in per_op.items() if n in info})
    for name, ns in per_op.most_common():
        stk, _ = info.get(name, ([], False))
        g = op_group(stk)
        groups[g] += ns
        rows.append((name, ns / 1e3 / steps, g, f"{Path(stk[0][0]).name}:{stk[0][2]}" if stk else ""))
    label = "plain" if k < 0 else f"spec K={k}"
    total = sum(per_op.values())
    print(f"\n{label}: {steps} steps, wall (profiled) {1e3 * wall / steps:.3f} ms/step, op time "
          f"{total / 1e6 / steps:.3f} ms/step")
    for g, ns in groups.most_common():
        print(f"  {g:40s} {ns / 1e3 / steps:8.1f} us/step")
    for r in rows[:top]:
        print(f"    {r[0]:50s} {r[1]:8.1f} us  {r[2]}  {r[3]}")
    return {"label": label, "groups_us": {g: ns / 1e3 / steps for g, ns in groups.items()}}


def _hlo_shapes(hlo: str) -> dict:
    """{instruction name: 'result shape <- operand shapes'} of the optimized HLO (to name unattributed ops)."""
    import re

    out = {}
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\((.*?)\)", line)
        if m:
            ops = re.findall(r"(f32|s32|pred|u32|bf16|s8|u8)\[([\d,]*)\]", m.group(4))
            out[m.group(1)] = f"{m.group(3)} {m.group(2).split('{')[0]} <- " + " ".join(f"{t}[{d}]" for t, d in ops)
    return out


def cache_copies(hlo: str, cache_shapes: set) -> list:
    """Instructions of the optimized HLO that copy a whole cache-shaped buffer (copy, or a fusion whose result
    is a cache leaf's shape and whose root is not an in-place update)."""
    import re

    hits = []
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(f32|bf16)\[([\d,]+)\]\S*\s+(copy|copy-start|fusion)\(", line)
        if m and tuple(int(x) for x in m.group(3).split(",")) in cache_shapes:
            if m.group(4) == "fusion" and ("dynamic-update-slice" in line or "scatter" in line or "kind=kLoop" not in line):
                continue
            hits.append(f"{m.group(1)} {m.group(4)} {m.group(2)}[{m.group(3)}]")
    return hits


def _branch_owner(hlo: str) -> dict:
    """{instruction name: its enclosing conditional} for the ops inside a conditional's branches (XLA drops
    their source metadata; they belong to the conditional's source line, e.g. the attention's prefix switch)."""
    import re

    comps, cur, conds = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and "=" not in line.split("{")[0]:
            cur = comps.setdefault(m.group(1), [])
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if m and cur is not None:
            cur.append((m.group(1), re.findall(r"(?:calls|to_apply|branch_computations)=\{?([^}]*?)[},]\s", line + " ")
                        and re.findall(r"%([\w.\-]+)", line.split("metadata")[0].split(")", 1)[-1])))
            if " conditional(" in line:
                conds.append((m.group(1), re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[-1]
                                                     .split("}")[0])))
    owner = {}

    def mark(comp, cond, seen):
        for name, called in comps.get(comp, []):
            owner.setdefault(name, cond)
            for c in called or []:
                if c in comps and c not in seen:
                    seen.add(c)
                    mark(c, cond, seen)

    for cond, branches in conds:
        for br in branches:
            mark(br, cond, {br})
    return owner


def device_op_profile(p: Probe, k: int, steps: int, top: int = 25) -> dict:
    """XLA's per-op CPU time of the isolated step (no host, no size chain): the plain loop's body (k < 0) or
    `steps` verify steps of K+1 tokens in a jitted fori_loop (extend + acceptance + commit), ops attributed to
    source lines (scripts/profile_train.py's HLO parser), with each op's shapes; and any cache-sized copy in
    the optimized HLO."""
    import collections
    import glob
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts"))
    from profile_train import parse_hlo

    e = p.e
    req = p._req(steps)
    state, _ = e._start(req)
    cache_shapes = {tuple(x.shape) for x in jax.tree.leaves(state.cache.layers) if x.ndim >= 3}
    if k < 0:
        hlo = e._loops.generate.lower(e.params, state, np.int32(steps), req.stop_S, req.knobs).compile().as_text()
        run = lambda: p.plain(steps)  # noqa: E731
    else:
        p.device(k, 2)  # compiles
        b = state.cache.lengths.shape[0]
        hlo = p._device[k].lower(e.params, state.cache, np.zeros((b, p.km), np.int32), np.full(b, k, np.int32),
                                 np.ones(b, bool), req.keys_Bx2, req.knobs, np.int32(steps)).compile().as_text()
        run = lambda: p.device(k, steps)  # noqa: E731
    run()
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, profiler_options=opts):
            run()
        pd = jax.profiler.ProfileData.from_file(sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))[-1])
    info, shapes, owner = parse_hlo(hlo), _hlo_shapes(hlo), _branch_owner(hlo)
    per_op, durations = collections.Counter(), collections.defaultdict(list)
    for plane in pd.planes:
        if plane.name != "/host:CPU":
            continue
        for ln in plane.lines:
            for ev in ln.events:
                # containers (loops, conditionals: the attention's prefix switch) hold ops that are counted
                if ev.name in info and not ev.name.startswith("while") and \
                        not shapes.get(ev.name, "").startswith(("while", "conditional", "call")):
                    durations[ev.name].append(ev.duration_ns)
    # Each op's median duration times its count: on a loaded machine a preempted op lasts 10-100x its usual
    # time, and the sum of raw durations moved by 2x between runs; the medians are stable.
    for name, ds in durations.items():
        per_op[name] = float(np.median(ds)) * len(ds)
    groups, rows = collections.Counter(), []
    for name, ns in per_op.most_common():
        stk, _ = info.get(name, ([], False))
        if not stk and name in owner:  # inside a conditional's branch: the conditional's source line
            stk = info.get(owner[name], ([], False))[0]
        g = op_group(stk)
        if g == "other" and shapes.get(name, "").startswith(("dot", "fusion")) and "dot" in name:
            g = "layers (matmul, norm, rope)"  # dots whose metadata XLA dropped
        groups[g] += ns
        where = f"{Path(stk[0][0]).name}:{stk[0][2]}" if stk else ""
        rows.append((name, ns / 1e3 / steps, g, where, shapes.get(name, "")))
    label = "plain step" if k < 0 else f"verify 1+{k} (isolated)"
    total = sum(per_op.values())
    copies = cache_copies(hlo, cache_shapes)
    print(f"\n{label}: op time {total / 1e3 / steps:.1f} us/step (sum of each op's median x count; {len(per_op)} ops), "
          f"cache-sized copies in the "
          f"optimized HLO: {copies or 'none'}")
    for g, ns in groups.most_common():
        print(f"  {g:32s} {ns / 1e3 / steps:8.1f} us/step")
    for r in rows[:top]:
        print(f"    {r[1]:7.1f} us  {r[0]:34s} {r[2]:28s} {r[3]:18s} {r[4][:90]}")
    return {"label": label, "total_us": total / 1e3 / steps, "groups_us": {g: ns / 1e3 / steps for g, ns in
                                                                           groups.items()},
            "ops": [dict(zip(("name", "us", "group", "line", "shapes"), r)) for r in rows], "cache_copies": copies}


def per_step(fn, n, clock=time.process_time):
    t0 = clock()
    fn(n)
    t1 = clock()
    fn(2 * n)
    t2 = clock()
    return ((t2 - t1) - (t1 - t0)) / n


def profile(name, engine, args) -> dict:
    p = Probe(engine, args.prompt_len)
    sizes = [k for k in engine.verify_sizes]
    rows = {"plain": lambda n: p.plain(n), "nostretch": lambda n: p.spec(0, n, max_stretch=1)}
    for k in sizes:
        rows[f"device {k}"] = lambda n, k=k: p.device(k, n)
        rows[f"chain {k}"] = lambda n, k=k: p.chain(k, n)
        rows[f"callback {k}"] = lambda n, k=k: p.callback(k, n)
        rows[f"spec {k}"] = lambda n, k=k: p.spec(k, n)
    if args.only:
        keep = args.only.split(",")
        rows = {r: f for r, f in rows.items() if r.split()[0] in keep}
    for f in rows.values():  # compile
        f(2)
    samples = {r: [] for r in rows}
    for _ in range(args.rounds):
        for r, f in rows.items():
            samples[r].append(per_step(f, args.steps))
    med = {r: 1e3 * float(np.median(v)) for r, v in samples.items()}
    print(f"\n{name}: CPU ms per step (medians of {args.rounds} alternating rounds, {args.steps} vs "
          f"{2 * args.steps} steps)")
    print("| K | device | chain | callback | spec (all) | spec / plain |")
    print("|---|---|---|---|---|---|")
    cell = lambda r: f"{med[r]:.3f}" if r in med else "-"  # noqa: E731
    print(f"plain {cell('plain')}; no draft without stretches (one host call per step) {cell('nostretch')}"
          + (f" = {med['nostretch'] / med['plain']:.2f}x" if "nostretch" in med and "plain" in med else ""))
    for k in sizes:
        ratio = f"{med[f'spec {k}'] / med['plain']:.2f}x" if f"spec {k}" in med and "plain" in med else "-"
        print(f"| {k} | {cell(f'device {k}')} | {cell(f'chain {k}')} | {cell(f'callback {k}')} | "
              f"{cell(f'spec {k}')} | {ratio} |")
    return {"name": name, "ms": med}


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=[])
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--only", help="comma-separated row kinds to time: plain, nostretch, device, chain, callback, "
                    "spec")
    ap.add_argument("--ops", action="store_true", help="XLA per-op profile of the plain loop and each verify size")
    ap.add_argument("--device-ops", action="store_true", help="XLA per-op profile of the isolated steps: the plain "
                    "loop and K+1 tokens of extend + acceptance + commit per verify size (no host, no size chain), "
                    "with op shapes and the cache-sized copies of the optimized HLO")
    ap.add_argument("--spec-options", help="XLA compiler options of the speculative loop as JSON (default: the "
                    "engine's, decode.engine.spec_default_options), e.g. '{}' for XLA's defaults")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not args.configs and not args.runs:
        raise UserError("give --configs and/or --runs")
    if args.spec_options is not None:
        try:
            if not isinstance(json.loads(args.spec_options), dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise UserError(f"--spec-options must be a JSON object of XLA options; got {args.spec_options!r} ({e})")
    out = []
    for src in args.configs + args.runs:
        name, eng = _engine(args, src)
        if args.device_ops:
            p = Probe(eng, args.prompt_len)
            out.append({"name": name, "device_ops": [device_op_profile(p, k, args.steps)
                                                     for k in (-1,) + tuple(k for k in eng.verify_sizes if k)]})
        elif args.ops:
            p = Probe(eng, args.prompt_len)
            out.append({"name": name, "ops": [op_profile(p, k, args.steps) for k in (-1,) + eng.verify_sizes]})
        else:
            out.append(profile(name, eng, args))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
