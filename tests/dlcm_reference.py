"""A plain, slow DLCM forward written from the paper's equations (../shared/research/dlcm.md, sections 2.3-2.9),
independent of models/dlcm.py: numpy in float64, one sequence, one position, one concept at a time.

It reads only the parameters (a pure dict of the Flax model) and the config; no code of the model is used.
What it pins:
- the encoder: causal pre-norm blocks (RMSNorm, RoPE half-split attention with grouped K/V, SwiGLU);
- boundaries (Eqs. 5-6): p_t = 1/2 (1 - cos(W_q h_{t-1}, W_k h_t)); b = 1 at position 0 and at every
  document start (the separator token); otherwise the given raw decisions or p >= threshold; then the slot
  cap, applied token by token: a boundary counts only while the number of concepts is below
  floor((t + 1) * slots / R) + slack;
- concepts (Eq. 7): the MEAN of the h of each concept's tokens, times W_up; the backbone runs over the
  concepts with RoPE on the concept index;
- the strict causal rule: token t sees the null concept and the concepts closed before t (k < j(t)), never
  its own open concept; "uniform" weighs each visible concept once, "replicated" is the paper's concept
  replication done literally: position s carries the key of the latest concept closed before s (the null
  concept in the first one) and token t attends over positions s <= t (an L x L causal attention);
- cross-attention (Eqs. 12-16): Q = RMSNorm(W_Q h), K = RMSNorm(W_K z), V = W_V z per head, output W_O plus
  the residual h, then the optional SwiGLU; the decoder; the head, times 1/s_token under muP (Eq. 21);
- the Global Parser (Eqs. 8-10): F and G are means over ALL tokens of the whole batch, not per sequence.
"""

from __future__ import annotations

import math

import numpy as np


def _np(tree):
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x_HxD, pos, base):
    """Half-split (NeoX) rotary embedding of one position."""
    half = x_HxD.shape[-1] // 2
    ang = pos * base ** (-np.arange(half) / half)
    x1, x2 = x_HxD[..., :half], x_HxD[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def swiglu(p, x):
    gu = np.einsum("d,dkh->kh", x, p["gate_up"]["kernel"])
    return (gu[0] / (1.0 + np.exp(-gu[0])) * gu[1]) @ p["down"]["kernel"]


def block_stack(blocks, xs, eps, rope_base):
    """Causal pre-norm blocks over a list of vectors (position = list index), one position at a time."""
    xs = [np.array(x) for x in xs]
    for i in sorted(blocks, key=int):
        p = blocks[i]
        w = p["mixer"]["qkv_proj"]["kernel"]  # [d, G, R + 2, hd]
        g, r, hd = w.shape[1], w.shape[2] - 2, w.shape[3]
        qs, ks, vs = [], [], []
        for t, x in enumerate(xs):
            y = np.einsum("d,dgjk->gjk", rms_norm(x, p["mixer_norm"]["scale"], eps), w)
            qs.append(rope(y[:, :r].reshape(g * r, hd), t, rope_base))  # head h = group * R + r
            ks.append(rope(y[:, r], t, rope_base))
            vs.append(y[:, r + 1])
        out = []
        for t, x in enumerate(xs):
            heads = []
            for h in range(g * r):
                kv = h // r
                s = np.array([qs[t][h] @ ks[u][kv] for u in range(t + 1)]) / math.sqrt(hd)
                a = softmax(s)
                heads.append(sum(a[u] * vs[u][kv] for u in range(t + 1)))
            x = x + np.concatenate(heads) @ p["mixer"]["o"]["kernel"]
            out.append(x + swiglu(p["mlp"], rms_norm(x, p["mlp_norm"]["scale"], eps)))
        xs = out
    return xs


def concept_cap(t, cfg):
    """Most concepts by position t (float32 arithmetic, as the config defines the slot rate)."""
    return int(np.floor(np.float32(t + 1) * np.float32(cfg.concept_slots / cfg.target_ratio))) + cfg.concept_slack


def reference_forward(params, cfg, tokens_BxL, raw_BxL=None):
    """Logits [B, L, V], realised boundaries b [B, L] and the parser statistics {F, G, L_aux, loss_parser}
    (and p [B, L]).

    raw_BxL: boundary decisions before the forced ones and the cap (None: p >= cfg.eval_threshold).
    """
    prm = _np(params)
    eps = cfg.norm_eps
    tokens_BxL = np.asarray(tokens_BxL)
    n_rows, length = tokens_BxL.shape
    emb = prm["embed"]["embedding"]
    all_logits, all_b, all_p = [], [], []
    for row in range(n_rows):
        toks = tokens_BxL[row]
        # encoder
        h = block_stack(prm["enc_blocks"], [emb[t] for t in toks], eps, cfg.rope_base)
        h = [rms_norm(x, prm["enc_norm"]["scale"], eps) for x in h]
        # boundaries, then the slot cap, token by token
        p, b, n = [], [], 0
        for t in range(length):
            forced = t == 0 or (cfg.doc_start_id >= 0 and toks[t] == cfg.doc_start_id)
            if forced:
                pt = 1.0
            else:
                q = h[t - 1] @ prm["w_q"]["kernel"]
                k = h[t] @ prm["w_k"]["kernel"]
                pt = 0.5 * (1.0 - q @ k / (np.linalg.norm(q) * np.linalg.norm(k)))
            raw = (pt >= cfg.eval_threshold) if raw_BxL is None else bool(raw_BxL[row][t])
            bt = (forced or raw) and n < concept_cap(t, cfg)
            n += int(bt)
            p.append(pt)
            b.append(bt)
        # concepts: mean of each concept's h, up-projected; the backbone over concept indices
        starts = [t for t in range(length) if b[t]]
        ends = starts[1:] + [length]
        concepts = [np.mean(h[s:e], axis=0) @ prm["w_up"]["kernel"] for s, e in zip(starts, ends)]
        z = block_stack(prm["bb_blocks"], concepts, eps, cfg.rope_base)
        z = [rms_norm(x, prm["bb_norm"]["scale"], eps) for x in z]
        # cross-attention keys: [null, z_0, z_1, ...]
        cr = prm["cross"]
        nh, hd = cfg.cross_heads, cfg.cross_hd
        zs = [prm["null_concept"]] + z
        keys = [rms_norm((x @ cr["k"]["kernel"]).reshape(nh, hd), cr["k_norm"]["scale"], eps) for x in zs]
        vals = [(x @ cr["v"]["kernel"]).reshape(nh, hd) for x in zs]
        own = np.cumsum(b) - 1  # the concept token t belongs to; concepts 0 .. own-1 are closed before t
        u = []
        for t in range(length):
            q = rms_norm((h[t] @ cr["q"]["kernel"]).reshape(nh, hd), cr["q_norm"]["scale"], eps)
            if cfg.cross_weighting == "replicated":
                # position s carries the key of the latest concept closed before s: key index own[s]
                visible = [own[s] for s in range(t + 1)]
            else:
                visible = list(range(own[t] + 1))  # null + the closed concepts, once each
            heads = []
            for hh in range(nh):
                s = np.array([q[hh] @ keys[kk][hh] for kk in visible]) / math.sqrt(hd)
                a = softmax(s)
                heads.append(sum(a[i] * vals[kk][hh] for i, kk in enumerate(visible)))
            x = h[t] + np.concatenate(heads) @ cr["o"]["kernel"]
            if cfg.cross_mlp:
                x = x + swiglu(prm["cross_ffn"], rms_norm(x, prm["cross_mlp_norm"]["scale"], eps))
            u.append(x)
        y = block_stack(prm["dec_blocks"], u, eps, cfg.rope_base)
        head = emb.T if cfg.tie_embeddings else prm["head"]["kernel"]
        logits = np.stack([rms_norm(x, prm["final_norm"]["scale"], eps) @ head for x in y])
        if cfg.mup:
            logits = logits * cfg.mup_base_width / cfg.d_model
        all_logits.append(logits)
        all_b.append(b)
        all_p.append(p)
    b_all, p_all = np.asarray(all_b, bool), np.asarray(all_p)
    f, g, r = b_all.mean(), p_all.mean(), cfg.target_ratio  # over the whole batch
    l_aux = r / (r - 1) * ((r - 1) * f * g + (1 - f) * (1 - g)) - 1
    stats = {"F": f, "G": g, "L_aux": l_aux, "loss_parser": cfg.aux_weight * l_aux, "p": p_all}
    return np.stack(all_logits), b_all, stats
