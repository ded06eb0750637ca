"""The model contract (models/contract.py), checked on every registered architecture with a tiny config.

One suite instead of a copy per model: the full forward equals a prefill plus token-by-token decoding;
extend(K) + commit(n) equals extend(n) + commit(n) for every n (per row too); right padding is inert; a
prefix-LM prefill followed by causal decoding equals the full forward with the prefix mask; commit returns
init_cache's exact typed structure; speculative greedy equals plain greedy (engine-free). Model-specific
checks (plain references, gradients, the DLCM parser) stay in the per-model test files.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.contract import (NO_DECAY, Cache, ConceptCache, DecodableLM, KVCache, MambaCache, RingCache,
                             count_params)
from models.registry import MODELS

# Tiny configs: several layers of each kind, GQA, a window (8) far below the sequence (so the ring wraps),
# a decoder cache of 96 slots (two prefix sizes, so a decode step goes through lax.switch) and a 33-token
# prefill (33 x 2 query heads per KV head > 64: the blocked prefill loop). DLCM's random W_q/W_k (d_scan !=
# d_model) close a concept every few tokens.
TINY = {
    "decoder": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16),
    "samba": dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, window=8, d_state=4, scan_chunk=8),
    "dlcm": dict(d_model=32, n_heads=2, n_kv_heads=1, enc_layers=1, dec_layers=1, d_concept=48, bb_layers=1,
                 bb_heads=2, cross_heads=2, d_scan=16, tie_embeddings=False, attn_block=16),
    "mamba": dict(d_model=32, n_layers=3, d_state=4, scan_chunk=8),
}
CONSTANT_SIZE = {"samba", "mamba"}  # caches that do not grow with max_len
B, L, MAX_LEN = 3, 60, 96
PAD = 258


def test_every_registered_model_has_a_tiny_config():
    assert sorted(TINY) == sorted(MODELS)


@pytest.fixture(scope="module", params=sorted(TINY))
def arch(request):
    name = request.param
    cls = MODELS[name]
    cfg = cls.config_class(**TINY[name])
    cfg.validate()
    model = cls(cfg, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(model)

    @jax.jit
    def forward(tokens, prefix=None):
        return nnx.merge(gdef, state)(tokens, prefix)[0]

    @jax.jit
    def step(cache, tokens_BxK, n_B, prefix=None):
        """extend + commit in one jit, as the engine runs them."""
        m = nnx.merge(gdef, state)
        logits, cache = m.extend(tokens_BxK, cache, prefix)
        return logits, m.commit(cache, n_B)

    return name, model, forward, step


def tokens(b, l, seed):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, 256)


def full(n):
    return jnp.full((B,), n, jnp.int32)


def _slots_live(kv: KVCache, n_B):
    """A KV cache with the slots at or past n_B (per row) zeroed: those are never visible."""
    live = jnp.arange(kv.k.shape[2])[None, :] < n_B[:, None]
    return [jnp.where(live[:, None, :, None], a, 0) for a in kv]


def live_state(cache: Cache):
    """Every array of a committed cache that can influence what follows (slots past a length are dead)."""
    out = [cache.lengths]
    for layer in cache.layers:
        if isinstance(layer, KVCache):  # token positions
            out += _slots_live(layer, cache.lengths)
        elif isinstance(layer, ConceptCache):  # concept slots: backbone 0..J-1, cross 0 (null)..J
            out += [layer.J, layer.seg_sum, layer.seg_cnt, layer.prev_q]
            for kv in layer.backbone:
                out += _slots_live(kv, layer.J)
            out += _slots_live(layer.cross, layer.J + 1)
        else:
            assert isinstance(layer, (RingCache, MambaCache)), type(layer)
            out += list(layer)
    return out


def assert_same_state(a: Cache, b: Cache, rows=None, atol=1e-5):
    for i, (x, y) in enumerate(zip(live_state(a), live_state(b), strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        if rows is not None:
            x, y = x[rows], y[rows]
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5, err_msg=f"cache array {i}")


# ---- (g) the protocol ---------------------------------------------------------------------------------------
def test_protocol_and_bookkeeping(arch):
    name, model, _, _ = arch
    assert isinstance(model, DecodableLM)
    assert model.vocab_size == model.cfg.vocab_size == 259
    assert isinstance(model.supports_prefix, bool) and model.supports_prefix == (name != "mamba")
    f64, f1k = model.flops_per_token(64), model.flops_per_token(1024)
    n_matrix = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)
    assert 0 < f64 <= f1k and f64 >= 2 * n_matrix and math.isfinite(f1k)
    assert 0 < count_params(model)
    assert model.cache_capacity(MAX_LEN) >= MAX_LEN
    # weight decay: matrices only, never A_log (the one 2-D leaf that is SSM dynamics)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = model.decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, x), decay in zip(flat, jax.tree.leaves(mask), strict=True):
        leaf = str(path[-1].key)
        assert decay == (x.ndim >= 2 and leaf not in NO_DECAY), (path, decay)
    assert nnx.to_pure_dict(model.decay_mask(nnx.state(model, nnx.Param))) == mask  # an nnx.State alike


def test_no_decay_names_only_real_parameters():
    """Every name in NO_DECAY is a parameter of some registered model (no stale entries like `dt_bias`)."""
    names = set()
    for name, cls in MODELS.items():
        model = nnx.eval_shape(lambda: cls(cls.config_class(**TINY[name]), rngs=nnx.Rngs(0)))
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
        names |= {str(p[-1].key) for p, _ in flat}
    assert NO_DECAY <= names, NO_DECAY - names


# ---- (f) the typed cache ------------------------------------------------------------------------------------
def _assert_typed(node):
    """Only the contract's NamedTuples, tuples, arrays and None: no dicts, no lists."""
    if isinstance(node, (Cache, KVCache, RingCache, MambaCache, ConceptCache)) or type(node) is tuple:
        for child in node:
            _assert_typed(child)
    else:
        assert node is None or isinstance(node, jax.Array), type(node)


def test_cache_is_typed_and_commit_returns_its_structure(arch):
    name, model, _, step = arch
    init = model.init_cache(B, MAX_LEN)
    assert type(init) is Cache and init.pending is None
    _assert_typed(init)
    assert all(isinstance(layer, (KVCache, RingCache, MambaCache, ConceptCache)) for layer in init.layers)
    ids = [id(x) for x in jax.tree.leaves(init)]
    assert len(set(ids)) == len(ids)  # every leaf its own buffer (donation)
    spec = [(x.shape, x.dtype) for x in jax.tree.leaves(init)]
    for k in (1, 4):
        _, c = step(init, tokens(B, k, seed=1), jnp.array([0, 1, k], jnp.int32))
        assert type(c) is Cache and c.pending is None
        assert jax.tree.structure(c) == jax.tree.structure(init)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(c)] == spec
        assert c.lengths.tolist() == [0, 1, k]
    _, extended = jax.eval_shape(lambda: model.extend(tokens(B, 2, seed=1), init))
    assert extended.pending is not None  # what commit needs travels in the typed cache
    with pytest.raises(ValueError):
        model.commit(init, full(1))  # a committed cache has nothing to commit
    small = jax.eval_shape(lambda: model.init_cache(B, 64))
    big = jax.eval_shape(lambda: model.init_cache(B, 1 << 20))
    assert jax.tree.structure(small) == jax.tree.structure(big)
    same = [a.shape for a in jax.tree.leaves(small)] == [a.shape for a in jax.tree.leaves(big)]
    assert same == (name in CONSTANT_SIZE)


# ---- (a) full forward == prefill + token-by-token decode ----------------------------------------------------
def test_forward_equals_prefill_then_decode(arch):
    """Mixed step sizes: a 33-token prefill, single tokens, a 20-token extend over a non-empty (wrapped) ring or
    cache, and a short multi-token extend."""
    _, model, forward, step = arch
    toks = tokens(B, L, seed=4)
    ref = forward(toks)
    cache, outs, t = model.init_cache(B, MAX_LEN), [], 0
    for k in (33, 1, 1, 20, 4, 1):
        logits, cache = step(cache, toks[:, t:t + k], full(k))
        outs.append(logits)
        t += k
    assert t == L and cache.lengths.tolist() == [L] * B
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=1e-4, rtol=1e-4)


# ---- (b), (e) extend(K) + commit(n) == extend(n) + commit(n) ------------------------------------------------
@pytest.fixture(scope="module")
def rollback(arch):
    """A cache after 20 tokens, a 4-token draft, and the references extend(n) + commit(n) for n = 0..4."""
    _, model, _, step = arch
    hist, draft = tokens(B, 20, seed=5), tokens(B, 4, seed=6)
    _, base = step(model.init_cache(B, MAX_LEN), hist, full(20))
    refs = [base] + [step(base, draft[:, :n], full(n))[1] for n in range(1, 5)]
    return base, draft, refs


def test_extend_k_commit_n_equals_extend_n(arch, rollback):
    """For every n in 0..K: the same live cache state, and the same logits for the tokens that follow."""
    _, _, _, step = arch
    base, draft, refs = rollback
    after = tokens(B, 3, seed=7)
    for n in range(5):
        _, rolled = step(base, draft, full(n))
        assert rolled.lengths.tolist() == [20 + n] * B
        assert_same_state(rolled, refs[n])
        got, _ = step(rolled, after, full(3))
        want, _ = step(refs[n], after, full(3))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"n={n}")


def test_rows_commit_different_counts(arch, rollback):
    _, _, _, step = arch
    base, draft, refs = rollback
    after = tokens(B, 3, seed=8)
    for n_B in ([0, 1, 2], [3, 4, 2]):
        _, rolled = step(base, draft, jnp.array(n_B, jnp.int32))
        got, _ = step(rolled, after, full(3))
        for i, n in enumerate(n_B):
            assert int(rolled.lengths[i]) == 20 + n
            assert_same_state(rolled, refs[n], rows=i)
            want, _ = step(refs[n], after, full(3))
            np.testing.assert_allclose(got[i], want[i], atol=1e-5, rtol=1e-5, err_msg=f"row {i}, n={n}")


# ---- (c) padding is inert -----------------------------------------------------------------------------------
def test_padding_is_inert(arch):
    """Right-padded prompts (one 33-token bucket, far past the ring) committed at their lengths equal each
    prompt unpadded (as a batch of copies, so no row is padded): the same state and greedy continuation."""
    _, model, _, step = arch
    lens = [3, 20, 33]
    toks = tokens(B, 33, seed=9)
    padded = jnp.where(jnp.arange(33)[None, :] < jnp.array(lens)[:, None], toks, PAD)

    def prompt_then_greedy(prompt, n_B, steps=4):
        logits, cache = step(model.init_cache(B, MAX_LEN), prompt, n_B)
        committed = cache
        nxt = jnp.argmax(logits[jnp.arange(B), n_B - 1], -1)[:, None]
        out = []
        for _ in range(steps):
            lg, cache = step(cache, nxt, full(1))
            out.append(lg[:, -1])
            nxt = jnp.argmax(lg[:, -1], -1)[:, None]
        return committed, jnp.stack(out, 1)

    batched_cache, batched = prompt_then_greedy(padded, jnp.array(lens, jnp.int32))
    for i, n in enumerate(lens):
        alone_cache, alone = prompt_then_greedy(jnp.repeat(toks[i:i + 1, :n], B, 0), full(n))
        assert_same_state(batched_cache, alone_cache, rows=i)
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-5, rtol=1e-5, err_msg=f"row {i}")


# ---- (d) prefix-LM prefill + causal decode == full forward with the prefix mask ------------------------------
def test_prefix_prefill_then_causal_decode_equals_prefix_forward(arch):
    name, model, forward, step = arch
    plen = jnp.array([5, 17, 33], jnp.int32)
    toks = tokens(B, L, seed=10)
    bucket = jnp.where(jnp.arange(33)[None, :] < plen[:, None], toks[:, :33], PAD)  # right-padded prompts
    logits, cache = step(model.init_cache(B, MAX_LEN), bucket, plen, plen)
    causal, _ = step(model.init_cache(B, MAX_LEN), bucket, plen)
    if not model.supports_prefix:  # Mamba layers are causal by nature: the prefix is not read at all
        assert name == "mamba"
        np.testing.assert_array_equal(logits, causal)
        return
    ref = forward(toks, plen)
    assert float(jnp.abs(logits[0, :5] - causal[0, :5]).max()) > 1e-4  # the prefix was read bidirectionally
    outs = []
    for j in range(L - 33):  # teacher-forced causal decoding, each row from its own prefix length
        lg, cache = step(cache, toks[jnp.arange(B), plen + j][:, None], full(1))
        outs.append(lg[:, 0])
    outs = jnp.stack(outs, 1)
    for i, p in enumerate(plen.tolist()):
        np.testing.assert_allclose(logits[i, :p], ref[i, :p], atol=1e-4, rtol=1e-4, err_msg=f"prefill row {i}")
        np.testing.assert_allclose(outs[i], ref[i, p:p + L - 33], atol=1e-4, rtol=1e-4, err_msg=f"decode row {i}")


# ---- speculative greedy == plain greedy, engine-free ----------------------------------------------------------
def test_speculative_greedy_equals_plain_greedy(arch):
    """The verify protocol at the contract level: extend [last, d1..dK], accept the longest prefix equal to
    the argmax plus one bonus token, commit n = accepted + 1. Drafts are right, wrong or partly right per row."""
    _, model, _, step = arch
    prompt_len, n_new, k = 20, 24, 4
    prompt = tokens(B, prompt_len, seed=11)
    logits, cache = step(model.init_cache(B, MAX_LEN), prompt, full(prompt_len))
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
    v = model.vocab_size
    out = [[int(first[i])] for i in range(B)]
    c, steps = cache, 0
    while min(len(o) for o in out) <= n_new:
        inputs = np.zeros((B, k + 1), np.int32)
        for i in range(B):
            d = plain[i, len(out[i]):len(out[i]) + k]
            d = np.pad(d, (0, k - len(d)))
            bad = rng.integers(0, k + 1)  # drafts from `bad` on are wrong
            d[bad:] = (d[bad:] + 1 + rng.integers(0, v - 1, size=k - bad)) % v
            inputs[i] = [out[i][-1], *d]
        g, n_acc, c = jax.device_get(verify(c, jnp.asarray(inputs)))
        steps += 1
        for i in range(B):
            out[i] += [int(t) for t in inputs[i, 1:1 + n_acc[i]]] + [int(g[i, n_acc[i]])]
    assert steps < n_new  # some drafts were accepted
    for i in range(B):
        assert out[i][:n_new + 1] == plain[i].tolist()
