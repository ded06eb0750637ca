"""An independent reference for the Mamba mixer: a plain numpy (float64) transcription of Mamba-1's
equations (Gu & Dao 2023, mamba_simple.py, written from the paper's recurrence, not from models/mamba.py),
with fixed random weights (every parameter random, including the conv bias, A and D, so no symmetry hides a
mistake). The full forward (sequential and associative inner scans, a chunk that does not divide the length)
and the cached step (extend one token + commit) must both match it; swapping B and C, or reversing the conv
kernel, fails every test here (checked by hand once, see the i15 report).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.mamba import Mamba

D_MODEL, D_STATE, D_CONV, EXPAND = 8, 4, 4, 2
L = 11


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _weights(seed=0):
    e, n = EXPAND * D_MODEL, D_STATE
    r = math.ceil(D_MODEL / 16)
    rng = np.random.default_rng(seed)
    return {
        "W_in": rng.normal(0, 0.4, (D_MODEL, 2 * e)),  # u @ W_in -> [x | z]
        "conv_w": rng.normal(0, 0.5, (D_CONV, e)),  # conv_w[k] pairs with input t - (D_CONV - 1) + k
        "conv_b": rng.normal(0, 0.2, (e,)),
        "W_x": rng.normal(0, 0.4, (e, r + 2 * n)),  # -> [delta (r) | B (n) | C (n)]
        "W_dt": rng.normal(0, 0.5, (r, e)),
        "b_dt": rng.normal(-2.0, 0.5, (e,)),
        "A_log": np.log(rng.uniform(0.5, 4.0, (e, n))),
        "D": rng.normal(1.0, 0.3, (e,)),
        "W_out": rng.normal(0, 0.3, (e, D_MODEL)),
    }


def reference(u_LxD, w):
    """Mamba-1 for one sequence, step by step, float64. Returns (out [L, D], h [E, N], last conv inputs)."""
    e, n = EXPAND * D_MODEL, D_STATE
    r = w["W_dt"].shape[0]
    xz = u_LxD @ w["W_in"]
    x, z = xz[:, :e], xz[:, e:]
    # depthwise Conv1d, cross-correlation over the input left-padded with D_CONV - 1 zeros (PyTorch's form)
    xpad = np.concatenate([np.zeros((D_CONV - 1, e)), x])
    xc = np.stack([sum(w["conv_w"][k] * xpad[t + k] for k in range(D_CONV)) for t in range(len(x))]) + w["conv_b"]
    xc = _silu(xc)
    dbc = xc @ w["W_x"]
    delta, Bm, Cm = dbc[:, :r], dbc[:, r:r + n], dbc[:, r + n:]
    dt = _softplus(delta @ w["W_dt"] + w["b_dt"])
    A = -np.exp(w["A_log"])
    h = np.zeros((e, n))
    ys = []
    for t in range(len(x)):
        h = np.exp(dt[t][:, None] * A) * h + (dt[t] * xc[t])[:, None] * Bm[t][None, :]
        ys.append(h @ Cm[t] + w["D"] * xc[t])
    y = np.stack(ys) * _silu(z)
    return y @ w["W_out"], h, xpad[-(D_CONV - 1):]


def _mixer(w, scan_inner="seq", scan_chunk=64):
    m = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND, scan_chunk=scan_chunk, scan_inner=scan_inner,
              rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    m.in_proj.kernel[...] = f32(w["W_in"])
    m.conv_kernel[...] = f32(w["conv_w"])
    m.conv_bias[...] = f32(w["conv_b"])
    m.x_proj.kernel[...] = f32(w["W_x"])
    m.dt_proj.kernel[...] = f32(w["W_dt"])
    m.dt_proj.bias[...] = f32(w["b_dt"])
    m.A_log[...] = f32(w["A_log"])
    m.D[...] = f32(w["D"])
    m.out_proj.kernel[...] = f32(w["W_out"])
    return m


def _jitted(m):
    """m's forward, extend and commit, each jitted (one compile per shape; op by op they took a minute)."""
    gdef, state = nnx.split(m)
    fwd = jax.jit(lambda u: nnx.merge(gdef, state)(u))
    extend = jax.jit(lambda u, cache: nnx.merge(gdef, state).extend(u, cache))
    commit = jax.jit(lambda cache, pending, n: nnx.merge(gdef, state).commit(cache, pending, n))
    return fwd, extend, commit


@pytest.fixture(scope="module")
def case():
    w = _weights()
    u = np.random.default_rng(1).normal(0, 1, (2, L, D_MODEL))
    refs = [reference(u[b], w) for b in range(2)]
    return w, u, refs


def _close(got, want, what):
    err = np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-6)
    assert err < 1e-5, f"{what}: max relative error {err:.2e}"


@pytest.mark.parametrize("scan_inner,scan_chunk", [("seq", 64), ("assoc", 64), ("seq", 4), ("assoc", 4)])
def test_forward_matches_the_numpy_reference(case, scan_inner, scan_chunk):
    """Both inner scans (the associative one is what accelerators run), one chunk and chunks of 4 over 11 steps."""
    w, u, refs = case
    out = _jitted(_mixer(w, scan_inner, scan_chunk))[0](jnp.asarray(u, jnp.float32))
    for b in range(2):
        _close(out[b], refs[b][0], f"forward row {b} ({scan_inner}, chunk {scan_chunk})")


@pytest.mark.parametrize("scan_inner", ["seq", "assoc"])
def test_cached_steps_match_the_numpy_reference(case, scan_inner):
    """One token at a time through extend + commit, then a 3-token extend with a partial commit (rollback)."""
    w, u, refs = case
    m = _mixer(w, scan_inner, 4)
    _, extend, commit = _jitted(m)
    cache = m.init_cache(2)
    uj = jnp.asarray(u, jnp.float32)
    for t in range(L - 3):
        out, cache, pending = extend(uj[:, t:t + 1], cache)
        cache = commit(cache, pending, jnp.ones((2,), jnp.int32))
        for b in range(2):
            _close(out[b, 0], refs[b][0][t], f"step {t} row {b}")
    # verify-style: 3 tokens at once, keep 2 in row 0 and all 3 in row 1
    out, cache3, pending = extend(uj[:, L - 3:], cache)
    for b in range(2):
        _close(out[b], refs[b][0][L - 3:], f"3-token extend row {b}")
    cache3 = commit(cache3, pending, jnp.asarray([2, 3], jnp.int32))
    ref_row0 = reference(u[0, :L - 1], w)
    _close(cache3.ssm[0], ref_row0[1], "state after a partial commit")
    _close(cache3.conv[0], ref_row0[2], "conv window after a partial commit")
    _close(cache3.ssm[1], refs[1][1], "state after a full commit")
    _close(cache3.conv[1], refs[1][2], "conv window after a full commit")


def test_the_reference_is_sensitive_to_the_mistakes_it_guards_against(case):
    """The reference itself: with B and C swapped, or the conv kernel reversed, its output moves by O(1)."""
    w, u, refs = case
    r = w["W_dt"].shape[0]
    n = D_STATE
    swapped = dict(w, W_x=np.concatenate([w["W_x"][:, :r], w["W_x"][:, r + n:], w["W_x"][:, r:r + n]], axis=1))
    reversed_ = dict(w, conv_w=w["conv_w"][::-1])
    for bad in (swapped, reversed_):
        diff = np.max(np.abs(reference(u[0], bad)[0] - refs[0][0])) / np.max(np.abs(refs[0][0]))
        assert diff > 0.05, diff
