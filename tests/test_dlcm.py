"""DLCM (strict causal variant): no leak, incremental = full with the concept count J tracking the boundaries,
extend/commit rollback across concept boundaries, inert padding, the Global Parser loss and its gradient path,
and the decoding engine (plain and speculative greedy). The generic decoding contract (typed caches, rows
committing different counts, prefix-LM prefill) is checked for every model in test_contract.py."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decode.drafters import Drafter
from models.dlcm import DLCMConfig, DLCMLM, parser_loss

# Random W_q / W_k (d_scan != d_model) put p near 1/2, so a random model has boundaries every few tokens;
# an untied head keeps its greedy continuations from repeating one token (which would close no concepts).
CFG = DLCMConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, d_concept=48, bb_layers=1, bb_heads=2,
                 cross_heads=2, d_scan=16, tie_embeddings=False, attn_block=16)
MAX_LEN = 64
B, L = 2, 48  # shared shapes: every test reuses the same few compiles


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: DLCMLM(CFG, rngs=nnx.Rngs(0)))()  # one compile instead of many eager inits


@pytest.fixture(scope="module")
def fns(model):
    """Jitted full forward (eval mode, optional prefix) and extend+commit, on split parameters."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens, prefix):
        return nnx.merge(graphdef, params)(tokens, prefix)

    @jax.jit
    def extend_commit(params, tokens, cache, n):
        m = nnx.merge(graphdef, params)
        logits, cache = m.extend(tokens, cache)
        return logits, m.commit(cache, n)

    @jax.jit
    def bounds(params, tokens):
        return nnx.merge(graphdef, params).boundaries(tokens)[1]

    model.jitted_boundaries = lambda t: np.asarray(bounds(params, jnp.asarray(t)))

    def fwd(t, prefix=None):
        return forward(params, jnp.asarray(t), None if prefix is None else jnp.asarray(prefix, jnp.int32))

    def ec(t, cache, n):
        return extend_commit(params, jnp.asarray(t, jnp.int32), cache, jnp.asarray(n, jnp.int32))

    return fwd, ec


def tokens(b, l, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, l)), jnp.int32)


def boundaries(model, x):
    """Eval-mode boundaries b_t (b_0 = 1) of the full forward, as numpy (jitted for a (B, L) batch)."""
    x = np.asarray(x)
    if x.shape == (B, L):
        return model.jitted_boundaries(x)
    return np.asarray(model.boundaries(jnp.asarray(x))[1])


def concept(cache):
    """The cache's ConceptCache (between the encoder and decoder token caches)."""
    return cache.layers[CFG.enc_layers]


def small_state(cache):
    c = concept(cache)
    return {"lengths": np.asarray(cache.lengths), **{k: np.asarray(getattr(c, k))
                                                   for k in ("J", "seg_sum", "seg_cnt", "prev_q")}}


# ---- causality ----------------------------------------------------------------------------------------------
def test_no_leak_future_tokens_never_change_past_logits(model, fns):
    fwd, _ = fns
    x = tokens(B, L, seed=1)
    base, aux = fwd(x)
    bnd = boundaries(model, x)
    assert 5 < bnd.sum(1).min() and bnd.sum(1).max() < L - 5  # real concepts of several tokens
    np.testing.assert_allclose(float(aux["boundary_rate"]), bnd.mean(), rtol=1e-6)
    for t in (0, 5, 17, 30, 46):
        y = x.at[:, t + 1:].set((x[:, t + 1:] + 7) % 256)
        out, _ = fwd(y)
        np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(base[:, :t + 1]))
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_prefix_lm_targets_stay_causal(fns):
    fwd, _ = fns
    x = tokens(B, L, seed=2)
    prefix = [9, 20]
    base, _ = fwd(x, prefix)
    y = x.at[0, 8].set((x[0, 8] + 1) % 256).at[1, 19].set((x[1, 19] + 1) % 256)  # last prefix tokens
    out, _ = fwd(y, prefix)
    assert not np.allclose(out[:, 0], base[:, 0])  # the prefix is seen bidirectionally
    for t in (20, 33):  # target tokens are never seen before their position
        y = x.at[:, t:].set((x[:, t:] + 3) % 256)
        out, _ = fwd(y, prefix)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))


# ---- decoding contract -----------------------------------------------------------------------------------------
def test_incremental_equals_full_forward_across_boundaries(model, fns):
    fwd, ec = fns
    x = tokens(B, L, seed=3)
    full = np.asarray(fwd(x)[0])
    bnd = boundaries(model, x)
    cache = model.init_cache(B, MAX_LEN)
    bucket = np.zeros((B, 32), np.int32)  # right-padded prefill bucket holding 20 prompt tokens
    bucket[:, :20] = x[:, :20]
    logits, cache = ec(bucket, cache, [20, 20])
    outs = [np.asarray(logits[:, :20])]
    np.testing.assert_array_equal(np.asarray(concept(cache).J), bnd[:, 1:20].sum(1))
    for t in range(20, L):
        lg, cache = ec(x[:, t:t + 1], cache, [1, 1])
        outs.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(concept(cache).J), bnd[:, 1:].sum(1))  # closed before the last token
    assert bnd[:, 1:20].sum(1).min() >= 5 and bnd[:, 20:].sum(1).min() >= 5  # in prefill and step by step


def test_concept_path_runs_only_when_a_concept_closes(model, fns):
    """Decoding from an empty cache one token at a time: the first step closes nothing (position 0) but must
    write the null concept; a step where no row closes a concept leaves the backbone and cross caches as they
    were (the concept path is skipped), a step where one closes writes them; the logits equal the full
    forward's throughout."""
    fwd, ec = fns
    x = tokens(B, L, seed=3)
    full = np.asarray(fwd(x)[0])
    bnd = boundaries(model, x)
    cache, outs, runs = model.init_cache(B, MAX_LEN), [], []
    for t in range(L):
        before = jax.tree.leaves((concept(cache).backbone, concept(cache).cross))
        lg, cache = ec(x[:, t:t + 1], cache, [1, 1])
        outs.append(np.asarray(lg))
        after = jax.tree.leaves((concept(cache).backbone, concept(cache).cross))
        runs.append(not all(np.array_equal(a, b) for a, b in zip(before, after)))
    closes = [t == 0 or bool(bnd[:, t].any()) for t in range(L)]  # t = 0: the empty cache's null concept
    assert runs == closes and not all(closes)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4, rtol=0)


def test_extend_k_then_commit_n_equals_extend_n(model, fns):
    _, ec = fns
    x = tokens(B, L, seed=4)
    bnd = boundaries(model, x)
    start, k = 16, 8
    bucket = np.zeros((B, 32), np.int32)
    bucket[:, :start] = x[:, :start]
    _, cache0 = ec(bucket, model.init_cache(B, MAX_LEN), [start, start])
    block = x[:, start:start + k]
    # the block closes concepts (in both rows, not at its first token only): some n cut across a boundary
    assert bnd[:, start + 1:start + k].sum(1).min() >= 1
    logits_k, _ = ec(block, cache0, [0, 0])
    # references: extend(n) as n single-token steps, and as one call of exactly n tokens for n = 5
    refs, cache = [cache0], cache0
    for i in range(k):
        lg, cache = ec(block[:, i:i + 1], cache, [1, 1])
        np.testing.assert_allclose(np.asarray(logits_k[:, i]), np.asarray(lg[:, 0]), atol=1e-5, rtol=0)
        refs.append(cache)
    lg5, cache5 = ec(block[:, :5], cache0, [5, 5])
    np.testing.assert_allclose(np.asarray(logits_k[:, :5]), np.asarray(lg5), atol=1e-5, rtol=0)
    for n in range(k + 1):
        _, cache_a = ec(block, cache0, [n, n])
        assert jax.tree.structure(cache_a) == jax.tree.structure(cache0)
        for cache_b in [refs[n]] + ([cache5] if n == 5 else []):
            sa, sb = small_state(cache_a), small_state(cache_b)
            for key in sa:
                np.testing.assert_allclose(sa[key], sb[key], atol=1e-5, rtol=0, err_msg=f"{key} at n={n}")
            # both caches then continue identically (stale concept and token slots are inert)
            nxt = x[:, start + n:start + n + 4]
            la, _ = ec(nxt, cache_a, [4, 4])
            lb, _ = ec(nxt, cache_b, [4, 4])
            np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-5, rtol=0, err_msg=f"n={n}")


def test_rows_commit_different_counts(model, fns):
    """An 8-token extend committed at 3 and 8 in one batch equals each count committed for both rows:
    bit-identical concept state (the per-row selection is exact, not merely close)."""
    _, ec = fns
    x = tokens(B, L, seed=5)
    bucket = np.zeros((B, 32), np.int32)
    bucket[:, :12] = x[:, :12]
    _, cache = ec(bucket, model.init_cache(B, MAX_LEN), [12, 12])
    _, mixed = ec(x[:, 12:20], cache, [3, 8])
    for row, n in ((0, 3), (1, 8)):
        _, ref = ec(x[:, 12:20], cache, [n, n])
        a, b = small_state(mixed), small_state(ref)
        for key in a:
            np.testing.assert_allclose(a[key][row], b[key][row], atol=0, rtol=0)


def test_padding_is_inert(model, fns):
    """A right-padded prefill bucket (rows of different lengths) then decoding == each sequence alone."""
    fwd, ec = fns
    lens = [5, 21]
    x = tokens(B, L, seed=6)
    bucket = np.full((B, 32), 258, np.int32)  # PAD
    for i, n in enumerate(lens):
        bucket[i, :n] = x[i, :n]
    lg, cache = ec(bucket, model.init_cache(B, MAX_LEN), lens)
    steps = [lg]
    for j in range(8):
        out, cache = ec(np.array([[x[i, n + j]] for i, n in enumerate(lens)]), cache, [1, 1])
        steps.append(out)
    full = np.asarray(fwd(x)[0])  # rows are independent, and causal: each row's prefix is that row alone
    for i, n in enumerate(lens):
        got = np.concatenate([np.asarray(steps[0][i, :n])] + [np.asarray(o[i]) for o in steps[1:]], 0)
        np.testing.assert_allclose(got, full[i, :n + 8], atol=1e-4, rtol=0, err_msg=f"row {i}")
        assert boundaries(model, x)[i, n:n + 8].sum() >= 1


# ---- the Global Parser ------------------------------------------------------------------------------------------
def test_parser_loss_values():
    for r in (2.0, 4.0, 8.0):
        assert abs(float(parser_loss(1 / r, 1 / r, r))) < 1e-7
        assert float(parser_loss(1.0, 1.0, r)) > 0 and float(parser_loss(0.0, 0.0, r)) > 0
        # dL/dG = R/(R-1) (R F - 1): too many boundaries push p down, too few push it up
        assert float(jax.grad(parser_loss, 1)(0.5, 0.3, r)) == pytest.approx(r / (r - 1) * (r * 0.5 - 1))
        assert float(jax.grad(parser_loss, 1)(0.1, 0.3, r)) < 0


def test_parser_gradient_flows_only_through_g(model):
    assert "rng" in inspect.signature(DLCMLM.__call__).parameters  # the trainer passes a key in training
    graphdef, params = nnx.split(model, nnx.Param)
    x = tokens(B, L + 1, seed=7)

    @jax.jit
    def grads(params, key):
        def run(p, name):
            logits, aux = nnx.merge(graphdef, p)(x[:, :-1], rng=key)
            if name == "ce":
                lp = jax.nn.log_softmax(logits)
                return -jnp.mean(jnp.take_along_axis(lp, x[:, 1:, None], -1))
            return aux[name]
        aux = nnx.merge(graphdef, params)(x[:, :-1], rng=key)[1]
        return aux, [jax.grad(run)(params, name) for name in ("ce", "loss_parser", "boundary_prob")]

    aux, (g_ce, g_aux, g_g) = grads(params, jax.random.key(3))
    g_ce, g_aux = nnx.to_pure_dict(g_ce), nnx.to_pure_dict(g_aux)
    # the language-model loss never reaches the boundary projections (discrete, stop-gradient decisions)
    for name in ("w_q", "w_k"):
        assert float(jnp.abs(g_ce[name]["kernel"]).max()) == 0.0
        assert float(jnp.abs(g_aux[name]["kernel"]).max()) > 0.0
    # the parser loss's gradient is exactly lambda * dL/dG * dG/dparams: F carries none
    r, f = CFG.target_ratio, float(aux["boundary_rate"])
    coef = CFG.aux_weight * r / (r - 1) * (r * f - 1)
    assert abs(coef) > 1e-3
    for a, g in zip(jax.tree.leaves(g_aux), jax.tree.leaves(nnx.to_pure_dict(g_g))):
        np.testing.assert_allclose(np.asarray(a), coef * np.asarray(g), rtol=1e-4, atol=1e-9)
    # training samples boundaries: the logged ratio is the realised one, and it depends on the key
    assert float(aux["tokens_per_concept"]) == pytest.approx(1 / f)
    assert float(grads(params, jax.random.key(4))[0]["boundary_rate"]) != f


# ---- the decoding engine ----------------------------------------------------------------------------------------
class Noisy(Drafter):
    """Drafts a correct prefix of random length, then random tokens (reference known in advance)."""

    def __init__(self, ref, seed, good=None):
        super().__init__()
        self.ref, self.rng, self.good = np.asarray(ref, np.int32), np.random.default_rng(seed), good

    def reset(self, prompt):
        self.pos = 0

    def accept(self, toks):
        self.pos += len(toks)

    def draft(self, k):
        n = int(self.rng.integers(0, k + 1))
        good = n if self.good == "all" else (0 if self.good == "none" else int(self.rng.integers(0, n + 1)))
        d = self.ref[self.pos:self.pos + n].copy()
        d[good:] = (d[good:] + 1 + self.rng.integers(0, 255, size=len(d) - good)) % 256
        return d


def test_engine_greedy_matches_naive_and_speculative(model, fns):
    from decode.engine import Engine

    fwd, _ = fns
    eng = Engine(model, max_len=MAX_LEN, bos_id=257, verify_sizes=(4,))
    ps = [np.asarray(tokens(1, n, seed=20 + n))[0] for n in (7, 19, 12)]
    n_new = 24
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Dd]onat.*")
        plain = eng.generate(ps, max_new_tokens=n_new, stop_ids=())
        # naive: recompute the whole right-padded sequence through the eval forward for every token
        for p, got in zip(ps, plain.tokens):
            seq = list(p)
            for _ in range(n_new):
                buf = np.zeros((B, L), np.int32)
                buf[0, :len(seq)] = seq
                seq.append(int(np.argmax(np.asarray(fwd(buf)[0][0, len(seq) - 1]))))
            assert got.tolist() == seq[len(p):]
            bnd = boundaries(model, buf)[0, len(p):len(seq) - 1]
            assert bnd.sum() >= 3  # decoding closed several concepts
        for seed, kinds in enumerate((("all", None, "none"), (None, "none", "all"))):
            drafters = [Noisy(t, seed * 3 + i, good) for i, (t, good) in enumerate(zip(plain.tokens, kinds))]
            spec = eng.generate_speculative(ps, drafters, max_new_tokens=n_new, stop_ids=())
            assert [t.tolist() for t in spec.tokens] == [t.tolist() for t in plain.tokens]
            assert spec.mat > 1.0
    assert eng.traces["prefill"] <= 2 and eng.traces["speculate"] == 1
