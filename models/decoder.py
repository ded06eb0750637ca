"""Decoder-only transformer LM (pre-RMSNorm, RoPE, GQA, SwiGLU) with a fixed-shape KV cache.

Model contract (DESIGN.md): `__call__` for training, `init_cache`, `extend` (K tokens at each row's length),
`commit` (keep the first n of them). The cache slot of a key is its position, so masks come from positions:
padding is inert and rollback is only a change of length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (Attention, AttentionDims, RMSNorm, SwiGLU, TokenIO, blocked_cache_attention, causal_mask,
                           dtype_of, scatter_rows_heads_first)


@dataclass(frozen=True)
class DecoderConfig(AttentionDims):
    arch: str = "decoder"
    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (plain multi-head attention)
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_hidden: int = 0  # 0: 8/3 d_model rounded up to a multiple of 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; bf16 for accelerators (XLA:CPU bf16 is ~10x slower)
    param_dtype: str = "float32"
    attn_block: int = 256  # cache read granularity when decoding
    remat: bool = False

    def validate(self):
        if min(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.attn_block) < 1:
            raise ValueError("vocab_size, d_model, n_layers, n_heads and attn_block must be positive")
        self.check_attention_dims()
        if self.hd % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.hd}")
        dtype_of(self.dtype), dtype_of(self.param_dtype)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, rope_base=cfg.rope_base, rngs=rngs,
                              dtype=dt, param_dtype=pdt, out_scale=out_scale)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden, rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale)
        self.block = cfg.attn_block

    def __call__(self, x, pos_BxL, mask_BxLxL):
        x = x + self.attn(self.attn_norm(x), pos_BxL, mask_BxLxL)
        return x + self.mlp(self.mlp_norm(x))

    def extend(self, x, pos_BxK, cache, n_valid):
        q, k, v = self.attn.qkv(self.attn_norm(x), pos_BxK)
        kc = scatter_rows_heads_first(cache["k"], k, pos_BxK)
        vc = scatter_rows_heads_first(cache["v"], v, pos_BxK)
        key_pos = jnp.broadcast_to(jnp.arange(kc.shape[2], dtype=jnp.int32), (kc.shape[0], kc.shape[2]))
        o = blocked_cache_attention(q, kc, vc, key_pos, pos_BxK, block=self.block, n_valid=n_valid,
                                    heads_first=True)
        x = x + self.attn.out(o)
        return x + self.mlp(self.mlp_norm(x)), {"k": kc, "v": vc}


class DecoderLM(TokenIO, nnx.Module):
    config_class = DecoderConfig

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        pdt = dtype_of(cfg.param_dtype)
        self._init_embed(cfg, cfg.d_model, rngs, pdt)
        self.blocks = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self._init_head(cfg, cfg.d_model, rngs, pdt)

    def __call__(self, tokens_BxL, prefix_len_B=None):
        b, l = tokens_BxL.shape
        pos_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        mask = causal_mask(pos_BxL, prefix_len_B)
        x = self._embed(tokens_BxL)
        for blk in self.blocks:
            if self.cfg.remat:
                x = nnx.remat(lambda m, y: m(y, pos_BxL, mask))(blk, x)
            else:
                x = blk(x, pos_BxL, mask)
        return self._logits(x), {}

    # ---- decoding contract -------------------------------------------------------------------------
    def cache_capacity(self, max_len: int) -> int:
        """Slots actually allocated for a requested max_len (rounded up to the attention block)."""
        blk = self.cfg.attn_block
        return -(-max_len // blk) * blk

    def init_cache(self, batch: int, max_len: int) -> dict:
        s = self.cache_capacity(max_len)
        shape = (batch, self.cfg.kv_heads, s, self.cfg.hd)  # heads first: blocks are contiguous per head
        # Each leaf is its own buffer: one shared zeros array cannot be donated twice.
        layers = [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                  for _ in range(self.cfg.n_layers)]
        return {"lengths": jnp.zeros((batch,), jnp.int32), "layers": layers}

    def extend(self, tokens_BxK, cache):
        b, k = tokens_BxK.shape
        lengths = cache["lengths"]
        pos_BxK = lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
        n_valid = jnp.max(lengths) + k  # cache slots that can hold a visible key
        x = self._embed(tokens_BxK)
        new_layers = []
        for blk, c in zip(self.blocks, cache["layers"]):
            x, c = blk.extend(x, pos_BxK, c, n_valid)
            new_layers.append(c)
        return self._logits(x), {"lengths": lengths, "layers": new_layers}

    def commit(self, cache, n_B):
        return {**cache, "lengths": cache["lengths"] + n_B.astype(jnp.int32)}


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
