"""Decoder-only transformer LM (pre-RMSNorm, RoPE, GQA, SwiGLU): a stack of global-attention blocks.

Each block is `x += GlobalAttention(RMSNorm(x)); x += SwiGLU(RMSNorm(x))` (models/base.py, Block). The KV
cache slot of a key is its position, so masks come from positions: padding is inert and rollback is only a
change of length (models/attention.py, GlobalAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from models.attention import GlobalAttention
from models.base import Block, StackLM, residual_scale
from models.layers import AttentionDims, SwiGLU, dtype_of


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
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    # "" (plain RoPE) or "llama3": Llama 3.1's frequency-dependent scaling with the four numbers below
    rope_scaling: str = ""
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    dtype: str = "float32"  # compute dtype; bf16 for accelerators (XLA:CPU bf16 is ~10x slower)
    param_dtype: str = "float32"
    # KV cache slots are allocated in multiples of attn_block, and a prefill attends to the cache in blocks
    # of attn_block slots (online softmax); a decode step reads a power-of-two prefix of the cache instead.
    attn_block: int = 256
    remat: bool = False

    def validate(self):
        if min(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.attn_block) < 1:
            raise ValueError("vocab_size, d_model, n_layers, n_heads and attn_block must be positive")
        self.check_attention_dims()
        if self.hd % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.hd}")
        if self.rope_scaling not in ("", "llama3"):
            raise ValueError(f"rope_scaling must be '' or 'llama3'; got {self.rope_scaling!r}")
        if self.rope_scaling and not (self.rope_factor > 0 and self.rope_high_freq_factor > self.rope_low_freq_factor
                                      and self.rope_original_max_len > 0):
            raise ValueError("llama3 rope scaling needs rope_factor > 0, rope_high_freq_factor > "
                             "rope_low_freq_factor and rope_original_max_len > 0")
        dtype_of(self.dtype), dtype_of(self.param_dtype)

    @property
    def rope_scaling_args(self) -> tuple:
        """What models.layers.rope takes: () or ("llama3", factor, low, high, original_max_len)."""
        if not self.rope_scaling:
            return ()
        return (self.rope_scaling, self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_max_len)


def attention_block(cfg: DecoderConfig, *, rngs: nnx.Rngs) -> Block:
    """One global-attention + SwiGLU block of a stack of cfg.n_layers (also DLCM's token and concept stacks)."""
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    out_scale = residual_scale(2 * cfg.n_layers)
    attn = GlobalAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, block=cfg.attn_block,
                           rope_base=cfg.rope_base, rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale,
                           rope_scaling=cfg.rope_scaling_args, qkv_bias=cfg.qkv_bias)
    mlp = SwiGLU(cfg.d_model, cfg.hidden, rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale)
    return Block(cfg.d_model, attn, mlp, norm_eps=cfg.norm_eps, param_dtype=pdt)


class DecoderLM(StackLM):
    config_class = DecoderConfig

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        _, pdt = self._init_embed(cfg, rngs)
        self.blocks = nnx.List([attention_block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self._init_head(cfg, cfg.d_model, rngs, pdt)
