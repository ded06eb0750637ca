"""What the LMs here share: the mixer protocol, the generic residual block and the LM base classes.

A model is an embedding, a stack of `Block`s (`x += mixer(norm(x)); x += mlp(norm(x))`, the MLP optional)
and a final norm with a (tied) head. Each mixer is one layer kind and owns its cache, so a new kind of layer
is a new mixer and a new architecture is a new choice of mixers (models/decoder.py, samba.py, mamba_lm.py).

The mixer protocol (models/attention.py: GlobalAttention, SlidingWindowAttention; models/mamba.py: Mamba):
- `__call__(x_BxLxD, pos_BxL, prefix_len_B=None) -> y_BxLxD`: the full-sequence forward (pos_BxL = 0..L-1 in
  every row, `full_positions`: attention skips the key blocks that are invisible by position). With a prefix
  (prefix LM), positions < prefix_len see each other bidirectionally if the layer can (`reads_prefix`).
- `reads_prefix`: whether the layer honours a prefix at all (Mamba: no, a recurrence is causal by nature).
- `cache_capacity(max_len)`: positions actually allocated; `init_cache(batch, max_len)`: the layer's cache,
  one of the contract's NamedTuples (KVCache, RingCache, MambaCache), every leaf its own buffer.
- `extend(x_BxKxD, cache, ctx: StepCtx) -> (y_BxKxD, cache, pending)`: K new tokens at `ctx.pos`. A layer
  either writes its cache now (global attention; pending None) or leaves it as it was and returns what
  `commit` needs (ring: the new keys; Mamba: the scan inputs). At prefill, `ctx.prefix_len` asks for the
  bidirectional prefix.
- `commit(cache, pending, n_B, lengths_B) -> cache`: the cache after exactly the first n_B of the K tokens
  (lengths_B: the lengths before the step), of the structure `init_cache` returns.
- `attention_flops(context) -> float`: FLOPs per token that are not matrix products of parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.contract import (Cache, decay_mask, dense_flops_per_token, full_positions, run_stack,
                             step_positions)
from models.layers import RMSNorm, dense, dtype_of, tied_logits, tokens_matmul


class StepCtx(NamedTuple):
    """What every layer of one stack needs to extend its cache by K tokens."""

    lengths: jax.Array  # [B] tokens committed before this step
    pos: jax.Array  # [B, K] positions of the new tokens
    n_valid: jax.Array  # () cache slots that can hold a visible key: max(lengths) + K
    prefix_len: jax.Array | None = None  # [B] prefill only: positions < prefix_len are a bidirectional prefix

    @classmethod
    def at(cls, lengths_B, k: int, prefix_len_B=None) -> StepCtx:
        return cls(lengths_B, step_positions(lengths_B, k), jnp.max(lengths_B) + k, prefix_len_B)


class Block(nnx.Module):
    """The generic pre-norm residual block: x += mixer(RMSNorm(x)); x += mlp(RMSNorm(x)) if there is an MLP.

    The caller builds the mixer and the MLP (in that order: parameter initialisation draws from the RNG
    streams in the order of the computation); the block adds the norms and forwards the cache protocol.
    """

    def __init__(self, d_model: int, mixer: nnx.Module, mlp: nnx.Module | None = None, *, norm_eps: float,
                 param_dtype):
        self.mixer_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.mixer = mixer
        self.mlp_norm = None if mlp is None else RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = mlp

    def _mlp(self, x):
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def __call__(self, x, pos_BxL, prefix_len_B=None):
        return self._mlp(x + self.mixer(self.mixer_norm(x), pos_BxL, prefix_len_B))

    def init_cache(self, batch: int, max_len: int):
        return self.mixer.init_cache(batch, max_len)

    def extend(self, x, cache, ctx: StepCtx):
        y, cache, pending = self.mixer.extend(self.mixer_norm(x), cache, ctx)
        return self._mlp(x + y), cache, pending

    def commit(self, cache, pending, n_B, lengths_B):
        return self.mixer.commit(cache, pending, n_B, lengths_B)


def residual_scale(n_outputs: int) -> float:
    """Initial scale of the residual output projections: 1/sqrt(residual branches in the stack)."""
    return 1.0 / math.sqrt(n_outputs)


class LM(nnx.Module):
    """Shared by every LM: token embedding in, final RMSNorm and a tied (or separate) head out, and the
    contract's bookkeeping (`vocab_size`, `decay_mask`). The subclass calls `_init_embed` (which also sets `cfg`
    and `dtype`) before its layers and `_init_head` after them (RNG draws in the order of the computation).
    """

    config_class: type
    supports_prefix: bool = True

    def _init_embed(self, cfg, rngs: nnx.Rngs, d: int | None = None):
        """Set `cfg` and the compute `dtype`, create the token embedding (width d, default cfg.d_model), and
        return (compute dtype, parameter dtype) for the layers that follow."""
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        param_dtype = dtype_of(cfg.param_dtype)
        d = d or cfg.d_model
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(d) if cfg.tie_embeddings else 1.0)
        self.embed = nnx.Embed(cfg.vocab_size, d, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))
        return self.dtype, param_dtype

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
            head_DxV = self.__dict__.get("_decode_head_DxV")
            if head_DxV is not None:  # see prepare_decoding
                return tokens_matmul(x, head_DxV, preferred_element_type=jnp.float32)
            return tied_logits(x, self.embed.embedding[...].astype(self.dtype))
        return self.head(x).astype(jnp.float32)

    def prepare_decoding(self) -> None:
        """Called by the decoding loops once per jitted call, outside their `while_loop`s: the tied head's
        [D, V] transpose is made here, once, so that every step's logits are a plain x @ W product. XLA:CPU
        does not hoist the transpose out of the loop, and its product with the transposed operand (x @ E^T) of
        2-17 rows took 65-78 us per step with YNNPACK fusion off (as the speculative loop runs) against 9-10 us
        for x @ W, and 14-16 vs 8.5 us with it on (5 x 192 by 259, measured in one process). The logits are
        the same sums in another order: equal to fp32 rounding. Training keeps `tied_logits`."""
        if self.cfg.tie_embeddings:
            object.__setattr__(self, "_decode_head_DxV", jnp.transpose(self.embed.embedding[...].astype(self.dtype)))

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def decay_mask(self, params):
        return decay_mask(params)


class StackLM(LM):
    """An LM that is one stack of `Block`s in `self.blocks`: the whole contract follows from its mixers.

    Cache: `Cache(lengths, layers)` with one layer-kind cache per block; after `extend`, `pending` holds one
    entry per block (None for the layers that write their cache in `extend`).
    Prefix LM: positions < prefix_len see each other bidirectionally in the layers that read a prefix
    (attention); recurrent layers (Mamba) stay causal. `supports_prefix` says whether any layer reads it.
    """

    @property
    def supports_prefix(self) -> bool:
        return any(blk.mixer.reads_prefix for blk in self.blocks)

    def __call__(self, tokens_BxL, prefix_len_B=None, *, rng=None):
        del rng  # deterministic
        pos_BxL = full_positions(*tokens_BxL.shape)
        x = run_stack(self.blocks, self._embed(tokens_BxL), lambda blk, y: blk(y, pos_BxL, prefix_len_B),
                      remat=self.cfg.remat)
        return self._logits(x), {}

    def flops_per_token(self, seq_len: int) -> float:
        """6 x matrix parameters (an untied embedding table is a lookup, not a product: not counted), plus each
        mixer's attention over the context it reads."""
        lookup = 0 if self.cfg.tie_embeddings else self.embed.embedding.size
        return (dense_flops_per_token(self) - 6.0 * lookup
                + sum(blk.mixer.attention_flops(seq_len) for blk in self.blocks))

    # ---- decoding contract -------------------------------------------------------------------------
    def cache_capacity(self, max_len: int) -> int:
        return max(blk.mixer.cache_capacity(max_len) for blk in self.blocks)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        cap = self.cache_capacity(max_len)
        return Cache(jnp.zeros((batch,), jnp.int32), tuple(blk.init_cache(batch, cap) for blk in self.blocks))

    def extend(self, tokens_BxK, cache: Cache, prefix_len_B=None):
        ctx = StepCtx.at(cache.lengths, tokens_BxK.shape[1], prefix_len_B)
        x = self._embed(tokens_BxK)
        layers, pending = [], []
        for blk, c in zip(self.blocks, cache.layers):
            x, c, p = blk.extend(x, c, ctx)
            layers.append(c)
            pending.append(p)
        return self._logits(x), Cache(cache.lengths, tuple(layers), tuple(pending))

    def commit(self, cache: Cache, n_B) -> Cache:
        if cache.pending is None:
            raise ValueError("commit needs the cache returned by extend (it holds the pending tokens)")
        n_B = jnp.asarray(n_B, jnp.int32)
        layers = tuple(blk.commit(c, p, n_B, cache.lengths)
                       for blk, c, p in zip(self.blocks, cache.layers, cache.pending))
        return Cache(cache.lengths + n_B, layers)
