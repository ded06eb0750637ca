"""The CPU selective scan (models/mamba.py `_seq_scan`: batch-major loops over a [B, N, E] state, a custom VJP
that recomputes the states every SEQ_CHUNK steps) against the recurrence written out here from the equations,
in float64 so that a wrong term cannot hide in fp32 rounding:

    h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t,    y_t = sum_n C_t[n] h_t[:, n]

Values and the gradients of all six inputs (through y and the final state both) for lengths below, at and
past SEQ_CHUNK, with and without a shorter last chunk; the state-only path that `commit` uses; and results
that do not depend on the chunk."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.mamba import SEQ_CHUNK, selective_scan


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def plain_scan(x, dt, A, Bm, Cm, h0):
    """The recurrence, one Python step at a time (no lax.scan, no chunks, the [B, E, N] layout)."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = jnp.exp(dt[:, t, :, None] * A[None]) * h + (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append(jnp.sum(h * Cm[:, t, None, :], axis=-1))
    return jnp.stack(ys, axis=1), h


def inputs(b, l, e, n, seed=0, dtype=jnp.float64):
    ks = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(ks[0], (b, l, e), dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, e), dtype) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[2], (e, n), dtype))  # every entry different: no symmetry hides a swap
    Bm, Cm = jax.random.normal(ks[3], (b, l, n), dtype), jax.random.normal(ks[4], (b, l, n), dtype)
    h0 = jax.random.normal(ks[5], (b, e, n), dtype)
    w_y, w_h = jax.random.normal(ks[6], (b, l, e), dtype), jax.random.normal(ks[7], (b, e, n), dtype)
    return (x, dt, A, Bm, Cm, h0), (w_y, w_h)


def value_and_grads(scan, args, w):
    def loss(*a):
        y, h = scan(*a)
        return jnp.sum(y * w[0]) + jnp.sum(h * w[1])
    return jax.jit(jax.value_and_grad(loss, tuple(range(6))))(*args)


@pytest.mark.parametrize("l,chunk", [(5, 64), (SEQ_CHUNK, 64), (2 * SEQ_CHUNK + 3, 64), (13, 4), (12, 4), (7, 1)])
def test_seq_scan_values_and_gradients_equal_the_recurrence(x64, l, chunk):
    args, w = inputs(2, l, 6, 3, seed=l)
    scan = functools.partial(selective_scan, chunk=chunk, inner="seq")
    y, h = jax.jit(scan)(*args)
    y_ref, h_ref = jax.jit(plain_scan)(*args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12)
    (v, g), (v_ref, g_ref) = value_and_grads(scan, args, w), value_and_grads(plain_scan, args, w)
    np.testing.assert_allclose(v, v_ref, rtol=1e-12)
    for name, a, r in zip(("x", "dt", "A", "B", "C", "h0"), g, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12, err_msg=f"d/d{name} (L {l}, chunk {chunk})")


def test_state_only_scan_is_the_recurrences_final_state_and_dt_zero_steps_are_inert(x64):
    """`commit` re-scans with want_y=False and dt = 0 past the accepted tokens: that must be the state after
    exactly the accepted ones."""
    (x, dt, A, Bm, Cm, h0), _ = inputs(3, 2 * SEQ_CHUNK + 5, 6, 3, seed=7)
    _, h = selective_scan(x, dt, A, Bm, None, h0, chunk=64, inner="seq", want_y=False)
    np.testing.assert_allclose(h, plain_scan(x, dt, A, Bm, Cm, h0)[1], rtol=1e-12, atol=1e-12)
    keep = jnp.arange(x.shape[1])[None, :] < jnp.array([0, 4, 20])[:, None]
    _, h = selective_scan(x, jnp.where(keep[..., None], dt, 0.0), A, Bm, None, h0, chunk=64, inner="seq",
                          want_y=False)
    for row, n in enumerate((0, 4, 20)):
        r = slice(row, row + 1)
        if n == 0:
            np.testing.assert_array_equal(h[r], h0[r])
            continue
        alone = selective_scan(x[r, :n], dt[r, :n], A, Bm[r, :n], None, h0[r], chunk=64, inner="seq", want_y=False)[1]
        np.testing.assert_array_equal(h[r], alone)  # exp(0) h + 0 B = h exactly: the padded steps change nothing
        np.testing.assert_allclose(h[r], plain_scan(x[r, :n], dt[r, :n], A, Bm[r, :n], Cm[r, :n], h0[r])[1],
                                   rtol=1e-12, atol=1e-12)


def test_seq_scan_results_do_not_depend_on_the_chunk():
    """The chunk only decides which states the backward pass recomputes: the same operations in the same order,
    so values and gradients are bit-identical (fp32)."""
    args, w = inputs(2, 37, 8, 4, seed=3, dtype=jnp.float32)
    outs = [value_and_grads(functools.partial(selective_scan, chunk=c, inner="seq"), args, w) for c in (1, 5, 64)]
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)
