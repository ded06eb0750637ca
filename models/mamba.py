"""Mamba-1 (S6) mixer with a chunked, rematerialised selective scan and a rollback-able decode cache.

Equations (Gu & Dao 2023, `mamba_simple.py`): x, z = split(W_in u); x~ = silu(causal_conv(x));
[delta, B, C] = W_x x~; dt = softplus(W_dt delta + b_dt); h_t = exp(dt_t A) h_{t-1} + (dt_t x~_t) B_t;
y_t = C_t . h_t + D x~_t; out = W_out (y * silu(z)).

The conv, dt, the scan and the state are in fp32 (or better, under x64) whatever the compute dtype: SSMs are
sensitive to their recurrent dynamics. Letters: E = expand * d_model (inner width), N = d_state,
R = dt_rank, T = scan chunk length.
"""

from __future__ import annotations

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


def resolve_inner(inner: str) -> str:
    """'auto': a sequential inner scan on CPU (about 2x faster there), associative elsewhere (parallel)."""
    if inner == "auto":
        return "seq" if jax.default_backend() == "cpu" else "assoc"
    return inner


def selective_scan(x_BxLxE, dt_BxLxE, A_ExN, B_BxLxN, C_BxLxN, h0_BxExN, *, chunk: int, inner: str = "auto",
                   want_y: bool = True):
    """h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t;  y_t = C_t . h_t.  Returns (y_BxLxE or None, h_L).

    The L steps go in chunks of T, and (B, L, E, N) is never materialised: only (B, T, E, N) tensors of one
    chunk exist at a time, and the backward pass keeps only the chunk-boundary states. Inside a chunk the
    scan is sequential (`inner` "seq", CPU: `_seq_scan`, a custom VJP whose backward pass recomputes one
    chunk's states and runs the adjoint recurrence) or associative (log depth, accelerators: the chunk body
    wrapped in `jax.checkpoint` and differentiated by JAX), see `resolve_inner`.
    Padding steps have dt = 0, which leaves the state unchanged (exp(0) = 1, zero input).
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

    def to_chunks(a, time_major=False):  # (B, L, F) -> (n_chunks, B, T, F), or (n_chunks, T, B, F); dt = 0 pads
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
        a = a.reshape(b, n_chunks, t, a.shape[-1])
        return a.transpose(1, 2, 0, 3) if time_major else a.swapaxes(0, 1)

    if inner == "seq" and want_y:
        y, h = _seq_scan(*(to_chunks(a, True) for a in (x, delta)), A, *(to_chunks(a, True) for a in (Bm, Cm)), h0)
        return y.transpose(2, 0, 1, 3).reshape(b, n_chunks * t, e)[:, :l], h

    xs = (to_chunks(x), to_chunks(delta), to_chunks(Bm)) + ((to_chunks(Cm),) if want_y else ())

    @jax.checkpoint
    def body(h_BxExN, inp):
        x_c, dt_c, B_c = inp[:3]
        if inner == "seq":  # one step at a time: only (B, E, N) live per step
            def step(h, step_in):
                h = _ssm_step(h, *step_in[:3], A)
                return h, (jnp.einsum("ben,bn->be", h, step_in[3]) if want_y else None)
            h, y = jax.lax.scan(step, h_BxExN, tuple(a.swapaxes(0, 1) for a in inp))
            return h, (y.swapaxes(0, 1) if want_y else None)
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


def _ssm_step(h_BxExN, x_BxE, dt_BxE, B_BxN, A_ExN):
    """One step of the recurrence (the sequential scans' shared body): exp(dt A) h + (dt x) B."""
    return jnp.exp(dt_BxE[..., None] * A_ExN) * h_BxExN + (dt_BxE * x_BxE)[..., None] * B_BxN[:, None, :]


# ---- the sequential scan with a hand-written backward pass (CPU training) ----------------------------------
# Shapes, time-major in chunks: x, dt [K, T, B, E]; B, C [K, T, B, N]; A [E, N]; h0 [B, E, N] (K chunks of T).
# JAX's derivative of the checkpointed sequential scan (the "assoc" path's structure with a sequential inner
# loop) recomputes each chunk and then runs about ten small ops per step over residuals it stacks step by
# step. Here the backward pass recomputes only the states before each step of a chunk, h_{t-1}, and one
# reverse loop does the rest per step: the adjoint G_t = dL/dh_t = a_{t+1} G_{t+1} + dy_t C_t and every
# input's gradient from it (a_t = exp(dt_t A), u_t = dt_t x_t):
#   dL/d(dt_t A) = G_t h_{t-1} a_t   ->  d dt_t = sum_n (.) A + (sum_n G_t B_t) x_t,  dA += sum (.) dt_t
#   d x_t = (sum_n G_t B_t) dt_t,  d B_t = sum_e G_t u_t,  d C_t = sum_e dy_t h_t.
# Measured on the 2-core CPU under load, fwd + bwd of samba_tiny's scan (B 32, L 128, E 256, N 16): 1.2-2.5x faster than
# JAX's derivative. (Doing the reductions after the loop, vectorised over a chunk's [T, B, E, N], was 1.5x
# slower than JAX's: XLA:CPU materialised the broadcasts.)
def _seq_scan_fwd(x, dt, A, Bm, Cm, h0):
    def chunk(h, inp):
        def step(h, step_in):
            h = _ssm_step(h, *step_in[:3], A)
            return h, jnp.einsum("ben,bn->be", h, step_in[3])
        h_end, y_c = jax.lax.scan(step, h, inp)
        return h_end, (y_c, h)

    h, (y, h_starts) = jax.lax.scan(chunk, h0, (x, dt, Bm, Cm))
    return (y, h), (x, dt, A, Bm, Cm, h_starts)


def _seq_scan_bwd(res, cts):
    x, dt, A, Bm, Cm, h_starts = res
    h0 = h_starts[0]
    dy, dh_end = cts

    def chunk(carry, inp):
        x_c, dt_c, B_c, C_c, dy_c, h0_c = inp

        def states(h, step_in):  # the chunk again, keeping the state before each step
            return _ssm_step(h, *step_in, A), h
        _, hprev = jax.lax.scan(states, h0_c, (x_c, dt_c, B_c))

        def back(carry, step_in):  # g: dL/dh_t from the later steps
            g, dA = carry
            hp, x_t, dt_t, B_t, C_t, dy_t = step_in
            a = jnp.exp(dt_t[..., None] * A)
            u = dt_t * x_t
            G = g + dy_t[..., None] * C_t[:, None, :]
            q = G * hp * a
            GB = jnp.einsum("ben,bn->be", G, B_t)
            d_dt = jnp.einsum("ben,en->be", q, A) + GB * x_t
            dB = jnp.einsum("ben,be->bn", G, u)
            dC = jnp.einsum("ben,be->bn", a * hp + u[..., None] * B_t[:, None, :], dy_t)
            dA = dA + q * dt_t[..., None]  # summed over the batch once, after the loops (no per-step transpose)
            return (a * G, dA), (GB * dt_t, d_dt, dB, dC)
        return jax.lax.scan(back, carry, (hprev, x_c, dt_c, B_c, C_c, dy_c), reverse=True)

    (dh0, dA), (dx, ddt, dB, dC) = jax.lax.scan(chunk, (dh_end, jnp.zeros_like(h0)),
                                                (x, dt, Bm, Cm, dy, h_starts), reverse=True)
    return dx, ddt, dA.sum(0), dB, dC, dh0


@jax.custom_vjp
def _seq_scan(x, dt, A, Bm, Cm, h0):
    """(y [K, T, B, E], final state): the sequential selective scan over K chunks of T steps."""
    return _seq_scan_fwd(x, dt, A, Bm, Cm, h0)[0]


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
