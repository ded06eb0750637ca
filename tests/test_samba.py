"""SAMBA: the cached decode path equals the full forward, rollback is exact, padding is inert, the chunked
scan equals the recurrence, and gradients match finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import causal_mask, masked_attention
from models.mamba import Mamba, selective_scan, selective_scan_ref
from models.samba import SambaConfig, SambaLM, sliding_window_attention, window_visible

W = 8  # window smaller than every sequence below, so the ring wraps several times
B, L = 3, 49  # one batch size and few step sizes throughout: every shape compiles once
CFG = SambaConfig(vocab_size=259, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, window=W, d_state=4,
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


def full(n):
    return jnp.full((B,), n, jnp.int32)


def test_chunked_scan_matches_sequential_reference():
    b, l, e, n = 2, 37, 6, 4  # l is not a multiple of the chunk: padded steps must be inert
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (b, l, e))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, e)) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[2], (e, n)))
    Bm, Cm = jax.random.normal(ks[3], (b, l, n)), jax.random.normal(ks[4], (b, l, n))
    h0 = jax.random.normal(ks[5], (b, e, n))
    y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, h0)
    sq = lambda scan: jax.jit(jax.grad(lambda x, dt, h0: jnp.sum(scan(x, dt, A, Bm, Cm, h0)[0] ** 2), (0, 1, 2)))
    g_ref = sq(selective_scan_ref)(x, dt, h0)
    for inner, chunk in (("seq", 8), ("assoc", 8)):  # several chunks, the last one padded
        scan = functools.partial(selective_scan, chunk=chunk, inner=inner)
        y, h = jax.jit(scan)(x, dt, A, Bm, Cm, h0)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(sq(scan)(x, dt, h0), g_ref):  # through the rematerialised chunks
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
    x = tokens(B, L, seed=3)
    y = x.at[:, 20].set((x[:, 20] + 1) % CFG.vocab_size)
    lx, ly = forward(x), forward(y)
    np.testing.assert_array_equal(lx[:, :20], ly[:, :20])
    assert float(jnp.abs(lx[:, 20:] - ly[:, 20:]).max()) > 1e-4
    prefix = jnp.full((B,), 24, jnp.int32)
    px, py = forward(x, prefix), forward(y, prefix)
    assert float(jnp.abs(px[:, 19] - py[:, 19]).max()) > 1e-4  # token 19 sees prefix token 20
    # Each of the 2 SWA layers carries the change W-1 positions back; Mamba layers are causal.
    np.testing.assert_array_equal(px[:, :20 - 2 * (W - 1)], py[:, :20 - 2 * (W - 1)])


def test_forward_equals_prefill_then_decode(model, forward, step):
    """Mixed step sizes: a prefill longer than 2W (chunked, empty ring), single tokens, a chunked extend over a
    non-empty ring, and short multi-token extends; the ring wraps several times."""
    toks = tokens(B, L, seed=4)
    ref = forward(toks)
    cache = model.init_cache(B, L)
    outs, t = [], 0
    for k in (20, 1, 1, 1, 20, 3, 2, 1):
        logits, cache = step(cache, toks[:, t:t + k], full(k))
        outs.append(logits)
        t += k
    assert t == L and cache["lengths"].tolist() == [L] * B
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=1e-4, rtol=1e-4)


def test_cache_is_constant_size_and_commit_strips_pending(model, step):
    c1, c2 = model.init_cache(B, 64), model.init_cache(B, 1 << 20)
    assert jax.tree.structure(c1) == jax.tree.structure(c2)
    assert [x.shape for x in jax.tree.leaves(c1)] == [x.shape for x in jax.tree.leaves(c2)]
    swa = c1["layers"][1]
    assert swa["k"].shape == (B, W, CFG.kv_heads, CFG.hd)  # a window-sized ring, not a full-length buffer
    assert c1["layers"][0]["ssm"].dtype == jnp.float32
    ids = [id(x) for x in jax.tree.leaves(c1)]
    assert len(set(ids)) == len(ids)  # every leaf its own buffer (donation)
    _, c = step(c1, tokens(B, 3), full(2))
    assert jax.tree.structure(c) == jax.tree.structure(c1)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(c)] == [(x.shape, x.dtype) for x in jax.tree.leaves(c1)]


def test_extend_commit_equals_extend_n(model, step):
    """extend(K) + commit(n) restores exactly the state after n tokens, for every n <= K (n varies per row):
    the same cache and the same logits for the tokens that follow."""
    k = 4
    hist, draft, after = tokens(1, 20, seed=5), tokens(1, k, seed=6), tokens(1, 3, seed=7)  # ring wrapped
    rep = lambda t: jnp.repeat(t, B, 0)
    _, base = step(model.init_cache(B, 32), rep(hist), full(20))
    refs = [base] + [step(base, rep(draft[:, :n]), full(n))[1] for n in range(1, k + 1)]  # extend(n), commit(n)
    for n_B in ([0, 1, 2], [3, 4, 2]):
        _, rolled = step(base, rep(draft), jnp.array(n_B, jnp.int32))  # extend(K), commit(n)
        after_logits, _ = step(rolled, rep(after), full(3))
        for i, n in enumerate(n_B):
            assert int(rolled["lengths"][i]) == 20 + n
            for a, r in zip(jax.tree.leaves(rolled), jax.tree.leaves(refs[n])):
                np.testing.assert_allclose(a[i], r[i], atol=1e-5, rtol=1e-5)
            ref_logits, _ = step(refs[n], rep(after), full(3))
            np.testing.assert_allclose(after_logits[i], ref_logits[i], atol=1e-5, rtol=1e-5)


def test_padding_is_inert(model, step):
    """Right-padded prompts (bucket 32, far past the W-slot ring) committed at their lengths equal each
    prompt unpadded (as a batch of copies, so no row is padded)."""
    lens = [3, 13, 32]
    toks = tokens(B, 32, seed=8)
    padded = jnp.where(jnp.arange(32)[None, :] < jnp.array(lens)[:, None], toks, CFG.vocab_size - 1)

    def greedy(cache, prompt, n_B, steps=4):
        logits, cache = step(cache, prompt, n_B)
        nxt = jnp.argmax(logits[jnp.arange(B), n_B - 1], -1)[:, None]
        out = []
        for _ in range(steps):
            lg, cache = step(cache, nxt, full(1))
            out.append(lg[:, -1])
            nxt = jnp.argmax(lg[:, -1], -1)[:, None]
        return jnp.stack(out, 1)

    batched = greedy(model.init_cache(B, 64), padded, jnp.array(lens, jnp.int32))
    for i, n in enumerate(lens):
        alone = greedy(model.init_cache(B, 64), jnp.repeat(toks[i:i + 1, :n], B, 0), full(n))
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-5, rtol=1e-5)


def test_speculative_greedy_equals_plain_greedy(model, step):
    """The verify protocol at the contract level: [last, d1..dK] -> accept the longest prefix equal to the
    argmax, plus one bonus token; commit n = accepted + 1. Drafts are right, wrong or partly right per row."""
    b, prompt_len, n_new, k = B, 20, 24, 4
    prompt = tokens(b, prompt_len, seed=9)
    logits, cache = step(model.init_cache(b, 64), prompt, full(prompt_len))
    first = jnp.argmax(logits[:, -1], -1)
    plain, last, c = [first], first, cache
    for _ in range(n_new):
        lg, c = step(c, last[:, None], full(1))
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
    """(finite difference, autodiff) of `loss` along g/|g| plus an equally long random direction (the
    derivative is then about |g|, far above rounding noise); asserts every gradient is finite and nonzero."""
    g = jax.device_get(jax.jit(jax.grad(loss))(params))
    leaves, tree = jax.tree.flatten(g)
    assert all(np.all(np.isfinite(x)) for x in leaves)
    assert all(np.any(x != 0) for x in leaves)  # every parameter gets a gradient
    rng = np.random.default_rng(seed)
    r = [rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    g_norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in leaves))
    r_norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in r))
    d = [(a / g_norm + b / r_norm).astype(a.dtype) for a, b in zip(leaves, r)]
    ad = sum(np.vdot(a.astype(np.float64), b) for a, b in zip(leaves, d))
    p = jax.tree.leaves(jax.device_get(params))
    f = jax.jit(loss)
    shifted = lambda sign: jax.tree.unflatten(tree, [(x + sign * eps * v).astype(x.dtype) for x, v in zip(p, d)])
    fd = (float(f(shifted(1.0))) - float(f(shifted(-1.0)))) / (2 * eps)
    return fd, ad


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
        fd, ad = _directional_check(loss, (params, u), seed=4, eps=1e-6)
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

    fd, ad = _directional_check(loss, params, seed=0, eps=1e-3)
    np.testing.assert_allclose(fd, ad, rtol=1e-3)


def test_config_validation():
    for bad in (dict(window=0), dict(scan_inner="fast"), dict(n_heads=3), dict(dt_min=0.2, dt_max=0.1)):
        with pytest.raises(ValueError):
            SambaConfig(**bad).validate()
    from models.registry import MODELS
    assert MODELS["samba"] is SambaLM



def test_extrapolation_windows_score_the_same_tokens_at_every_length():
    """bench_context's length-extrapolation eval: each length cuts the same spans, so targets are identical."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_context.py"
    spec = importlib.util.spec_from_file_location("bench_context", path)
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    val = np.arange(10_000) % 251
    spans = bc.same_token_spans(val, 64, 256)
    assert spans.shape == (4, 65)
    targets = {length: np.sort(bc.split_spans(spans, length)[:, 1:].ravel()) for length in (8, 16, 64)}
    assert all(np.array_equal(targets[8], t) for t in targets.values())
    w = bc.split_spans(spans, 16)
    assert w.shape == (16, 17) and np.array_equal(w[1, :], spans[0, 16:33])  # consecutive windows share a token
    with pytest.raises(bc.ConfigError):
        bc.split_spans(spans, 24)
