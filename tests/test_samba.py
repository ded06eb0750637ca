"""SAMBA: the cached decode path equals the full forward, rollback is exact, padding is inert, the chunked
scan equals the recurrence, and gradients match finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import causal_mask, masked_attention
from models.mamba import Mamba, selective_scan, selective_scan_ref
from models.samba import SambaConfig, SambaLM, sliding_window_attention, window_visible

W = 8  # window smaller than every sequence below, so the ring wraps several times
CFG = SambaConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, window=W, d_state=4,
                  scan_chunk=8)


@pytest.fixture(scope="module")
def model():
    return SambaLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    gdef, state = nnx.split(model)
    return jax.jit(lambda toks, prefix=None: nnx.merge(gdef, state)(toks, prefix)[0])


@pytest.fixture(scope="module")
def step(model):
    """Jitted extend + commit (one compile per K), as the engine runs them: inside one jit."""
    gdef, state = nnx.split(model)

    @jax.jit
    def fn(cache, tokens_BxK, n_B):
        m = nnx.merge(gdef, state)
        logits, cache = m.extend(tokens_BxK, cache)
        return logits, m.commit(cache, n_B)

    return fn


def tokens(b, l, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, CFG.vocab_size)


def full(b, n):
    return jnp.full((b,), n, jnp.int32)


def test_chunked_scan_matches_sequential_reference():
    b, l, e, n = 2, 37, 6, 4  # l is not a multiple of the chunk: padded steps must be inert
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (b, l, e))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, e)) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[2], (e, n)))
    Bm, Cm = jax.random.normal(ks[3], (b, l, n)), jax.random.normal(ks[4], (b, l, n))
    h0 = jax.random.normal(ks[5], (b, e, n))
    y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, h0)
    g_ref = jax.jit(jax.grad(lambda x, dt, h0: jnp.sum(selective_scan_ref(x, dt, A, Bm, Cm, h0)[0] ** 2), (0, 1, 2)))(x, dt, h0)
    for inner, chunk in (("seq", 8), ("assoc", 8), ("seq", 64), ("assoc", 64)):
        y, h = jax.jit(lambda *a: selective_scan(*a, chunk=chunk, inner=inner))(x, dt, A, Bm, Cm, h0)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
        if chunk == 8:  # the rematerialised multi-chunk path
            _, h_only = selective_scan(x, dt, A, Bm, None, h0, chunk=chunk, inner=inner, want_y=False)
            np.testing.assert_allclose(h_only, h_ref, rtol=1e-5, atol=1e-5)
            g = jax.jit(jax.grad(lambda x, dt, h0: jnp.sum(selective_scan(x, dt, A, Bm, Cm, h0, chunk=chunk,
                                                                          inner=inner)[0] ** 2), (0, 1, 2)))(x, dt, h0)
            for a, r in zip(g, g_ref):
                np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_sliding_window_attention_matches_dense_masks():
    b, l, h, g, d = 2, 37, 4, 2, 8  # l > 2W: chunked path with padding
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (b, l, h, d))
    k, v = jax.random.normal(ks[1], (b, l, g, d)), jax.random.normal(ks[2], (b, l, g, d))
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    # causal: the dense reference mask is the shared layers.causal_mask with the window
    mask = causal_mask(pos, None, W)
    assert bool(jnp.all(mask == window_visible(pos[:, :, None], pos[:, None, :], W)))
    assert mask[0].sum(-1)[W - 1:].tolist() == [W] * (l - W + 1)  # each query sees W keys, itself included
    swa = jax.jit(sliding_window_attention, static_argnames="window")
    np.testing.assert_allclose(swa(q, k, v, pos, window=W), jax.jit(masked_attention)(q, k, v, mask), atol=1e-5)
    # prefix-LM: prefix tokens also see later prefix tokens within the window
    prefix = jnp.array([13, 2], jnp.int32)
    pmask = window_visible(pos[:, :, None], pos[:, None, :], W, prefix[:, None, None])
    assert bool(pmask[0, 3, 10]) and not bool(pmask[0, 3, 11]) and not bool(pmask[1, 3, 10])
    np.testing.assert_allclose(swa(q, k, v, pos, window=W, prefix_len_B=prefix),
                               jax.jit(masked_attention)(q, k, v, pmask), atol=1e-5)


def test_forward_is_causal_and_prefix_bidirectional(forward):
    x = tokens(1, 30, seed=3)
    y = x.at[0, 20].set((x[0, 20] + 1) % CFG.vocab_size)
    lx, ly = forward(x), forward(y)
    np.testing.assert_array_equal(lx[0, :20], ly[0, :20])
    assert float(jnp.abs(lx[0, 20:] - ly[0, 20:]).max()) > 1e-4
    prefix = jnp.array([24], jnp.int32)
    px, py = forward(x, prefix), forward(y, prefix)
    assert float(jnp.abs(px[0, 19] - py[0, 19]).max()) > 1e-4  # token 19 sees prefix token 20
    # Each of the 2 SWA layers carries the change W-1 positions back; Mamba layers are causal.
    np.testing.assert_array_equal(px[0, :20 - 2 * (W - 1)], py[0, :20 - 2 * (W - 1)])


def test_forward_equals_prefill_then_decode(model, forward, step):
    """Mixed step sizes: a prefill longer than 2W (chunked, empty ring), single tokens, a chunked extend over a
    non-empty ring, and a short multi-token extend; the ring wraps several times."""
    l = 48
    toks = tokens(2, l, seed=4)
    ref = forward(toks)
    cache = model.init_cache(2, l)
    outs, t = [], 0
    for k in (19, 1, 1, 1, 20, 1, 3, 1, 1):
        logits, cache = step(cache, toks[:, t:t + k], full(2, k))
        outs.append(logits)
        t += k
    assert t == l and cache["lengths"].tolist() == [l, l]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=1e-4, rtol=1e-4)


def test_cache_is_constant_size_and_commit_strips_pending(model, step):
    c1, c2 = model.init_cache(3, 64), model.init_cache(3, 1 << 20)
    assert jax.tree.structure(c1) == jax.tree.structure(c2)
    assert [x.shape for x in jax.tree.leaves(c1)] == [x.shape for x in jax.tree.leaves(c2)]
    swa = c1["layers"][1]
    assert swa["k"].shape == (3, W, CFG.kv_heads, CFG.hd)  # a window-sized ring, not a full-length buffer
    assert c1["layers"][0]["ssm"].dtype == jnp.float32
    ids = [id(x) for x in jax.tree.leaves(c1)]
    assert len(set(ids)) == len(ids)  # every leaf its own buffer (donation)
    _, c = step(c1, tokens(3, 5), full(3, 2))
    assert jax.tree.structure(c) == jax.tree.structure(c1)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(c)] == [(x.shape, x.dtype) for x in jax.tree.leaves(c1)]


def test_extend_commit_equals_extend_n(model, step):
    """extend(K) + commit(n) restores exactly the state after n tokens, for every n <= K (n varies per row)."""
    k = 4
    hist, draft, after = tokens(1, 11, seed=5), tokens(1, k, seed=6), tokens(1, 3, seed=7)  # ring wrapped
    rows = k + 1
    _, base = step(model.init_cache(rows, 32), jnp.repeat(hist, rows, 0), full(rows, 11))
    n_B = jnp.arange(rows, dtype=jnp.int32)
    _, rolled = step(base, jnp.repeat(draft, rows, 0), n_B)
    after_logits, _ = step(rolled, jnp.repeat(after, rows, 0), full(rows, 3))
    row = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
    for n in range(rows):
        ref = row(base, n)
        if n:
            _, ref = step(ref, draft[:, :n], full(1, n))
        got = row(rolled, n)
        assert got["lengths"].tolist() == ref["lengths"].tolist() == [11 + n]
        for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
        ref_logits, _ = step(ref, after, full(1, 3))
        np.testing.assert_allclose(after_logits[n:n + 1], ref_logits, atol=1e-5, rtol=1e-5)


def test_padding_is_inert(model, step):
    """Right-padded prompts (bucket 32, far past the W-slot ring) committed at their lengths equal each alone."""
    lens = [3, 13, 32]
    toks = tokens(3, 32, seed=8)
    padded = jnp.where(jnp.arange(32)[None, :] < jnp.array(lens)[:, None], toks, CFG.vocab_size - 1)
    logits, cache = step(model.init_cache(3, 64), padded, jnp.array(lens, jnp.int32))
    nxt = jnp.argmax(logits[jnp.arange(3), jnp.array(lens) - 1], -1)[:, None]
    batched = []
    for _ in range(5):
        lg, cache = step(cache, nxt, full(3, 1))
        batched.append(lg)
        nxt = jnp.argmax(lg[:, -1], -1)[:, None]
    batched = jnp.concatenate(batched, axis=1)
    for i, n in enumerate(lens):
        lg, c = step(model.init_cache(1, 64), toks[i:i + 1, :n], full(1, n))
        nxt = jnp.argmax(lg[:, -1], -1)[:, None]
        for t in range(5):
            lg, c = step(c, nxt, full(1, 1))
            np.testing.assert_allclose(lg[0, -1], batched[i, t], atol=1e-5, rtol=1e-5)
            nxt = jnp.argmax(lg[:, -1], -1)[:, None]


def test_speculative_greedy_equals_plain_greedy(model, step):
    """The verify protocol at the contract level: [last, d1..dK] -> accept the longest prefix equal to the
    argmax, plus one bonus token; commit n = accepted + 1. Drafts are right, wrong or partly right per row."""
    b, prompt_len, n_new, k = 3, 10, 24, 4
    prompt = tokens(b, prompt_len, seed=9)
    logits, cache = step(model.init_cache(b, 64), prompt, full(b, prompt_len))
    first = jnp.argmax(logits[:, -1], -1)
    plain, last, c = [first], first, cache
    for _ in range(n_new):
        lg, c = step(c, last[:, None], full(b, 1))
        last = jnp.argmax(lg[:, -1], -1)
        plain.append(last)
    plain = np.asarray(jnp.stack(plain, 1))

    gdef, state = nnx.split(model)

    @jax.jit
    def verify(c, inputs_BxK1):
        m = nnx.merge(gdef, state)
        lg, c = m.extend(inputs_BxK1, c)
        g_BxK1 = jnp.argmax(lg, -1)
        n_acc = jnp.sum(jnp.cumprod(inputs_BxK1[:, 1:] == g_BxK1[:, :-1], axis=1), axis=1)
        return g_BxK1, n_acc, m.commit(c, n_acc + 1)

    rng = np.random.default_rng(0)
    v = CFG.vocab_size
    out = [[int(first[i])] for i in range(b)]
    c, steps = cache, 0
    while min(len(o) for o in out) <= n_new:
        inputs = np.zeros((b, k + 1), np.int32)
        for i in range(b):
            d = plain[i, len(out[i]):len(out[i]) + k]
            d = np.pad(d, (0, k - len(d)))
            bad = rng.integers(0, k + 1)  # drafts from `bad` on are wrong
            d[bad:] = (d[bad:] + 1 + rng.integers(0, v - 1, size=k - bad)) % v
            inputs[i] = [out[i][-1], *d]
        g, n_acc, c = jax.device_get(verify(c, jnp.asarray(inputs)))
        steps += 1
        for i in range(b):
            out[i] += [int(t) for t in inputs[i, 1:1 + n_acc[i]]] + [int(g[i, n_acc[i]])]
    assert steps < n_new  # some drafts were accepted
    for i in range(b):
        assert out[i][:n_new + 1] == plain[i].tolist()


def _directional_check(loss, params, seed, eps):
    """(finite difference, autodiff) of `loss` along g/|g| plus an equally long random direction, in one jit:
    the derivative is about |g|, far above rounding noise."""
    @jax.jit
    def fn(p):
        g = jax.grad(loss)(p)
        leaves = jax.tree.leaves(g)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        r = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        g_norm = jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))
        r_norm = jnp.sqrt(sum(jnp.sum(x * x) for x in r))
        d = jax.tree.unflatten(jax.tree.structure(g), [a / g_norm + b / r_norm for a, b in zip(leaves, r)])
        ad = sum(jnp.vdot(a, b) for a, b in zip(leaves, jax.tree.leaves(d)))
        fd = (loss(jax.tree.map(lambda x, v: x + eps * v, p, d))
              - loss(jax.tree.map(lambda x, v: x - eps * v, p, d))) / (2 * eps)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))
        nonzero = jnp.all(jnp.array([jnp.any(x != 0) for x in leaves]))  # every parameter gets a gradient
        return fd, ad, finite, nonzero

    return jax.device_get(fn(params))


def test_mamba_gradients_match_finite_differences_fp64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        # The associative inner scan (the accelerator path); the sequential one's gradients equal the
        # reference recurrence's in test_chunked_scan_matches_sequential_reference.
        mix = Mamba(8, d_state=4, expand=2, scan_chunk=4, scan_inner="assoc", rngs=nnx.Rngs(1),
                    dtype=jnp.float64, param_dtype=jnp.float64)
        gdef, params = nnx.split(mix)
        u = jax.random.normal(jax.random.key(2), (2, 11, 8), jnp.float64)
        w = jax.random.normal(jax.random.key(3), (2, 11, 8), jnp.float64)
        loss = lambda pu: jnp.sum(jnp.tanh(nnx.merge(gdef, pu[0])(pu[1])) * w)  # params and input
        fd, ad, finite, nonzero = _directional_check(loss, (params, u), seed=4, eps=1e-6)
        assert finite and nonzero
        np.testing.assert_allclose(ad, fd, rtol=1e-7)
    finally:
        jax.config.update("jax_enable_x64", prev)


def test_model_gradients_finite_and_match_directional_difference():
    model = SambaLM(SambaConfig(**{**CFG.__dict__, "n_layers": 2}), rngs=nnx.Rngs(5))  # one Mamba + one SWA block
    gdef, params = nnx.split(model)
    toks = tokens(2, 33, seed=10)

    def loss(p):
        logits, _ = nnx.merge(gdef, p)(toks[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))

    fd, ad, finite, nonzero = _directional_check(loss, params, seed=0, eps=1e-3)
    assert finite and nonzero
    np.testing.assert_allclose(fd, ad, rtol=1e-3)


def test_config_validation():
    for bad in (dict(window=0), dict(scan_inner="fast"), dict(n_heads=3), dict(dt_min=0.2, dt_max=0.1)):
        with pytest.raises(ValueError):
            SambaConfig(**bad).validate()
    from models.registry import MODELS
    assert MODELS["samba"] is SambaLM


def test_engine_speculative_greedy_equals_plain_greedy():
    """Through the shared engine (bucketed prefill, while-loop decoding, verify steps with rollback)."""
    from decode.engine import Engine

    model = SambaLM(SambaConfig(**{**CFG.__dict__, "vocab_size": 259}), rngs=nnx.Rngs(6))
    eng = Engine(model, max_len=64, bos_id=256, verify_sizes=(4,))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(32, 127, size=n).astype(np.int32) for n in (5, 19)]  # 19: bucket 32 > 2W + 4
    ref = eng.generate(prompts, max_new_tokens=30, stop_ids=()).tokens

    class Noisy:  # a correct prefix of random length, then wrong tokens
        def __init__(self, ref, seed):
            self.ref, self.rng = np.asarray(ref, np.int32), np.random.default_rng(seed)

        def reset(self, prompt):
            self.pos = 0

        def accept(self, toks):
            self.pos += len(toks)

        def draft(self, k):
            d = self.ref[self.pos:self.pos + k].copy()
            bad = int(self.rng.integers(0, len(d) + 1))
            d[bad:] = (d[bad:] + 1) % 256
            return d

    res = eng.generate_speculative(prompts, [Noisy(r, i) for i, r in enumerate(ref)], max_new_tokens=30,
                                   stop_ids=())
    assert [t.tolist() for t in res.tokens] == [t.tolist() for t in ref]
    assert 1.0 < res.mat < 5.0
