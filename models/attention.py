"""Attention: the kernels (dense masked, cache, sliding window) and the two attention mixers.

Every kernel decides visibility with the one rule `models.contract.key_visible` (causal, prefix LM, window).
The mixers follow the mixer protocol of `models.base` and each owns its cache:
- `GlobalAttention`: keys/values of every position in a `KVCache` (heads first, slot = position), written
  in `extend`; nothing is pending, rollback is a shorter length.
- `SlidingWindowAttention`: a `RingCache` of the last W positions; `extend` never writes it (the K new keys
  are returned as pending), `commit(n)` writes the newest accepted ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.contract import KVCache, RingCache, attention_flops_per_token, key_visible, round_up
from models.layers import (NEG_INF, Projection, dense, rope, rope_table, rotate_pairs, scatter_rows,
                           scatter_rows_heads_first, split_heads)


# ---- dense attention with an explicit mask (full forward) ------------------------------------------------
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


def causal_mask(pos_BxL, prefix_len_B=None, window: int = 0):
    """[B, L, L] mask of a full forward: `key_visible` between the sequence's own positions."""
    prefix = None if prefix_len_B is None else prefix_len_B[:, None, None]
    return key_visible(pos_BxL[:, :, None], pos_BxL[:, None, :], window=window, prefix_len=prefix)


Q_CHUNKS = 2  # a causal full forward splits its queries into this many chunks (training speed, see below)
Q_CHUNK_MIN = 64  # ... each of at least this many queries


def causal_attention(q_BxLxHxD, k_BxLxGxD, v_BxLxGxD, pos_BxL, *, window: int = 0, prefix_len_B=None):
    """Self-attention of a full forward (pos[b, i] = i, as `full_positions` gives): `key_visible` with the
    window, and with a prefix-LM prefix. Token-major operands around `causal_attention_heads_first`, which the
    mixers' full forward calls directly (`Attention.full_forward`); pos_BxL must be 0..L-1 and is not read."""
    del pos_BxL
    l = q_BxLxHxD.shape[1]
    q_BxGxNxD, k_BxGxLxD, v_BxGxLxD = _heads_first(q_BxLxHxD, k_BxLxGxD, v_BxLxGxD)
    o_BxGxNxD = causal_attention_heads_first(q_BxGxNxD, k_BxGxLxD, v_BxGxLxD, window=window, prefix_len_B=prefix_len_B)
    return rows_to_tokens(o_BxGxNxD, l).astype(q_BxLxHxD.dtype)


def _heads_first(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD):
    """Token-major q/k/v -> heads first: q [B, G, L * R, D] (the R query heads of a KV group in the rows,
    row = position * R + r), k and v [B, G, S, D]."""
    b, l, h, d = q_BxLxHxD.shape
    g = k_BxSxGxD.shape[2]
    q_BxGxNxD = jnp.transpose(_grouped(q_BxLxHxD, g), (0, 2, 1, 3, 4)).reshape(b, g, l * (h // g), d)
    return (q_BxGxNxD, *(jnp.transpose(a, (0, 2, 1, 3)) for a in (k_BxSxGxD, v_BxSxGxD)))


def masked_rows_attention(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, mask_BxLxS):
    """`masked_attention`'s values on token-major operands through `_rows_attention` (heads first, the written-out
    backward pass): for a data-dependent mask in which every query sees at least one key (DLCM's
    cross-attention, whose null concept is always visible). A row that sees no key would get a gradient where
    `masked_attention`'s has none."""
    l, h, g = q_BxLxHxD.shape[1], q_BxLxHxD.shape[2], k_BxSxGxD.shape[2]
    q_BxGxNxD, k_BxGxSxD, v_BxGxSxD = _heads_first(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD)
    vis = jnp.repeat(mask_BxLxS, h // g, axis=1)[:, None]  # row l * R + r sees what position l sees
    return rows_to_tokens(_rows_attention(q_BxGxNxD, k_BxGxSxD, v_BxGxSxD, vis), l).astype(q_BxLxHxD.dtype)


def rows_to_tokens(o_BxGxNxD, l: int):
    """[B, G, L * R, D] (row = position * R + r) -> [B, L, H, D] (head h = g * R + r)."""
    b, g, n, d = o_BxGxNxD.shape
    r = n // l
    return jnp.transpose(o_BxGxNxD.reshape(b, g, l, r, d), (0, 2, 1, 3, 4)).reshape(b, l, g * r, d)


def causal_attention_heads_first(q_BxGxNxD, k_BxGxLxD, v_BxGxLxD, *, window: int = 0, prefix_len_B=None):
    """Self-attention of a full forward on heads-first operands: q [B, G, L * R, D] with row = position * R + r,
    k/v [B, G, L, D], positions 0..L-1, visibility `key_visible` (window, prefix LM); o [B, G, L * R, D] fp32.

    Causal (no prefix): the queries go in Q_CHUNKS chunks and chunk [a, b) reads only keys [a - W + 1, b)
    (W = window, or all keys from 0): the keys after b are invisible to all of its queries, and so are those
    at or before a - W. This skips the score blocks above the diagonal (and beyond the window), which a dense
    masked attention computes, masks, exponentiates and differentiates for nothing: at L = 256 with 4 chunks
    it does 5/8 of the work (SWA with W = L/2: 9/16). Each chunk's mask is a constant of the positions.
    With a prefix (prefix LM) a chunk's keys depend on the data: one block, the mask [B, L, L] from the
    prefix lengths. Every block is one `_rows_attention` (written-out backward pass). Same masks and softmax
    as a dense masked attention, so the results equal its results to fp32 rounding.
    """
    l = k_BxGxLxD.shape[2]
    r = q_BxGxNxD.shape[2] // l
    if prefix_len_B is not None:
        pos = jnp.arange(l, dtype=jnp.int32)
        vis_BxLxL = key_visible(pos[None, :, None], pos[None, None, :], window=window,
                                prefix_len=prefix_len_B[:, None, None])
        return _rows_attention(q_BxGxNxD, k_BxGxLxD, v_BxGxLxD, jnp.repeat(vis_BxLxL, r, axis=1)[:, None])
    c = max(Q_CHUNK_MIN, -(-l // Q_CHUNKS))
    outs = []
    for a in range(0, l, c):
        e = min(a + c, l)
        lo = max(0, a - window + 1) if window else 0
        vis = key_visible(np.arange(a, e)[:, None], np.arange(lo, e)[None, :], window=window)
        outs.append(_rows_attention(q_BxGxNxD[:, :, a * r:e * r], k_BxGxLxD[:, :, lo:e], v_BxGxLxD[:, :, lo:e],
                                    np.repeat(np.asarray(vis), r, axis=0)))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def _rows_fwd_math(q_BxGxNxD, k_BxGxSxD, v_BxGxSxD, vis):
    s = jnp.einsum("bgnd,bgsd->bgns", q_BxGxNxD, k_BxGxSxD,
                   preferred_element_type=jnp.float32) / math.sqrt(q_BxGxNxD.shape[-1])
    p = jax.nn.softmax(jnp.where(vis, s, NEG_INF), axis=-1)
    o = jnp.einsum("bgns,bgsd->bgnd", p.astype(v_BxGxSxD.dtype), v_BxGxSxD, preferred_element_type=jnp.float32)
    return o, p


@jax.custom_vjp
def _rows_attention(q_BxGxNxD, k_BxGxSxD, v_BxGxSxD, vis):
    """Attention of heads-first query rows: q [B, G, N, D] (the query heads of a KV group in the rows), k/v
    [B, G, S, D], vis (bool, broadcasting to [B, G, N, S]: a constant [N, S] or the data's [B, 1, N, S]), at least
    one visible key per row; o [B, G, N, D] in fp32. Softmax in fp32; the backward pass is written out."""
    return _rows_fwd_math(q_BxGxNxD, k_BxGxSxD, v_BxGxSxD, vis)[0]


def _rows_attention_fwd(q, k, v, vis):
    o, p = _rows_fwd_math(q, k, v, vis)
    return o, (q, k, v, o, jnp.swapaxes(p, -1, -2))


def _rows_attention_bwd(res, do_BxGxNxD):
    # With P^T [S, N] saved, every product's left operand contracts over its last dimension (the layout
    # XLA:CPU's YNNPACK GEMMs take; the other orientation falls back to slower Eigen dots or transposes):
    #   dV = P^T dO,  dP^T = V dO^T,  dS^T = P^T * (dP^T - rowsum(dO * O)) / sqrt(d),  dK = dS^T Q,  dQ = dS K.
    # Masked entries of P^T are exact zeros, so dS^T is zero there: no mask in the backward pass.
    q, k, v, o, pt_BxGxSxN = res
    do = do_BxGxNxD.astype(jnp.float32)
    dv = jnp.einsum("bgsn,bgnd->bgsd", pt_BxGxSxN, do)
    dpt = jnp.einsum("bgsd,bgnd->bgsn", v.astype(jnp.float32), do)
    delta_BxGxN = jnp.sum(do * o, axis=-1)
    dst = pt_BxGxSxN * (dpt - delta_BxGxN[:, :, None, :]) / math.sqrt(q.shape[-1])
    dk = jnp.einsum("bgsn,bgnd->bgsd", dst, q.astype(jnp.float32))
    dq = jnp.einsum("bgsn,bgsd->bgnd", dst, k.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_rows_attention.defvjp(_rows_attention_fwd, _rows_attention_bwd)


# ---- attention over a KV cache (slot = position) ---------------------------------------------------------
PREFIX_MIN = 64  # smallest cache prefix a decode step reads (then 128, 256, ... up to the whole cache)
PREFIX_MAX_QUERIES = 64  # up to this many queries per KV head read one prefix; more (prefill) loop over blocks


def prefix_sizes(s_total: int) -> tuple:
    """Static prefix lengths a decode step may read: PREFIX_MIN doubled until it reaches s_total."""
    sizes, n = [], PREFIX_MIN
    while n < s_total:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (s_total,)


def blocked_cache_attention(q_BxKxHxD, k_BxGxSxD, v_BxGxSxD, q_pos_BxK, *, block: int, n_valid,
                            prefix_len_B=None):
    """Attention of K new queries over a preallocated heads-first cache [B, G, S, D] whose slot s holds the
    key of position s, reading only the slots that can hold visible keys.

    Visibility is `key_visible(q_pos, slot, prefix_len)`; slots beyond a row's keys are either invisible
    (after the query) or overwritten before a query can see them. `n_valid` (traced) says how many leading
    slots may hold visible keys, so the cost grows with the context actually held, not with the buffer size.
    Softmax in fp32. Heads first: blocks are contiguous per KV head, so XLA:CPU does not copy them each step.

    Two schedules, chosen by the static number of queries per KV head:
    - decode and verify steps (few queries): one dense attention over the smallest static prefix in
      `prefix_sizes` that covers n_valid, picked by `lax.switch`. Each branch reads its prefix in place;
      a dynamic block loop made XLA:CPU copy every block before its dot (measured, 26M decoder, batch 1,
      context 300: 1.1 ms -> 0.4 ms of attention per step over 8 layers).
    - prefill (many queries): a loop over blocks of `block` slots with an online softmax, so the scores
      never exceed [B, G, queries, block].
    """
    b, kq, h, d = q_BxKxHxD.shape
    g, s_total = k_BxGxSxD.shape[1], k_BxGxSxD.shape[2]
    r = h // g
    # queries of one KV group side by side: n = k * R + r
    q_BxGxNxD = jnp.transpose(_grouped(q_BxKxHxD, g), (0, 2, 1, 3, 4)).reshape(b, g, kq * r, d)
    q_BxGxNxD = q_BxGxNxD.astype(jnp.float32) / math.sqrt(d)
    prefix = None if prefix_len_B is None else prefix_len_B[:, None, None]

    def scores(kb, start, size):
        s = jnp.einsum("bgnd,bgsd->bgns", q_BxGxNxD, kb.astype(jnp.float32))
        slot = start + jnp.arange(size, dtype=jnp.int32)
        vis_BxKxS = key_visible(q_pos_BxK[:, :, None], slot[None, None, :], prefix_len=prefix)
        vis_Bx1xNxS = jnp.repeat(vis_BxKxS, r, axis=1)[:, None]
        return jnp.where(vis_Bx1xNxS, s, NEG_INF), vis_Bx1xNxS

    def finish(acc, l):
        o_BxGxNxD = acc / jnp.maximum(l, 1e-30)[..., None]
        o = jnp.transpose(o_BxGxNxD.reshape(b, g, kq, r, d), (0, 2, 1, 3, 4))
        return o.reshape(b, kq, h, d).astype(q_BxKxHxD.dtype)

    if kq * r <= PREFIX_MAX_QUERIES:
        def prefix_attention(size):
            def attend():
                kb = jax.lax.slice_in_dim(k_BxGxSxD, 0, size, axis=2)
                vb = jax.lax.slice_in_dim(v_BxGxSxD, 0, size, axis=2)
                s, vis = scores(kb, 0, size)
                # masked scores are exactly 0 after exp, also in a row that sees no key at all
                p = jnp.where(vis, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
                acc = jnp.einsum("bgns,bgsd->bgnd", p, vb.astype(jnp.float32))
                return finish(acc, p.sum(-1))
            return attend

        sizes = prefix_sizes(s_total)
        if len(sizes) == 1:
            return prefix_attention(s_total)()
        # compare_all: one fused comparison; the default scan is a while loop of a few tiny steps in every step
        idx = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.asarray(n_valid, jnp.int32), method="compare_all")
        return jax.lax.switch(jnp.minimum(idx, len(sizes) - 1), [prefix_attention(n) for n in sizes])

    assert s_total % block == 0, (s_total, block)
    n_blocks = jnp.minimum((n_valid + block - 1) // block, s_total // block)

    def body(i, carry):
        m, l, acc = carry
        start = i * block
        kb = jax.lax.dynamic_slice_in_dim(k_BxGxSxD, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v_BxGxSxD, start, block, axis=2).astype(jnp.float32)
        s, _ = scores(kb, start, block)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l_new = l * corr + p.sum(-1)
        return m_new, l_new, acc * corr[..., None] + jnp.einsum("bgns,bgsd->bgnd", p, vb)

    n = kq * r
    init = (jnp.full((b, g, n), NEG_INF, jnp.float32), jnp.zeros((b, g, n), jnp.float32),
            jnp.zeros((b, g, n, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return finish(acc, l)


# ---- sliding-window attention (keys of the block, plus a ring of earlier ones) ------------------------------
def ring_positions(lengths_B, slots: int):
    """Position held by each ring slot: the largest p < length with p = s (mod slots), or -1 if p < 0."""
    s = jnp.arange(slots, dtype=jnp.int32)
    last = lengths_B[:, None] - 1
    p = last - jnp.mod(last - s[None, :], slots)
    return jnp.where(p >= 0, p, -1)


def sliding_window_attention(q_BxKxHxD, k_BxKxGxD, v_BxKxGxD, pos_BxK, *, window: int, ring=None,
                             prefix_len_B=None):
    """Attention of K queries over the K new keys (same positions) and, optionally, a ring of W earlier keys,
    with `key_visible(..., window=W, prefix_len)`.

    For K <= 2W everything is one block. Beyond, queries go in chunks of W that see only their own chunk
    and the previous one (the ring for chunk 0), plus the next one under prefix-LM: O(K W) time and memory,
    so long prefills and long-context evaluation never build a K x K score matrix.
    ring: (k_BxWxGxD, v_BxWxGxD, pos_BxW), position -1 = empty slot. Softmax in fp32.
    """
    b, kq, h, d = q_BxKxHxD.shape
    g = k_BxKxGxD.shape[2]
    r = h // g
    if kq <= 2 * window:
        c, n = kq, 1
    else:
        c, n = window, -(-kq // window)
    pad = n * c - kq
    if pad:
        padw = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BxKxHxD, k_BxKxGxD, v_BxKxGxD = (jnp.pad(a, padw) for a in (q_BxKxHxD, k_BxKxGxD, v_BxKxGxD))
        pos_BxK = jnp.pad(pos_BxK, ((0, 0), (0, pad)), constant_values=-1)
    q = q_BxKxHxD.reshape(b, n, c, g, r, d)
    k = k_BxKxGxD.reshape(b, n, c, g, d)
    v = v_BxKxGxD.reshape(b, n, c, g, d)
    p = pos_BxK.reshape(b, n, c)

    ks, vs, ps = [k], [v], [p]
    if ring is not None or n > 1:
        if ring is not None:
            rk, rv, rp = (a[:, None] for a in ring)
        else:
            rk, rv = jnp.zeros_like(k[:, :1]), jnp.zeros_like(v[:, :1])
            rp = jnp.full_like(p[:, :1], -1)
        if n > 1:
            assert rk.shape[2] == c, (rk.shape, c)
            rk, rv, rp = (jnp.concatenate([a0, a[:, :-1]], axis=1) for a0, a in ((rk, k), (rv, v), (rp, p)))
        ks, vs, ps = [rk] + ks, [rv] + vs, [rp] + ps
    if prefix_len_B is not None and n > 1:
        ks.append(jnp.concatenate([k[:, 1:], jnp.zeros_like(k[:, :1])], axis=1))
        vs.append(jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1))
        ps.append(jnp.concatenate([p[:, 1:], jnp.full_like(p[:, :1], -1)], axis=1))
    keys, vals, kpos = (jnp.concatenate(a, axis=2) for a in (ks, vs, ps))

    s = jnp.einsum("bncgrd,bnsgd->bngrcs", q, keys, preferred_element_type=jnp.float32) / math.sqrt(d)
    prefix = None if prefix_len_B is None else prefix_len_B[:, None, None, None]
    vis_BxNxCxS = key_visible(p[..., :, None], kpos[..., None, :], window=window, prefix_len=prefix)
    s = jnp.where(vis_BxNxCxS[:, :, None, None], s, NEG_INF)
    w = jax.nn.softmax(s, axis=-1).astype(vals.dtype)
    o = jnp.einsum("bngrcs,bnsgd->bncgrd", w, vals, preferred_element_type=jnp.float32)
    return o.reshape(b, n * c, h, d)[:, :kq].astype(q_BxKxHxD.dtype)


# ---- heads-first q/k/v for the training kernel ----------------------------------------------------------------
def _heads_first_qkv_impl(y_BxLxGxExD, cos_BxLxF, sin_BxLxF, r: int):
    yt = jnp.transpose(y_BxLxGxExD, (0, 2, 1, 3, 4))  # [B, G, L, R + 2, D]
    b, g, l, _, d = yt.shape
    cos, sin = cos_BxLxF[:, None, :, None, :], sin_BxLxF[:, None, :, None, :]
    qk = rotate_pairs(yt[..., :r + 1, :].astype(jnp.float32), cos, sin).astype(yt.dtype)
    return qk[..., :r, :].reshape(b, g, l * r, d), qk[..., r, :], yt[..., r + 1, :]


def _heads_first_qkv_fwd(y, cos, sin, r):
    return _heads_first_qkv_impl(y, cos, sin, r), (cos, sin)


def _heads_first_qkv_bwd(r, res, cts):
    # RoPE's transpose is the rotation by -angle; the three cotangents go back into the fused [B, L, G, R + 2, D]
    # layout in one pass (no pads and adds of the slices, no separate transposes).
    cos, sin = res
    dq, dk, dv = cts
    b, g, n, d = dq.shape
    c, s = cos[:, None, :, None, :], sin[:, None, :, None, :]
    dqk = jnp.concatenate([dq.reshape(b, g, n // r, r, d), dk[..., None, :]], axis=3)
    dqk = rotate_pairs(dqk.astype(jnp.float32), c, -s).astype(dv.dtype)
    dy = jnp.concatenate([dqk, dv[..., None, :]], axis=3)
    return jnp.transpose(dy, (0, 2, 1, 3, 4)), jnp.zeros_like(cos), jnp.zeros_like(sin)


heads_first_qkv = jax.custom_vjp(_heads_first_qkv_impl, nondiff_argnums=(3,))
heads_first_qkv.__doc__ = """The fused q/k/v projection's output y [B, L, G, R + 2, D] as heads-first operands of
`causal_attention_heads_first` with RoPE (angles cos/sin [B, L, D/2]) on q and k: q [B, G, L * R, D] (row =
position * R + r), k and v [B, G, L, D]. Same values as `Attention.qkv` plus the transposes; the backward pass
writes the fused layout's cotangent in one fusion."""
heads_first_qkv.defvjp(_heads_first_qkv_fwd, _heads_first_qkv_bwd)


# ---- the projections, and the two mixers -------------------------------------------------------------------
class Attention(nnx.Module):
    """Grouped-query q/k/v and output projections with RoPE; the mixers below choose what keys a query sees."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_base: float,
                 rngs: nnx.Rngs, dtype, param_dtype, out_scale: float = 1.0, rope_scaling: tuple = (),
                 qkv_bias: bool = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_base = n_heads, n_kv_heads, head_dim, rope_base
        self.rope_scaling = tuple(rope_scaling)  # () or ("llama3", factor, low, high, original_max_len)
        self.dtype = dtype
        # q, k and v in one kernel, grouped by KV head: [d, G, R + 2, hd] holds the R query heads of group g
        # (head h = g * R + r, the order `_grouped` assumes), then its key and its value head. Tensor
        # parallelism splits G, so every shard computes whole q/k/v groups.
        self.r = n_heads // n_kv_heads
        self.qkv_proj = Projection(d_model, (n_kv_heads, self.r + 2, head_dim), ("embed", "kv_heads", None, None),
                                   **kw)
        # Optional q/k/v biases (Qwen2), the kernel's output [G, R + 2, hd] flattened (1-D: no weight decay, not
        # a matrix in the FLOP count); zeros at init.
        self.qkv_bias = (nnx.Param(jnp.zeros((n_kv_heads * (self.r + 2) * head_dim,), param_dtype),
                                   out_sharding=("kv_heads",)) if qkv_bias else None)
        self.o = dense(n_heads * head_dim, d_model, ("heads", "embed"), scale=out_scale, **kw)

    def _fused_qkv(self, x_BxLxD):
        y = self.qkv_proj(x_BxLxD)  # [B, L, G, R + 2, hd]
        if self.qkv_bias is not None:
            y = y + self.qkv_bias[...].astype(y.dtype).reshape(y.shape[-3:])
        return y

    def qkv(self, x_BxLxD, pos_BxL):
        b, l, _ = x_BxLxD.shape
        y = self._fused_qkv(x_BxLxD)
        q, k, v = split_heads(y, (self.r, 1, 1), 3)
        q = q.reshape(b, l, self.n_heads, self.head_dim)
        k, v = k[:, :, :, 0], v[:, :, :, 0]
        sc = self.rope_scaling
        return rope(q, pos_BxL, self.rope_base, sc), rope(k, pos_BxL, self.rope_base, sc), v

    def full_forward(self, x_BxLxD, pos_BxL, window: int = 0, prefix_len_B=None):
        """The causal (windowed, prefix-LM) self-attention of a full forward, positions 0..L-1 (pos_BxL
        is not read: RoPE's angles and the masks are constants of L): heads-first q/k/v out of the fused
        projection (`heads_first_qkv`), `causal_attention_heads_first`, out."""
        del pos_BxL
        cos, sin = rope_table(x_BxLxD.shape[1], self.head_dim, self.rope_base, self.rope_scaling)
        q, k, v = heads_first_qkv(self._fused_qkv(x_BxLxD), cos, sin, self.r)
        o = causal_attention_heads_first(q, k, v, window=window, prefix_len_B=prefix_len_B)
        return self.out(rows_to_tokens(o, x_BxLxD.shape[1]).astype(self.dtype))

    def out(self, o_BxLxHxD):
        b, l = o_BxLxHxD.shape[:2]
        return self.o(o_BxLxHxD.reshape(b, l, self.n_heads * self.head_dim))

    def attention_flops(self, context: int) -> float:
        """QK^T and AV per token over `context` keys, forward and backward (12 T d_attn, causal in full)."""
        return attention_flops_per_token(1, context, self.n_heads, self.head_dim)


class GlobalAttention(Attention):
    """Causal attention over every earlier position (prefix LM: the prefix also sees itself bidirectionally).

    Cache: a `KVCache` [B, G, S, D] (S a multiple of `block`); `extend` writes the K new keys at their
    positions first and then attends, so a prefill's prefix keys are all visible to each other; nothing is
    pending and `commit` changes nothing here (the model's lengths decide what is visible).
    """

    reads_prefix = True

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, block: int, **kw):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, **kw)
        self.block = block

    def __call__(self, x_BxLxD, pos_BxL, prefix_len_B=None):
        return self.full_forward(x_BxLxD, pos_BxL, prefix_len_B=prefix_len_B)

    def cache_capacity(self, max_len: int) -> int:
        """Slots allocated for max_len positions: rounded up to the prefill block."""
        return round_up(max_len, self.block)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        shape = (batch, self.n_kv_heads, self.cache_capacity(max_len), self.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def extend(self, x_BxKxD, cache: KVCache, ctx):
        q, k, v = self.qkv(x_BxKxD, ctx.pos)
        kc = scatter_rows_heads_first(cache.k, k, ctx.pos)
        vc = scatter_rows_heads_first(cache.v, v, ctx.pos)
        o = blocked_cache_attention(q, kc, vc, ctx.pos, block=self.block, n_valid=ctx.n_valid,
                                    prefix_len_B=ctx.prefix_len)
        return self.out(o), KVCache(kc, vc), None

    def commit(self, cache: KVCache, pending, n_B, lengths_B) -> KVCache:
        del pending, n_B, lengths_B  # written in extend; slots past the new length are invisible
        return cache


class RingPending(NamedTuple):
    """The K new rotated keys and values of a sliding-window layer [B, K, G, D], written by `commit`."""

    k: jax.Array
    v: jax.Array


class SlidingWindowAttention(Attention):
    """Attention over the last `window` positions, the query's own included (prefix LM: prefix keys within
    the window also after the query).

    Cache: a `RingCache` of W slots; slot s holds the last committed position p with p = s mod W, so the
    per-slot positions are a pure function of the lengths (`ring_positions`) and masks come from them.
    `extend` never writes the ring: the K new keys are attended to next to it and returned as pending, and
    `commit(n)` writes only the n accepted ones (at most the newest W, whose slots are distinct). Rejected
    drafts and prompt padding therefore never overwrite a key inside the window, and W slots suffice
    whatever K is (a prefill bucket of any size included).
    """

    reads_prefix = True

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, window: int, **kw):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, **kw)
        self.window = window

    def __call__(self, x_BxLxD, pos_BxL, prefix_len_B=None):
        if prefix_len_B is None and x_BxLxD.shape[1] <= 2 * self.window:  # one block: skip what the window hides
            return self.full_forward(x_BxLxD, pos_BxL, self.window)
        q, k, v = self.qkv(x_BxLxD, pos_BxL)
        return self.out(sliding_window_attention(q, k, v, pos_BxL, window=self.window, prefix_len_B=prefix_len_B))

    def cache_capacity(self, max_len: int) -> int:
        return max_len  # constant size: any length fits

    def init_cache(self, batch: int, max_len: int) -> RingCache:
        del max_len
        shape = (batch, self.window, self.n_kv_heads, self.head_dim)
        return RingCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def extend(self, x_BxKxD, cache: RingCache, ctx):
        q, k, v = self.qkv(x_BxKxD, ctx.pos)
        ring = (cache.k, cache.v, ring_positions(ctx.lengths, self.window))
        o = sliding_window_attention(q, k, v, ctx.pos, window=self.window, ring=ring, prefix_len_B=ctx.prefix_len)
        return self.out(o), cache, RingPending(k, v)

    def commit(self, cache: RingCache, pending: RingPending, n_B, lengths_B) -> RingCache:
        # Write the accepted keys only, and of those only the newest W: their slots are then distinct.
        kq = pending.k.shape[1]
        j = jnp.arange(kq, dtype=jnp.int32)[None, :]
        keep = (j < n_B[:, None]) & (j >= n_B[:, None] - self.window)
        slot_BxK = jnp.where(keep, jnp.mod(lengths_B[:, None] + j, self.window), self.window)  # W: dropped
        return RingCache(scatter_rows(cache.k, pending.k, slot_BxK), scatter_rows(cache.v, pending.v, slot_BxK))

    def attention_flops(self, context: int) -> float:
        return super().attention_flops(min(context, self.window))
