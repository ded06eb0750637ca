"""Token sampling and speculative acceptance, with every knob a traced per-row value.

Temperature, top-k and top-p are arrays, never Python numbers, so changing them never recompiles.
Temperature 0 means greedy (argmax), chosen per row with `jnp.where`. Randomness is per row and per
position: the key for the token at absolute position p of row b is `fold_in(key_b, p)`, so a row's
samples do not depend on which other rows share its batch or on the prompt bucket.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_U, _RESIDUAL = 0, 1  # sub-streams of a position's key in speculative acceptance


def _bcast(x, ndim: int):
    """Per-row value [B] -> [B, 1, ...] broadcastable against [B, ..., V] of rank ndim."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def filtered_logits(logits_xV, temperature, top_k, top_p):
    """Temperature-scaled logits with everything outside top-k, then outside top-p, set to -inf.

    Top-k keeps the k largest (0 or >= V: all). Top-p keeps the smallest set of the most likely tokens
    whose mass reaches p (the most likely token always stays). Ties at the cut-off are all kept.
    The knobs have the shape of the leading axes of logits (or broadcast to it). Rows with temperature 0
    are scaled by 1; their distribution is unused (see `target_probs`).
    """
    x = logits_xV.astype(jnp.float32)
    v = x.shape[-1]
    t = jnp.asarray(temperature, jnp.float32)
    t = _bcast(jnp.where(t > 0, t, 1.0), x.ndim)
    x = x / t
    k = jnp.asarray(top_k, jnp.int32)
    k = _bcast(jnp.where((k > 0) & (k < v), k, v), x.ndim)
    p = _bcast(jnp.asarray(top_p, jnp.float32), x.ndim)
    # top_k must be traced, so lax.top_k (static k) is out: sort once and cut by rank.
    sorted_xV = -jnp.sort(-x, axis=-1)
    rank = jnp.arange(v, dtype=jnp.int32)
    in_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_k, sorted_xV, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < p) | (rank == 0))
    n_keep = keep.sum(-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_xV, n_keep - 1, axis=-1)
    return jnp.where(x >= cutoff, x, -jnp.inf)


def target_probs(logits_xV, temperature, top_k, top_p):
    """The distribution the sampler draws from: filtered softmax, or one-hot argmax at temperature 0."""
    p = jax.nn.softmax(filtered_logits(logits_xV, temperature, top_k, top_p), axis=-1)
    greedy = jax.nn.one_hot(jnp.argmax(logits_xV, axis=-1), logits_xV.shape[-1], dtype=p.dtype)
    t = _bcast(jnp.asarray(temperature), logits_xV.ndim)
    return jnp.where(t > 0, p, greedy)


def position_keys(keys_Bx2, pos_B):
    """Per-row, per-position keys: fold_in(row key, absolute position)."""
    return jax.vmap(jax.random.fold_in)(keys_Bx2, pos_B.astype(jnp.uint32))


def greedy_ids(logits_xV):
    """jnp.argmax over the last axis (the first maximal index; the first NaN in a row holding one), written as
    two plain reductions: a max, then the smallest index that holds it. XLA:CPU lowers argmax to a variadic
    (value, index) reduce that cost ~2x these two at the 5 x 259 logits of a 1+4 verify step (jitted loop,
    YNNPACK fusion off: 5.6 vs 2.7 us; acceptance in the profiled decoder_s0 step 9.7 -> 5.8 us, median op
    times under load, scripts/profile_spec.py --device-ops). Same ids as argmax, always."""
    v = logits_xV.shape[-1]
    m = jnp.max(logits_xV, axis=-1, keepdims=True)
    hit = (logits_xV == m) | (logits_xV != logits_xV)  # x != x: NaN, as argmax reports the first NaN
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def sample(logits_BxV, keys_Bx2, pos_B, temperature_B, top_k_B, top_p_B):
    """One token per row; pos_B is the absolute position of the token being sampled."""
    greedy = greedy_ids(logits_BxV)

    def draw():
        x = filtered_logits(logits_BxV, temperature_B, top_k_B, top_p_B)
        tok = jax.vmap(jax.random.categorical)(position_keys(keys_Bx2, pos_B), x).astype(jnp.int32)
        return jnp.where(temperature_B > 0, tok, greedy)

    # A traced branch (not a recompile): all-greedy batches skip the sort and the categorical draw.
    return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda: greedy)


def accept(logits_BxK1xV, draft_BxK, draft_len_B, keys_Bx2, pos_B, temperature_B, top_k_B, top_p_B):
    """Speculative acceptance of point-mass drafts: (n_accepted_B, next_token_B).

    logits[:, i] is the model's prediction after the pending token and draft[:, :i]; draft_len_B of the K
    draft slots are real. pos_B is the absolute position of the first draft token; fold_in(row key, pos_B)
    keys the step's randomness (a step always starts past the previous one). Row b emits
    draft[b, :n] followed by `next` (the correction on a rejection, or the bonus token when every draft
    token was accepted), so every verify step emits n + 1 tokens.

    Greedy rows (temperature 0): n is the longest prefix of the draft equal to the argmax, and next is the
    argmax after it, which makes the output identical to plain greedy decoding.
    Sampling rows: draft token d is accepted with probability p(d); on rejection, next is drawn from p with
    d removed and renormalised; after a full acceptance, next is drawn from p at the last position. For a
    draft that is a point mass this emits each token with probability exactly p (speculative sampling,
    Leviathan et al. 2023, with q = one-hot).
    """
    b, k1, v = logits_BxK1xV.shape
    k = k1 - 1
    logits = logits_BxK1xV.astype(jnp.float32)
    valid_BxK = jnp.arange(k, dtype=jnp.int32)[None, :] < draft_len_B[:, None]
    greedy_BxK1 = greedy_ids(logits)
    n_greedy = jnp.cumprod(valid_BxK & (draft_BxK == greedy_BxK1[:, :k]), axis=1).sum(1).astype(jnp.int32)
    next_greedy = jnp.take_along_axis(greedy_BxK1, n_greedy[:, None], axis=1)[:, 0]

    def sampled():
        x_BxK1xV = filtered_logits(logits, temperature_B[:, None], top_k_B[:, None], top_p_B[:, None])
        logp_BxKxV = jax.nn.log_softmax(x_BxK1xV[:, :k], axis=-1)
        p_draft_BxK = jnp.exp(jnp.take_along_axis(logp_BxKxV, draft_BxK[..., None], axis=-1)[..., 0])
        # One key per row and step: the step's first position differs on every step, so steps are independent.
        step_keys = position_keys(keys_Bx2, pos_B)
        u_BxK = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, _U), (k,)))(step_keys)
        n = jnp.cumprod(valid_BxK & (u_BxK < p_draft_BxK), axis=1).sum(1).astype(jnp.int32)
        # Residual at a rejected slot: p without the draft token. Past the draft (the bonus slot): p itself.
        draft_BxK1 = jnp.where(valid_BxK, draft_BxK, -1)
        draft_BxK1 = jnp.concatenate([draft_BxK1, jnp.full((b, 1), -1, draft_BxK1.dtype)], axis=1)
        removed = jnp.arange(v, dtype=jnp.int32) == draft_BxK1[..., None]
        gumbel_BxK1xV = jax.vmap(lambda kk: jax.random.gumbel(jax.random.fold_in(kk, _RESIDUAL), (k1, v)))(step_keys)
        residual_BxK1 = jnp.argmax(jnp.where(removed, -jnp.inf, x_BxK1xV) + gumbel_BxK1xV, axis=-1).astype(jnp.int32)
        nxt = jnp.take_along_axis(residual_BxK1, n[:, None], axis=1)[:, 0]
        sampling = temperature_B > 0
        return jnp.where(sampling, n, n_greedy), jnp.where(sampling, nxt, next_greedy)

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: (n_greedy, next_greedy))
