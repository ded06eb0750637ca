"""Mamba-1 (S6) mixer with a chunked, rematerialised selective scan and a rollback-able decode cache.

Equations (Gu & Dao 2023, `mamba_simple.py`): x, z = split(W_in u); x~ = silu(causal_conv(x));
[delta, B, C] = W_x x~; dt = softplus(W_dt delta + b_dt); h_t = exp(dt_t A) h_{t-1} + (dt_t x~_t) B_t;
y_t = C_t . h_t + D x~_t; out = W_out (y * silu(z)).

The conv, dt, the scan and the state are in fp32 (or better, under x64) whatever the compute dtype: SSMs are
sensitive to their recurrent dynamics. Letters: E = expand * d_model (inner width), N = d_state,
R = dt_rank, T = scan chunk length.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.contract import MambaCache
from models.layers import dense, split_heads


def acc_dtype(dtype):
    """Accumulation dtype: fp32, or fp64 when the inputs are fp64 (gradient checks under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


# The sequential scan keeps the state every SEQ_CHUNK steps at most (whatever `chunk` says: its results do not
# depend on it), and its backward pass recomputes that many states at a time into a [SEQ_CHUNK, B, N, E]
# stack: a fresh buffer every step, whose first touch costs more than the recomputation saves beyond this
# (samba_tiny's scan fwd + bwd, 2-core CPU, one process, alternated: 143 ms at 16 against 171 at 8, 155 at
# 32 and 183 at its scan_chunk 64; its whole train step 1.17x faster at 16 than at 64).
SEQ_CHUNK = 16


def resolve_inner(inner: str) -> str:
    """'auto': a sequential inner scan on CPU (about 2x faster there), associative elsewhere (parallel)."""
    if inner == "auto":
        return "seq" if jax.default_backend() == "cpu" else "assoc"
    return inner


def selective_scan(x_BxLxE, dt_BxLxE, A_ExN, B_BxLxN, C_BxLxN, h0_BxExN, *, chunk: int, inner: str = "auto",
                   want_y: bool = True):
    """h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t;  y_t = C_t . h_t.  Returns (y_BxLxE or None, h_L).

    (B, L, E, N) is never materialised. `inner` "seq" (CPU, see `resolve_inner`): `_seq_scan`, a sequential
    loop over the steps reading the [B, L, .] inputs in place, with a custom VJP that keeps the state every
    min(chunk, SEQ_CHUNK) steps and recomputes them in the backward pass; its results do not depend on the
    chunk. "assoc" (accelerators): chunks of T steps, an associative scan (log depth) within each, the chunk
    body wrapped in `jax.checkpoint` and differentiated by JAX; padding steps have dt = 0, which leaves the
    state unchanged (exp(0) = 1, zero input).
    """
    b, l, e = x_BxLxE.shape
    acc = acc_dtype(x_BxLxE.dtype)
    x, delta, Bm = (a.astype(acc) for a in (x_BxLxE, dt_BxLxE, B_BxLxN))
    Cm = C_BxLxN.astype(acc) if want_y else None
    A = A_ExN.astype(acc)
    h0 = h0_BxExN.astype(acc)

    if l == 1:  # one decoding step: no scan at all
        h = jnp.exp(delta[:, 0, :, None] * A) * h0 + (delta[:, 0] * x[:, 0])[:, :, None] * Bm[:, 0, None, :]
        y = jnp.einsum("ben,bn->be", h, Cm[:, 0])[:, None] if want_y else None
        return y, h

    inner = resolve_inner(inner)
    t = min(chunk, l)
    n_chunks = -(-l // t)
    pad = n_chunks * t - l

    def to_chunks(a):  # (B, L, F) -> (n_chunks, B, T, F); dt = 0 pads
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
        return a.reshape(b, n_chunks, t, a.shape[-1]).swapaxes(0, 1)

    if inner == "seq":  # batch-major, a [B, N, E] state: no time-major copies (see _seq_scan)
        args = (min(t, SEQ_CHUNK), x, delta, A.T, Bm, Cm, h0.swapaxes(1, 2))
        y, h = _seq_scan(*args) if want_y else _seq_loops(*args, want_y=False, keep=False)[:2]
        return y, h.swapaxes(1, 2)

    xs = (to_chunks(x), to_chunks(delta), to_chunks(Bm)) + ((to_chunks(Cm),) if want_y else ())

    @jax.checkpoint
    def body(h_BxExN, inp):  # associative within the chunk (log depth)
        x_c, dt_c, B_c = inp[:3]
        dA_BxTxExN = jnp.exp(dt_c[..., None] * A)
        dBx_BxTxExN = (dt_c * x_c)[..., None] * B_c[:, :, None, :]
        a_cum, h_loc = jax.lax.associative_scan(_combine, (dA_BxTxExN, dBx_BxTxExN), axis=1)
        h_BxTxExN = a_cum * h_BxExN[:, None] + h_loc
        y = jnp.einsum("bten,btn->bte", h_BxTxExN, inp[3]) if want_y else None
        return h_BxTxExN[:, -1], y

    h, y = jax.lax.scan(body, h0, xs)
    if want_y:
        y = y.swapaxes(0, 1).reshape(b, n_chunks * t, e)[:, :l]
    return y, h


# ---- the sequential scan with a hand-written backward pass (CPU) -------------------------------------------
# Batch-major: x, dt [B, L, E] and B, C [B, L, N] are read in place at [:, t] and the outputs written in place
# (no time-major copies in or out); the state is [B, N, E] (E innermost: every per-step op is a contiguous
# vector op over E and the sums over N are adds of E-vectors, fused into one loop, no reduce op); A is [N, E].
# Loops over chunks of T steps with static trip counts (the last chunk may be shorter: no padding); the
# forward pass keeps only the state before each chunk. The backward pass recomputes one chunk's states
# before each step, h_{t-1}, then one reverse loop computes per step the adjoint G_t = dL/dh_t =
# a_{t+1} G_{t+1} + dy_t C_t and every input's gradient from it (a_t = exp(dt_t A), u_t = dt_t x_t):
#   dL/d(dt_t A) = G_t h_{t-1} a_t   ->  d dt_t = sum_n (.) A + (sum_n G_t B_t) x_t,  dA += sum_b (.) dt_t
#   d x_t = (sum_n G_t B_t) dt_t,  d B_t = sum_e G_t u_t,  d C_t = sum_e dy_t h_t
#   (h_t = a_t h_{t-1} + u_t B_t, so d C_t = sum_e (a_t h_{t-1}) dy_t + B_t sum_e u_t dy_t).
# The sums over e are batched mat-vec products over contiguous rows ([B, N, E] . [B, E]): no transposes.
# (The time-major version before it spent most of its time in a transpose of G h a to [E, N, B] per step,
# XLA's lowering of the einsum "ben,en->be" for d dt, and in copying each chunk's inputs out of the
# time-major stacks.)
def _ssm_step(h_BxNxE, x_BxE, dt_BxE, B_BxN, A_NxE):
    """One step of the recurrence in the [B, N, E] layout: exp(dt A) h + (dt x) B."""
    return jnp.exp(dt_BxE[:, None, :] * A_NxE) * h_BxNxE + (dt_BxE * x_BxE)[:, None, :] * B_BxN[:, :, None]


def _sum_n(term, n: int):
    """sum_i term(i) for i < n, term(i) [B, E] (a slice of a [B, N, E] product): an unrolled sum of E-vectors
    that XLA fuses into one loop reading the factors (a reduce op, or the product materialised first, was
    slower here)."""
    out = term(0)
    for i in range(1, n):
        out = out + term(i)
    return out


def _at(a, t):
    return jax.lax.dynamic_index_in_dim(a, t, 1, keepdims=False)


def _put(buf, v, t):
    return jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), t, 1)


def _chunks(l: int, chunk: int):
    """(number of full chunks, length of the last partial chunk or 0)."""
    return divmod(l, chunk)


def _seq_loops(chunk, x, dt, A, Bm, Cm, h0, *, want_y=True, keep=True):
    """The forward recurrence: (y [B, L, E] or None, h_L [B, N, E], the state before each chunk [K, B, N, E]
    or None). x, dt [B, L, E]; A [N, E]; B, C [B, L, N]; h0 [B, N, E]."""
    l = x.shape[1]
    full, tail = _chunks(l, chunk)

    def step(t, c):
        h, y = c
        h = _ssm_step(h, _at(x, t), _at(dt, t), _at(Bm, t), A)
        if want_y:
            C_t = _at(Cm, t)
            y = _put(y, _sum_n(lambda m: h[:, m] * C_t[:, m, None], h.shape[1]), t)
        return h, y

    def run(lo, n, h, y):  # n steps from lo (traced), a static trip count
        return jax.lax.fori_loop(0, n, lambda i, c: step(lo + i, c), (h, y))

    def chunk_body(k, c):
        h, y, hs = c
        if keep:
            hs = jax.lax.dynamic_update_index_in_dim(hs, h, k, 0)
        h, y = run(k * chunk, chunk, h, y)
        return h, y, hs

    y = jnp.zeros_like(x) if want_y else None
    hs = jnp.zeros((full + (tail > 0),) + h0.shape, h0.dtype) if keep else None
    h, y, hs = jax.lax.fori_loop(0, full, chunk_body, (h0, y, hs))
    if tail:
        if keep:
            hs = jax.lax.dynamic_update_index_in_dim(hs, h, full, 0)
        h, y = run(full * chunk, tail, h, y)
    return y, h, hs


def _seq_scan_fwd(chunk, x, dt, A, Bm, Cm, h0):
    y, h, hs = _seq_loops(chunk, x, dt, A, Bm, Cm, h0)
    return (y, h), (x, dt, A, Bm, Cm, hs)


def _seq_scan_bwd(chunk, res, cts):
    x, dt, A, Bm, Cm, hs = res
    dy, dh_end = cts
    l = x.shape[1]
    full, tail = _chunks(l, chunk)

    def back_chunk(k, n, c):  # the chunk k (traced) of n steps (static)
        g, dA, dx, ddt, dB, dC, stack = c
        lo = k * chunk

        def states(i, stack):  # the chunk again: the state before each step, computed into its slot
            t = lo + i
            h = _ssm_step(jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False), _at(x, t), _at(dt, t),
                          _at(Bm, t), A)
            return jax.lax.dynamic_update_index_in_dim(stack, h, i + 1, 0)
        stack = jax.lax.dynamic_update_index_in_dim(stack, jax.lax.dynamic_index_in_dim(hs, k, 0, keepdims=False),
                                                    0, 0)
        stack = jax.lax.fori_loop(0, n - 1, states, stack)

        def back(j, c3):  # g: dL/dh_t from the later steps
            g, dA, dx, ddt, dB, dC = c3
            i = n - 1 - j
            t = lo + i
            hp = jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False)
            x_t, dt_t, B_t, C_t, dy_t = (_at(a, t) for a in (x, dt, Bm, Cm, dy))
            a = jnp.exp(dt_t[:, None, :] * A)
            u = dt_t * x_t
            G = g + C_t[:, :, None] * dy_t[:, None, :]
            ah = a * hp
            q = G * ah
            GB = _sum_n(lambda m: G[:, m] * B_t[:, m, None], A.shape[0])
            d_dt = _sum_n(lambda m: q[:, m] * A[m], A.shape[0]) + GB * x_t
            dB_t = jnp.einsum("bne,be->bn", G, u)
            dC_t = jnp.einsum("bne,be->bn", ah, dy_t) + B_t * jnp.sum(u * dy_t, -1)[:, None]
            dA = dA + q * dt_t[:, None, :]  # summed over the batch once, after the loops
            return (a * G, dA, _put(dx, GB * dt_t, t), _put(ddt, d_dt, t), _put(dB, dB_t, t), _put(dC, dC_t, t))
        g, dA, dx, ddt, dB, dC = jax.lax.fori_loop(0, n, back, (g, dA, dx, ddt, dB, dC))
        return g, dA, dx, ddt, dB, dC, stack

    z = jnp.zeros_like
    c = (dh_end, z(dh_end), z(x), z(dt), z(Bm), z(Cm), jnp.zeros((min(chunk, l),) + dh_end.shape, dh_end.dtype))
    if tail:
        c = back_chunk(full, tail, c)
    g, dA, dx, ddt, dB, dC, _ = jax.lax.fori_loop(0, full, lambda kk, c: back_chunk(full - 1 - kk, chunk, c), c)
    return dx, ddt, dA.sum(0), dB, dC, g


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _seq_scan(chunk, x, dt, A, Bm, Cm, h0):
    """(y [B, L, E], h_L [B, N, E]): the sequential selective scan in chunks of `chunk` steps (layouts above)."""
    return _seq_loops(chunk, x, dt, A, Bm, Cm, h0, keep=False)[:2]


_seq_scan.defvjp(_seq_scan_fwd, _seq_scan_bwd)


def selective_scan_ref(x_BxLxE, dt_BxLxE, A_ExN, B_BxLxN, C_BxLxN, h0_BxExN):
    """Naive step-by-step recurrence (the definition), for tests."""
    def step(h, inp):
        x, dt, Bm, Cm = inp
        h = jnp.exp(dt[..., None] * A_ExN) * h + (dt * x)[..., None] * Bm[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, Cm)

    xs = tuple(a.swapaxes(0, 1) for a in (x_BxLxE, dt_BxLxE, B_BxLxN, C_BxLxN))
    h, y = jax.lax.scan(step, h0_BxExN, xs)
    return y.swapaxes(0, 1), h


def causal_conv(window_BxWxE, x_BxKxE, kernel_CxE, bias_E):
    """Depthwise causal conv of the K new inputs, given the C-1 inputs before them (zeros at the start).

    kernel[C-1] multiplies the current input (PyTorch Conv1d cross-correlation with left padding C-1).
    """
    c = kernel_CxE.shape[0]
    k = x_BxKxE.shape[1]
    acc = acc_dtype(x_BxKxE.dtype)
    full = jnp.concatenate([window_BxWxE.astype(acc), x_BxKxE.astype(acc)], axis=1)
    w = kernel_CxE.astype(acc)
    out = sum(full[:, i:i + k] * w[i] for i in range(c))
    return out + bias_E.astype(acc)


def inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class MambaPending(NamedTuple):
    """What `commit` replays: the K tokens' conv outputs x~, dt and B (fp32) and the raw conv inputs."""

    x: jax.Array  # [B, K, E]
    dt: jax.Array  # [B, K, E]
    B: jax.Array  # [B, K, N]
    xraw: jax.Array  # [B, K, E]


class Mamba(nnx.Module):
    """Mamba-1 mixer (the mixer protocol of models/base.py). `__call__` for a full sequence; `extend`/`commit`
    for its `MambaCache` (the last d_conv - 1 raw conv inputs and the fp32 SSM state).

    Causal by nature: a prefix (prefix LM) is never read bidirectionally here (`reads_prefix` is False), in
    the full forward as in `extend`; a prefix only changes where the loss falls.
    """

    reads_prefix = False

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int = 0,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, scan_chunk: int = 64,
                 scan_inner: str = "auto", rngs: nnx.Rngs, dtype, param_dtype, out_scale: float = 1.0):
        e = expand * d_model
        r = dt_rank or math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = e, d_state, d_conv, r
        self.scan_chunk, self.scan_inner = scan_chunk, scan_inner
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = dense(d_model, 2 * e, ("embed", "inner"), **kw)
        # PyTorch Conv1d default init (kaiming-uniform a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in = d_conv.
        bound = 1.0 / math.sqrt(d_conv)
        self.conv_kernel = nnx.Param(_init(_uniform_init(bound), ("conv", "inner"), rngs, (d_conv, e), param_dtype))
        self.conv_bias = nnx.Param(_init(_uniform_init(bound), ("inner",), rngs, (e,), param_dtype))
        self.x_proj = dense(e, r + 2 * d_state, ("inner", None), **kw)
        # dt_proj runs in fp32 (small); weight U(+-R^-0.5); bias = softplus^-1(dt), dt log-uniform in
        # [dt_min, dt_max], so softplus(bias) starts in that range (mamba_simple.py dt init).
        acc = acc_dtype(param_dtype)
        self.dt_proj = nnx.Linear(r, e, use_bias=True, dtype=acc, param_dtype=param_dtype, rngs=rngs,
                                  kernel_init=nnx.with_partitioning(_uniform_init(r ** -0.5), ("dt_rank", "inner")),
                                  bias_init=nnx.with_partitioning(
                                      _dt_bias_init(dt_min, dt_max, dt_init_floor), ("inner",)))
        # S4D-real: A = -(1..N) per channel, stored as log; D = 1.
        a_log = lambda key, shape, dtype: jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=dtype), shape))
        self.A_log = nnx.Param(_init(a_log, ("inner", "state"), rngs, (e, d_state), param_dtype))
        self.D = nnx.Param(_init(nnx.initializers.ones_init(), ("inner",), rngs, (e,), param_dtype))
        self.out_proj = dense(e, d_model, ("inner", "embed"), scale=out_scale, **kw)

    # ---- pieces shared by the full forward and the cached step -----------------------------------------
    def _A(self):
        return -jnp.exp(self.A_log[...].astype(acc_dtype(self.A_log[...].dtype)))

    def _mix(self, u_BxKxD, window_BxWxE, h0_BxExN):
        """Returns the output, the final state and the per-token scan inputs needed to replay the state."""
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        xz = self.in_proj(u_BxKxD)
        xraw_BxKxE, z_BxKxE = split_heads(xz, (e, e), xz.ndim - 1)
        xc_BxKxE = jax.nn.silu(causal_conv(window_BxWxE, xraw_BxKxE, self.conv_kernel[...], self.conv_bias[...]))
        proj = self.x_proj(xc_BxKxE.astype(self.dtype))
        acc = xc_BxKxE.dtype
        delta_BxKxR, B_BxKxN, C_BxKxN = split_heads(proj, (r, n, n), proj.ndim - 1)
        dt_BxKxE = jax.nn.softplus(self.dt_proj(delta_BxKxR.astype(acc)).astype(acc))
        B_BxKxN, C_BxKxN = B_BxKxN.astype(acc), C_BxKxN.astype(acc)
        y_BxKxE, h = selective_scan(xc_BxKxE, dt_BxKxE, self._A(), B_BxKxN, C_BxKxN, h0_BxExN,
                                    chunk=self.scan_chunk, inner=self.scan_inner)
        y_BxKxE = y_BxKxE + self.D[...].astype(acc) * xc_BxKxE
        y_BxKxE = y_BxKxE * jax.nn.silu(z_BxKxE.astype(acc))
        out = self.out_proj(y_BxKxE.astype(self.dtype))
        return out, h, MambaPending(xc_BxKxE, dt_BxKxE, B_BxKxN, xraw_BxKxE)

    def __call__(self, u_BxLxD, pos_BxL=None, prefix_len_B=None):
        del pos_BxL, prefix_len_B  # causal, position-free
        cache = self.init_cache(u_BxLxD.shape[0])
        return self._mix(u_BxLxD, cache.conv, cache.ssm)[0]

    def attention_flops(self, context: int) -> float:
        del context
        return 0.0

    # ---- decode cache: conv window + SSM state; extend keeps the inputs, commit replays n of them --------
    def cache_capacity(self, max_len: int) -> int:
        return max_len  # constant size: any length fits

    def init_cache(self, batch: int, max_len: int = 0) -> MambaCache:
        del max_len
        return MambaCache(jnp.zeros((batch, self.d_conv - 1, self.d_inner), self.dtype),
                          jnp.zeros((batch, self.d_inner, self.d_state), acc_dtype(self.dtype)))

    def extend(self, u_BxKxD, cache: MambaCache, ctx=None):
        """Output for K new tokens (causal whatever ctx.prefix_len says); the cache is left as it was and the
        replay inputs are pending."""
        del ctx
        out, _, pending = self._mix(u_BxKxD, cache.conv, cache.ssm)
        return out, cache, pending

    def commit(self, cache: MambaCache, pending: MambaPending, n_B, lengths_B=None) -> MambaCache:
        """State after exactly the first n_B pending tokens of each row (masked re-scan: dt = 0 is a no-op)."""
        del lengths_B
        k = pending.dt.shape[1]
        keep_BxK = jnp.arange(k)[None, :] < n_B[:, None]
        dt = jnp.where(keep_BxK[..., None], pending.dt, 0.0)
        _, h = selective_scan(pending.x, dt, self._A(), pending.B, None, cache.ssm,
                              chunk=self.scan_chunk, inner=self.scan_inner, want_y=False)
        # The conv window is re-sliced at n too (forgetting it is a known cause of drift after rollback).
        full = jnp.concatenate([cache.conv, pending.xraw.astype(cache.conv.dtype)], axis=1)
        w = self.d_conv - 1
        conv = jax.vmap(lambda f, s: jax.lax.dynamic_slice_in_dim(f, s, w, axis=0))(full, n_B)
        return MambaCache(conv, h.astype(cache.ssm.dtype))


class MambaDims:
    """Config mixin for the Mamba fields (d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max,
    scan_chunk, scan_inner): their checks and the mixer they describe."""

    def check_mamba_dims(self):
        for name in ("d_model", "d_state", "d_conv", "expand", "scan_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.dt_rank < 0:
            raise ValueError(f"dt_rank must be >= 0 (0: ceil(d_model / 16)); got {self.dt_rank}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}")
        if self.scan_inner not in ("auto", "assoc", "seq"):
            raise ValueError(f"scan_inner must be 'auto', 'assoc' or 'seq'; got {self.scan_inner!r}")

    def mamba_mixer(self, *, rngs: nnx.Rngs, dtype, param_dtype, out_scale: float) -> Mamba:
        return Mamba(self.d_model, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                     dt_rank=self.dt_rank, dt_min=self.dt_min, dt_max=self.dt_max, scan_chunk=self.scan_chunk,
                     scan_inner=self.scan_inner, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                     out_scale=out_scale)


def _init(fn, axes, rngs, shape, dtype):
    """A parameter value carrying its logical axes (the same route as `nnx.Linear`'s initialisers)."""
    return nnx.with_partitioning(fn, axes)(rngs.params(), shape, dtype)


def _uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        return inverse_softplus(jnp.maximum(dt, floor)).astype(dtype)
    return init
