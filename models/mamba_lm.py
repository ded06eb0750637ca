"""A pure-Mamba LM: a stack of the generic block around Mamba-1 mixers, the MLP optional (off by default,
as in the Mamba paper's LMs). It exists as the fourth architecture to show what adding one takes: this file
and one line in models/registry.py.

Causal only: Mamba layers cannot read a bidirectional prefix, so `supports_prefix` is False and a prefix
(prefix-LM training, `extend(..., prefix_len_B)`) only changes where the loss falls.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from models.base import Block, StackLM, residual_scale
from models.layers import SwiGLU, dtype_of, mlp_hidden_default
from models.mamba import MambaDims


@dataclass(frozen=True)
class MambaLMConfig(MambaDims):
    arch: str = "mamba"
    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    scan_chunk: int = 64  # selective-scan chunk: memory holds (B, chunk, E, N), not (B, L, E, N)
    scan_inner: str = "auto"  # scan inside a chunk: "assoc", "seq", or "auto" (seq on CPU, assoc elsewhere)
    mlp: bool = False  # a SwiGLU after each Mamba mixer
    mlp_hidden: int = 0  # 0: 8/3 d_model rounded up to a multiple of 64
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def validate(self):
        for name in ("vocab_size", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be >= 0 (0: default); got {self.mlp_hidden}")
        self.check_mamba_dims()
        dtype_of(self.dtype), dtype_of(self.param_dtype)


class MambaLM(StackLM):
    config_class = MambaLMConfig

    def __init__(self, cfg: MambaLMConfig, *, rngs: nnx.Rngs):
        dt, pdt = self._init_embed(cfg, rngs)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt,
                  out_scale=residual_scale((2 if cfg.mlp else 1) * cfg.n_layers))

        def block():
            mixer = cfg.mamba_mixer(**kw)
            mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden or mlp_hidden_default(cfg.d_model), **kw) if cfg.mlp else None
            return Block(cfg.d_model, mixer, mlp, norm_eps=cfg.norm_eps, param_dtype=pdt)

        self.blocks = nnx.List([block() for _ in range(cfg.n_layers)])
        self._init_head(cfg, cfg.d_model, rngs, pdt)
