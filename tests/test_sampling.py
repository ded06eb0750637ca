"""Sampling filters and speculative acceptance: exact reference checks and distribution tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.sampling import accept, filtered_logits, sample, target_probs

# Chi-square critical values at p = 1e-4 (df -> value); a correct sampler fails with probability 1e-4
# for a given seed, and the seeds are fixed, so the test is deterministic.
CHI2_CRIT = {2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74}


def chi2(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    n = counts.sum()
    exp = n * probs[keep]
    return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def ref_filter(logits, t, k, p):
    """Plain numpy reference: scale, keep top-k, then the smallest most-likely set with mass >= p."""
    x = logits / (t if t > 0 else 1.0)
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, bool)
    kk = len(x) if k <= 0 or k >= len(x) else k
    sel = order[:kk]
    pr = np.exp(x[sel] - x[sel].max())
    pr /= pr.sum()
    mass = 0.0
    for idx, q in zip(sel, pr):
        keep[idx] = True
        mass += q
        if mass >= p:
            break
    return np.where(keep, x, -np.inf)


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.5, 4, 0.8), (1.0, 1, 1.0),
                                   (2.0, 100, 0.05)])
def test_filtered_logits_matches_reference(t, k, p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11)).astype(np.float32) * 2
    got = np.asarray(filtered_logits(jnp.asarray(logits), jnp.full(3, t), jnp.full(3, k), jnp.full(3, p)))
    for row in range(3):
        want = ref_filter(logits[row].astype(np.float64), t, k, p)
        assert np.array_equal(np.isinf(got[row]), np.isinf(want))
        np.testing.assert_allclose(got[row][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)


def test_sample_greedy_rows_and_knob_changes_do_not_recompile():
    traces = []

    @jax.jit
    def f(logits, keys, pos, t, k, p):
        traces.append(1)
        return sample(logits, keys, pos, t, k, p)

    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4, dtype=jnp.uint32))
    pos = jnp.arange(4, dtype=jnp.int32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    f32 = lambda *x: jnp.array(x, jnp.float32)
    i32 = lambda *x: jnp.array(x, jnp.int32)
    out = f(logits, keys, pos, f32(0, 0, 0, 0), i32(0, 0, 0, 0), f32(1, 1, 1, 1))
    assert np.array_equal(np.asarray(out), greedy)
    # Mixed rows: temperature-0 rows stay greedy, top-k 1 rows are greedy too.
    out = f(logits, keys, pos, f32(0, 1, 0, 5), i32(0, 1, 0, 1), f32(1, 1, 0.3, 1))
    assert np.array_equal(np.asarray(out), greedy)
    f(logits, keys, pos, f32(0.3, 0.3, 1, 2), i32(7, 7, 0, 3), f32(0.5, 0.5, 0.9, 1))
    assert len(traces) == 1


def test_sample_follows_filtered_distribution_and_is_per_position():
    logits = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    n = 40000
    keys = jnp.tile(jax.random.PRNGKey(3)[None], (n, 1))
    pos = jnp.arange(n, dtype=jnp.int32)  # one row key, many positions: fold_in gives independent draws
    knobs = (jnp.full(n, 0.8), jnp.full(n, 3, jnp.int32), jnp.full(n, 1.0))
    tok = np.asarray(jax.jit(sample)(jnp.tile(logits, (n, 1)), keys, pos, *knobs))
    want = np.asarray(target_probs(logits, 0.8, 3, 1.0))
    stat, df = chi2(np.bincount(tok, minlength=5), want)
    assert stat < CHI2_CRIT[df], stat
    # Same key and position -> same token; the value depends only on (row key, position).
    again = np.asarray(jax.jit(sample)(jnp.tile(logits, (n, 1)), keys, pos, *knobs))
    assert np.array_equal(tok, again)


def test_greedy_acceptance_longest_matching_prefix_plus_bonus():
    v = 7
    argmax_BxK1 = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 0, 1]])
    logits = jax.nn.one_hot(argmax_BxK1, v) * 5.0
    draft = jnp.array([[1, 2, 3], [1, 0, 3], [1, 2, 3], [0, 6, 0]])
    dlen = jnp.array([3, 3, 2, 3])
    z = jnp.zeros(4)
    n, nxt = accept(logits, draft, dlen, jnp.zeros((4, 2), jnp.uint32), jnp.zeros(4, jnp.int32), z,
                    jnp.zeros(4, jnp.int32), jnp.ones(4))
    assert np.asarray(n).tolist() == [3, 1, 2, 0]
    assert np.asarray(nxt).tolist() == [4, 2, 3, 5]


def _run_accept(logits_K1xV, draft, knobs, n, seed):
    k1, v = logits_K1xV.shape
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n, dtype=jnp.uint32) + seed * n)
    t, k, p = knobs
    f = jax.jit(accept)
    na, nxt = f(jnp.broadcast_to(logits_K1xV, (n, k1, v)), jnp.broadcast_to(jnp.asarray(draft), (n, k1 - 1)),
                jnp.full(n, len(draft), jnp.int32), keys, jnp.zeros(n, jnp.int32), jnp.full(n, t),
                jnp.full(n, k, jnp.int32), jnp.full(n, p))
    na, nxt = np.asarray(na), np.asarray(nxt)
    emitted = np.concatenate([np.broadcast_to(np.asarray(draft), (n, k1 - 1)), np.zeros((n, 1), int)], 1)
    emitted[np.arange(n), na] = nxt
    return na, emitted


@pytest.mark.parametrize("knobs", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.2, 0, 0.7)])
@pytest.mark.parametrize("draft", [[1, 3], [3, 0], [5, 5]])
def test_sampling_acceptance_preserves_target_distribution(knobs, draft):
    """Emitted tokens follow p: the first always, the second given that the first draft was accepted."""
    v = 6
    logits = jnp.log(jnp.array([[0.05, 0.35, 0.1, 0.3, 0.15, 0.05],
                                [0.3, 0.05, 0.25, 0.1, 0.2, 0.1],
                                [0.1, 0.1, 0.2, 0.2, 0.3, 0.1]]))
    n = 60000
    na, emitted = _run_accept(logits, draft, knobs, n, seed=1)
    p = np.asarray(target_probs(logits, *knobs))
    stat, df = chi2(np.bincount(emitted[:, 0], minlength=v), p[0])
    assert stat < CHI2_CRIT[df], (stat, df)
    # The acceptance rate of the first draft token is exactly p(d) in expectation.
    assert abs((na >= 1).mean() - p[0, draft[0]]) < 5 * np.sqrt(p[0, draft[0]] * (1 - p[0, draft[0]]) / n) + 1e-9
    second = emitted[na >= 1, 1]
    if len(second) > 1000:
        stat, df = chi2(np.bincount(second, minlength=v), p[1])
        assert stat < CHI2_CRIT[df], (stat, df)


def test_sampling_acceptance_bonus_token_after_full_acceptance():
    """A draft of tokens with p = 1 is always accepted and the bonus follows p at the last position."""
    v = 5
    big = 60.0  # one-hot-like rows: p(d) == 1 exactly in fp32
    logits = jnp.stack([jax.nn.one_hot(2, v) * big, jax.nn.one_hot(4, v) * big,
                        jnp.log(jnp.array([0.1, 0.2, 0.3, 0.15, 0.25]))])
    n = 30000
    na, emitted = _run_accept(logits, [2, 4], (1.0, 0, 1.0), n, seed=2)
    assert (na == 2).all()
    stat, df = chi2(np.bincount(emitted[:, 2], minlength=v), np.asarray(target_probs(logits[2], 1.0, 0, 1.0)))
    assert stat < CHI2_CRIT[df], stat


def test_draft_outside_filtered_support_is_always_rejected():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    na, emitted = _run_accept(logits, [3], (1.0, 2, 1.0), 5000, seed=3)
    assert (na == 0).all()
    assert set(np.unique(emitted[:, 0])) == {0, 1}


def test_row_keys_are_the_seed_folded_with_each_row_or_each_rows_own_seed():
    """decode.request.row_keys (cached, numpy): one seed -> PRNGKey(seed) folded with the row index; one seed per
    row -> PRNGKey of each (negative seeds wrap as uint32). Requests of different sizes get their own keys."""
    from decode.request import row_keys

    for seed, n in ((0, 1), (7, 3), (2**40 + 3, 2), (7, 5)):
        want = [np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), i)) for i in range(n)]
        np.testing.assert_array_equal(row_keys(seed, n), np.stack(want))
    seeds = (3, -1, 9)
    want = [np.asarray(jax.random.PRNGKey(np.uint32(s % 2**32))) for s in seeds]
    np.testing.assert_array_equal(row_keys(seeds, 3), np.stack(want))
