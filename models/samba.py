"""SAMBA (arXiv 2406.07522): blocks alternate Mamba-1 (even) and sliding-window attention (odd).

`pattern` = "mamba" or "attention" makes every block one kind (baselines in the same family), and `mlp` =
false drops the SwiGLU after each mixer.

Each block is the generic `x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))` (models/base.py, Block),
embeddings are tied, and the residual output projections start scaled by 1/sqrt(2 * blocks).

The decode cache is constant-size whatever the length generated, and each layer owns its part:
- Mamba layers (models/mamba.py): a `MambaCache`, the last d_conv-1 raw conv inputs and the fp32 SSM
  state; `extend` leaves it as it was and returns the per-token scan inputs, `commit(n)` replays the first n
  of them (dt = 0 beyond n leaves the state unchanged) and re-slices the conv window at n.
- SWA layers (models/attention.py, SlidingWindowAttention): a `RingCache` of W slots; `extend` returns the
  new keys as pending and `commit(n)` writes the newest accepted ones, so rejected drafts and prompt padding
  never overwrite a key inside the window and W slots suffice whatever K is.

Prefix LM: the SWA layers read the prefix bidirectionally (within the window), the Mamba layers stay causal.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from models.attention import SlidingWindowAttention
from models.base import Block, StackLM, residual_scale
from models.layers import AttentionDims, SwiGLU, dtype_of
from models.mamba import MambaDims


PATTERNS = ("alternate", "mamba", "attention")


@dataclass(frozen=True)
class SambaConfig(AttentionDims, MambaDims):
    arch: str = "samba"
    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4  # blocks: Mamba on even, SWA on odd (pattern "alternate")
    # Which mixer each block holds: "alternate" (SAMBA), "mamba" (Mamba only) or "attention" (SWA only): the
    # study's pure-Mamba and pure-attention baselines in the same family.
    pattern: str = "alternate"
    mlp: bool = True  # a SwiGLU after each mixer
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
        for name in ("vocab_size", "n_layers", "n_heads", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}; got {self.pattern!r}")
        self.check_mamba_dims()
        self.check_attention_dims()
        if self.hd % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.hd}")
        dtype_of(self.dtype), dtype_of(self.param_dtype)


class SambaLM(StackLM):
    config_class = SambaConfig

    def __init__(self, cfg: SambaConfig, *, rngs: nnx.Rngs):
        dt, pdt = self._init_embed(cfg, rngs)
        out_scale = residual_scale((2 if cfg.mlp else 1) * cfg.n_layers)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt, out_scale=out_scale)

        def block(i):
            if cfg.pattern == "mamba" or (cfg.pattern == "alternate" and i % 2 == 0):
                mixer = cfg.mamba_mixer(**kw)
            else:
                mixer = SlidingWindowAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, window=cfg.window,
                                               rope_base=cfg.rope_base, **kw)
            mlp = SwiGLU(cfg.d_model, cfg.hidden, **kw) if cfg.mlp else None
            return Block(cfg.d_model, mixer, mlp, norm_eps=cfg.norm_eps, param_dtype=pdt)

        self.blocks = nnx.List([block(i) for i in range(cfg.n_layers)])
        self._init_head(cfg, cfg.d_model, rngs, pdt)
