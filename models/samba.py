"""SAMBA (arXiv 2406.07522): blocks alternate Mamba-1 (even) and sliding-window attention (odd).

Each block is `x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))`, embeddings are tied, and the residual
output projections start scaled by 1/sqrt(2 * blocks).

Decode cache (constant size, whatever the length generated):
- Mamba layers: the last d_conv-1 raw conv inputs and the fp32 SSM state.
- SWA layers: a ring of W slots of rotated keys and values. `extend` never writes the ring: the K new keys
  are attended to directly next to it and returned as pending entries, and `commit(n)` writes only the
  n accepted ones (at most the newest W). Rejected drafts and prompt padding therefore never overwrite
  a key inside the window, W slots suffice whatever K is (a prefill bucket of any size included), and the
  ring always holds the last W committed positions: slot s holds the position p < length with p = s mod W,
  so the per-slot position array is a pure function of the lengths (-1 where p < 0) and masks come from it.
  (DESIGN.md's W+K slots are needed only when extend writes the ring before knowing n.)
- `extend` keeps the pre-step state and the per-token scan inputs (x~, dt, B, raw x); `commit` replays
  the first n of them (dt = 0 beyond n leaves the state unchanged) and re-slices the conv window at n.
  `commit` strips the pending entries, so its result has exactly the structure of `init_cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (NEG_INF, Attention, AttentionDims, RMSNorm, SwiGLU, TokenIO, dtype_of,
                           scatter_rows)
from models.mamba import Mamba


@dataclass(frozen=True)
class SambaConfig(AttentionDims):
    arch: str = "samba"
    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4  # blocks: Mamba on even, SWA on odd
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_hidden: int = 0  # 0: 8/3 d_model rounded up to a multiple of 64
    window: int = 128  # each query sees this many keys, itself included
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    scan_chunk: int = 64  # selective-scan chunk: memory holds (B, chunk, E, N), not (B, L, E, N)
    scan_inner: str = "auto"  # scan inside a chunk: "assoc", "seq", or "auto" (seq on CPU, assoc elsewhere)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def validate(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "window", "d_state", "d_conv", "expand",
                    "scan_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        self.check_attention_dims()
        if self.hd % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.hd}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}")
        if self.scan_inner not in ("auto", "assoc", "seq"):
            raise ValueError(f"scan_inner must be 'auto', 'assoc' or 'seq'; got {self.scan_inner!r}")
        dtype_of(self.dtype), dtype_of(self.param_dtype)


# ---- sliding-window attention -----------------------------------------------------------------------------
def window_visible(q_pos, k_pos, window: int, prefix_len=None):
    """Key visible iff it exists (pos >= 0), pos_q - pos_k < W and it is causal, or (prefix-LM) both lie
    in the row's prefix within W of each other."""
    vis = (k_pos >= 0) & (q_pos - k_pos < window)
    ok = k_pos <= q_pos
    if prefix_len is not None:
        ok |= k_pos < prefix_len
        vis &= k_pos - q_pos < window
    return vis & ok


def ring_positions(lengths_B, slots: int):
    """Position held by each ring slot: the largest p < length with p = s (mod slots), or -1 if p < 0."""
    s = jnp.arange(slots, dtype=jnp.int32)
    last = lengths_B[:, None] - 1
    p = last - jnp.mod(last - s[None, :], slots)
    return jnp.where(p >= 0, p, -1)


def sliding_window_attention(q_BxKxHxD, k_BxKxGxD, v_BxKxGxD, pos_BxK, *, window: int, ring=None,
                             prefix_len_B=None):
    """Attention of K queries over the K new keys (same positions) and, optionally, a ring of W earlier keys.

    For K <= 2W everything is one block. Beyond, queries go in chunks of W that see only their own chunk
    and the previous one (the ring for chunk 0), plus the next one under prefix-LM: O(K W) time and memory,
    so long prefills and long-context evaluation never build a K x K score matrix.
    ring: (k_BxWxGxD, v_BxWxGxD, pos_BxW). Softmax in fp32.
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
    vis_BxNxCxS = window_visible(p[..., :, None], kpos[..., None, :], window, prefix)
    s = jnp.where(vis_BxNxCxS[:, :, None, None], s, NEG_INF)
    w = jax.nn.softmax(s, axis=-1).astype(vals.dtype)
    o = jnp.einsum("bngrcs,bnsgd->bncgrd", w, vals, preferred_element_type=jnp.float32)
    return o.reshape(b, n * c, h, d)[:, :kq].astype(q_BxKxHxD.dtype)


# ---- blocks -----------------------------------------------------------------------------------------------
class SambaBlock(nnx.Module):
    def __init__(self, cfg: SambaConfig, kind: str, *, rngs: nnx.Rngs):
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        self.kind, self.window, self.dtype = kind, cfg.window, dt
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        if kind == "mamba":
            self.mixer = Mamba(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                               dt_rank=cfg.dt_rank, dt_min=cfg.dt_min, dt_max=cfg.dt_max, scan_chunk=cfg.scan_chunk,
                               scan_inner=cfg.scan_inner, rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale)
        else:
            self.mixer = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, rope_base=cfg.rope_base,
                                   rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden, rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale)

    def __call__(self, x, pos_BxL, prefix_len_B=None):
        h = self.mixer_norm(x)
        if self.kind == "mamba":  # causal whatever the objective: a prefix only changes where the loss falls
            x = x + self.mixer(h)
        else:
            q, k, v = self.mixer.qkv(h, pos_BxL)
            o = sliding_window_attention(q, k, v, pos_BxL, window=self.window, prefix_len_B=prefix_len_B)
            x = x + self.mixer.out(o)
        return x + self.mlp(self.mlp_norm(x))

    def init_cache(self, batch: int) -> dict:
        if self.kind == "mamba":
            return self.mixer.init_cache(batch)
        m = self.mixer
        shape = (batch, self.window, m.n_kv_heads, m.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def extend(self, x, pos_BxK, cache, ring_pos_BxW):
        h = self.mixer_norm(x)
        if self.kind == "mamba":
            y, pending = self.mixer.extend(h, cache)
        else:
            q, k, v = self.mixer.qkv(h, pos_BxK)
            o = sliding_window_attention(q, k, v, pos_BxK, window=self.window,
                                         ring=(cache["k"], cache["v"], ring_pos_BxW))
            y, pending = self.mixer.out(o), {"k": k, "v": v}
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), pending

    def commit(self, cache, pending, n_B, lengths_B):
        if self.kind == "mamba":
            return self.mixer.commit(cache, pending, n_B)
        # Write the accepted keys only, and of those only the newest W: their slots are then distinct.
        kq = pending["k"].shape[1]
        j = jnp.arange(kq, dtype=jnp.int32)[None, :]
        keep = (j < n_B[:, None]) & (j >= n_B[:, None] - self.window)
        slot_BxK = jnp.where(keep, jnp.mod(lengths_B[:, None] + j, self.window), self.window)  # W: dropped
        return {"k": scatter_rows(cache["k"], pending["k"], slot_BxK),
                "v": scatter_rows(cache["v"], pending["v"], slot_BxK)}


class SambaLM(TokenIO, nnx.Module):
    config_class = SambaConfig

    def __init__(self, cfg: SambaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        pdt = dtype_of(cfg.param_dtype)
        self._init_embed(cfg, cfg.d_model, rngs, pdt)
        self.blocks = nnx.List([SambaBlock(cfg, "mamba" if i % 2 == 0 else "swa", rngs=rngs)
                                for i in range(cfg.n_layers)])
        self._init_head(cfg, cfg.d_model, rngs, pdt)

    def __call__(self, tokens_BxL, prefix_len_B=None):
        b, l = tokens_BxL.shape
        pos_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        x = self._embed(tokens_BxL)
        for blk in self.blocks:
            if self.cfg.remat:
                x = nnx.remat(lambda m, y: m(y, pos_BxL, prefix_len_B))(blk, x)
            else:
                x = blk(x, pos_BxL, prefix_len_B)
        return self._logits(x), {}

    # ---- decoding contract -------------------------------------------------------------------------
    def cache_capacity(self, max_len: int) -> int:
        """Any length fits: the cache is constant-size (W ring slots, fixed recurrent state)."""
        return max_len

    def init_cache(self, batch: int, max_len: int = 0) -> dict:
        del max_len  # constant memory whatever the length
        # Each leaf is its own buffer: one shared zeros array cannot be donated twice.
        return {"lengths": jnp.zeros((batch,), jnp.int32),
                "layers": [blk.init_cache(batch) for blk in self.blocks]}

    def extend(self, tokens_BxK, cache):
        b, k = tokens_BxK.shape
        lengths = cache["lengths"]
        pos_BxK = lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
        ring_pos = ring_positions(lengths, self.cfg.window)
        x = self._embed(tokens_BxK)
        pending = []
        for blk, c in zip(self.blocks, cache["layers"]):
            x, p = blk.extend(x, pos_BxK, c, ring_pos)
            pending.append(p)
        return self._logits(x), {"lengths": lengths, "layers": cache["layers"], "pending": pending}

    def commit(self, cache, n_B):
        if "pending" not in cache:
            raise ValueError("commit needs the cache returned by extend (it holds the pending tokens)")
        n_B = n_B.astype(jnp.int32)
        lengths = cache["lengths"]
        layers = [blk.commit(c, p, n_B, lengths) for blk, c, p in zip(self.blocks, cache["layers"], cache["pending"])]
        return {"lengths": lengths + n_B, "layers": layers}
