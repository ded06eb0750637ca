"""models/dlcm.py pinned to the independent reference (tests/dlcm_reference.py): logits, boundaries and the
Global Parser statistics, for both cross-attention weightings, with a document separator, the slot cap
binding, and fixed boundaries whose rows have different boundary rates (so per-sequence parser statistics
differ from the global ones)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.dlcm import DLCMConfig, DLCMLM, sharpen
from tests.dlcm_reference import reference_forward

# Small but complete: GQA in the token stacks, cross MLP, d_scan != d_model (random W_q / W_k: p near 1/2, a
# boundary every few tokens, so the cap at 1.25 / R binds), muP with s_token = 1/4 (logits x 4).
CFG = dict(d_model=32, n_heads=4, n_kv_heads=2, enc_layers=1, dec_layers=1, d_concept=48, bb_layers=1,
           bb_heads=2, cross_heads=2, d_scan=16, tie_embeddings=False, cross_mlp=True, attn_block=16,
           concept_slack=2)
B, L = 2, 24
SEP = 257  # the document separator (doc_start_id)


@pytest.fixture(scope="module")
def uniform_model():
    return nnx.jit(lambda: DLCMLM(DLCMConfig(**CFG), rngs=nnx.Rngs(0)))()  # one compile, not many eager inits


def tokens():
    x = np.random.default_rng(0).integers(0, 256, (B, L)).astype(np.int32)
    x[0, [3, 9, 15, 20]] = SEP  # documents start inside row 0 (forced boundaries with p = 1)
    return x


def raw_boundaries():
    """Fixed decisions: row 0 dense (the cap binds), row 1 sparse (long concepts)."""
    raw = np.zeros((B, L), bool)
    raw[0, ::2] = True
    raw[1, [5, 6, 13]] = True
    return raw


@pytest.fixture(scope="module", params=["uniform", "replicated"])
def setup(request, uniform_model):
    """The model (the same parameters for both weightings) in eval mode and with fixed boundaries, one jit."""
    cfg = DLCMConfig(**CFG, cross_weighting=request.param)
    gdef, _ = nnx.split(nnx.eval_shape(lambda: DLCMLM(cfg, rngs=nnx.Rngs(0))))
    state = nnx.state(uniform_model)

    @jax.jit
    def run(tokens, raw):
        m = nnx.merge(gdef, state)
        return m(tokens), m.boundaries(tokens)[1], m(tokens, raw_boundaries=raw)

    @jax.jit
    def decode(tokens):
        """The cached path over the same tokens in three 8-token extends (separators inside blocks)."""
        m = nnx.merge(gdef, state)
        cache, out = m.init_cache(B, 32), []
        for i in range(0, L, 8):
            logits, cache = m.extend(tokens[:, i:i + 8], cache)
            cache = m.commit(cache, jnp.full((B,), 8, jnp.int32))
            out.append(logits)
        return jnp.concatenate(out, 1)

    x, raw = tokens(), raw_boundaries()
    params = nnx.to_pure_dict(nnx.state(uniform_model, nnx.Param))
    outs = jax.device_get(run(jnp.asarray(x), jnp.asarray(raw)))
    return cfg, params, outs, x, raw, np.asarray(decode(jnp.asarray(x)))


def test_eval_forward_matches_reference(setup):
    """Threshold boundaries: the same realised boundaries (forced at the separator, capped), logits, F, G."""
    cfg, params, ((logits, aux), bnd, _), x, _, cached = setup
    ref, ref_b, stats = reference_forward(params, cfg, x)
    np.testing.assert_array_equal(np.asarray(bnd), ref_b)
    assert ref_b[0, [3, 9, 15]].all()  # separators start concepts (while the cap allows: not at 20)
    assert float(aux["concept_capped"]) > 0  # the cap dropped some boundaries
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(cached, ref, atol=2e-4, rtol=1e-4)  # decoding: the same forced and capped bounds
    for key, name in (("F", "boundary_rate"), ("G", "boundary_prob"), ("loss_parser", "loss_parser")):
        np.testing.assert_allclose(float(aux[name]), stats[key], atol=1e-6, rtol=1e-5, err_msg=key)


def test_fixed_boundaries_and_global_parser_statistics(setup):
    """Fixed raw boundaries with different F (and G) per row: the parser loss over the global batch differs
    from the mean of per-row losses, and the test can tell them apart."""
    cfg, params, (_, _, (logits, aux)), x, raw, _ = setup
    ref, ref_b, stats = reference_forward(params, cfg, x, raw)
    rates, probs = ref_b.mean(1), stats["p"].mean(1)
    assert rates[0] > 2 * rates[1] and probs[0] > probs[1] + 0.05
    r = cfg.target_ratio
    per_row = [r / (r - 1) * ((r - 1) * f * g + (1 - f) * (1 - g)) - 1 for f, g in zip(rates, probs)]
    assert abs(np.mean(per_row) - stats["L_aux"]) > 1e-3  # the test can tell global from per-row statistics
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=1e-4)
    for key, name in (("F", "boundary_rate"), ("G", "boundary_prob"), ("L_aux", "parser_aux"),
                      ("loss_parser", "loss_parser")):
        np.testing.assert_allclose(float(aux[name]), stats[key], atol=1e-6, rtol=1e-5, err_msg=key)


def test_sharpen_and_eval_threshold(uniform_model):
    """sharpen pushes p away from 1/2 (s = 1: identity; 0 and 1 fixed); the eval threshold is p >= t on the
    model's own p (then the forced boundaries and the cap), and a higher threshold gives fewer boundaries."""
    p = jnp.array([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    np.testing.assert_allclose(np.asarray(sharpen(p, 1.0)), np.asarray(p), atol=1e-7)
    sp = np.asarray(sharpen(p, 6.0))
    np.testing.assert_allclose(sp[[0, 6]], [0.0, 1.0], atol=1e-7)
    # ConceptMoE's sharpen_prob_power: p^(1/s) above 1/2, 1 - (1-p)^(1/s) at or below (a jump at 1/2)
    np.testing.assert_allclose(sp[1:6], [1 - 0.9 ** (1 / 6), 1 - 0.7 ** (1 / 6), 1 - 0.5 ** (1 / 6),
                                         0.7 ** (1 / 6), 0.9 ** (1 / 6)], rtol=1e-5)
    assert (np.diff(sp) > 0).all() and sp[2] < 0.3 and sp[4] > 0.7
    x = tokens()
    counts = []
    for thr in (0.5, 0.55):
        cfg = DLCMConfig(**{**CFG, "concept_slack": 64}, eval_threshold=thr)  # no cap at this length
        gdef, _ = nnx.split(nnx.eval_shape(lambda: DLCMLM(cfg, rngs=nnx.Rngs(0))))
        prob, bnd = jax.jit(lambda t: nnx.merge(gdef, nnx.state(uniform_model)).boundaries(t))(jnp.asarray(x))
        prob, bnd = np.asarray(prob), np.asarray(bnd)
        forced = (np.arange(L)[None] == 0) | (x == SEP)
        np.testing.assert_array_equal(bnd, (prob >= thr) | forced)
        assert ((prob[~forced] > 0.45) & (prob[~forced] < 0.55)).any()  # p near 1/2: the threshold matters
        counts.append(bnd.sum())
    assert counts[1] < counts[0]


def test_default_sharpening_is_one_and_a_half_r(uniform_model):
    """sharpen = 0 (the default) samples the training boundaries at power s = 1.5 R (6 at R = 4, 12 at R = 8);
    an explicit sharpen is used as given. Draws (one key, no cap at this length) are pinned to
    Bernoulli(sharpen(p, s)) with p the model's own; the p near 1/2 make s = 6, 8, 12 and 1 draw differently."""
    x = np.random.default_rng(3).integers(0, 256, (8, L)).astype(np.int32)
    key = jax.random.key(7)
    draws = {}
    for ratio, s_cfg, s_want in ((4.0, 0.0, 6.0), (8.0, 0.0, 12.0), (8.0, 5.0, 5.0)):
        cfg = DLCMConfig(**{**CFG, "concept_slack": 64}, target_ratio=ratio, sharpen=s_cfg)
        assert cfg.sharpen_power == s_want
        gdef, _ = nnx.split(nnx.eval_shape(lambda: DLCMLM(cfg, rngs=nnx.Rngs(0))))

        @jax.jit
        def run(t):
            m = nnx.merge(gdef, nnx.state(uniform_model))
            return m.boundaries(t)[0], m.boundaries(t, rng=key)[1]

        prob, bnd = run(jnp.asarray(x))
        want = np.asarray(jax.random.bernoulli(key, sharpen(prob, s_want)))
        np.testing.assert_array_equal(np.asarray(bnd), want, err_msg=f"R {ratio}, sharpen {s_cfg}")
        for other in (1.0, 6.0, 8.0, 12.0):  # the test tells these powers apart
            if other != s_want:
                assert (np.asarray(jax.random.bernoulli(key, sharpen(prob, other))) != want).any(), other
        draws[ratio, s_cfg] = np.asarray(bnd)
    assert (draws[4.0, 0.0] != draws[8.0, 0.0]).any()
