"""The jitted side of decoding: prefill, the plain generation loop and the speculative loop.

Works for any model that follows the contract of models/contract.py (docs/ARCHITECTURE.md, "The model
contract"); nothing here looks inside the cache except `cache.lengths`.

- The model is split once with `nnx.split` and merged inside plain `jax.jit` functions (plain `nnx.jit`
  costs 2-3 ms per call on CPU); they take the parameters as a flat list of arrays (see `Loops`). The cache
  and the decode state are donated and returned.
- Prefill runs the right-padded prompts (bucketed to a power of two) through `extend` and commits each
  row's prompt length, so padding is inert for every architecture. With `prefix_prompt` the prompt is read
  as a bidirectional prefix (prefix LM); every later step is causal. It also samples the first token.
- Plain generation is one `lax.while_loop` over a `DecodeState` of fixed shapes; it stops when the step
  budget is spent or every row is done. The step budget is a traced value, so the loop can be resumed
  chunk by chunk (streaming) without recompiling.
- Speculative decoding is one jitted `lax.while_loop` too, over a `SpecState`. Each iteration verifies
  [pending, draft...] with extend + acceptance + commit, at the smallest verify size that holds the longest
  draft (a 0-or-1-trip loop per size, so one compile covers them all), then calls the host once with the emitted
  tokens (decode/speculation.py): the host updates the drafters and returns the next drafts. When no row
  drafts, the iteration is a plain stretch of 1, 2, 4, ... steps without the host (see `_speculate`).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from decode.request import Knobs
from decode.sampling import accept, sample
from models.contract import run_if


class DecodeState(NamedTuple):
    """The plain loop's carry (every field [B, ...] except the scalar step counter)."""

    cache: Any  # the model's Cache
    tokens: jax.Array  # [B, max_len] emitted ids, pad_id beyond n
    n: jax.Array  # [B] tokens emitted so far
    last: jax.Array  # [B] the last emitted token: the next step's input
    done: jax.Array  # [B] stopped (stop id, budget, or a padded row)
    step: jax.Array  # [] loop steps run so far (the streaming budget counts against it)
    keys: jax.Array  # [B, 2] per-row PRNG keys
    max_new: jax.Array  # [B] token budgets


class SpecState(NamedTuple):
    """The speculative loop's carry; inputs, draft_len and live come back from the host every step."""

    cache: Any  # the model's Cache
    inputs: jax.Array  # [B, max verify size + 1]: the pending token, then the draft
    draft_len: jax.Array  # [B] real draft tokens in inputs[:, 1:]
    live: jax.Array  # [B] rows still generating
    room: jax.Array  # [B] tokens each row may still emit (a plain stretch stops a row there)
    stretch: jax.Array  # [] plain steps the next undrafted iteration runs (1, doubling while nothing drafts)
    step: jax.Array  # [] loop iterations (= host calls) run so far


class Loops:
    """The jitted functions of one engine: `prefill`, `generate`, `speculate`.

    `traces` counts how often each was traced (= compiled). `host_call(shape, emitted)` is the speculative
    loop's host callback (decode.speculation.Host.call): one int32 array in, one int32 array of `shape` out.
    `max_stretch` is the longest plain stretch the speculative loop may run between host calls (static: it
    sizes the emitted array; a request may ask for less, see `_speculate`).
    """

    def __init__(self, graphdef, params_def, *, max_len: int, pad_id: int, verify_sizes: tuple,
                 prefix_prompt: bool, host_call: Callable, max_stretch: int = 16,
                 spec_compiler_options: dict | None = None):
        self.graphdef, self.params_def = graphdef, params_def
        self.max_stretch = max(int(max_stretch), 1)
        self.spec_options = dict(spec_compiler_options or {})
        self.max_len, self.pad_id = int(max_len), int(pad_id)
        self.verify_sizes = tuple(verify_sizes)
        self.prefix_prompt = bool(prefix_prompt)
        self.host_call = host_call
        self.traces: collections.Counter = collections.Counter()
        self.prefill = jax.jit(self._prefill, static_argnames=("observe_k",))
        self.generate = jax.jit(self._generate, donate_argnums=(1,))
        self.speculate = jax.jit(self._speculate, static_argnames=("observe_k",), donate_argnums=(1,),
                                 compiler_options=self.spec_options or None)

    def _model(self, params):
        # A flat list of arrays, not the nnx.State (see Engine.__init__: flattening the State's Variable nodes
        # in Python on every call cost ~1.4 ms per verify step).
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.params_def, params))
        prepare = getattr(model, "prepare_decoding", None)
        if prepare is not None:  # per-call work outside the step loops (models.base.LM.prepare_decoding)
            prepare()
        return model

    # ---- prefill ----------------------------------------------------------------------------------
    def _prefill(self, params, tokens_BxS, plen_B, keys_Bx2, max_new_B, stop_S, knobs: Knobs, *, observe_k: int):
        """(DecodeState after the prompt and the first sampled token, top-k ids [B, S, observe_k] or None)."""
        self.traces["prefill"] += 1
        model = self._model(params)
        b = tokens_BxS.shape[0]
        cache = model.init_cache(b, self.max_len)
        # Prefix LM: the prompt (up to each row's length; the padding after it stays invisible) is read
        # bidirectionally, as the model was trained to read it. Decode and verify steps pass no prefix.
        logits_BxSxV, cache = model.extend(tokens_BxS, cache, prefix_len_B=plen_B if self.prefix_prompt else None)
        cache = model.commit(cache, plen_B)
        rows = jnp.arange(b)
        first = sample(logits_BxSxV[rows, plen_B - 1], keys_Bx2, plen_B, *knobs)
        live = max_new_B > 0
        out_BxW = jnp.full((b, self.max_len), self.pad_id, jnp.int32)
        out_BxW = out_BxW.at[rows, jnp.where(live, 0, self.max_len)].set(first, mode="drop")
        n = live.astype(jnp.int32)
        done = ~live | jnp.isin(first, stop_S) | (n >= max_new_B)
        state = DecodeState(cache=cache, tokens=out_BxW, n=n, last=first, done=done, step=jnp.zeros((), jnp.int32),
                            keys=keys_Bx2, max_new=max_new_B)
        topk = jax.lax.top_k(logits_BxSxV, observe_k)[1] if observe_k else None
        return state, topk

    # ---- plain generation -------------------------------------------------------------------------
    def _generate(self, params, state: DecodeState, n_steps, stop_S, knobs: Knobs) -> DecodeState:
        """Up to n_steps more decode steps (a traced budget: streaming resumes without recompiling)."""
        self.traces["generate"] += 1
        model = self._model(params)
        until = state.step + n_steps
        b, w = state.tokens.shape
        rows = jnp.arange(b)

        def cond(s: DecodeState):
            return (s.step < until) & ~jnp.all(s.done)

        def body(s: DecodeState):
            live = ~s.done
            logits_Bx1xV, cache = model.extend(s.last[:, None], s.cache)
            cache = model.commit(cache, live.astype(jnp.int32))
            tok = sample(logits_Bx1xV[:, 0], s.keys, cache.lengths, *knobs)
            out = s.tokens.at[rows, jnp.where(live, s.n, w)].set(tok, mode="drop")
            n = s.n + live
            done = s.done | jnp.isin(tok, stop_S) | (n >= s.max_new)
            return s._replace(cache=cache, tokens=out, n=n, last=jnp.where(live, tok, s.last), done=done,
                              step=s.step + 1)

        return jax.lax.while_loop(cond, body, state)

    # ---- speculative generation -------------------------------------------------------------------
    def _verify_step(self, model, cache, inputs_BxK1, draft_len_B, live_B, keys_Bx2, knobs: Knobs, observe_k: int):
        """extend [pending, draft...], accept, commit: (cache, emitted tokens [B, K+1], counts, top-k ids)."""
        logits_BxK1xV, cache = model.extend(inputs_BxK1, cache)
        draft_BxK = inputs_BxK1[:, 1:]
        n_acc, nxt = accept(logits_BxK1xV, draft_BxK, draft_len_B, keys_Bx2, cache.lengths + 1, *knobs)
        # The pending token and the accepted drafts become final; the correction/bonus is the next pending.
        cache = model.commit(cache, jnp.where(live_B, n_acc + 1, 0))
        b, k1 = inputs_BxK1.shape
        i = jnp.arange(k1)[None, :]
        drafts = jnp.concatenate([draft_BxK, jnp.full((b, 1), self.pad_id, draft_BxK.dtype)], axis=1)
        out_BxK1 = jnp.where(i < n_acc[:, None], drafts, jnp.where(i == n_acc[:, None], nxt[:, None], self.pad_id))
        topk = jax.lax.top_k(logits_BxK1xV, observe_k)[1] if observe_k else jnp.zeros((b, k1, 0), jnp.int32)
        return cache, out_BxK1, n_acc + 1, topk.astype(jnp.int32)

    def _speculate(self, params, cache, inputs_BxKm, draft_len_B, live_B, room_B, max_steps, max_stretch, stop_S,
                   keys_Bx2, knobs: Knobs, *, observe_k: int) -> SpecState:
        """Iterations until the host reports no live row; the host callback owns drafts and output.
        The cache is donated; the loop starts from a SpecState built here (step 0).

        An iteration in which no row drafts is a plain stretch: `stretch` plain steps (size-0 verify steps) in
        a row without calling the host, each row stopping at a stop id or its budget (`room`). The stretch
        doubles (1, 2, 4, ... max_stretch, a traced cap <= the engine's static `max_stretch`) while nothing
        drafts and falls back to 1 after any draft, so a drafter that finds a match waits at most as many
        steps as already went undrafted. max_stretch <= 1: one plain step per host call."""
        self.traces["speculate"] += 1
        model = self._model(params)
        b, km = inputs_BxKm.shape  # km = max verify size + 1
        w = max(km, self.max_stretch)  # emitted tokens per row and iteration (a verify or a stretch)
        sizes = self.verify_sizes
        rows = jnp.arange(b)
        cap = jnp.maximum(jnp.asarray(max_stretch, jnp.int32), 1)

        def verify(k, s: SpecState):
            def run(carry):
                cache = carry[0]
                cache, out, counts, topk = self._verify_step(model, cache, s.inputs[:, :k + 1], s.draft_len, s.live,
                                                             keys_Bx2, knobs, observe_k)
                out = jnp.pad(out, ((0, 0), (0, w - k - 1)), constant_values=self.pad_id)
                return (cache, out, jnp.where(s.live, counts, 0), jnp.pad(topk, ((0, 0), (0, w - k - 1), (0, 0))),
                        s.live.astype(jnp.int32))
            return run

        def plain(s: SpecState):
            """s.stretch plain steps from the pending tokens: (cache, tokens [B, w], count = steps [B], top-k)."""
            zeros = jnp.zeros((b,), jnp.int32)

            def run(carry):
                def cond(c):
                    return (c[-1] < s.stretch) & jnp.any(c[4])

                def body(c):
                    cache, tok, out, cnt, alive, topk_buf, j = c
                    cache, o, _, topk = self._verify_step(model, cache, tok[:, None], zeros, alive, keys_Bx2, knobs,
                                                          observe_k)
                    new = o[:, 0]
                    at = jnp.where(alive, cnt, w)
                    out = out.at[rows, at].set(new, mode="drop")
                    topk_buf = topk_buf.at[rows, at].set(topk[:, 0], mode="drop")
                    cnt = cnt + alive
                    tok = jnp.where(alive, new, tok)
                    alive = alive & ~jnp.isin(new, stop_S) & (cnt < s.room)
                    return cache, tok, out, cnt, alive, topk_buf, j + 1

                start = (carry[0], s.inputs[:, 0], carry[1], zeros, s.live, carry[3], jnp.zeros((), jnp.int32))
                cache, _, out, cnt, _, topk_buf, _ = jax.lax.while_loop(cond, body, start)
                return cache, out, cnt, topk_buf, cnt
            return run

        # One int32 array each way: every callback operand and result costs a conversion (~10-30 us each).
        host_shape = jax.ShapeDtypeStruct((b, km + 3), jnp.int32)  # next inputs, draft length, live, room

        def body(s: SpecState):
            size = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.max(s.draft_len),  # smallest that fits
                                    method="compare_all")  # one fused comparison, not a while loop
            size = jnp.minimum(size, len(sizes) - 1)
            # One `run_if` (a while loop of 0 or 1 trips) per size, in a chain, not lax.cond or lax.switch:
            # XLA:CPU copies the cache inside a conditional branch that updates it (the KV writes stop being in
            # place; measured on decoder_tiny: +0.28 ms per step with one other size, +0.39 ms with three).
            carry = (s.cache, jnp.full((b, w), self.pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
                     jnp.zeros((b, w, observe_k), jnp.int32), jnp.zeros((b,), jnp.int32))
            for j, k in enumerate(sizes):
                carry = run_if(size == j, plain(s) if k == 0 else verify(k, s), carry)
            cache, out, counts, topk, steps = carry
            # [emitted tokens (w) | count | steps | top-k ids (w * observe_k)] per row, see speculation.Host.step
            emitted = jnp.concatenate([out, counts[:, None], steps[:, None], topk.reshape(b, -1)], axis=1)
            nxt = self.host_call(host_shape, emitted)
            stretch = jnp.where(size == 0, jnp.minimum(2 * s.stretch, cap), 1) if sizes[0] == 0 else s.stretch
            return SpecState(cache=cache, inputs=nxt[:, :km], draft_len=nxt[:, km], live=nxt[:, km + 1] > 0,
                             room=nxt[:, km + 2], stretch=stretch, step=s.step + 1)

        def cond(s: SpecState):
            return jnp.any(s.live) & (s.step < max_steps)

        start = SpecState(cache=cache, inputs=inputs_BxKm, draft_len=draft_len_B, live=live_B, room=room_B,
                          stretch=jnp.ones((), jnp.int32), step=jnp.zeros((), jnp.int32))
        return jax.lax.while_loop(cond, body, start)
