"""DLCM (Dynamic Large Concept Models, arXiv 2512.24617), strict causal variant (docs/ARCHITECTURE.md,
"Facts from the papers"); tests/dlcm_reference.py is an independent loop-by-loop reference of this forward.

Pipeline: a causal token encoder gives h; a boundary p_t = 1/2 (1 - cos(W_q h_{t-1}, W_k h_t)) marks token t
as the start of a concept (sampled from Bernoulli(sharpen(p)) in training, p >= eval_threshold otherwise);
p = b = 1 at a row's position 0 and at every document start (`doc_start_id`, the data's separator); a
concept is the mean of its tokens' h, projected up by W_up; a causal transformer (the backbone, RoPE on the
concept index) runs over the concepts; every token cross-attends to the concepts CLOSED BEFORE it plus a
learned null concept (Q = RMSNorm(W_Q h), K = RMSNorm(W_K z), V = W_V z, residual onto h, then an optional
SwiGLU); a causal token decoder and the head give the logits (times 1/s_token under muP).

Which concepts token t sees: with seg_t = (number of boundaries at or before t) - 1, t's own concept is
seg_t and the closed ones are 0 .. seg_t - 1. Keys are numbered [null, z_0, z_1, ...], so key index
kk is visible iff kk <= seg_t. `cross_weighting`: "uniform" weighs each visible key once (exact L x (M+1)
masked attention); "replicated" is the paper's concept replication under the strict rule (position s carries
key seg_s, token t attends over s <= t), i.e. key kk weighted by its multiplicity: a log-count bias of
log |concept kk| for kk < seg_t and log (tokens of t's concept up to t) for kk = seg_t.

Concept slots (the cap): by position t at most cap(t) = floor((t + 1) concept_slots / R) + concept_slack
concepts exist (the open one included); a boundary that would exceed it is dropped (`capped_boundaries`).
The cap depends on the position only, so the full forward and every extend (any K, any commit) drop the same
boundaries: a length-L forward needs cap(L - 1) slots (`concept_slots_for`, about 1.25 L / R), never more,
and the backbone's training cost scales with 1/R. `concept_capped` logs the share of dropped boundaries.

Global Parser loss (returned as `loss_parser` = aux_weight * L_aux; the trainer adds every `loss_*`):
L_aux = R/(R-1) [(R-1) F G + (1-F)(1-G)] - 1, F = mean(b) of the realised boundaries (no gradient),
G = mean(p), both over the whole (global) batch. The boundary decisions are discrete, so W_q/W_k are trained
by L_aux through G only.

Decoupled muP (paper Eqs. 18-21, on by default): `optimizer_groups` labels the token-side matrices
(encoder, decoder, W_q/W_k, cross Q/O and MLP) and the concept-side ones (backbone, W_up, cross K/V); the
trainer's AdamW gives them lr and eps times 1/s_token and 1/s_concept (s = width / mup_base_width); a tied
embedding's init does not shrink with width; fan-in init is already variance 1/(s d_base); logits x 1/s_token.

Decode cache `Cache(lengths, layers)` with layers = (encoder KVCache per layer, ConceptCache, decoder KVCache
per layer); slot = position for token caches, slot = concept index for concept caches:
- the token stacks' `KVCache`s are rolled back by `lengths` (models/attention.py, GlobalAttention);
- `ConceptCache.backbone`: the backbone's concept K/V per layer (slot k = concept k); `.cross`: the
  cross-attention K/V (slot 0 = the null concept, rewritten by every extend; slot k+1 = concept k);
  `.counts` (replicated only): slot kk's multiplicity, the length of concept kk once it closed; all are
  rolled back by `J`, the number of closed concepts: slots beyond J are invisible (masks come from
  positions) and are overwritten before use;
- per row: `J`, the open concept's running fp32 sum `seg_sum` and count `seg_cnt`, `prev_q` (= W_q h_{t-1},
  the previous token's half of the boundary score, so a step projects only its own tokens).
`extend` is parallel over its K tokens: the token stacks run as in the decoder, the boundaries need only
h_{t-1} and h_t (and the cap the count before the block), the concepts closed inside the block (at most K)
are packed into K backbone slots written at J..J+K-1 (the unused ones are garbage beyond the new J, hence
inert), and each token's cross-attention query position is its own J_t. The concept path (backbone, cross
K/V, counts) runs only in an extend where some row closes a concept or starts empty: a plain decode step
pays for the backbone about once per concept, not once per token. The per-position state after each
of the K tokens is pending (`ConceptPending`); `commit(n)` selects the state after exactly n tokens and
returns the structure of `init_cache`. Concept caches hold cap(token capacity - 1) + 1 slots.
Prefix LM (the full forward and a prefill's `extend(..., prefix_len_B)` alike): the token stacks read the
prefix bidirectionally; the concept path (boundaries, backbone, cross-attention) stays causal.
Boundaries are a threshold on p: paths that round differently (the cached extend vs the full forward, K = 1 vs
K > 1, and above all bf16 compute) can decide differently for a p within rounding of the threshold, after
which the concepts differ. Exactness is tested in fp32; for bit-exact speculative = plain greedy, decode in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import blocked_cache_attention, masked_rows_attention
from models.base import LM, StepCtx
from models.contract import (Cache, ConceptCache, KVCache, attention_flops_per_token, full_positions, round_up,
                             run_if, run_stack)
from models.decoder import DecoderConfig, attention_block
from models.layers import NEG_INF, RMSNorm, SwiGLU, dense, mlp_hidden_default, scatter_rows, scatter_rows_heads_first


@dataclass(frozen=True)
class DLCMConfig:
    arch: str = "dlcm"
    vocab_size: int = 259
    # token side (encoder, cross-attention, decoder) at width d_model
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_hidden: int = 0  # 0: 8/3 d_model rounded up to a multiple of 64
    enc_layers: int = 2
    dec_layers: int = 2
    # concept backbone at width d_concept
    d_concept: int = 256
    bb_layers: int = 2
    bb_heads: int = 4
    bb_kv_heads: int = 0
    bb_head_dim: int = 0
    bb_mlp_hidden: int = 0
    # token -> concept cross-attention (no RoPE, QK-RMSNorm)
    cross_heads: int = 4
    cross_head_dim: int = 0  # 0: d_model // cross_heads
    cross_mlp: bool = True  # a SwiGLU after the cross-attention (the paper's "intermediate size (cross)")
    # boundaries and the Global Parser
    d_scan: int = 0  # width of W_q / W_k; 0: d_model (then both start as the identity, as in H-Net)
    target_ratio: float = 4.0  # R: target tokens per concept
    aux_weight: float = 0.03  # lambda
    sharpen: float = 0.0  # s: training samples b ~ Bernoulli(p^(1/s) if p > 1/2 else 1 - (1-p)^(1/s)); 0: s =
    #                       1.5 R (`sharpen_power`: 6 at R = 4, 12 at R = 8). The parser drives the SAMPLED rate
    #                       to 1/R; draws at p < 1/2 never fire at evaluation, so the eval ratio overshoots R,
    #                       more at a larger R unless s grows with it (dlcm_tiny, R = 8: +19% at s = 6, +12% at
    #                       16, +9.9% at 12; R = 4: +6% at 6)
    eval_threshold: float = 0.5  # evaluation and decoding: b = [p >= eval_threshold]
    doc_start_id: int = 257  # this token always starts a concept (the data's document separator: the
    #                          tokenizer's EOS, written after every document by core/data.py); -1: none. A run
    #                          config that leaves it out gets its tokenizer's (core.config); 257: bytes
    # Concept slots: by position t (0-based) at most floor((t + 1) * concept_slots / R) + concept_slack
    # concepts exist (the open one included); a boundary beyond that is dropped, in training, evaluation and
    # decoding alike (the cap depends on the position only). A length-L forward runs the backbone over
    # floor(L * concept_slots / R) + concept_slack slots (at most L), so its cost scales with 1/R.
    concept_slots: float = 1.25
    concept_slack: int = 8
    # token -> concept weighting: "uniform" (each visible concept once: L x (M+1) masked attention) or
    # "replicated" (the paper's concept replication under the strict rule: each visible concept weighted by
    # the number of tokens so far that replicate it, i.e. a log-count bias)
    cross_weighting: str = "uniform"
    # decoupled muP (paper Eqs. 18-21): s_token = d_model / mup_base_width, s_concept = d_concept /
    # mup_base_width; AdamW learning rate and eps of the token (concept) matrices scaled by 1/s_token
    # (1/s_concept); the base learning rates are mup_lr_token / mup_lr_concept x train.lr; embeddings,
    # norms and the null concept keep train.lr; width-independent embedding init; logits x 1/s_token.
    mup: bool = True
    mup_base_width: int = 128
    mup_lr_token: float = 1.0
    mup_lr_concept: float = 1.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attn_block: int = 256  # caches are allocated in multiples of this; a prefill attends in blocks of it
    remat: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def cross_hd(self) -> int:
        return self.cross_head_dim or self.d_model // self.cross_heads

    @property
    def scan_dim(self) -> int:
        return self.d_scan or self.d_model

    @property
    def s_token(self) -> float:
        return self.d_model / self.mup_base_width if self.mup else 1.0

    @property
    def s_concept(self) -> float:
        return self.d_concept / self.mup_base_width if self.mup else 1.0

    @property
    def sharpen_power(self) -> float:
        """The sharpening power s of the training draws: `sharpen`, or 1.5 R when it is 0."""
        return self.sharpen or 1.5 * self.target_ratio

    @property
    def slot_rate(self) -> float:
        """Concept slots per token (the cap's slope), as float32 so that every path computes the same cap."""
        return float(np.float32(self.concept_slots / self.target_ratio))

    def concept_slots_for(self, length: int) -> int:
        """Concept slots a `length`-token sequence can need under the cap: cap(length - 1), at most length."""
        cap = int(np.floor(np.float32(length) * np.float32(self.slot_rate))) + self.concept_slack
        return max(1, min(length, cap))

    @property
    def n_layers(self) -> int:
        """All transformer blocks (encoder + backbone + decoder), for tools that report a depth."""
        return self.enc_layers + self.bb_layers + self.dec_layers

    def token_stack(self, n_layers: int) -> DecoderConfig:
        return DecoderConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=n_layers,
                             n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                             mlp_hidden=self.mlp_hidden, rope_base=self.rope_base, norm_eps=self.norm_eps,
                             dtype=self.dtype, param_dtype=self.param_dtype, attn_block=self.attn_block)

    def backbone_stack(self) -> DecoderConfig:
        return DecoderConfig(vocab_size=self.vocab_size, d_model=self.d_concept, n_layers=self.bb_layers,
                             n_heads=self.bb_heads, n_kv_heads=self.bb_kv_heads, head_dim=self.bb_head_dim,
                             mlp_hidden=self.bb_mlp_hidden, rope_base=self.rope_base, norm_eps=self.norm_eps,
                             dtype=self.dtype, param_dtype=self.param_dtype, attn_block=self.attn_block)

    def validate(self):
        positive = ("vocab_size", "d_model", "n_heads", "enc_layers", "dec_layers", "d_concept", "bb_layers",
                    "bb_heads", "cross_heads", "attn_block")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("n_kv_heads", "head_dim", "mlp_hidden", "bb_kv_heads", "bb_head_dim", "bb_mlp_hidden",
                     "cross_head_dim", "d_scan"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: default); got {getattr(self, name)}")
        if not self.cross_head_dim and self.d_model % self.cross_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by cross_heads ({self.cross_heads})")
        if not self.target_ratio > 1.0:
            raise ValueError(f"target_ratio must be > 1; got {self.target_ratio}")
        if self.aux_weight < 0 or self.sharpen < 0:
            raise ValueError(f"need aux_weight >= 0 and sharpen >= 0 (0: 1.5 R); got {self.aux_weight}, "
                             f"{self.sharpen}")
        if not 0.0 < self.eval_threshold <= 1.0:
            raise ValueError(f"eval_threshold must be in (0, 1]; got {self.eval_threshold}")
        if not self.concept_slots > 0 or self.concept_slack < 1:
            raise ValueError(f"need concept_slots > 0 and concept_slack >= 1; got {self.concept_slots}, "
                             f"{self.concept_slack}")
        if self.cross_weighting not in ("uniform", "replicated"):
            raise ValueError(f"cross_weighting must be 'uniform' or 'replicated'; got {self.cross_weighting!r}")
        if self.mup_base_width < 1 or not (self.mup_lr_token > 0 and self.mup_lr_concept > 0):
            raise ValueError(f"need mup_base_width >= 1 and mup_lr_token, mup_lr_concept > 0; got "
                             f"{self.mup_base_width}, {self.mup_lr_token}, {self.mup_lr_concept}")
        if self.doc_start_id >= self.vocab_size:
            raise ValueError(f"doc_start_id {self.doc_start_id} is not a token id (vocab_size {self.vocab_size})")
        for name, sub in (("token", self.token_stack(1)), ("backbone", self.backbone_stack())):
            try:
                sub.validate()
            except ValueError as e:
                raise ValueError(f"{name} stack: {e}") from None


# ---- pieces -----------------------------------------------------------------------------------------------
def parser_loss(f, g, ratio: float):
    """Global Parser loss: 0 at F = G = 1/R; dL/dG = R/(R-1) (R F - 1)."""
    r = ratio
    return r / (r - 1.0) * ((r - 1.0) * f * g + (1.0 - f) * (1.0 - g)) - 1.0


def sharpen(p, s: float):
    """ConceptMoE's sharpen_prob_power: pushes p away from 1/2 (s = 1 is the identity)."""
    p = jnp.clip(p, 0.0, 1.0)
    return jnp.where(p > 0.5, p ** (1.0 / s), 1.0 - (1.0 - p) ** (1.0 / s))


def boundary_prob(q_prev, k_cur):
    """p = 1/2 (1 - cos(q_prev, k_cur)) in fp32; a zero vector counts as orthogonal (p = 1/2)."""
    q = q_prev.astype(jnp.float32)
    k = k_cur.astype(jnp.float32)
    qn = q * jax.lax.rsqrt(jnp.maximum(jnp.sum(q * q, -1, keepdims=True), 1e-12))
    kn = k * jax.lax.rsqrt(jnp.maximum(jnp.sum(k * k, -1, keepdims=True), 1e-12))
    return 0.5 * (1.0 - jnp.sum(qn * kn, -1))


def concept_cap(pos, rate: float, slack: int):
    """Most concepts (the open one included) that may exist by position `pos`: floor((pos+1) rate) + slack."""
    return jnp.floor((pos + 1).astype(jnp.float32) * jnp.float32(rate)).astype(jnp.int32) + slack


def capped_boundaries(raw_BxK, pos_BxK, n0_B, rate: float, slack: int):
    """Boundaries under the slot cap, and the concept count after each token.

    With n the concept count (open concept included; n0 before the first of the K tokens), a raw boundary
    at t counts iff n_{t-1} < cap(t): n_t = min(n_{t-1} + b_t, cap(t)) (cap is nondecreasing and n never
    exceeds it), which unrolls to n_t = A_t + min(n0, min_{s<=t} (cap(s) - A_s)) with A the running count of
    raw boundaries: a cumsum and a cummin, the same in the full forward and in every extend.
    """
    a = jnp.cumsum(raw_BxK.astype(jnp.int32), axis=1)
    cap = concept_cap(pos_BxK, rate, slack)
    n = a + jnp.minimum(n0_B[:, None], jax.lax.cummin(cap - a, axis=1))
    prev = jnp.concatenate([n0_B[:, None], n[:, :-1]], axis=1)
    return n > prev, n


def biased_attention(q_BxLxHxD, k_BxHxSxD, v_BxHxSxD, bias_BxLxS):
    """Attention of L queries over S heads-first keys with an additive fp32 bias (NEG_INF: invisible)."""
    d = q_BxLxHxD.shape[-1]
    s = jnp.einsum("blhd,bhsd->bhls", q_BxLxHxD, k_BxHxSxD, preferred_element_type=jnp.float32) / math.sqrt(d)
    p = jax.nn.softmax(s + bias_BxLxS[:, None], axis=-1).astype(v_BxHxSxD.dtype)
    o = jnp.einsum("bhls,bhsd->blhd", p, v_BxHxSxD, preferred_element_type=jnp.float32)
    return o.astype(q_BxLxHxD.dtype)


def replication_bias(n_keys: int, seg_BxL, own_BxL, counts_BxS):
    """Log-multiplicity of each key kk (0 = null, k + 1 = concept k) for a token whose own concept is seg:
    concept replication gathers key seg_s at every position s, so key kk < seg is replicated by all
    counts[kk] tokens of concept kk, key seg by the `own` tokens of t's concept up to t; later keys are
    invisible."""
    kk = jnp.arange(n_keys, dtype=jnp.int32)[None, None, :]
    seg = seg_BxL[:, :, None]
    closed = jnp.log(jnp.maximum(counts_BxS[:, None, :n_keys], 1).astype(jnp.float32))
    own = jnp.log(jnp.maximum(own_BxL, 1).astype(jnp.float32))[:, :, None]
    return jnp.where(kk < seg, closed, jnp.where(kk == seg, own, NEG_INF))


def _identity_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(*shape, dtype=dtype)


def _segmented_cumsum(start_BxK, x_BxKxD, n_BxK):
    """Running (sum, count) within segments along axis 1; a segment starts where start is True."""
    def op(a, b):
        fa, sa, na = a
        fb, sb, nb = b
        return fa | fb, jnp.where(fb[..., None], sb, sa + sb), jnp.where(fb, nb, na + nb)
    _, s, n = jax.lax.associative_scan(op, (start_BxK, x_BxKxD, n_BxK), axis=1)
    return s, n


class ConceptCrossAttention(nnx.Module):
    """Tokens (queries) over concepts (keys/values), QK-RMSNorm per head, no RoPE."""

    def __init__(self, d_model: int, d_concept: int, n_heads: int, head_dim: int, *, norm_eps: float,
                 rngs: nnx.Rngs, dtype, param_dtype, out_scale: float):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q = dense(d_model, n_heads * head_dim, ("embed", "heads"), **kw)
        self.k = dense(d_concept, n_heads * head_dim, ("embed", "heads"), **kw)
        self.v = dense(d_concept, n_heads * head_dim, ("embed", "heads"), **kw)
        self.o = dense(n_heads * head_dim, d_model, ("heads", "embed"), scale=out_scale, **kw)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)

    def query(self, h_BxLxD):
        b, l, _ = h_BxLxD.shape
        return self.q_norm(self.q(h_BxLxD).reshape(b, l, self.n_heads, self.head_dim))

    def kv(self, z_BxMxC):
        b, m, _ = z_BxMxC.shape
        k = self.k_norm(self.k(z_BxMxC).reshape(b, m, self.n_heads, self.head_dim))
        return k, self.v(z_BxMxC).reshape(b, m, self.n_heads, self.head_dim)

    def out(self, o_BxLxHxD):
        b, l = o_BxLxHxD.shape[:2]
        return self.o(o_BxLxHxD.reshape(b, l, self.n_heads * self.head_dim))


class ConceptPending(NamedTuple):
    """The concept state after each of the K extended tokens (what `commit(n)` picks from)."""

    J: jax.Array  # [B, K]
    seg_sum: jax.Array  # [B, K, d] fp32
    seg_cnt: jax.Array  # [B, K]
    prev_q: jax.Array  # [B, K, d_scan]


# ---- the model ----------------------------------------------------------------------------------------------
class DLCMLM(LM):
    config_class = DLCMConfig
    supports_prefix = True  # the token stacks read a prefix; the concept path stays causal

    def __init__(self, cfg: DLCMConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        dt, pdt = self._init_embed(cfg, rngs)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt)
        d, c = cfg.d_model, cfg.d_concept
        if cfg.mup and cfg.tie_embeddings:  # muP: an embedding's init does not shrink with width
            emb = self.embed.embedding
            emb[...] = emb[...] * jnp.asarray(math.sqrt(cfg.s_token), emb.dtype)
        enc_cfg, dec_cfg = cfg.token_stack(cfg.enc_layers), cfg.token_stack(cfg.dec_layers)
        self.enc_blocks = nnx.List([attention_block(enc_cfg, rngs=rngs) for _ in range(cfg.enc_layers)])
        self.enc_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pdt)
        if cfg.scan_dim == d:
            init = nnx.with_partitioning(_identity_init, ("embed", None))
            self.w_q = nnx.Linear(d, d, use_bias=False, kernel_init=init, **kw)
            self.w_k = nnx.Linear(d, d, use_bias=False, kernel_init=init, **kw)
        else:
            self.w_q = dense(d, cfg.scan_dim, ("embed", None), **kw)
            self.w_k = dense(d, cfg.scan_dim, ("embed", None), **kw)
        self.w_up = dense(d, c, ("embed", None), **kw)
        self.bb_blocks = nnx.List([attention_block(cfg.backbone_stack(), rngs=rngs) for _ in range(cfg.bb_layers)])
        self.bb_norm = RMSNorm(c, eps=cfg.norm_eps, param_dtype=pdt)
        self.null_concept = nnx.Param(jax.random.normal(rngs.params(), (c,), pdt), out_sharding=("embed",))
        out_scale = 1.0 / math.sqrt(2 * (cfg.dec_layers + 1))
        self.cross = ConceptCrossAttention(d, c, cfg.cross_heads, cfg.cross_hd, norm_eps=cfg.norm_eps,
                                           out_scale=out_scale, **kw)
        if cfg.cross_mlp:
            self.cross_mlp_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pdt)
            self.cross_ffn = SwiGLU(d, cfg.mlp_hidden or mlp_hidden_default(d), out_scale=out_scale, **kw)
        self.dec_blocks = nnx.List([attention_block(dec_cfg, rngs=rngs) for _ in range(cfg.dec_layers)])
        self._init_head(cfg, d, rngs, pdt)

    # ---- shared pieces ---------------------------------------------------------------------------------
    def _stack(self, blocks, x, pos, prefix_len_B=None):
        return run_stack(blocks, x, lambda blk, y: blk(y, pos, prefix_len_B), remat=self.cfg.remat)

    def _concepts_in(self, sum_f32, cnt):
        """Concept vectors c = W_up mean(h) from an fp32 sum and a count (an empty segment gives 0)."""
        mean = sum_f32 / jnp.maximum(cnt, 1).astype(jnp.float32)[..., None]
        return self.w_up(mean.astype(self.dtype))

    def _out(self, y):
        """Logits, times 1/s_token under muP (Eq. 21)."""
        logits = self._logits(y)
        return logits * (1.0 / self.cfg.s_token) if self.cfg.mup and self.cfg.s_token != 1.0 else logits

    def _raw_boundaries(self, tokens, p, pos, rng=None):
        """Boundary decisions before the slot cap: sampled (training) or p >= eval_threshold, forced at
        position 0 and at every document start (the document separator token)."""
        if rng is None:
            bnd = p >= self.cfg.eval_threshold
        else:
            bnd = jax.random.bernoulli(rng, jax.lax.stop_gradient(sharpen(p, self.cfg.sharpen_power)))
        return bnd | self._forced(tokens, pos)

    def _forced(self, tokens, pos):
        forced = pos == 0
        if self.cfg.doc_start_id >= 0:
            forced = forced | (tokens == self.cfg.doc_start_id)
        return forced

    def _null_kv(self, b):
        z0 = jnp.broadcast_to(self.null_concept[...].astype(self.dtype), (b, 1, self.cfg.d_concept))
        return self.cross.kv(z0)

    def _fuse(self, h, o):
        """Residual cross-attention output onto h, then the optional SwiGLU."""
        u = h + self.cross.out(o)
        if self.cfg.cross_mlp:
            u = u + self.cross_ffn(self.cross_mlp_norm(u))
        return u

    # ---- training / evaluation forward -------------------------------------------------------------------
    def _encode(self, tokens_BxL, prefix_len_B=None, rng=None, raw_BxL=None):
        """Encoder states h, boundary probabilities p (fp32, 1 where a boundary is forced), the boundaries b
        under the slot cap, and the raw decisions before the cap. `raw_BxL` replaces the decisions (tests,
        analysis): the forced boundaries and the cap still apply."""
        pos = full_positions(*tokens_BxL.shape)
        h = self.enc_norm(self._stack(self.enc_blocks, self._embed(tokens_BxL), pos, prefix_len_B))
        q, k = self.w_q(h), self.w_k(h)
        q_prev = jnp.concatenate([jnp.zeros_like(q[:, :1]), q[:, :-1]], axis=1)
        forced = self._forced(tokens_BxL, pos)
        p = jnp.where(forced, 1.0, boundary_prob(q_prev, k))
        if raw_BxL is None:
            raw = self._raw_boundaries(tokens_BxL, p, pos, rng)
        else:
            raw = jnp.asarray(raw_BxL, bool) | forced
        raw = jax.lax.stop_gradient(raw)
        zero = jnp.zeros((tokens_BxL.shape[0],), jnp.int32)
        bnd, _ = capped_boundaries(raw, pos, zero, self.cfg.slot_rate, self.cfg.concept_slack)
        return h, p, bnd, raw, pos

    def boundaries(self, tokens_BxL, prefix_len_B=None, *, rng=None):
        """(p, b): boundary probabilities and decisions (b_t = 1: token t starts a concept), for analysis."""
        _, p, bnd, _, _ = self._encode(tokens_BxL, prefix_len_B, rng)
        return p, bnd

    def __call__(self, tokens_BxL, prefix_len_B=None, *, rng=None, raw_boundaries=None):
        """Logits (fp32) and aux. With `rng` (training), boundaries are sampled; without, p >= threshold.
        `raw_boundaries` [B, L] (tests, analysis) fixes the decisions before the forced ones and the cap.

        Prefix-LM: the token stacks see the prefix bidirectionally; the concept path stays causal, which
        keeps every target's prediction free of later targets.
        """
        cfg = self.cfg
        b, l = tokens_BxL.shape
        h, p, bnd, raw, pos = self._encode(tokens_BxL, prefix_len_B, rng, raw_boundaries)
        seg = jnp.cumsum(bnd.astype(jnp.int32), axis=1) - 1  # t's own concept; 0 .. seg-1 are closed

        # concepts: segment means (fp32 sums) in the slots the cap allows (never fewer than needed)
        m = cfg.concept_slots_for(l)
        pool = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, m, indices_are_sorted=True))
        sums = pool(h.astype(jnp.float32), seg)
        cnts = pool(jnp.ones((b, l), jnp.int32), seg)
        z = self.bb_norm(self._stack(self.bb_blocks, self._concepts_in(sums, cnts), full_positions(b, m)))

        # strict cross-attention: key kk (0 = null, k + 1 = concept k) visible iff kk <= seg_t
        kz, vz = self.cross.kv(z)
        k0, v0 = self._null_kv(b)
        keys, vals = jnp.concatenate([k0, kz], axis=1), jnp.concatenate([v0, vz], axis=1)
        q = self.cross.query(h)
        if cfg.cross_weighting == "replicated":
            start = jax.lax.cummax(jnp.where(bnd, pos, 0), axis=1)  # t's concept starts here
            counts = jnp.concatenate([cnts, jnp.zeros((b, 1), jnp.int32)], axis=1)  # key kk <- concept kk
            bias = replication_bias(m + 1, seg, pos - start + 1, counts)
            o = biased_attention(q, keys.transpose(0, 2, 1, 3), vals.transpose(0, 2, 1, 3), bias)
        else:
            vis = jnp.arange(m + 1, dtype=jnp.int32)[None, None, :] <= seg[:, :, None]
            o = masked_rows_attention(q, keys, vals, vis)  # the null concept: every row sees a key
        y = self._stack(self.dec_blocks, self._fuse(h, o), pos, prefix_len_B)

        # Global Parser over the whole (global) batch: F of the realised boundaries (no gradient), G = mean p
        f = jnp.mean(bnd.astype(jnp.float32))
        g = jnp.mean(p)
        l_aux = parser_loss(f, g, cfg.target_ratio)
        aux = {"loss_parser": cfg.aux_weight * l_aux, "parser_aux": l_aux, "boundary_rate": f,
               "boundary_prob": g, "tokens_per_concept": 1.0 / f,
               "concept_capped": jnp.sum(raw & ~bnd) / jnp.maximum(jnp.sum(raw), 1)}
        return self._out(y), aux

    def _param_count(self, *mods) -> int:
        return sum(x.size for m in mods for x in jax.tree.leaves(nnx.state(m, nnx.Param)) if x.ndim >= 2)

    def _split_params(self):
        """(per-token matrix parameters incl. the head, per-concept matrix parameters)."""
        cfg = self.cfg
        per_token = self._param_count(self.enc_blocks, self.dec_blocks, self.w_q, self.w_k, self.cross.q,
                                      self.cross.o)
        per_token += self._param_count(self.cross_ffn) if cfg.cross_mlp else 0
        per_token += cfg.vocab_size * cfg.d_model  # the head (tied or not)
        per_concept = self._param_count(self.bb_blocks, self.w_up, self.cross.k, self.cross.v)
        return per_token, per_concept

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per token of the training step as executed (6 N_matmul + 12 L d_attn per attention,
        causal attention counted in full as in bench_train): the backbone runs over the static concept slots
        of a seq_len window (`concept_slots_for`, about concept_slots / R per token)."""
        cfg = self.cfg
        per_token, per_slot = self._split_params()
        m = cfg.concept_slots_for(seq_len)
        bb = cfg.backbone_stack()
        attn = attention_flops_per_token(cfg.enc_layers + cfg.dec_layers, seq_len, cfg.n_heads, cfg.hd)
        attn += attention_flops_per_token(cfg.bb_layers, m, bb.n_heads, bb.hd) * m / seq_len
        attn += attention_flops_per_token(1, m + 1, cfg.cross_heads, cfg.cross_hd)
        return 6.0 * (per_token + per_slot * m / seq_len) + attn

    def inference_flops_per_token(self, context: int, tokens_per_concept: float) -> float:
        """Forward FLOPs per generated token at a context of `context` tokens, with a concept closing every
        `tokens_per_concept` tokens (2 N_matmul, and 4 T d_attn per attention over its keys, in full): the
        token side runs every token, the backbone, W_up and the cross K/V once per concept."""
        cfg = self.cfg
        per_token, per_concept = self._split_params()
        n_con = context / tokens_per_concept
        bb = cfg.backbone_stack()
        attn = attention_flops_per_token(cfg.enc_layers + cfg.dec_layers, context, cfg.n_heads, cfg.hd)
        attn += attention_flops_per_token(cfg.bb_layers, n_con, bb.n_heads, bb.hd) / tokens_per_concept
        attn += attention_flops_per_token(1, n_con + 1, cfg.cross_heads, cfg.cross_hd)
        return 2.0 * (per_token + per_concept / tokens_per_concept) + attn / 3.0

    def optimizer_groups(self, params):
        """Decoupled muP (the hook train/loop.py's make_optimizer calls): (labels like `params`, {label:
        (lr multiplier, eps multiplier)}). Matrices of the token side (encoder, decoder, boundary projections,
        cross-attention Q/O and its MLP) are "token"; of the concept side (backbone, W_up, cross-attention
        K/V) "concept"; embeddings, the head, norms and the null concept "other" (train.lr). None without
        muP (one AdamW for everything)."""
        cfg = self.cfg
        if not cfg.mup:
            return None
        concept_keys = {"bb_blocks", "w_up"}

        def label(path, x):
            keys = [str(k.key) for k in path if hasattr(k, "key")]
            if x.ndim < 2 or keys[0] in ("embed", "head", "null_concept"):
                return "other"
            if keys[0] in concept_keys or (keys[0] == "cross" and keys[1] in ("k", "v")):
                return "concept"
            return "token"

        labels = jax.tree_util.tree_map_with_path(label, params)
        mults = {"token": (cfg.mup_lr_token / cfg.s_token, 1.0 / cfg.s_token),
                 "concept": (cfg.mup_lr_concept / cfg.s_concept, 1.0 / cfg.s_concept),
                 "other": (1.0, 1.0)}
        return labels, mults

    # ---- decoding contract --------------------------------------------------------------------------------
    def cache_capacity(self, max_len: int) -> int:
        """Token slots allocated for a requested max_len (rounded up to the attention block); the concept
        caches hold one more (the null concept) so that one concept per token always fits."""
        return round_up(max_len, self.cfg.attn_block)

    def _concept_capacity(self, max_len: int) -> int:
        """Cross slots: the null concept and every concept the cap allows over the token cache's positions."""
        return round_up(self.cfg.concept_slots_for(self.cache_capacity(max_len)) + 1, self.cfg.attn_block)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        cfg = self.cfg
        s, sc = self.cache_capacity(max_len), self._concept_capacity(max_len)
        x_shape = (batch, cfg.cross_heads, sc, cfg.cross_hd)  # heads first, as GlobalAttention's KVCache
        # Each leaf is its own buffer: one shared zeros array cannot be donated twice.
        concept = ConceptCache(
            J=jnp.zeros((batch,), jnp.int32), seg_sum=jnp.zeros((batch, cfg.d_model), jnp.float32),
            seg_cnt=jnp.zeros((batch,), jnp.int32), prev_q=jnp.zeros((batch, cfg.scan_dim), self.dtype),
            backbone=tuple(blk.init_cache(batch, sc) for blk in self.bb_blocks),
            cross=KVCache(jnp.zeros(x_shape, self.dtype), jnp.zeros(x_shape, self.dtype)),
            counts=jnp.zeros((batch, sc), jnp.int32) if cfg.cross_weighting == "replicated" else None)
        enc = tuple(blk.init_cache(batch, s) for blk in self.enc_blocks)
        dec = tuple(blk.init_cache(batch, s) for blk in self.dec_blocks)
        return Cache(jnp.zeros((batch,), jnp.int32), (*enc, concept, *dec))

    def _split(self, layers):
        ne = self.cfg.enc_layers
        return layers[:ne], layers[ne], layers[ne + 1:]

    def extend(self, tokens_BxK, cache: Cache, prefix_len_B=None):
        cfg = self.cfg
        b, k = tokens_BxK.shape
        enc_c, cc, dec_c = self._split(cache.layers)
        j0 = cc.J
        rows = jnp.arange(b)[:, None]
        ar = jnp.arange(k, dtype=jnp.int32)[None, :]
        tok = StepCtx.at(cache.lengths, k, prefix_len_B)  # the token stacks (prefix LM at prefill)
        pos = tok.pos
        n_con = jnp.max(j0) + k + 1  # concept slots, the null concept included

        # encoder
        x = self._embed(tokens_BxK)
        enc = []
        for blk_m, c in zip(self.enc_blocks, enc_c):
            x, c, _ = blk_m.extend(x, c, tok)
            enc.append(c)
        h = self.enc_norm(x)

        # boundaries: token i closes the open concept iff it starts a new one at a position > 0 (the same
        # forced boundaries and slot cap as the full forward; n0 counts the open concept of a non-empty row)
        q = self.w_q(h)
        q_prev = jnp.concatenate([cc.prev_q[:, None].astype(q.dtype), q[:, :-1]], axis=1)
        raw = self._raw_boundaries(tokens_BxK, boundary_prob(q_prev, self.w_k(h)), pos)
        n0 = j0 + (cache.lengths > 0).astype(jnp.int32)
        bnd, _ = capped_boundaries(raw, pos, n0, cfg.slot_rate, cfg.concept_slack)
        close = bnd & (pos > 0)
        c_idx = jnp.cumsum(close.astype(jnp.int32), axis=1)  # closes so far in the block
        j_after = j0[:, None] + c_idx  # closed concepts visible to token i

        # running state of the open concept after each token, and the concepts closed in the block
        run_sum, run_cnt = _segmented_cumsum(close, h.astype(jnp.float32), jnp.ones((b, k), jnp.int32))
        in_open = (c_idx == 0)
        run_sum = run_sum + jnp.where(in_open[..., None], cc.seg_sum[:, None], 0.0)
        run_cnt = run_cnt + jnp.where(in_open, cc.seg_cnt[:, None], 0)

        # The concept path (backbone over the K packed slots at concept positions J0 .. J0+K-1, their cross
        # K/V, the null concept's K/V in slot 0, the replicated counts) runs only when some row closes a
        # concept in this block, or starts empty (the null slot is written at a row's first extend, and slot
        # 0 is never written otherwise). Skipping it changes nothing visible: everything it writes at or past
        # the new J is garbage (inert), and it writes no slot below J. `run_if` (contract.py), not lax.cond, so
        # the caches are updated in place.
        con = StepCtx(j0, j0[:, None] + ar, n_con)

        def concept_path(carry):
            bb_c, ck, cv, counts = carry
            # the concepts closed in the block, packed: slot r holds the one closed by the r-th close
            prev_sum = jnp.concatenate([cc.seg_sum[:, None], run_sum[:, :-1]], axis=1)
            prev_cnt = jnp.concatenate([cc.seg_cnt[:, None], run_cnt[:, :-1]], axis=1)
            dest = jnp.where(close, c_idx - 1, k)
            packed_sum = jnp.zeros_like(prev_sum).at[rows, dest].set(prev_sum, mode="drop")
            packed_cnt = jnp.zeros_like(prev_cnt).at[rows, dest].set(prev_cnt, mode="drop")
            zc = self._concepts_in(packed_sum, packed_cnt)
            bb = []
            for blk_m, c in zip(self.bb_blocks, bb_c):  # causal whatever the prefix
                zc, c, _ = blk_m.extend(zc, c, con)
                bb.append(c)
            kz, vz = self.cross.kv(self.bb_norm(zc))
            k0, v0 = self._null_kv(b)
            slots = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), con.pos + 1], axis=1)
            ck = scatter_rows_heads_first(ck, jnp.concatenate([k0, kz], axis=1), slots)
            cv = scatter_rows_heads_first(cv, jnp.concatenate([v0, vz], axis=1), slots)
            if counts is not None:
                # concept r closed in the block was replicated by its own tokens' successors: slot J0 + r
                # holds the length of concept J0 + r (packed_cnt); slots past the new J are garbage, hence inert
                counts = scatter_rows(counts, packed_cnt, j0[:, None] + ar)
            return tuple(bb), ck, cv, counts

        bb, ck, cv, counts = run_if(jnp.any(close) | jnp.any(cache.lengths == 0), concept_path,
                                    (tuple(cc.backbone), cc.cross.k, cc.cross.v, cc.counts))

        # strict cross-attention: token i sees slots 0 .. J_i (null + closed concepts)
        if cfg.cross_weighting == "replicated":
            bias = replication_bias(counts.shape[1], j_after, run_cnt, counts)
            o = biased_attention(self.cross.query(h), ck, cv, bias)
        else:
            o = blocked_cache_attention(self.cross.query(h), ck, cv, j_after, block=cfg.attn_block,
                                        n_valid=n_con)
        x = self._fuse(h, o)
        dec = []
        for blk_m, c in zip(self.dec_blocks, dec_c):
            x, c, _ = blk_m.extend(x, c, tok)
            dec.append(c)

        concept = cc._replace(backbone=tuple(bb), cross=KVCache(ck, cv), counts=counts)
        pending = ConceptPending(J=j_after, seg_sum=run_sum, seg_cnt=run_cnt, prev_q=q)
        return self._out(x), Cache(cache.lengths, (*enc, concept, *dec), pending)

    def commit(self, cache: Cache, n_B) -> Cache:
        if cache.pending is None:
            raise ValueError("commit needs the cache returned by extend (it holds the pending state)")
        pend = cache.pending
        n = jnp.asarray(n_B, jnp.int32)
        k = pend.J.shape[1]
        idx = jnp.clip(n - 1, 0, k - 1)
        rows = jnp.arange(n.shape[0])
        has = n > 0

        def pick(new_BxK, old_B):
            sel = new_BxK[rows, idx]
            keep = has.reshape((-1,) + (1,) * (sel.ndim - 1))
            return jnp.where(keep, sel, old_B).astype(old_B.dtype)

        enc, cc, dec = self._split(cache.layers)
        concept = cc._replace(J=pick(pend.J, cc.J), seg_sum=pick(pend.seg_sum, cc.seg_sum),
                              seg_cnt=pick(pend.seg_cnt, cc.seg_cnt), prev_q=pick(pend.prev_q, cc.prev_q))
        return Cache(cache.lengths + n, (*enc, concept, *dec))
