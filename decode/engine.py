"""The decoding engine: bucketed prefill, one jitted generation loop, and speculative verification.

Works for any model that follows the contract in DESIGN.md (`init_cache`, `extend`, `commit`,
`cache_capacity`); nothing here looks inside the cache except `cache["lengths"]`.

- The model is split once with `nnx.split` and merged inside plain `jax.jit` functions (plain `nnx.jit`
  costs 2-3 ms per call on CPU). The cache and the decode state are donated and returned.
- Prefill runs the right-padded prompts (bucketed to a power of two) through `extend` and commits each
  row's prompt length, so padding is inert for every architecture. It also samples the first token.
- Plain generation is one `lax.while_loop` over a state of fixed shapes; it stops when the step budget is
  spent or every row is done. The step budget is a traced value, so the loop can be resumed chunk by chunk
  (streaming) without recompiling.
- Speculative decoding is one jitted `lax.while_loop` too. Each iteration verifies [pending, draft...] with
  extend + acceptance + commit, at the smallest verify size that holds the longest draft (a branch per
  size, so one compile covers them all), then calls the host once with the emitted tokens: the host
  updates the drafters and returns the next drafts. On CPU the call is a `buffer_callback` (~3 us); a
  separate jitted call per step cost ~0.3 ms of dispatch and sync, as much as a tiny model's whole step.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

try:  # a host callback that writes its result in place: ~3 us a call on CPU against ~40 us for io_callback
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # older or newer JAX without it
    buffer_callback = None

from decode.sampling import accept, sample

VERIFY_SIZES = (0, 1, 2, 4, 8, 16)  # 0: no draft this step, a plain step inside the loop


class InputError(ValueError):
    """A user's mistake in a request (prompt, budget, sampling value): the CLIs print it and exit 2."""


@dataclass
class Result:
    """Generated ids per row (a stop id, when hit, is kept as the last token) and timing."""

    tokens: list[np.ndarray]
    prompt_lengths: list[int]
    steps: list[int]  # model steps after prefill that emitted tokens for the row (decode or verify steps)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    verify_calls: int = 0  # jitted verify steps (speculative only); 0 for plain decoding
    draft_s: float = 0.0  # host time spent in the drafters (draft, accept, observe)

    @classmethod
    def concat(cls, results: Sequence["Result"]) -> "Result":
        """One result for several batches: rows appended, times and counts summed."""
        return cls([t for r in results for t in r.tokens], [n for r in results for n in r.prompt_lengths],
                   [s for r in results for s in r.steps], sum(r.prefill_s for r in results),
                   sum(r.decode_s for r in results), sum(r.verify_calls for r in results),
                   sum(r.draft_s for r in results))

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mat(self) -> float:
        """Mean tokens emitted per model step per row (the first token comes from prefill and is excluded)."""
        steps = sum(self.steps)
        after_prefill = sum(max(len(t) - 1, 0) for t in self.tokens)
        return after_prefill / steps if steps else 1.0

    def row_mat(self, i: int) -> float:
        return (len(self.tokens[i]) - 1) / self.steps[i] if self.steps[i] else 1.0

    @property
    def draft_us_per_step(self) -> float:
        return 1e6 * self.draft_s / self.verify_calls if self.verify_calls else 0.0


@dataclass
class _Request:
    prompts: list[np.ndarray]  # one per row, padded rows included
    n_real: int
    tokens_BxS: np.ndarray
    plen_B: np.ndarray
    max_new_B: np.ndarray
    keys_Bx2: jax.Array
    knobs: tuple  # temperature_B, top_k_B, top_p_B
    stop_S: np.ndarray


def _per_row(name: str, value, n: int) -> np.ndarray:
    """A scalar or one value per prompt, as an array of n values."""
    try:
        return np.broadcast_to(np.asarray(value), (n,))
    except ValueError:
        raise InputError(f"{name} must be one value or one per prompt ({n}); got {value!r}") from None


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """Jitted prefill, generation loop and speculative verify for one model and one cache size.

    `max_len` bounds prompt + generated tokens + the slack of max(verify_sizes)+1 positions that a verify
    step may write past a row's length (out-of-range cache writes would be clamped or dropped silently).
    `traces` counts how often each jitted function was traced (= compiled).
    """

    def __init__(self, model, *, max_len: int, bos_id: int | None = None, pad_id: int = 0,
                 stop_ids: Sequence[int] = (), verify_sizes: Sequence[int] = VERIFY_SIZES, observe_k: int = 8,
                 min_bucket: int = 16, max_stop_ids: int = 8, vocab_size: int | None = None):
        self.graphdef, state = nnx.split(model)
        # Hand the jitted functions a flat list of arrays, not the nnx.State: flattening the State's Variable
        # nodes in Python on every call cost ~1.4 ms per verify step (more than a tiny model's forward).
        self.params, self._params_def = jax.tree.flatten(state)
        self.vocab_size = int(vocab_size or model.cfg.vocab_size)
        self.verify_sizes = tuple(sorted(set(int(k) for k in verify_sizes)))
        if not self.verify_sizes or self.verify_sizes[0] < 0 or self.verify_sizes[-1] < 1:
            raise InputError(f"verify_sizes must be integers >= 0, one of them positive; got {tuple(verify_sizes)}")
        self.slack = self.verify_sizes[-1] + 1
        self.max_len = int(max_len)
        if self.max_len < self.slack + 2:
            raise InputError(f"max_len {max_len} is too small; it needs at least {self.slack + 2} "
                             f"(1 prompt token, 1 new token and {self.slack} verify slack)")
        self.bos_id, self.pad_id = bos_id, int(pad_id)
        self.observe_k = min(int(observe_k), self.vocab_size)
        self.min_bucket, self.max_stop_ids = int(min_bucket), int(max_stop_ids)
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.traces: collections.Counter = collections.Counter()
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("observe_k",))
        self._generate = jax.jit(self._generate_fn, donate_argnums=(1,))
        self._speculate = jax.jit(self._speculate_fn, static_argnames=("observe_k",), donate_argnums=(1,))
        self._run: _SpeculativeRun | None = None  # the request the host callback serves (one at a time)

    # ---- jitted functions --------------------------------------------------------------------------
    def _prefill_fn(self, params, tokens_BxS, plen_B, keys_Bx2, max_new_B, stop_S, temperature_B, top_k_B, top_p_B,
                    *, observe_k: int):
        self.traces["prefill"] += 1
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._params_def, params))
        b = tokens_BxS.shape[0]
        cache = model.init_cache(b, self.max_len)
        logits_BxSxV, cache = model.extend(tokens_BxS, cache)
        cache = model.commit(cache, plen_B)
        rows = jnp.arange(b)
        first = sample(logits_BxSxV[rows, plen_B - 1], keys_Bx2, plen_B, temperature_B, top_k_B, top_p_B)
        live = max_new_B > 0
        out_BxW = jnp.full((b, self.max_len), self.pad_id, jnp.int32)
        out_BxW = out_BxW.at[rows, jnp.where(live, 0, self.max_len)].set(first, mode="drop")
        n = live.astype(jnp.int32)
        done = ~live | jnp.isin(first, stop_S) | (n >= max_new_B)
        state = {"cache": cache, "tokens": out_BxW, "n": n, "last": first, "done": done,
                 "step": jnp.zeros((), jnp.int32), "keys": keys_Bx2, "max_new": max_new_B}
        topk = jax.lax.top_k(logits_BxSxV, observe_k)[1] if observe_k else None
        return state, topk

    def _generate_fn(self, params, state, n_steps, stop_S, temperature_B, top_k_B, top_p_B):
        self.traces["generate"] += 1
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._params_def, params))
        until = state["step"] + n_steps
        b, w = state["tokens"].shape
        rows = jnp.arange(b)

        def cond(s):
            return (s["step"] < until) & ~jnp.all(s["done"])

        def body(s):
            live = ~s["done"]
            logits_Bx1xV, cache = model.extend(s["last"][:, None], s["cache"])
            cache = model.commit(cache, live.astype(jnp.int32))
            tok = sample(logits_Bx1xV[:, 0], s["keys"], cache["lengths"], temperature_B, top_k_B, top_p_B)
            out = s["tokens"].at[rows, jnp.where(live, s["n"], w)].set(tok, mode="drop")
            n = s["n"] + live
            done = s["done"] | jnp.isin(tok, stop_S) | (n >= s["max_new"])
            return {**s, "cache": cache, "tokens": out, "n": n, "last": jnp.where(live, tok, s["last"]),
                    "done": done, "step": s["step"] + 1}

        return jax.lax.while_loop(cond, body, state)

    def _verify_step(self, model, cache, inputs_BxK1, draft_len_B, live_B, keys_Bx2, temperature_B, top_k_B,
                     top_p_B, observe_k: int):
        """extend [pending, draft...], accept, commit: (cache, emitted tokens [B, K+1], counts, top-k ids)."""
        logits_BxK1xV, cache = model.extend(inputs_BxK1, cache)
        draft_BxK = inputs_BxK1[:, 1:]
        n_acc, nxt = accept(logits_BxK1xV, draft_BxK, draft_len_B, keys_Bx2, cache["lengths"] + 1,
                            temperature_B, top_k_B, top_p_B)
        # The pending token and the accepted drafts become final; the correction/bonus is the next pending.
        cache = model.commit(cache, jnp.where(live_B, n_acc + 1, 0))
        b, k1 = inputs_BxK1.shape
        i = jnp.arange(k1)[None, :]
        drafts = jnp.concatenate([draft_BxK, jnp.full((b, 1), self.pad_id, draft_BxK.dtype)], axis=1)
        out_BxK1 = jnp.where(i < n_acc[:, None], drafts, jnp.where(i == n_acc[:, None], nxt[:, None], self.pad_id))
        topk = jax.lax.top_k(logits_BxK1xV, observe_k)[1] if observe_k else jnp.zeros((b, k1, 0), jnp.int32)
        return cache, out_BxK1, n_acc + 1, topk.astype(jnp.int32)

    def _speculate_fn(self, params, cache, inputs_BxKm, draft_len_B, live_B, max_steps, keys_Bx2, temperature_B,
                      top_k_B, top_p_B, *, observe_k: int):
        """Verify steps until the host reports no live row; the host callback owns drafts and output."""
        self.traces["speculate"] += 1
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._params_def, params))
        b, km = inputs_BxKm.shape  # km = max verify size + 1
        sizes = self.verify_sizes
        knobs = (keys_Bx2, temperature_B, top_k_B, top_p_B)

        def verify(k):
            def run(cache, inputs, draft_len, live, *_):
                cache, out, counts, topk = self._verify_step(model, cache, inputs[:, :k + 1], draft_len, live, *knobs,
                                                             observe_k=observe_k)
                out = jnp.pad(out, ((0, 0), (0, km - k - 1)), constant_values=self.pad_id)
                return cache, out, counts, jnp.pad(topk, ((0, 0), (0, km - k - 1), (0, 0)))
            return run

        def skip(cache, inputs, draft_len, live, out, counts, topk):
            return cache, out, counts, topk

        # One int32 array each way: every callback operand and result costs a conversion (~10-30 us each).
        host_shape = jax.ShapeDtypeStruct((b, km + 2), jnp.int32)  # next inputs, draft length, live

        def body(c):
            cache, inputs, draft_len, live, step = c
            size = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.max(draft_len))  # smallest that fits
            size = jnp.minimum(size, len(sizes) - 1)
            # One two-way cond per size, in a chain, rather than lax.switch: XLA:CPU copies the whole cache
            # into a switch of 3+ branches that update it in place (every step), but not into a two-way
            # cond whose other branch passes it through.
            out = jnp.full((b, km), self.pad_id, jnp.int32)
            counts = jnp.zeros((b,), jnp.int32)
            topk = jnp.zeros((b, km, observe_k), jnp.int32)
            for j, k in enumerate(sizes):
                cache, out, counts, topk = jax.lax.cond(size == j, verify(k), skip, cache, inputs, draft_len, live,
                                                        out, counts, topk)
            emitted = jnp.concatenate([out, counts[:, None], topk.reshape(b, -1)], axis=1)
            nxt = self._host_call(host_shape, emitted)
            return cache, nxt[:, :km], nxt[:, km], nxt[:, km + 1] > 0, step + 1

        def cond(c):
            return jnp.any(c[3]) & (c[4] < max_steps)

        return jax.lax.while_loop(cond, body, (cache, inputs_BxKm, draft_len_B, live_B, jnp.zeros((), jnp.int32)))

    def _host_call(self, shape, emitted):
        """Run `_host_step` on the host from inside the jitted loop."""
        if buffer_callback is not None and jax.default_backend() == "cpu":
            def write(ctx, out, x):  # CPU buffers are host memory: numpy views, no copies
                np.asarray(out)[...] = self._host_step(np.asarray(x))
            return buffer_callback(write, shape, has_side_effect=True)(emitted)
        return io_callback(self._host_step, shape, emitted, ordered=False)

    def _host_step(self, emitted):
        """The loop's host callback: [out (K+1) | count | top-k ids] per row in, [inputs | length | live] out."""
        e = np.asarray(emitted)
        km = self.verify_sizes[-1] + 1
        inputs, draft_len, live = self._run.step(e[:, :km], e[:, km], e[:, km + 1:].reshape(len(e), km, -1))
        return np.concatenate([inputs, draft_len[:, None], live[:, None]], axis=1, dtype=np.int32)

    # ---- input checks -------------------------------------------------------------------------------
    def check_prompt(self, prompt, max_new_tokens: int) -> np.ndarray:
        """The prompt as int32 ids (BOS for an empty one); InputError if it or its budget does not fit."""
        p = np.asarray(prompt)
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise InputError("expected a 1-D sequence of integer token ids")
        if p.size == 0:
            if self.bos_id is None:
                raise InputError("empty prompt and the engine has no bos_id to start from")
            p = np.array([self.bos_id])
        bad = (p < 0) | (p >= self.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(p[bad][0])} out of range [0, {self.vocab_size})")
        room = self.max_len - self.slack
        if len(p) + 1 > room:
            raise InputError(f"{len(p)} prompt tokens do not fit: max_len {self.max_len} allows at most "
                             f"{room - 1} (it keeps {self.slack} slots of verify slack)")
        if len(p) + max_new_tokens > room:
            raise InputError(f"{len(p)} prompt tokens + max_new_tokens {max_new_tokens} exceed max_len "
                             f"{self.max_len} - {self.slack} verify slack; use max_new_tokens <= {room - len(p)}")
        return p.astype(np.int32)

    def _prepare(self, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, batch_size) -> _Request:
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
            raise InputError("prompts must be a list of token-id sequences (got a single 1-D array)")
        prompts = [np.asarray(p) for p in prompts]
        if not prompts:
            raise InputError("no prompts given")
        n_real = len(prompts)
        if batch_size is not None and batch_size < n_real:
            raise InputError(f"{n_real} prompts do not fit batch_size {batch_size}")
        max_new = _per_row("max_new_tokens", max_new_tokens, n_real)
        if not np.issubdtype(max_new.dtype, np.integer) or (max_new < 1).any():
            raise InputError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
        out = []
        for i, (p, m) in enumerate(zip(prompts, max_new)):
            try:
                out.append(self.check_prompt(p, int(m)))
            except InputError as e:
                raise InputError(f"prompt {i}: {e}") from None
        knobs = self._knobs(n_real, temperature, top_k, top_p)
        stops = self.stop_ids if stop_ids is None else tuple(int(s) for s in stop_ids)
        if len(stops) > self.max_stop_ids:
            raise InputError(f"at most {self.max_stop_ids} stop ids; got {len(stops)}")
        if any(not 0 <= s < self.vocab_size for s in stops):
            raise InputError(f"stop ids must be in [0, {self.vocab_size}); got {list(stops)}")
        stop_S = np.full((self.max_stop_ids,), -1, np.int32)
        stop_S[:len(stops)] = stops
        seeds = np.asarray(seed)
        if not np.issubdtype(seeds.dtype, np.integer) or seeds.ndim > 1 or (seeds.ndim and len(seeds) != n_real):
            raise InputError(f"seed must be an integer or one integer per prompt; got {seed!r}")
        if np.ndim(seed) == 0:  # one seed: rows differ by their index in the request
            base = jax.random.PRNGKey(int(seed))
            keys = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(n_real, dtype=jnp.uint32))
        else:
            keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))

        # Padded rows (to reach batch_size) start done: max_new 0 means they emit nothing.
        b = batch_size or n_real
        pad_rows = b - n_real
        out += [out[-1]] * pad_rows
        max_new = np.concatenate([max_new, np.zeros(pad_rows, max_new.dtype)]).astype(np.int32)
        keys = jnp.concatenate([keys, jnp.zeros((pad_rows, 2), keys.dtype)]) if pad_rows else keys
        knobs = tuple(np.concatenate([k, np.repeat(k[-1:], pad_rows)]) for k in knobs)
        plen = np.array([len(p) for p in out], np.int32)
        s = min(max(self.min_bucket, _next_pow2(int(plen.max()))), self.max_len)
        tokens = np.full((b, s), self.pad_id, np.int32)
        for i, p in enumerate(out):
            tokens[i, :len(p)] = p
        return _Request(out, n_real, tokens, plen, max_new, keys, knobs, stop_S)

    @staticmethod
    def _knobs(n, temperature, top_k, top_p):
        t = _per_row("temperature", temperature, n)
        k = _per_row("top_k", top_k, n)
        p = _per_row("top_p", top_p, n)
        if not (np.issubdtype(t.dtype, np.number) and np.issubdtype(p.dtype, np.number)):
            raise InputError(f"temperature and top_p must be numbers; got {temperature!r}, {top_p!r}")
        t, p = t.astype(np.float32), p.astype(np.float32)
        if not np.all(np.isfinite(t)) or (t < 0).any():
            raise InputError(f"temperature must be finite and >= 0; got {temperature!r}")
        if not np.issubdtype(k.dtype, np.integer) or (k < 0).any():
            raise InputError(f"top_k must be an integer >= 0 (0: off); got {top_k!r}")
        if not np.all((p > 0) & (p <= 1)):
            raise InputError(f"top_p must be in (0, 1]; got {top_p!r}")
        return t, k.astype(np.int32), p

    # ---- plain decoding ----------------------------------------------------------------------------
    def _start(self, req: _Request, observe_k: int = 0):
        return self._prefill(self.params, req.tokens_BxS, req.plen_B, req.keys_Bx2, req.max_new_B, req.stop_S,
                             *req.knobs, observe_k=observe_k)

    def stream(self, prompts, *, max_new_tokens: int, chunk: int = 32, temperature=0.0, top_k=0, top_p=1.0,
               seed=0, stop_ids=None, batch_size=None, timing: dict | None = None) -> Iterator[list[np.ndarray]]:
        """Yields, after prefill and then every `chunk` loop steps, the new tokens of each prompt.

        Every chunk resumes the same compiled loop (the step budget is a traced value): no recompiles.
        `timing`, if given, receives prefill_s, decode_s and steps (per row).
        """
        req = self._prepare(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_ids=stop_ids, batch_size=batch_size)
        if chunk < 1:
            raise InputError(f"chunk must be >= 1; got {chunk}")
        timing = {} if timing is None else timing
        t0 = time.perf_counter()
        state, _ = self._start(req)
        out, n, done = jax.device_get((state["tokens"], state["n"], state["done"]))
        timing["prefill_s"] = time.perf_counter() - t0
        sent = np.zeros_like(n)
        t0 = time.perf_counter()
        while True:
            yield [out[i, sent[i]:n[i]] for i in range(req.n_real)]
            sent = n
            if done.all():
                break
            state = self._generate(self.params, state, np.int32(chunk), req.stop_S, *req.knobs)
            out, n, done = jax.device_get((state["tokens"], state["n"], state["done"]))
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
                             seed=0, stop_ids=None, batch_size=None) -> Result:
        """Speculative decoding with one drafter per prompt (reset/draft/accept, optional observe).

        Each step: every live row drafts up to max(verify_sizes) tokens (never more than it may still emit
        minus one), the step verifies [pending, draft...] for all rows at the smallest verify size that holds
        the longest draft. Greedy rows reproduce plain greedy decoding exactly; sampling rows follow the
        target distribution (see decode.sampling.accept). The steps run in one jitted loop that calls the
        host between steps, so an Engine serves one speculative request at a time.
        """
        req = self._prepare(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_ids=stop_ids, batch_size=batch_size)
        if len(drafters) != req.n_real:
            raise InputError(f"need one drafter per prompt: {len(drafters)} drafters for {req.n_real} prompts")
        if self._run is not None:
            raise RuntimeError("this Engine is already running a speculative request")
        observe = any(getattr(d, "uses_observe", hasattr(d, "observe")) for d in drafters)
        observe_k = self.observe_k if observe else 0
        t0 = time.perf_counter()
        state, topk_BxSxk = self._start(req, observe_k)
        first, n0, done0 = jax.device_get((state["tokens"][:, 0], state["n"], state["done"]))
        topk_BxSxk = np.asarray(topk_BxSxk) if observe_k else None
        cache = state["cache"]
        del state
        prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        run = _SpeculativeRun(self, req, drafters, observe_k, first, n0, done0, topk_BxSxk)
        inputs, draft_len, live = run.drafts()
        self._run = run
        try:
            final = self._speculate(self.params, cache, inputs, draft_len, live, np.int32(req.max_new_B.max()),
                                    req.keys_Bx2, *req.knobs, observe_k=observe_k)
            jax.block_until_ready(final)
        finally:
            self._run = None
        if run.error is not None:
            raise run.error
        decode_s = time.perf_counter() - t0
        n = req.n_real
        return Result([np.asarray(e, np.int32) for e in run.emitted[:n]], [len(p) for p in prompts], run.steps[:n],
                      prefill_s, decode_s, run.calls, run.draft_s)

    # ---- compile ahead of timing -------------------------------------------------------------------
    def warmup(self, batch_size: int, prompt_len: int, *, speculative: bool = False):
        """Compile prefill for prompt_len's bucket and the generation loop; with `speculative`, also both
        variants of the speculative loop (every verify size), with and without the top-k ids that observing
        drafters (Token Recycling) use, and the prefill that returns them."""
        prompts = [np.zeros(prompt_len, np.int32)] * batch_size
        self.generate(prompts, max_new_tokens=2, stop_ids=())
        if speculative:
            from decode.drafters import Drafter  # drafts nothing; numba loads only when speculation is wanted

            for observe in (False, True):
                drafters = [Drafter() for _ in prompts]
                for d in drafters:
                    d.uses_observe = observe
                self.generate_speculative(prompts, drafters, max_new_tokens=2, stop_ids=())


class _SpeculativeRun:
    """Host side of one speculative request: drafters, emitted tokens and per-row state.

    `step` runs inside the jitted loop's host callback. An exception there (a drafter bug) is kept in
    `error`, ends the loop (no live rows) and is raised by the caller afterwards.
    """

    def __init__(self, engine: Engine, req: _Request, drafters, observe_k: int, first, n0, done0, prompt_topk):
        self.engine, self.req, self.drafters, self.observe_k = engine, req, drafters, observe_k
        b = len(req.prompts)
        self.kmax = engine.verify_sizes[-1]
        self.stops = set(int(s) for s in req.stop_S if s >= 0)
        self.emitted = [[int(first[i])] if n0[i] else [] for i in range(b)]
        self.live = ~done0
        self.live[req.n_real:] = False
        self.pending = first.astype(np.int32)
        self.steps = [0] * b
        self.calls = 0
        self.error: BaseException | None = None
        self.inputs = np.full((b, self.kmax + 1), engine.pad_id, np.int32)
        self.draft_len = np.zeros(b, np.int32)
        td = time.perf_counter()
        for i in range(req.n_real):
            d, p = drafters[i], req.prompts[i]
            d.reset(p)
            if observe_k:
                d.observe(p, prompt_topk[i, :len(p)])
            d.accept(np.asarray(self.emitted[i], np.int32))
        self.draft_s = time.perf_counter() - td

    def drafts(self):
        """(inputs [B, kmax+1] = pending then draft, draft lengths [B], live [B]) for the next verify step."""
        td = time.perf_counter()
        vocab, max_new = self.engine.vocab_size, self.req.max_new_B
        self.inputs[:] = self.engine.pad_id
        self.inputs[:, 0] = self.pending
        self.draft_len[:] = 0
        for i in np.flatnonzero(self.live):
            room = min(self.kmax, int(max_new[i]) - len(self.emitted[i]) - 1)
            if room > 0:
                d = np.asarray(self.drafters[i].draft(room)).reshape(-1)[:room]
                if d.size and (d.min() < 0 or d.max() >= vocab):  # a drafter bug, not user input
                    raise ValueError(f"drafter {i} proposed token ids outside [0, {vocab}): {d}")
                self.inputs[i, 1:1 + d.size] = d
                self.draft_len[i] = d.size
        self.draft_s += time.perf_counter() - td
        return self.inputs.copy(), self.draft_len.copy(), self.live.copy()

    def step(self, out_BxKm, counts_B, topk_BxKmxO):
        if self.error is not None:  # the loop is ending; keep state as it was at the error
            return self.inputs.copy(), self.draft_len.copy(), np.zeros_like(self.live)
        try:
            self._emit(out_BxKm, counts_B, topk_BxKmxO)
            return self.drafts()
        except BaseException as e:  # noqa: BLE001 - re-raised by generate_speculative after the loop
            self.error = e
            return self.inputs.copy(), self.draft_len.copy(), np.zeros_like(self.live)

    def _emit(self, out_BxKm, counts_B, topk_BxKmxO):
        self.calls += 1
        td = time.perf_counter()
        max_new = self.req.max_new_B
        for i in np.flatnonzero(self.live):
            new = out_BxKm[i, :counts_B[i]]
            new = new[:int(max_new[i]) - len(self.emitted[i])]
            hit = [j for j, t in enumerate(new) if int(t) in self.stops]
            if hit:
                new = new[:hit[0] + 1]
            self.emitted[i].extend(int(t) for t in new)
            self.steps[i] += 1
            self.pending[i] = new[-1]
            if hit or len(self.emitted[i]) >= max_new[i]:
                self.live[i] = False
            if self.observe_k:
                n = self.draft_len[i] + 1
                self.drafters[i].observe(self.inputs[i, :n], topk_BxKmxO[i, :n])
            self.drafters[i].accept(new)
        self.draft_s += time.perf_counter() - td


def engine_for_run(run_dir, *, step: int | None = None, **kw):
    """(cfg, tokenizer, Engine) for a training run's checkpoint; EOS stops generation.

    Raises train.config.ConfigError for a missing run directory or checkpoint.
    """
    from train.checkpoint import load_model
    from train.tokenizer import get_tokenizer

    cfg, model, _ = load_model(run_dir, step)
    tok = get_tokenizer(cfg.data.tokenizer)
    engine = Engine(model, max_len=cfg.decode.max_len, bos_id=tok.bos_id, pad_id=tok.pad_id,
                    stop_ids=(tok.eos_id,), vocab_size=cfg.model.vocab_size, **kw)
    return cfg, tok, engine
