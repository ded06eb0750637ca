"""The decoding engine: the facade users call (generate, stream, generate_speculative, warmup).

One Engine serves one model at one cache size. The work is split as gemma splits its sampler
(docs/ARCHITECTURE.md, "A speculative decoding step"):
- decode/request.py checks a request into a `Request` of fixed-shape arrays and defines `Result`;
- decode/loops.py holds the jitted prefill, plain loop and speculative loop over typed states;
- decode/speculation.py is the host side of speculation (drafters, emitted tokens, the host callback).
The engine uses only the model contract (models/contract.py): `init_cache`, `extend`, `commit`,
`cache.lengths`, `vocab_size`, and `supports_prefix` when a prefix-LM prefill is asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from core.errors import UserError
from decode.loops import Loops
from decode.request import Limits, Request, Result, check_prompt, prepare
from decode.speculation import Host, SpeculativeRun, observing, step_clock, step_elapsed
from models.mamba import Mamba

VERIFY_SIZES = (0, 1, 2, 4, 8, 16)  # 0: no draft this step, a plain step inside the loop

__all__ = ["Engine", "Result", "VERIFY_SIZES", "engine_for_run", "default_max_draft", "verify_sizes_for",
           "spec_default_options"]


def default_max_draft() -> int:
    """Measured on the 26M decoder, 2-core CPU: max draft 4 gave 2.5x (sam) against 1.4x with 8, because a
    K=8 verify costs ~3.5 plain steps there; on an H100 a K=16 verify costs about one plain step."""
    return 4 if jax.default_backend() == "cpu" else 16


def spec_default_options(model=None) -> dict:
    """XLA options for the speculative loop. On CPU, YNNPACK fusion off for models without Mamba layers: XLA:CPU
    0.10 turns every 2-17 row product of a verify step into a `ynn_fusion` gemm that costs ~4x the one-row gemv
    of a plain step (decoder_s0, scripts/profile_spec.py --ops); with it off the same loop ran 20-25% less CPU
    time per step at every verify size (0.71 -> 0.57 ms at 1+1, 0.78 -> 0.60 ms at 1+4, interleaved in one
    process, load ~7), and dlcm_s0 gained at 1+4 (2.95x -> 2.40x plain). samba_s0 lost (1+1 2.03x -> 2.55x, same
    A/B), so a model with a Mamba layer keeps XLA's default; so does `Engine(spec_compiler_options={})`. Only
    the speculative loop is compiled so; prefill and the plain loop keep XLA's defaults."""
    if jax.default_backend() != "cpu":
        return {}
    if model is not None and any(isinstance(m, Mamba) for _, m in nnx.iter_graph(model)):
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def verify_sizes_for(max_draft: int) -> tuple:
    """0 (no draft: a plain step), then powers of two below max_draft, and max_draft."""
    return tuple(sorted({0} | {1 << i for i in range(max_draft.bit_length()) if 1 << i < max_draft} | {max_draft}))


class Engine:
    """Jitted prefill, generation loop and speculative verify for one model and one cache size.

    `max_len` bounds prompt + generated tokens + the slack of max(verify_sizes)+1 positions that a verify
    step may write past a row's length (out-of-range cache writes would be clamped or dropped silently).
    `prefix_prompt` reads every prompt as a bidirectional prefix (for models trained as prefix LMs); it
    takes effect only where the model `supports_prefix` (`prefix_prompt` then says what the engine does, and
    `prefix_unsupported` that it was asked for in vain: such a model was trained causally anyway).
    `traces` counts how often each jitted function was traced (= compiled).
    `max_stretch`: when no row drafts, the speculative loop runs up to this many plain steps in a row without
    calling the host (1, 2, 4, ... while nothing drafts); 0 or 1: one plain step per host call.
    `spec_compiler_options`: XLA options for the speculative loop's compile only (None: `spec_default_options`).
    """

    def __init__(self, model, *, max_len: int, bos_id: int | None = None, pad_id: int = 0,
                 stop_ids: Sequence[int] = (), prefix_prompt: bool = False,
                 verify_sizes: Sequence[int] = VERIFY_SIZES, observe_k: int = 8, min_bucket: int = 16,
                 max_stop_ids: int = 8, mesh=None, max_stretch: int = 16,
                 spec_compiler_options: dict | None = None):
        self.verify_sizes = tuple(sorted(set(int(k) for k in verify_sizes)))
        if not self.verify_sizes or self.verify_sizes[0] < 0 or self.verify_sizes[-1] < 1:
            raise UserError(f"verify_sizes must be integers >= 0, one of them positive; got {tuple(verify_sizes)}")
        self.vocab_size = int(model.vocab_size)
        self.limits = Limits(vocab_size=self.vocab_size, max_len=int(max_len), slack=self.verify_sizes[-1] + 1,
                             bos_id=bos_id, pad_id=int(pad_id), stop_ids=tuple(int(s) for s in stop_ids),
                             min_bucket=int(min_bucket), max_stop_ids=int(max_stop_ids))
        self.prefix_unsupported = bool(prefix_prompt) and not model.supports_prefix
        self.prefix_prompt = bool(prefix_prompt) and not self.prefix_unsupported
        self.observe_k = min(int(observe_k), self.vocab_size)
        if int(max_stretch) < 0:
            raise UserError(f"max_stretch must be >= 0; got {max_stretch}")
        self.max_stretch = int(max_stretch)
        graphdef, state = nnx.split(model)
        # Hand the jitted functions a flat list of arrays, not the nnx.State: flattening the State's Variable
        # nodes in Python on every call cost ~1.4 ms per verify step (more than a tiny model's forward).
        self.params, params_def = jax.tree.flatten(state)
        # A mesh (core.mesh.make_mesh): parameters sharded by their logical axes (fsdp / tensor), and each
        # request's rows and cache over data x fsdp, KV heads and Mamba channels over tensor (core.mesh).
        self.mesh = mesh
        if mesh is not None:
            from core.mesh import state_shardings

            self.params = jax.device_put(self.params, state_shardings(state, mesh))
        # serves one speculative request at a time (on a mesh, from its first device)
        self._host = Host(self.verify_sizes[-1], None if mesh is None else mesh.devices.flat[0], self.max_stretch)
        self._loops = Loops(graphdef, params_def, max_len=self.max_len, pad_id=self.pad_id,
                            verify_sizes=self.verify_sizes, prefix_prompt=self.prefix_prompt,
                            host_call=self._host.call, max_stretch=self.max_stretch,
                            spec_compiler_options=(spec_default_options(model) if spec_compiler_options is None
                                                   else spec_compiler_options))
        self._verify_cost: dict = {}  # batch size -> VerifyCost, measured once (verify_cost)
        self._observed: dict = {}  # batch size -> ObservedCost, corrected by every request (observed_cost)
        # what the cost of a step depends on besides the machine and the code (verify_cost_path)
        self._cost_key = repr((type(model).__module__, type(model).__qualname__, getattr(model, "cfg", None),
                               [(tuple(x.shape), str(x.dtype)) for x in self.params], self.max_len,
                               self.verify_sizes, self.prefix_prompt, mesh is not None and mesh.shape, self.max_stretch,
                               sorted(self._loops.spec_options.items())))

    # The limits, as attributes of the engine (tests and the CLIs read them).
    max_len = property(lambda self: self.limits.max_len)
    slack = property(lambda self: self.limits.slack)
    bos_id = property(lambda self: self.limits.bos_id)
    pad_id = property(lambda self: self.limits.pad_id)
    stop_ids = property(lambda self: self.limits.stop_ids)

    @property
    def traces(self):
        """Traces (= compiles) per jitted function: prefill, generate, speculate."""
        return self._loops.traces

    def check_prompt(self, prompt, max_new_tokens: int) -> np.ndarray:
        """The prompt as int32 ids (BOS for an empty one); UserError if it or its budget does not fit."""
        return check_prompt(self.limits, prompt, max_new_tokens)

    # ---- plain decoding ----------------------------------------------------------------------------
    def _prepare(self, prompts, **kw) -> Request:
        return prepare(self.limits, prompts, **kw)

    def _start(self, req: Request, observe_k: int = 0):
        rows = (req.tokens_BxS, req.plen_B, req.keys_Bx2, req.max_new_B)
        if self.mesh is not None:
            from core.mesh import batch_rows_sharding

            rows = [jax.device_put(x, batch_rows_sharding(x, self.mesh)) for x in rows]
        state, topk = self._loops.prefill(self.params, *rows, req.stop_S, req.knobs, observe_k=observe_k)
        if self.mesh is not None:  # a no-op where the compiler already propagated the row sharding
            from core.mesh import cache_shardings

            state = state._replace(cache=jax.device_put(state.cache, cache_shardings(state.cache, self.mesh)))
        return state, topk

    def stream(self, prompts, *, max_new_tokens: int, chunk: int = 32, temperature=0.0, top_k=0, top_p=1.0,
               seed=0, stop_ids=None, batch_size=None, timing: dict | None = None) -> Iterator[list[np.ndarray]]:
        """Yields, after prefill and then every `chunk` loop steps, the new tokens of each prompt.

        Every chunk resumes the same compiled loop (the step budget is a traced value): no recompiles.
        `timing`, if given, receives prefill_s, decode_s and steps (per row).
        """
        req = self._prepare(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_ids=stop_ids, batch_size=batch_size)
        if chunk < 1:
            raise UserError(f"chunk must be >= 1; got {chunk}")
        timing = {} if timing is None else timing
        t0 = time.perf_counter()
        state, _ = self._start(req)
        out, n, done = jax.device_get((state.tokens, state.n, state.done))
        timing["prefill_s"] = time.perf_counter() - t0
        sent = np.zeros_like(n)
        t0 = time.perf_counter()
        while True:
            yield [out[i, sent[i]:n[i]] for i in range(req.n_real)]
            sent = n
            if done.all():
                break
            state = self._loops.generate(self.params, state, np.int32(chunk), req.stop_S, req.knobs)
            out, n, done = jax.device_get((state.tokens, state.n, state.done))
        timing["decode_s"] = time.perf_counter() - t0
        timing["steps"] = [max(int(x) - 1, 0) for x in n[:req.n_real]]

    def generate(self, prompts, *, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop_ids=None, batch_size=None) -> Result:
        """Plain decoding of a batch of prompts (lists of token ids) in one jitted loop after prefill."""
        timing: dict = {}
        rows = [[] for _ in prompts]
        for new in self.stream(prompts, max_new_tokens=max_new_tokens, chunk=self.max_len, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, batch_size=batch_size,
                               timing=timing):
            for r, t in zip(rows, new):
                r.append(t)
        return Result([np.concatenate(r).astype(np.int32) for r in rows], [len(p) for p in prompts],
                      timing["steps"], timing["prefill_s"], timing["decode_s"])

    # ---- speculative decoding ----------------------------------------------------------------------
    def generate_speculative(self, prompts, drafters, *, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
                             seed=0, stop_ids=None, batch_size=None, on_tokens=None,
                             max_stretch: int | None = None) -> Result:
        """Speculative decoding with one drafter per prompt (decode.drafters: reset/draft/accept, and
        observe for drafters whose `observes` is true).

        Each step: every live row drafts up to max(verify_sizes) tokens (never more than it may still emit
        minus one), the step verifies [pending, draft...] for all rows at the smallest verify size that holds
        the longest draft. Greedy rows reproduce plain greedy decoding exactly; sampling rows follow the
        target distribution (see decode.sampling.accept). The steps run in one jitted loop that calls the
        host between steps, so an Engine serves one speculative request at a time. `on_tokens(row, ids)`,
        if given, receives each row's new tokens as they become final (the first from prefill, then every
        verify step, from inside the loop's host callback): streaming. When no row drafts, the loop runs a
        plain stretch (see Engine's `max_stretch`; `max_stretch` here caps it for this request, no recompile);
        each stretch token counts as one step of its row, and `verify_calls` counts host calls.
        """
        req = self._prepare(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_ids=stop_ids, batch_size=batch_size)
        if len(drafters) != req.n_real:
            raise UserError(f"need one drafter per prompt: {len(drafters)} drafters for {req.n_real} prompts")
        if self._host.busy:
            raise RuntimeError("this Engine is already running a speculative request")
        observe_k = self.observe_k if observing(drafters) else 0
        t0 = time.perf_counter()
        state, topk_BxSxk = self._start(req, observe_k)
        first, n0, done0 = jax.device_get((state.tokens[:, 0], state.n, state.done))
        topk_BxSxk = np.asarray(topk_BxSxk) if observe_k else None
        cache = state.cache
        del state
        prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        stretch = self.max_stretch if max_stretch is None else min(int(max_stretch), self.max_stretch)
        run = SpeculativeRun(req, drafters, max_verify=self.verify_sizes[-1], pad_id=self.pad_id,
                             vocab_size=self.vocab_size, observe_k=observe_k, first=first, n0=n0, done0=done0,
                             prompt_topk=topk_BxSxk, on_tokens=on_tokens,
                             observed_cost=self._observed.get(len(req.prompts)), sizes=self.verify_sizes,
                             stretch=stretch if self.verify_sizes[0] == 0 else 1)  # no size 0: no stretches
        inputs, draft_len, live = run.drafts()
        with self._host.serving(run):
            final = self._loops.speculate(self.params, cache, inputs, draft_len, live, run.room(),
                                          np.int32(req.max_new_B.max()), np.int32(stretch), req.stop_S, req.keys_Bx2,
                                          req.knobs, observe_k=observe_k)
            jax.block_until_ready(final)
        if run.error is not None:
            raise run.error
        decode_s = time.perf_counter() - t0
        n = req.n_real
        return Result([np.asarray(e, np.int32) for e in run.emitted[:n]], [len(p) for p in prompts], run.steps[:n],
                      prefill_s, decode_s, run.calls, run.draft_s, host_s=run.host_s)

    def verify_cost(self, batch_size: int = 1, **kw):
        """The measured cost of a speculative step per verify size at this batch size (a VerifyCost, in
        CPU seconds). Measured once per (model, engine settings, batch size, machine, code): kept in memory
        and on disk next to the compilation cache (`verify_cost_path`), so a repeated eval or `python -m
        decode --drafter sam` reads it instead of paying ~100 steps per size again. `kw`: see
        measure_verify_cost (a call with `kw` always measures). The "cost" draft rule sizes drafts by it."""
        if batch_size in self._verify_cost and not kw:
            return self._verify_cost[batch_size]
        path = None if kw else verify_cost_path(self, batch_size)
        cost = _read_cost(path)
        if cost is None:
            cost = measure_verify_cost(self, batch_size=batch_size, **kw)
            _write_cost(path, cost)
        self._verify_cost[batch_size] = cost
        return cost

    def observed_cost(self, batch_size: int = 1):
        """`verify_cost(batch_size)` as an ObservedCost that every later speculative request at this batch size
        corrects with the step times it sees (the table the CLIs hand to sam's cost rule)."""
        if batch_size not in self._observed:
            from decode.drafters import ObservedCost

            self._observed[batch_size] = ObservedCost(self.verify_cost(batch_size))
        return self._observed[batch_size]

    # ---- compile ahead of timing -------------------------------------------------------------------
    def warmup(self, batch_size: int, prompt_len: int, *, speculative: bool = False,
               observe: Sequence[bool] = (False, True)):
        """Compile prefill for prompt_len's bucket and the generation loop; with `speculative`, also the
        speculative loop (every verify size) for each value in `observe`: without and with the top-k ids that
        observing drafters (Token Recycling) use, and the prefill that returns them. The drafters used here
        are fresh stubs that draft nothing; no drafter of the caller's is touched."""
        prompts = [np.zeros(prompt_len, np.int32)] * batch_size
        self.generate(prompts, max_new_tokens=2, stop_ids=())
        if speculative:
            from decode.drafters import Drafter  # drafts nothing; numba loads only when speculation is wanted

            for obs in observe:
                self.generate_speculative(prompts, [Drafter(observes=bool(obs)) for _ in prompts],
                                          max_new_tokens=2, stop_ids=())


class _FixedDraft:
    """Drafts k copies of token 0 every step (all rejected but by chance): a verify step of size k; k = 0 drafts
    nothing (the loop runs plain stretches). Its `stamps` are `step_clock()` stamps at each `draft` call, i.e.
    once per host call, from the host callback (see SpeculativeRun._observe_cost for why not the process's CPU
    clock); `emitted[i]` is how many tokens host call i brought (`accept`; [0] is prefill's token), so the
    interval stamps[i-1] -> stamps[i] emitted emitted[i] tokens."""

    observes = False

    def __init__(self, k: int):
        self.k = k
        self.draft_ = np.zeros(k, np.int32)
        self.stamps: list = []
        self.emitted: list = []

    def reset(self, prompt):
        pass

    def draft(self, k):
        self.stamps.append(step_clock())
        return self.draft_[:k]

    def accept(self, tokens):
        self.emitted.append(len(tokens))

    def observe(self, inputs, topk):
        pass


def measure_verify_cost(engine: "Engine", *, batch_size: int = 1, prompt_len: int = 64, steps: int = 24,
                        rounds: int = 2):
    """Cost of one speculative-loop step at each verify size, in CPU seconds of the thread that runs the loop
    (`step_elapsed`): the median of the time between consecutive host calls (the drafter stamps the clock at
    each, from inside the loop's host callback) over `rounds` requests of `steps` steps per size, sizes
    interleaved, after one short untimed request per size (which compiles what is missing). A median of
    single-step intervals ignores prefill, the request's fixed cost and the odd preempted step.
    Size 0 is what a token costs when nothing is drafted: the loop's plain stretches at their longest
    (`engine.max_stretch` steps per host call, the host's round trip shared by them), per token. It is the
    price a draft must beat: a one-step iteration with a host call (the size-0 entry before 2026-12-03) cost
    ~2x a plain step on the tiny models, so the cost rule drafted where a plain stretch was cheaper.
    CPU time rather than wall time, because on a shared machine the wall time of a step is mostly waiting
    for a core (measured with 8 agents on 2 cores: wall ratios of 3.8x for a step that costs 1.3x); then a
    size never costs more than a larger one (a spike is noise: the larger verify does strictly more work)."""
    from decode.drafters import VerifyCost

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, min(engine.vocab_size, 256), prompt_len).astype(np.int32) for _ in range(batch_size)]
    kmax = engine.verify_sizes[-1]
    sizes = tuple(sorted({0} | set(engine.verify_sizes)))
    samples: dict = {k: [] for k in sizes}

    # without a size-0 branch (verify_sizes lacking 0) the loop runs no stretches: an undrafted step is a verify
    stretch = max(engine.max_stretch, 1) if engine.verify_sizes[0] == 0 else 1
    room = engine.max_len - prompt_len - kmax - 2  # tokens a request may emit

    def one_step(k, n):
        """n intervals of one loop step per host call (no stretches), verifying k drafted tokens."""
        d = [_FixedDraft(k) for _ in prompts]
        engine.generate_speculative(prompts, d, max_new_tokens=n + kmax + 1, stop_ids=(), batch_size=batch_size,
                                    max_stretch=1)
        st = d[0].stamps[:n + 1]  # steps whose drafts were not yet cut by the budget
        return np.asarray([step_elapsed(a, b) for a, b in zip(st, st[1:])])

    def run(k, n):
        if k:
            return one_step(k, n)
        # size 0: a few host calls at the longest stretch, after the ramp 1, 2, 4, ... up to it; n // 8 of them
        # (the tokens of n steps of a verify size that drafts 8), so that the context (and with it the
        # attention's cost) stays about where the verify sizes are timed
        d = [_FixedDraft(0) for _ in prompts]
        ramp = sum(min(1 << i, stretch) for i in range(stretch.bit_length()))
        budget = max(min(ramp + max(n // 8, 2) * stretch, room), 2)
        engine.generate_speculative(prompts, d, max_new_tokens=budget, stop_ids=(), batch_size=batch_size)
        st, em = d[0].stamps, d[0].emitted
        return np.asarray([step_elapsed(a, b) / em[i + 1] for i, (a, b) in enumerate(zip(st, st[1:]))
                           if i + 1 < len(em) and em[i + 1] == stretch])

    for r in range(rounds + 1):
        for k in sizes:
            dt = run(k, steps if r else 2)
            if r:
                samples[k] += dt.tolist()
    if not samples[0]:  # no room for a stretch at its longest (a tiny max_len): a one-step plain iteration
        for _ in range(rounds):
            samples[0] += one_step(0, steps).tolist()
    med = [max(float(np.median(samples[k])), 1e-9) for k in sizes]
    iso = [min(med[i:]) for i in range(len(med))]  # non-decreasing in size
    return VerifyCost(sizes, tuple(iso))


@functools.cache
def _code_hash() -> str:
    """Of the code a step runs: the engine's loops and the models (a changed step is another cost)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*(root / "decode").glob("*.py"), *(root / "models").glob("*.py")]):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@functools.cache
def _machine() -> str:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    dev = jax.devices()[0]
    return repr((platform.node(), platform.machine(), cpu, os.cpu_count(), dev.platform,
                 getattr(dev, "device_kind", ""), jax.device_count(), jax.__version__))


def verify_cost_path(engine: "Engine", batch_size: int):
    """Where the verify-cost table of this engine at this batch size is kept: `verify_cost/<key>.json` in
    the compilation cache directory (core.compile_cache.default_dir: `$LMARCH_COMPILE_CACHE`, else
    ~/.cache/lmarch/jax; None when that is off). The key hashes the model (class, config, parameter
    shapes), the engine's settings, the batch size, the machine (host, CPU, devices, jax version) and the
    code of decode/ and models/."""
    from core.compile_cache import default_dir

    base = default_dir()
    if base is None:
        return None
    key = hashlib.sha256(repr((engine._cost_key, int(batch_size), _machine(), _code_hash())).encode()).hexdigest()
    return Path(base) / "verify_cost" / f"{key[:32]}.json"


def _read_cost(path):
    from decode.drafters import VerifyCost

    if path is None or not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return VerifyCost(tuple(int(k) for k in d["sizes"]), tuple(float(c) for c in d["cost_s"]))
    except (OSError, ValueError, KeyError, TypeError):  # a damaged entry is measured again
        return None


def _write_cost(path, cost) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"sizes": list(cost.sizes), "cost_s": list(cost.cost)}))
        os.replace(tmp, path)
    except OSError:  # a read-only cache directory: measure again next time
        pass


def engine_for_run(run_dir, *, step: int | None = None, prefix: bool | None = None, mesh=None, **kw):
    """(cfg, tokenizer, Engine) for a training run's checkpoint; EOS stops generation.

    `prefix` None: the prompt is read as a bidirectional prefix iff the run trained a prefix LM
    (cfg.train.objective == "prefix"); True/False override. Raises UserError for a missing run directory or
    checkpoint (core.checkpoint.load_model).
    """
    from core.checkpoint import load_model
    from core.tokenizer import get_tokenizer

    cfg, model, _ = load_model(run_dir, step, mesh=mesh)
    tok = get_tokenizer(cfg.data)
    if prefix is None:
        prefix = cfg.train.objective == "prefix"
    engine = Engine(model, max_len=cfg.decode.max_len, bos_id=tok.bos_id, pad_id=tok.pad_id,
                    stop_ids=(tok.eos_id,), prefix_prompt=prefix, mesh=mesh, **kw)
    return cfg, tok, engine


def prefix_note(engine: Engine) -> None:
    """One line on stderr (the CLIs) when a prefix-LM prefill was asked for but the model cannot read one."""
    if engine.prefix_unsupported:
        print("note: this model's layers are causal by nature (supports_prefix is False); the prompt is read "
              "causally", file=sys.stderr)
