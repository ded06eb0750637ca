"""The pieces of a verify step (K+1 tokens through extend + acceptance + commit) that its profile looked at,
each pinned to a plain reference written from its definition (numpy, float64 where it computes):
- `greedy_ids` (greedy acceptance and the plain loop's greedy token) is numpy's argmax: the first maximal
  index, ties and NaN rows included;
- greedy `accept` emits the longest draft prefix equal to the argmax and then the argmax after it;
- the heads-first cache write (every verify step's KV write) puts new[b, i, g] at buf[b, g, pos[b, i]] and drops
  slots past the cache;
- `blocked_cache_attention` with several queries per row (the verify step's shape), on both sides of a
  prefix-size boundary of its `lax.switch`, is softmax attention over the keys at or before each query.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.sampling import accept, greedy_ids
from models.attention import PREFIX_MIN, blocked_cache_attention
from models.contract import step_positions
from models.layers import scatter_rows_heads_first


def test_greedy_ids_is_numpy_argmax_with_ties_inf_and_nan():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(6, 5, 37)).astype(np.float32)  # small integers: many ties per row
    x[0, 0] = -np.inf  # a row of -inf: index 0
    x[0, 1, [4, 9]] = np.inf  # first +inf
    x[1, 2, [7, 20]] = np.nan  # argmax reports the first NaN
    x[2, 3, 36] = 99.0  # the last index
    got = np.asarray(jax.jit(greedy_ids)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def reference_accept(logits, draft, draft_len):
    """Greedy speculative acceptance from its definition, row by row."""
    n_out, nxt_out = [], []
    for lg, d, m in zip(logits, draft, draft_len):
        g = [int(np.argmax(row)) for row in lg]
        n = 0
        while n < m and d[n] == g[n]:
            n += 1
        n_out.append(n)
        nxt_out.append(g[n])
    return np.asarray(n_out), np.asarray(nxt_out)


def test_greedy_accept_matches_reference_with_ties():
    rng = np.random.default_rng(1)
    b, k, v = 7, 4, 11
    logits = rng.integers(0, 3, size=(b, k + 1, v)).astype(np.float32)  # ties in most rows
    greedy = np.argmax(logits, axis=-1)
    draft = rng.integers(0, v, size=(b, k)).astype(np.int32)
    for i, take in enumerate([0, 1, 2, 3, 4, 4, 2]):  # rows that agree with the argmax for `take` tokens
        draft[i, :take] = greedy[i, :take]
        if take < k:
            draft[i, take] = (greedy[i, take] + 1) % v
    draft_len = np.asarray([4, 4, 4, 4, 4, 2, 0], np.int32)  # short and empty drafts stop acceptance early
    zeros = jnp.zeros((b,), jnp.float32)
    n, nxt = jax.jit(accept)(jnp.asarray(logits), jnp.asarray(draft), jnp.asarray(draft_len),
                             jnp.zeros((b, 2), jnp.uint32), jnp.zeros((b,), jnp.int32), zeros,
                             jnp.zeros((b,), jnp.int32), zeros + 1)
    ref_n, ref_next = reference_accept(logits, draft, draft_len)
    np.testing.assert_array_equal(np.asarray(n), ref_n)
    np.testing.assert_array_equal(np.asarray(nxt), ref_next)
    assert ref_n.tolist() == [0, 1, 2, 3, 4, 2, 0]  # the cases the draft was built for


def test_heads_first_cache_write_matches_reference():
    rng = np.random.default_rng(2)
    b, g, s, d, k = 3, 2, 16, 4, 5
    buf = rng.normal(size=(b, g, s, d)).astype(np.float32)
    new = rng.normal(size=(b, k, g, d)).astype(np.float32)
    pos = np.asarray([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13], [13, 14, 15, 16, 17]], np.int32)  # last: 2 dropped
    got = np.asarray(jax.jit(scatter_rows_heads_first)(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(pos)))
    ref = buf.copy()
    for bi in range(b):
        for i in range(k):
            if pos[bi, i] < s:
                for gi in range(g):
                    ref[bi, gi, pos[bi, i]] = new[bi, i, gi]
    np.testing.assert_array_equal(got, ref)


def plain_cache_attention(q, kc, vc, pos):
    """q [K, H, D], cache k/v [G, S, D], pos [K]: softmax over the slots j <= pos[i] (float64)."""
    q, kc, vc = (np.asarray(a, np.float64) for a in (q, kc, vc))
    r = q.shape[1] // kc.shape[0]
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        js = np.arange(pos[i] + 1)
        for h in range(q.shape[1]):
            s = kc[h // r, js] @ q[i, h] / math.sqrt(q.shape[2])
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ vc[h // r, js]
    return out


@pytest.mark.parametrize("kq", [1, 5])
def test_cache_attention_of_a_verify_step_matches_reference(kq):
    rng = np.random.default_rng(3 + kq)
    b, h, g, d, s_total = 3, 4, 2, 8, 4 * PREFIX_MIN
    q = rng.normal(size=(b, kq, h, d)).astype(np.float32)
    kc = rng.normal(size=(b, g, s_total, d)).astype(np.float32)
    vc = rng.normal(size=(b, g, s_total, d)).astype(np.float32)
    fn = jax.jit(lambda q, k, v, lengths: blocked_cache_attention(
        q, k, v, step_positions(lengths, kq), block=PREFIX_MIN, n_valid=jnp.max(lengths) + kq))
    # rows of different lengths; the longest crosses the 64-slot prefix (another switch branch), then 128
    for lengths in ([3, 40, 60], [3, 40, PREFIX_MIN - 2], [70, 5, 2 * PREFIX_MIN + 1]):
        lengths = np.asarray(lengths, np.int32)
        got = np.asarray(fn(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(lengths)))
        pos = lengths[:, None] + np.arange(kq)[None, :]
        ref = np.stack([plain_cache_attention(q[i], kc[i], vc[i], pos[i]) for i in range(b)])
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


def test_host_callback_is_effect_free_so_the_loop_keeps_jits_fast_dispatch():
    """The speculative loop's host callback must not carry a JAX effect: jit's C++ dispatch path is off for any
    executable with effects, and the Python path cost ~2.5 ms per speculative request on decoder_s0 (a call with
    max_steps=0 took 3.4 ms with an effect, 0.9 ms without). The callback still runs exactly once per loop
    iteration (its result is the next iteration's carry); the value it returns is checked here too."""
    from decode.speculation import host_callback

    calls = []

    def fn(x):
        calls.append(x.copy())
        return (x[:, :2] + 1).astype(np.int32)

    shape = jax.ShapeDtypeStruct((1, 2), jnp.int32)

    def loop(x):
        return jax.lax.fori_loop(0, 3, lambda i, c: host_callback(fn, shape, jnp.concatenate([c, c], 1)), x)

    x = jnp.zeros((1, 2), jnp.int32)
    assert not jax.make_jaxpr(loop)(x).effects
    out = jax.jit(loop)(x)
    np.testing.assert_array_equal(np.asarray(out), [[3, 3]])
    assert len(calls) == 3
