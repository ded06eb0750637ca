"""SAMBA and the Mamba family: the chunked scan equals the recurrence, the SWA/Mamba mix is causal with a
windowed prefix, gradients match finite differences, and the pure-Mamba LM's options. The decoding contract
(prefill + decode = forward, rollback, padding, typed constant-size caches, speculation) is checked for every
model in test_contract.py, the sliding-window mixer against a plain reference in test_attention.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.errors import UserError
from models.mamba import Mamba, selective_scan, selective_scan_ref
from models.contract import MambaCache, RingCache
from models.mamba_lm import MambaLM, MambaLMConfig
from models.samba import SambaConfig, SambaLM

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


def tokens(b, l, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, CFG.vocab_size)


def test_cache_is_a_window_ring_and_an_fp32_ssm_state():
    """Layer by layer: the SWA layers hold a W-slot ring (not a full-length buffer, the peers' pitfall) and the
    Mamba layers an fp32 state, also when the compute dtype is bf16."""
    for cfg in (CFG, dataclasses.replace(CFG, dtype="bfloat16")):
        cache = jax.eval_shape(lambda: SambaLM(cfg, rngs=nnx.Rngs(0)).init_cache(B, 1 << 20))
        for i, layer in enumerate(cache.layers):
            if i % 2:  # SWA
                assert isinstance(layer, RingCache)
                assert layer.k.shape == layer.v.shape == (B, W, CFG.kv_heads, CFG.hd)
            else:
                assert isinstance(layer, MambaCache) and layer.ssm.dtype == jnp.float32


def test_chunked_scan_matches_sequential_reference():
    b, l, e, n = 2, 37, 6, 4  # l is not a multiple of the chunk: padded steps must be inert
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (b, l, e))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, e)) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[2], (e, n)))
    Bm, Cm = jax.random.normal(ks[3], (b, l, n)), jax.random.normal(ks[4], (b, l, n))
    h0 = jax.random.normal(ks[5], (b, e, n))
    w_h = jax.random.normal(ks[0], (b, e, n))
    y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, h0)

    def grads(scan):  # of every input, through the outputs y and the final state both
        def loss(*args):
            y, h = scan(*args)
            return jnp.sum(y ** 2) + jnp.sum(h * w_h)
        return jax.jit(jax.grad(loss, tuple(range(6))))(x, dt, A, Bm, Cm, h0)

    g_ref = grads(selective_scan_ref)
    # several chunks, the last one padded; "seq" has a hand-written backward pass (models/mamba.py, _seq_scan)
    for inner, chunk in (("seq", 8), ("assoc", 8), ("seq", 64)):
        scan = functools.partial(selective_scan, chunk=chunk, inner=inner)
        y, h = jax.jit(scan)(x, dt, A, Bm, Cm, h0)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
        for name, a, r in zip(("x", "dt", "A", "B", "C", "h0"), grads(scan), g_ref):
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4, err_msg=f"d/d{name} ({inner}, chunk {chunk})")


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


def test_flops_per_token_counts_attention_within_the_window(model):
    dense = 6.0 * sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)
    swa_layers = CFG.n_layers // 2
    for seq in (4, W, 1024):  # beyond the window, attention costs no more
        attn = 12.0 * swa_layers * min(seq, W) * CFG.n_heads * CFG.hd
        assert model.flops_per_token(seq) == pytest.approx(dense + attn, rel=1e-12)


def test_mamba_lm_is_causal_and_its_mlp_optional():
    """The pure-Mamba LM: blocks without an MLP by default (with one on request), and a prefix changes
    nothing (Mamba layers are causal by nature, so the model does not claim to read one)."""
    small = dict(d_model=16, n_layers=2, d_state=4, scan_chunk=8)
    bare = MambaLM(MambaLMConfig(**small), rngs=nnx.Rngs(0))
    assert bare.blocks[0].mlp is None and not bare.supports_prefix
    with_mlp = MambaLM(MambaLMConfig(**small, mlp=True), rngs=nnx.Rngs(0))
    assert with_mlp.blocks[0].mlp is not None
    assert with_mlp.flops_per_token(64) > bare.flops_per_token(64) == bare.flops_per_token(4096)
    x = tokens(2, 20, seed=11)
    for m in (bare, with_mlp):
        np.testing.assert_array_equal(m(x)[0], m(x, jnp.array([5, 12], jnp.int32))[0])
    for bad in (dict(n_layers=0), dict(dt_min=0.2, dt_max=0.1), dict(scan_inner="fast"), dict(mlp_hidden=-1)):
        with pytest.raises(ValueError):
            MambaLMConfig(**bad).validate()


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
    with pytest.raises(UserError):
        bc.split_spans(spans, 24)
