import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.decoder import DecoderConfig, DecoderLM
from models.layers import rope

CFG = DecoderConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16)


@functools.cache
def _model(cfg=CFG):
    """One model per config for the file (nothing mutates it), initialised in one compile, not op by op."""
    return nnx.jit(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))()


def _forward(m):
    """m's full forward, jitted: one compile per input shape (op by op, these tests took minutes)."""
    return jax.jit(lambda x, prefix=None: m(x, prefix))


def _tokens(b, l, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, l)), jnp.int32)


def test_causality_future_tokens_do_not_change_past_logits():
    m = _forward(_model())
    x = _tokens(2, 24)
    base, _ = m(x)
    for t in (0, 7, 22):
        y = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % 256)
        out, _ = m(y)
        np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(base[:, :t + 1]))
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_prefix_lm_mask():
    m = _forward(_model())
    x = _tokens(2, 20)
    prefix = jnp.array([8, 12], jnp.int32)
    base, _ = m(x, prefix)
    for row, p in enumerate([8, 12]):
        # prefix positions depend on later prefix tokens (bidirectional) ...
        y = x.at[row, p - 1].set((x[row, p - 1] + 1) % 256)
        out, _ = m(y, prefix)
        assert not np.allclose(out[row, 0], base[row, 0])
        # ... but never on target tokens
        for t in range(p, 20):
            y = x.at[row, t:].set((x[row, t:] + 3) % 256)
            out, _ = m(y, prefix)
            np.testing.assert_array_equal(np.asarray(out[row, :t]), np.asarray(base[row, :t]))
    # other rows are independent
    y = x.at[1].set((x[1] + 5) % 256)
    out, _ = m(y, prefix)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(base[0]))


def test_causal_and_prefix_agree_on_targets_when_prefix_is_one():
    m = _forward(_model())
    x = _tokens(1, 16)
    a, _ = m(x)
    b, _ = m(x, jnp.array([1], jnp.int32))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_rope_is_relative():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    def score(i, j):
        return float(jnp.sum(rope(q, jnp.array([[i]])) * rope(k, jnp.array([[j]]))))
    assert abs(score(5, 3) - score(105, 103)) < 1e-4
    assert abs(score(5, 3) - score(5, 4)) > 1e-3


def test_flops_per_token_is_dense_plus_attention():
    """6 x the matrix parameters (tied: the embedding is the head's matrix) + 12 L T d_attn, from the config."""
    m = _model()
    d, hd, g, hidden = CFG.d_model, CFG.hd, CFG.kv_heads, CFG.hidden
    per_layer = d * (CFG.n_heads + 2 * g) * hd + CFG.n_heads * hd * d + 3 * d * hidden
    dense = CFG.vocab_size * d + CFG.n_layers * per_layer
    for seq in (64, 1024):
        assert m.flops_per_token(seq) == 6.0 * dense + 12.0 * CFG.n_layers * seq * CFG.n_heads * hd


def test_bf16_compute_agrees_with_fp32():
    """Top-1 agreement and max |Δ log p| (tests/test_bf16.py), bounds that an unrelated model fails; the
    full forward and the cached extend."""
    from tests.test_bf16 import check_bf16

    check_bf16(DecoderLM, CFG, _model(), _tokens(2, 128), 128, "decoder")
