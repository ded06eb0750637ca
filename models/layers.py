"""Shared layers: RMSNorm, RoPE, SwiGLU, dense projections with logical sharding axes, and attention kernels.

Parameters carry logical axis names (see train/mesh.py for the one table mapping them to mesh axes).
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
          scale: float = 1.0) -> nnx.Linear:
    """Bias-free projection with fan-in init, optionally scaled (residual outputs use 1/sqrt(2*blocks))."""
    init = nnx.initializers.variance_scaling(scale ** 2, "fan_in", "truncated_normal")
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init, axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_BxLxHxD, pos_BxL, base: float = 10000.0):
    """Rotary embedding, half-split (NeoX) layout. Angles in fp32: bf16 angles break at long positions."""
    d = x_BxLxHxD.shape[-1]
    half = d // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang_BxLxF = pos_BxL.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(ang_BxLxF)[:, :, None, :]
    sin = jnp.sin(ang_BxLxF)[:, :, None, :]
    x = x_BxLxHxD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxD.dtype)


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
        y = x.astype(self.dtype) @ w.reshape(w.shape[0], -1)  # a bitcast: one plain matmul
        return y.reshape(*x.shape[:-1], *self.out_shape)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), with gate and up as one [d, 2, hidden] kernel."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype, out_scale: float = 1.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_up = Projection(d_model, (2, hidden), ("embed", None, "mlp"), **kw)
        self.down = dense(hidden, d_model, ("mlp", "embed"), scale=out_scale, **kw)

    def __call__(self, x):
        gu = self.gate_up(x)
        return self.down(jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :])


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


def _grouped(q_BxLxHxD, n_kv: int):
    b, l, h, d = q_BxLxHxD.shape
    return q_BxLxHxD.reshape(b, l, n_kv, h // n_kv, d)


def masked_attention(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, mask_BxLxS):
    """Grouped-query attention with an explicit boolean mask; softmax in fp32."""
    b, l, h, d = q_BxLxHxD.shape
    g = k_BxSxGxD.shape[2]
    q = _grouped(q_BxLxHxD, g)
    s_BxGxRxLxS = jnp.einsum("blgrd,bsgd->bgrls", q, k_BxSxGxD,
                             preferred_element_type=jnp.float32) / math.sqrt(d)
    s_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], s_BxGxRxLxS, NEG_INF)
    p = jax.nn.softmax(s_BxGxRxLxS, axis=-1).astype(v_BxSxGxD.dtype)
    o = jnp.einsum("bgrls,bsgd->blgrd", p, v_BxSxGxD, preferred_element_type=jnp.float32)
    return o.reshape(b, l, h, d).astype(q_BxLxHxD.dtype)


PREFIX_MIN = 64  # smallest cache prefix a decode step reads (then 128, 256, ... up to the whole cache)
PREFIX_MAX_QUERIES = 64  # up to this many queries per KV head read one prefix; more (prefill) loop over blocks


def prefix_sizes(s_total: int) -> tuple:
    """Static prefix lengths a decode step may read: PREFIX_MIN doubled until it reaches s_total."""
    sizes, n = [], PREFIX_MIN
    while n < s_total:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (s_total,)


def _visible(key_pos_BxS, q_pos_BxK, window: int):
    vis_BxKxS = (key_pos_BxS[:, None, :] >= 0) & (key_pos_BxS[:, None, :] <= q_pos_BxK[:, :, None])
    if window:
        vis_BxKxS &= (q_pos_BxK[:, :, None] - key_pos_BxS[:, None, :]) < window
    return vis_BxKxS


def blocked_cache_attention(q_BxKxHxD, k_cache, v_cache, key_pos_BxS, q_pos_BxK, *, block: int,
                            window: int = 0, n_valid=None, heads_first: bool = False):
    """Attention of K new queries over a preallocated cache, reading only the slots that can hold keys.

    Keys are masked by position: key j is visible to query i iff 0 <= pos_j <= pos_i (and, with a window W,
    pos_i - pos_j < W). Slots with position -1 are empty. `n_valid` (traced) says how many leading slots
    may hold visible keys (None: all), so the cost grows with the context actually held, not with the
    buffer size. Softmax in fp32.

    Two schedules, chosen by the static number of queries per KV head:
    - decode and verify steps (few queries): one dense attention over the smallest static prefix in
      `prefix_sizes` that covers n_valid, picked by `lax.switch`. Each branch reads its prefix in place;
      a dynamic block loop made XLA:CPU copy every block before its dot (measured, 26M decoder, batch 1,
      context 300: 1.1 ms -> 0.4 ms of attention per step over 8 layers).
    - prefill (many queries): a loop over blocks of `block` slots with an online softmax, so the scores
      never exceed [B, G, queries, block].

    The cache is [B, S, G, D], or [B, G, S, D] with heads_first (blocks contiguous per KV head).
    """
    b, kq, h, d = q_BxKxHxD.shape
    s_axis = 2 if heads_first else 1
    s_total = k_cache.shape[s_axis]
    g = k_cache.shape[1] if heads_first else k_cache.shape[2]
    r = h // g
    # queries of one KV group side by side: n = k * R + r
    q_BxGxNxD = jnp.transpose(_grouped(q_BxKxHxD, g), (0, 2, 1, 3, 4)).reshape(b, g, kq * r, d)
    q_BxGxNxD = q_BxGxNxD.astype(jnp.float32) / math.sqrt(d)
    k_eq = "bgsd" if heads_first else "bsgd"

    def scores(kb, pb):
        s = jnp.einsum(f"bgnd,{k_eq}->bgns", q_BxGxNxD, kb.astype(jnp.float32))
        vis_Bx1xNxS = jnp.repeat(_visible(pb, q_pos_BxK, window), r, axis=1)[:, None]
        return jnp.where(vis_Bx1xNxS, s, NEG_INF), vis_Bx1xNxS

    def finish(acc, l):
        o_BxGxNxD = acc / jnp.maximum(l, 1e-30)[..., None]
        o = jnp.transpose(o_BxGxNxD.reshape(b, g, kq, r, d), (0, 2, 1, 3, 4))
        return o.reshape(b, kq, h, d).astype(q_BxKxHxD.dtype)

    if kq * r <= PREFIX_MAX_QUERIES:
        def prefix(size):
            def attend():
                kb = jax.lax.slice_in_dim(k_cache, 0, size, axis=s_axis)
                vb = jax.lax.slice_in_dim(v_cache, 0, size, axis=s_axis)
                s, vis = scores(kb, key_pos_BxS[:, :size])
                # masked scores are exactly 0 after exp, also in a row that sees no key at all
                p = jnp.where(vis, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
                acc = jnp.einsum(f"bgns,{k_eq}->bgnd", p, vb.astype(jnp.float32))
                return finish(acc, p.sum(-1))
            return attend

        sizes = prefix_sizes(s_total)
        if n_valid is None or len(sizes) == 1:
            return prefix(s_total)()
        idx = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.asarray(n_valid, jnp.int32))
        return jax.lax.switch(jnp.minimum(idx, len(sizes) - 1), [prefix(n) for n in sizes])

    assert s_total % block == 0, (s_total, block)
    n_blocks = s_total // block
    if n_valid is not None:
        n_blocks = jnp.minimum((n_valid + block - 1) // block, n_blocks)

    def body(i, carry):
        m, l, acc = carry
        start = i * block
        kb = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=s_axis)
        vb = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=s_axis).astype(jnp.float32)
        s, _ = scores(kb, jax.lax.dynamic_slice_in_dim(key_pos_BxS, start, block, axis=1))
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l_new = l * corr + p.sum(-1)
        return m_new, l_new, acc * corr[..., None] + jnp.einsum(f"bgns,{k_eq}->bgnd", p, vb)

    n = kq * r
    init = (jnp.full((b, g, n), NEG_INF, jnp.float32), jnp.zeros((b, g, n), jnp.float32),
            jnp.zeros((b, g, n, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return finish(acc, l)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE; the caller chooses the mask (full forward) or the cache layout."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_base: float,
                 rngs: nnx.Rngs, dtype, param_dtype, out_scale: float = 1.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_base = n_heads, n_kv_heads, head_dim, rope_base
        # q, k and v in one kernel, grouped by KV head: [d, G, R + 2, hd] holds the R query heads of group g
        # (head h = g * R + r, the order `_grouped` assumes), then its key and its value head. Tensor
        # parallelism splits G, so every shard computes whole q/k/v groups.
        self.r = n_heads // n_kv_heads
        self.qkv_proj = Projection(d_model, (n_kv_heads, self.r + 2, head_dim), ("embed", "kv_heads", None, None),
                                   **kw)
        self.o = dense(n_heads * head_dim, d_model, ("heads", "embed"), scale=out_scale, **kw)

    def qkv(self, x_BxLxD, pos_BxL):
        b, l, _ = x_BxLxD.shape
        y = self.qkv_proj(x_BxLxD)  # [B, L, G, R + 2, hd]
        q = y[:, :, :, :self.r].reshape(b, l, self.n_heads, self.head_dim)
        k, v = y[:, :, :, self.r], y[:, :, :, self.r + 1]
        return rope(q, pos_BxL, self.rope_base), rope(k, pos_BxL, self.rope_base), v

    def out(self, o_BxLxHxD):
        b, l = o_BxLxHxD.shape[:2]
        return self.o(o_BxLxHxD.reshape(b, l, self.n_heads * self.head_dim))

    def __call__(self, x_BxLxD, pos_BxL, mask_BxLxL):
        q, k, v = self.qkv(x_BxLxD, pos_BxL)
        return self.out(masked_attention(q, k, v, mask_BxLxL))


def causal_mask(pos_BxL, prefix_len_B=None, window: int = 0):
    """Key j visible to query i iff pos_j <= pos_i, or (prefix-LM) j lies in the row's prefix.

    With a prefix, prefix tokens see the whole prefix bidirectionally and targets see the prefix plus
    earlier targets: visible iff pos_j < prefix or pos_j <= pos_i.
    """
    qi = pos_BxL[:, :, None]
    kj = pos_BxL[:, None, :]
    vis = kj <= qi
    if window:
        vis &= (qi - kj) < window
    if prefix_len_B is not None:
        vis |= kj < prefix_len_B[:, None, None]
    return vis


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


class TokenIO:
    """Mixin for every LM here: byte embedding in, final RMSNorm and a tied (or separate) head out.

    The host module calls `_init_embed` before its blocks and `_init_head` after them, so parameter
    initialisation draws from the RNG streams in the order of the computation.
    """

    def _init_embed(self, cfg, d: int, rngs: nnx.Rngs, param_dtype):
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(d) if cfg.tie_embeddings else 1.0)
        self.embed = nnx.Embed(cfg.vocab_size, d, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))

    def _init_head(self, cfg, d: int, rngs: nnx.Rngs, param_dtype):
        self.final_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.head = dense(d, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=self.dtype,
                              param_dtype=param_dtype)

    def _embed(self, tokens):
        return self.embed(tokens).astype(self.dtype)

    def _logits(self, x):
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            w = self.embed.embedding[...].astype(self.dtype)
            return jnp.einsum("bld,vd->blv", x, w, preferred_element_type=jnp.float32)
        return self.head(x).astype(jnp.float32)
