"""Shared layers: RMSNorm, RoPE, SwiGLU, dense projections with logical sharding axes, cache scatters.

Attention kernels and mixers live in models/attention.py, Mamba in models/mamba.py.

Parameters carry logical axis names (core/mesh.py holds the one table mapping them to mesh axes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NEG_INF = -1e30


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def dense(d_in: int, d_out: int, axes: tuple, *, rngs: nnx.Rngs, dtype, param_dtype,
          scale: float = 1.0) -> Projection:
    """Bias-free projection with fan-in init, optionally scaled (residual outputs use 1/sqrt(2*blocks)).
    The parameter tree, initial values and RNG draws are nnx.Linear's (one `kernel` [d_in, d_out]), so
    checkpoints and the Hugging Face import are unchanged; the product is `tokens_matmul`'s."""
    return Projection(d_in, (d_out,), axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype, scale=scale)


def tokens_matmul(x, w_DxN, preferred_element_type=None):
    """x[..., D] @ w[D, N] as ONE 2-D product over the flattened tokens [prod(...), D].

    XLA:CPU otherwise keeps the batched [B, L, D] operand: the weight gradient then contracts over two
    dimensions (B and L) and the forward output is relaid out before the next op (copy fusions around each
    product in the profile). Flattened, the forward, the input gradient and the weight gradient are each one
    plain GEMM on contiguous operands. Same products and sums: equal to the 3-D dot to fp32 rounding."""
    y = jnp.matmul(jnp.reshape(x, (-1, x.shape[-1])), w_DxN, preferred_element_type=preferred_element_type)
    return jnp.reshape(y, (*x.shape[:-1], w_DxN.shape[1]))


def tied_logits(x_BxLxD, embed_VxD):
    """x @ embed^T (the tied head) as one 2-D product over the flattened tokens, fp32 logits."""
    b, l, d = x_BxLxD.shape
    y = jax.lax.dot_general(jnp.reshape(x_BxLxD, (b * l, d)), embed_VxD, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return jnp.reshape(y, (b, l, embed_VxD.shape[0]))


def _split(y, sizes, axis):
    out, a = [], 0
    for n in sizes:
        out.append(jax.lax.slice_in_dim(y, a, a + n, axis=axis))
        a += n
    return tuple(out)


def _split_fwd(y, sizes, axis):
    return _split(y, sizes, axis), None


def _split_bwd(sizes, axis, _, cts):
    return (jnp.concatenate(cts, axis=axis),)


split_heads = jax.custom_vjp(_split, nondiff_argnums=(1, 2))
split_heads.__doc__ = """Consecutive slices of `y` of `sizes` along `axis` (fused q/k/v); the backward pass concatenates the
slices' cotangents into one array, where JAX's derivative of each slice pads it to y's shape and adds the pads."""
split_heads.defvjp(_split_fwd, _split_bwd)


def _silu_mul(gu_Nx2xH):
    g, u = gu_Nx2xH[..., 0, :], gu_Nx2xH[..., 1, :]
    return g * jax.nn.sigmoid(g) * u


def _silu_mul_fwd(gu):
    return _silu_mul(gu), gu


def _silu_mul_bwd(gu, dh):
    # d/dg [g s(g) u] = u s (1 + g (1 - s)), d/du = g s: one sigmoid, and the two cotangents written straight
    # into the fused [.., 2, H] layout of the gate/up product (no pads, no add).
    g, u = gu[..., 0, :], gu[..., 1, :]
    s = jax.nn.sigmoid(g)
    gs = g * s
    return (jnp.stack([dh * u * (s + gs * (1 - s)), dh * gs], axis=-2),)


silu_mul = jax.custom_vjp(_silu_mul)
silu_mul.__doc__ = "SwiGLU's silu(g) * u of the fused gate/up product gu[..., 2, H] (g = gu[..., 0, :])."
silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(d: int, base: float = 10000.0, scaling: tuple = ()):
    """The d/2 rotary frequencies (numpy fp32 math, a trace-time constant). `scaling` is () or
    ("llama3", factor, low_freq_factor, high_freq_factor, original_max_len): Llama 3.1's frequency-dependent
    scaling (low frequencies divided by `factor`, high ones kept, a smooth ramp between), as transformers'
    `_compute_llama3_parameters` computes it."""
    import numpy as np

    half = d // 2
    inv = 1.0 / (base ** (np.arange(half, dtype=np.float32) / half))
    if scaling:
        kind, factor, low, high, old_len = scaling
        if kind != "llama3":
            raise ValueError(f"unknown rope scaling {kind!r}; valid: llama3")
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope(x_BxLxHxD, pos_BxL, base: float = 10000.0, scaling: tuple = ()):
    """Rotary embedding, half-split (NeoX) layout. Angles in fp32: bf16 angles break at long positions.
    `scaling`: see `rope_inv_freq` (() = plain RoPE)."""
    cos, sin = rope_angles(pos_BxL, x_BxLxHxD.shape[-1], base, scaling)
    return rotate_half(x_BxLxHxD.astype(jnp.float32), cos[:, :, None, :], sin[:, :, None, :]).astype(x_BxLxHxD.dtype)


def rope_table(l: int, d: int, base: float = 10000.0, scaling: tuple = ()):
    """cos and sin [1, l, d/2] of positions 0..l-1 as trace-time constants (numpy, fp32 angles as `rope_angles`
    computes them). XLA:CPU otherwise recomputes cos and sin of traced angles inside every fusion that reads
    them (per element of q and k, forward and backward)."""
    import numpy as np

    ang = np.arange(l, dtype=np.float32)[:, None] * rope_inv_freq(d, base, scaling)[None, :]
    return np.cos(ang).astype(np.float32)[None], np.sin(ang).astype(np.float32)[None]


def rope_angles(pos_BxL, d: int, base: float = 10000.0, scaling: tuple = ()):
    """cos and sin [B, L, d/2] (fp32) of RoPE's angles at the positions (see `rope`)."""
    half = d // 2
    if scaling:
        inv_freq = jnp.asarray(rope_inv_freq(d, base, scaling))
    else:
        inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang_BxLxF = pos_BxL.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang_BxLxF), jnp.sin(ang_BxLxF)


def rotate_pairs(x, cos, sin):
    """The plain rotation of `rotate_half` (no custom VJP), for kernels that write their own backward pass."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_half_fwd(x, cos, sin):
    return rotate_pairs(x, cos, sin), (cos, sin)


def _rotate_half_bwd(res, dy):
    # The rotation's transpose is the rotation by -angle: one fusion, where JAX's derivative slices the
    # cotangent, multiplies, pads each half back and adds. Angles come from integer positions: no gradient.
    cos, sin = res
    return rotate_pairs(dy, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


rotate_half = jax.custom_vjp(rotate_pairs)
rotate_half.__doc__ = "RoPE's rotation of the half-split pairs (x1, x2) of x[..., D] by the angles of cos/sin [..., D/2]."
rotate_half.defvjp(_rotate_half_fwd, _rotate_half_bwd)


class Projection(nnx.Module):
    """Bias-free x[..., d_in] @ W[d_in, *out_shape] -> [..., *out_shape], fan-in init (optionally scaled).

    Several projections of one input (q/k/v, gate/up) live in one kernel so that a decode step makes one
    matrix-vector product instead of several: at batch 1 on CPU each product is bandwidth-bound and each
    extra one costs a pass of dispatch (measured: fused q/k/v and gate/up cut the 26M decoder's matvec chain
    from 4.8-5.4 to 4.4-4.6 ms per token). Logical axes name every kernel dimension.
    """

    def __init__(self, d_in: int, out_shape: tuple, axes: tuple, *, rngs: nnx.Rngs, dtype, param_dtype,
                 scale: float = 1.0):
        out_shape = tuple(out_shape)
        init = nnx.initializers.variance_scaling(scale ** 2, "fan_in", "truncated_normal", in_axis=0,
                                                 out_axis=tuple(range(1, 1 + len(out_shape))))
        self.kernel = nnx.Param(init(rngs.params(), (d_in, *out_shape), param_dtype), out_sharding=axes)
        self.out_shape, self.dtype = out_shape, dtype

    def __call__(self, x):
        w = self.kernel[...].astype(self.dtype)
        y = tokens_matmul(x.astype(self.dtype), w.reshape(w.shape[0], -1))  # the reshape is a bitcast
        return y.reshape(*x.shape[:-1], *self.out_shape)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), with gate and up as one [d, 2, hidden] kernel."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype, out_scale: float = 1.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_up = Projection(d_model, (2, hidden), ("embed", None, "mlp"), **kw)
        self.down = dense(hidden, d_model, ("mlp", "embed"), scale=out_scale, **kw)

    def __call__(self, x):
        return self.down(silu_mul(self.gate_up(x)))


def mlp_hidden_default(d_model: int) -> int:
    """8/3 d rounded up to a multiple of 64 (keeps SwiGLU's parameter count near a 4d GELU MLP)."""
    return int(math.ceil(8 * d_model / 3 / 64) * 64)


class AttentionDims:
    """Derived sizes for configs with d_model, n_heads, n_kv_heads, head_dim and mlp_hidden (0 = default)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or mlp_hidden_default(self.d_model)

    def check_attention_dims(self):
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


def scatter_rows(buf_BxSx, new_BxKx, idx_BxK):
    """Write new[b, i] to buf[b, idx[b, i]] (per-row positions); out-of-range indices are dropped."""
    b = buf_BxSx.shape[0]
    return buf_BxSx.at[jnp.arange(b)[:, None], idx_BxK].set(new_BxKx.astype(buf_BxSx.dtype), mode="drop")


def scatter_rows_heads_first(buf_BxGxSxD, new_BxKxGxD, idx_BxK):
    """scatter_rows for a heads-first [B, G, S, D] cache: new[b, i, g] goes to buf[b, g, idx[b, i]]."""
    b = buf_BxGxSxD.shape[0]
    new = jnp.transpose(new_BxKxGxD, (0, 2, 1, 3)).astype(buf_BxGxSxD.dtype)  # [B, G, K, D]
    return buf_BxGxSxD.at[jnp.arange(b)[:, None, None], jnp.arange(buf_BxGxSxD.shape[1])[None, :, None],
                          idx_BxK[:, None, :]].set(new, mode="drop")
