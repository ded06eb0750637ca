"""The attention mixers against a plain reference written from the equations: o_i = sum_j softmax_j(q_i . k_j /
sqrt(d)) v_j over the keys j that query i may see, with that set spelled out per case (causal, prefix LM,
window). Both the full forward and the cache path (prefill, single steps, multi-token extends, the blocked
prefill loop and the lax.switch decode step, a ring that wraps) must reproduce it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import GlobalAttention, SlidingWindowAttention
from models.base import StepCtx
from models.contract import key_visible

D, H, G, HD = 32, 4, 2, 8  # two query heads per KV head
B, L = 2, 40
PREFIX = [13, 2]


def plain_attention(q, k, v, visible):
    """q [L, H, hd], k/v [S, G, hd], visible(i, j) -> bool: the attention output [L, H, hd], in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    r = q.shape[1] // k.shape[1]
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        js = [j for j in range(k.shape[0]) if visible(i, j)]
        for h in range(q.shape[1]):
            s = np.array([q[i, h] @ k[j, h // r] for j in js]) / math.sqrt(q.shape[2])
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ v[js, h // r]
    return out


def reference(mixer, x, pos, visible_for_row):
    """The mixer's own projections around the plain attention (what is pinned is who sees whom)."""
    q, k, v = mixer.qkv(x, pos)
    o = np.stack([plain_attention(q[b], k[b], v[b], visible_for_row(b)) for b in range(x.shape[0])])
    return mixer.out(jnp.asarray(o, jnp.float32))


def run_cached(mixer, x, schedule, prefix_len_B):
    """Prefill (with the prefix) then extends of the sizes in `schedule`, committing every token; each extend +
    commit jitted as the engine runs it (one compile per step size; eager dispatch of the blocked loop and the
    lax.switch cost minutes)."""

    @jax.jit
    def step(x_BxKxD, cache, lengths, prefix):
        k = x_BxKxD.shape[1]
        y, cache, pending = mixer.extend(x_BxKxD, cache, StepCtx.at(lengths, k, prefix))
        return y, mixer.commit(cache, pending, jnp.full((B,), k, jnp.int32), lengths)

    cache = mixer.init_cache(B, 96)
    lengths, outs, t = jnp.zeros((B,), jnp.int32), [], 0
    for i, k in enumerate(schedule):
        y, cache = step(x[:, t:t + k], cache, lengths, prefix_len_B if i == 0 else None)
        lengths, t = lengths + k, t + k
        outs.append(y)
    assert t == x.shape[1]
    return jnp.concatenate(outs, axis=1)


def _forward(mixer):
    """The mixer's full forward, jitted (one compile per shape and prefix-or-not)."""
    return jax.jit(lambda x, pos, prefix=None: mixer(x, pos, prefix))


def _inputs(seed):
    x = jax.random.normal(jax.random.key(seed), (B, L, D))
    return x, jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


def test_global_attention_matches_plain_reference():
    mixer = GlobalAttention(D, H, G, HD, block=16, rope_base=10000.0, rngs=nnx.Rngs(0), dtype=jnp.float32,
                            param_dtype=jnp.float32)
    x, pos = _inputs(1)
    fwd = _forward(mixer)
    prefix = jnp.array(PREFIX, jnp.int32)
    causal = reference(mixer, x, pos, lambda b: lambda i, j: j <= i)
    np.testing.assert_allclose(fwd(x, pos), causal, atol=1e-5)
    # prefix LM: the prefix positions see the whole prefix, targets the prefix and earlier targets
    ref = reference(mixer, x, pos, lambda b: lambda i, j: j <= i or j < PREFIX[b])
    assert float(jnp.abs(ref - causal).max()) > 1e-3
    np.testing.assert_allclose(fwd(x, pos, prefix), ref, atol=1e-5)
    # cache: a 33-token prefill reading the prefix (33 x 2 queries per KV head: the blocked loop over 16-slot
    # blocks), then decode steps over a 96-slot cache (prefix sizes 64 and 96: lax.switch), one of 4 tokens
    np.testing.assert_allclose(run_cached(mixer, x, (33, 1, 1, 4, 1), prefix), ref, atol=1e-5)


def test_sliding_window_attention_matches_plain_reference():
    w = 8
    mixer = SlidingWindowAttention(D, H, G, HD, window=w, rope_base=10000.0, rngs=nnx.Rngs(0), dtype=jnp.float32,
                                   param_dtype=jnp.float32)
    x, pos = _inputs(2)
    fwd = _forward(mixer)
    prefix = jnp.array(PREFIX, jnp.int32)
    causal = reference(mixer, x, pos, lambda b: lambda i, j: 0 <= i - j < w)  # W keys, the query's own included
    np.testing.assert_allclose(fwd(x, pos), causal, atol=1e-5)  # L > 2W: chunks of W
    n = 37  # not a multiple of W: the last chunk is padded
    np.testing.assert_allclose(fwd(x[:, :n], pos[:, :n]), causal[:, :n], atol=1e-5)
    # prefix LM: two prefix positions also see each other within the window, in both directions
    ref = reference(mixer, x, pos,
                    lambda b: lambda i, j: 0 <= i - j < w or (i < PREFIX[b] and j < PREFIX[b] and abs(i - j) < w))
    assert float(jnp.abs(ref - causal).max()) > 1e-3
    np.testing.assert_allclose(fwd(x, pos, prefix), ref, atol=1e-5)
    # ring: a chunked 20-token prefill reading the prefix, single steps, then a chunked 17-token extend over a
    # ring that has wrapped
    np.testing.assert_allclose(run_cached(mixer, x, (20, 1, 1, 17, 1), prefix), ref, atol=1e-5)


def test_key_visible_window_and_prefix_cases():
    """The one visibility rule, spelled out: with a window each query sees W keys, its own included; a prefix
    position also sees later prefix positions within the window, and nothing past the prefix."""
    w, n = 8, 37
    pos = jnp.arange(n, dtype=jnp.int32)
    vis = key_visible(pos[:, None], pos[None, :], window=w)
    assert vis.sum(-1)[w - 1:].tolist() == [w] * (n - w + 1)
    assert vis.sum(-1)[:w].tolist() == list(range(1, w + 1))
    pre = key_visible(pos[None, :, None], pos[None, None, :], window=w,
                      prefix_len=jnp.array(PREFIX, jnp.int32)[:, None, None])
    assert bool(pre[0, 3, 10]) and not bool(pre[0, 3, 11]) and not bool(pre[1, 3, 10])
    assert bool(pre[0, 12, 5]) and not bool(pre[0, 13, 14])  # targets stay causal


def _plain_attention_jnp(q, k, v, visible):
    """The equations in jnp with a mask spelled out query by query (visible(i, j) -> bool); JAX's own autodiff
    of this gives the reference gradients: o_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j, GQA head h reading
    KV head h // R."""
    l, s = q.shape[1], k.shape[1]
    r = q.shape[2] // k.shape[2]
    mask = np.array([[visible(i, j) for j in range(s)] for i in range(l)])
    kk, vv = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    sc = jnp.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(q.shape[-1])
    e = jnp.where(mask, jnp.exp(sc - jnp.max(jnp.where(mask, sc, -jnp.inf), -1, keepdims=True)), 0.0)
    return jnp.einsum("bhij,bjhd->bihd", e / e.sum(-1, keepdims=True), vv)


def test_causal_attention_values_and_gradients_match_the_plain_equations(monkeypatch):
    """The training kernel (`causal_attention`: query chunks, each with its own written-out backward pass)
    against the plain equations, values and the gradients of q, k and v: causal and sliding window over
    3 chunks whose last one is shorter (L = 37, chunks of 13), one chunk, GQA (2 query heads per KV head),
    and the prefix-LM fallback."""
    from models import attention
    from models.attention import causal_attention

    monkeypatch.setattr(attention, "Q_CHUNKS", 3)
    monkeypatch.setattr(attention, "Q_CHUNK_MIN", 8)
    b, n, h, g, d = 2, 37, 4, 2, 8
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (b, n, h, d)) * 2
    k = jax.random.normal(ks[1], (b, n, g, d)) * 2
    v = jax.random.normal(ks[2], (b, n, g, d))
    ct = jax.random.normal(ks[3], (b, n, h, d))
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

    def vg(fn, *args):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct[:, :q.shape[1]]), (0, 1, 2)))(*args)

    def check(ours, visible, q=q, k=k, v=v):
        got = vg(ours, q, k, v)
        want = vg(lambda q, k, v: _plain_attention_jnp(q, k, v, visible), q, k, v)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, e, atol=2e-5, rtol=2e-5)

    check(lambda q, k, v: causal_attention(q, k, v, pos), lambda i, j: j <= i)
    w = 6
    check(lambda q, k, v: causal_attention(q, k, v, pos, window=w), lambda i, j: 0 <= i - j < w)
    m = 11  # one chunk: L <= Q_CHUNK_MIN
    monkeypatch.setattr(attention, "Q_CHUNK_MIN", 16)
    check(lambda q, k, v: causal_attention(q, k, v, pos[:, :m]), lambda i, j: j <= i, q[:, :m], k[:, :m], v[:, :m])
    prefix = jnp.array([5, 5], jnp.int32)  # the same prefix in both rows (the plain mask is per query, key)
    check(lambda q, k, v: causal_attention(q, k, v, pos, prefix_len_B=prefix), lambda i, j: j <= i or j < 5)


def test_mixer_full_forward_gradients_match_the_plain_equations():
    """The training path of both mixers (heads-first q/k/v out of the fused projection with RoPE, its own
    backward pass into the fused layout, the chunked kernel) against the mixer's own `qkv` (token-major,
    JAX's derivative) around the plain equations: the output and the gradients of x and of every parameter
    (q/k/v kernel and bias, out kernel), causal and windowed."""
    cases = [(GlobalAttention, dict(block=16), lambda i, j: j <= i),
             (SlidingWindowAttention, dict(window=24), lambda i, j: 0 <= i - j < 24)]  # L <= 2W: the chunked kernel
    x, pos = _inputs(4)
    ct = jax.random.normal(jax.random.key(5), (B, L, D))
    for cls, kw, visible in cases:
        mixer = cls(D, H, G, HD, rope_base=10000.0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
                    qkv_bias=True, **kw)
        gdef, params = nnx.split(mixer)
        params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(6), a.shape), params)  # bias != 0

        def ours(params, x):
            return jnp.sum(nnx.merge(gdef, params)(x, pos) * ct)

        def plain(params, x):
            m = nnx.merge(gdef, params)
            q, k, v = m.qkv(x, pos)
            return jnp.sum(m.out(_plain_attention_jnp(q, k, v, visible)) * ct)

        got = jax.jit(jax.value_and_grad(ours, (0, 1)))(params, x)
        want = jax.jit(jax.value_and_grad(plain, (0, 1)))(params, x)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-5)


def test_masked_rows_attention_equals_the_dense_masked_attention():
    """DLCM's cross-attention path: a data mask (every row sees key 0, like the null concept), GQA, S != L;
    values and q/k/v gradients equal `masked_attention`'s (autodiff) to fp32 rounding."""
    from models.attention import masked_attention, masked_rows_attention

    rng = np.random.default_rng(3)
    b, l, s, h, g, d = 2, 12, 7, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((b, l, h, d), (b, s, g, d), (b, s, g, d)))
    seg = jnp.asarray(np.sort(rng.integers(0, s, (b, l)), axis=1))  # each token's last visible key, 0 included
    mask = jnp.arange(s)[None, None, :] <= seg[:, :, None]
    w = jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.float32)

    def vg(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v, mask) * w), argnums=(0, 1, 2)))(q, k, v)

    (got, gg), (want, gw) = vg(masked_rows_attention), vg(masked_attention)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(gg, gw):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
