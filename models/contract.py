"""What a decodable LM is, in code (docs/ARCHITECTURE.md, "The model contract").

Every architecture is an `nnx.Module` that satisfies `DecodableLM`:

- `__call__(tokens_BxL, prefix_len_B=None, *, rng=None) -> (logits_BxLxV fp32, aux dict)`: the training and
  evaluation forward. `prefix_len_B` (prefix LM) makes positions < prefix_len see each other
  bidirectionally where the architecture can; `rng` is a key for stochastic training (DLCM's sampled
  boundaries) and is ignored by deterministic models. Entries of `aux` named `loss_*` are added to the loss.
- `init_cache(batch, max_len) -> Cache`: a fixed-shape cache, every leaf its own buffer (donatable).
- `extend(tokens_BxK, cache, prefix_len_B=None) -> (logits_BxKxV, Cache)`: K tokens at each row's
  `cache.lengths`. The returned cache carries whatever `commit` needs in `pending`; it is not yet advanced.
  `prefix_len_B` is only for prefill (an empty cache): the prompt is read as a bidirectional prefix.
- `commit(cache, n_B) -> Cache`: keep exactly the first n_B of the K extended tokens per row (0 <= n_B <= K);
  the result has exactly the pytree structure of `init_cache` (pending is None) and `lengths + n_B`.
  extend(K) + commit(n) must equal extend(n) + commit(n) for every n: rejected drafts and padding are inert.
- `vocab_size`, `flops_per_token(seq_len)` (training FLOPs per token as executed), `decay_mask(params)`
  (which parameters get weight decay), `cache_capacity(max_len)` (positions actually allocated).

The engine reads nothing inside a cache but `lengths`. Each layer kind owns one cache type below.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx


# ---- caches: one type per layer kind ---------------------------------------------------------------------
class KVCache(NamedTuple):
    """Global attention: keys/values heads-first [B, G, S, D], slot = position (rollback = a shorter length)."""

    k: jax.Array
    v: jax.Array


class RingCache(NamedTuple):
    """Sliding-window attention: a ring of W slots [B, W, G, D]; slot s holds the last position p = s mod W."""

    k: jax.Array
    v: jax.Array


class MambaCache(NamedTuple):
    """Mamba: the last d_conv - 1 raw conv inputs [B, d_conv-1, E] and the fp32 SSM state [B, E, N]."""

    conv: jax.Array
    ssm: jax.Array


class ConceptCache(NamedTuple):
    """DLCM's concept state: closed-concept count J [B], the open concept's fp32 running sum [B, d] and count
    [B], the last boundary query prev_q = W_q h_{t-1} [B, d_scan], backbone K/V per layer (slot = concept index),
    the cross-attention K/V (slot 0 = the null concept, slot k + 1 = concept k)."""

    J: jax.Array
    seg_sum: jax.Array
    seg_cnt: jax.Array
    prev_q: jax.Array
    backbone: tuple
    cross: KVCache
    counts: jax.Array | None = None  # replicated weighting only: [B, S] tokens replicating cross slot s


class Cache(NamedTuple):
    """A model's whole cache: per-row lengths [B] (tokens committed), one entry per layer (a layer-kind cache
    above, or a tuple of them), and `pending`: what `extend` leaves for `commit` (None once committed)."""

    lengths: jax.Array
    layers: tuple
    pending: Any = None


# ---- the contract -----------------------------------------------------------------------------------------
@runtime_checkable
class DecodableLM(Protocol):
    cfg: Any
    supports_prefix: bool  # whether any layer reads a bidirectional prefix (Mamba layers never do)

    @property
    def vocab_size(self) -> int: ...

    def __call__(self, tokens_BxL, prefix_len_B=None, *, rng=None) -> tuple[jax.Array, dict]: ...

    def init_cache(self, batch: int, max_len: int) -> Cache: ...

    def extend(self, tokens_BxK, cache: Cache, prefix_len_B=None) -> tuple[jax.Array, Cache]: ...

    def commit(self, cache: Cache, n_B) -> Cache: ...

    def cache_capacity(self, max_len: int) -> int: ...

    def flops_per_token(self, seq_len: int) -> float: ...

    def decay_mask(self, params) -> Any: ...


# ---- scaffolding shared by every model ----------------------------------------------------------------------
NO_DECAY = frozenset({"scale", "bias", "A_log", "D", "null_concept"})  # norms, biases, SSM dynamics


def decay_mask(params, no_decay=NO_DECAY):
    """Weight decay on matrices only, never on leaves named in `no_decay` (a pytree of bools like params, a
    pure dict or an nnx.State: the name is the last dict key of the path, not a Variable's `.value`)."""
    def keep(path, x):
        keys = [k.key for k in path if hasattr(k, "key")]
        return x.ndim >= 2 and (str(keys[-1]) if keys else "") not in no_decay
    return jax.tree_util.tree_map_with_path(keep, params)


def count_params(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def full_positions(batch: int, length: int):
    """[B, L] positions 0..L-1 of a full forward."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def step_positions(lengths_B, k: int):
    """[B, K] positions of K new tokens appended at each row's length."""
    return lengths_B[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]


def key_visible(q_pos, k_pos, *, window: int = 0, prefix_len=None):
    """The one visibility rule (broadcasting): key k is visible to query q iff it exists (k >= 0) and
    k <= q (causal) or, prefix LM, k lies in the row's prefix (k < prefix_len); with a window W also
    |q - k| < W (the backward bound matters only for prefix keys after the query)."""
    vis = k_pos <= q_pos
    if prefix_len is not None:
        vis = vis | (k_pos < prefix_len)
    vis = vis & (k_pos >= 0)
    if window:
        vis = vis & (q_pos - k_pos < window)
        if prefix_len is not None:  # a causal key is never after its query
            vis = vis & (k_pos - q_pos < window)
    return vis


def run_stack(blocks, x, call, *, remat: bool):
    """x through `call(block, x)` for each block, each rematerialised in the backward pass if `remat`."""
    for blk in blocks:
        x = nnx.remat(call)(blk, x) if remat else call(blk, x)
    return x


def dense_flops_per_token(model: nnx.Module) -> float:
    """6 x (parameters in matrices): forward + backward matmul FLOPs per token. The embedding table is counted
    once, as the tied head's matrix; a model with an untied head subtracts its table (a lookup)."""
    return 6.0 * sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)


def attention_flops_per_token(n_layers: int, context: int, n_heads: int, head_dim: int) -> float:
    """12 L T d_attn per token: QK^T and AV, forward and backward, counted in full (as bench_train does)."""
    return 12.0 * n_layers * context * n_heads * head_dim


def run_if(pred, fn, operand):
    """`fn(operand)` if `pred` (a traced bool) else `operand`, as a `lax.while_loop` of 0 or 1 trips rather
    than `lax.cond`: XLA:CPU copies the buffers (caches) that a conditional branch writes, while a loop's carry
    is updated in place, and a loop that does not run costs its predicate only (measured on decoder_tiny's
    verify chain: +0.28 ms per step with one cond, none with the loop)."""
    out, _ = jax.lax.while_loop(lambda c: c[1], lambda c: (fn(c[0]), jnp.zeros((), bool)), (operand, pred))
    return out
