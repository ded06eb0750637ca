"""Training speed without changed numerics (issue 13): the chunked causal attention equals the dense masked
attention, the train state does not make the second step compile again, and the persistent compilation
cache goes where it is told (never into the user's cache from the test suite)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import compile_cache
from models import attention
from models.attention import causal_attention, causal_mask, masked_attention
from models.contract import full_positions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("window", [0, 12])
def test_chunked_causal_attention_equals_the_dense_masked_attention(monkeypatch, window):
    monkeypatch.setattr(attention, "Q_CHUNKS", 3)  # chunks of 14, 14 and 12 queries (a short last one)
    monkeypatch.setattr(attention, "Q_CHUNK_MIN", 8)
    b, l, h, g, d = 2, 40, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, l, h, d))
    k = jax.random.normal(ks[1], (b, l, g, d))
    v = jax.random.normal(ks[2], (b, l, g, d))
    ct = jax.random.normal(ks[3], (b, l, h, d))
    pos = full_positions(b, l)

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), (0, 1, 2)))(q, k, v)

    dense = value_and_grads(lambda q, k, v: masked_attention(q, k, v, causal_mask(pos, None, window)))
    chunked = value_and_grads(lambda q, k, v: causal_attention(q, k, v, pos, window=window))
    for a, e in zip(jax.tree.leaves(chunked), jax.tree.leaves(dense)):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


def test_second_train_step_reuses_the_first_steps_compilation():
    from core.config import from_dict
    from scripts.profile_train import setup  # the profiler's and the benchmark's setup: the real train step

    cfg = from_dict({"model": {"arch": "decoder", "d_model": 16, "n_layers": 1, "n_heads": 2, "attn_block": 16},
                     "data": {"sources": ["x"], "seq_len": 8, "batch_size": 8}}, "t")
    _, tr, state, toks, pre = setup(cfg)
    for _ in range(3):
        state, m = tr.train_step(state, toks, pre)
    jax.block_until_ready(m)
    assert tr.train_step._cache_size() == 1  # an uncommitted step counter made step 2 compile again


def test_compile_cache_directory_env_and_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LMARCH_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache.default_dir() == str(tmp_path / "env")
    monkeypatch.setenv("LMARCH_COMPILE_CACHE", "off")
    assert compile_cache.default_dir() is None
    monkeypatch.delenv("LMARCH_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "lmarch" / "jax")


def test_the_suite_keeps_out_of_the_users_cache():
    d = os.environ.get("LMARCH_COMPILE_CACHE", "")
    assert d and not Path(d).resolve().is_relative_to(Path.home() / ".cache"), d  # conftest's temporary dir


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    """The persistent cache really holds CPU executables: a rerun of the same program hits it."""
    code = ("import sys, jax, jax.numpy as jnp; from core import compile_cache; "
            "print(compile_cache.enable(sys.argv[1])); "
            "from jax._src import monitoring; hits = []; "
            "monitoring.register_event_listener(lambda e, **k: hits.append(e) if 'cache_hits' in e else None); "
            "jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready(); print(len(hits))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    run = lambda: subprocess.run([sys.executable, "-c", code, str(tmp_path / "jc")], env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=120)
    first, second = run(), run()
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split()[0] == str(tmp_path / "jc")
    assert first.stdout.split()[-1] == "0" and int(second.stdout.split()[-1]) >= 1, (first.stdout, second.stdout)
    assert any(p.name.endswith("-cache") for p in (tmp_path / "jc").iterdir())


# ---- the faster layers equal their plain definitions, values and gradients ------------------------------------
def _vjp(fn, *args, seed=7):
    """(value, gradient of sum(value * random cotangent)) of fn at args."""
    out, pull = jax.vjp(fn, *args)
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    ct = jax.tree.unflatten(tree, [jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, leaves)])
    return out, pull(ct)


def test_split_heads_backward_is_the_cotangents_in_place():
    from models.layers import split_heads

    y = jax.random.normal(jax.random.key(0), (2, 3, 2, 5, 4))
    got = _vjp(lambda y: list(split_heads(y, (3, 1, 1), 3)), y)
    want = _vjp(lambda y: [y[:, :, :, :3], y[:, :, :, 3:4], y[:, :, :, 4:]], y)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, e)


def test_silu_mul_value_and_gradient_equal_swiglus_definition():
    from models.layers import silu_mul

    gu = 3 * jax.random.normal(jax.random.key(1), (4, 6, 2, 16))
    got = _vjp(silu_mul, gu)
    want = _vjp(lambda gu: jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], gu)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-5)


def test_dense_keeps_nnx_linears_parameters_and_computes_x_at_w():
    """Checkpoints and the HF import rely on the names and the init; the product is a plain x @ W."""
    from flax import nnx

    from models.layers import dense

    ours = dense(12, 20, ("embed", "mlp"), rngs=nnx.Rngs(3), dtype=jnp.float32, param_dtype=jnp.float32, scale=0.5)
    init = nnx.initializers.variance_scaling(0.25, "fan_in", "truncated_normal")
    lin = nnx.Linear(12, 20, use_bias=False, rngs=nnx.Rngs(3), kernel_init=init)
    a, b = nnx.to_pure_dict(nnx.state(ours, nnx.Param)), nnx.to_pure_dict(nnx.state(lin, nnx.Param))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    np.testing.assert_array_equal(a["kernel"], b["kernel"])
    x = jax.random.normal(jax.random.key(2), (3, 5, 12))
    w = a["kernel"]
    graph = nnx.split(ours, nnx.Param)[0]
    y, (dx, dw) = _vjp(lambda x, w: nnx.merge(graph, {"kernel": w})(x), x, w)
    y_ref, (dx_ref, dw_ref) = _vjp(lambda x, w: jnp.einsum("bld,dn->bln", x, w), x, w)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64), atol=1e-5, rtol=1e-5)
    for a, e in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


def _plain_decoder_loss(p, tokens_BxL1, *, r: int, eps: float = 1e-5, base: float = 10000.0):
    """The decoder's next-token loss written from the equations with plain jnp on the parameter dict
    (pre-RMSNorm blocks, GQA with half-split RoPE, causal softmax, SwiGLU, tied head), differentiated by JAX."""
    x_in, y = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    emb = p["embed"]["embedding"]
    x = emb[x_in]
    b, l, _ = x.shape
    rms = lambda x, s: x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * s  # noqa: E731
    pos = jnp.arange(l, dtype=jnp.float32)

    def rot(t):  # [B, L, heads, hd]
        half = t.shape[-1] // 2
        ang = pos[:, None] * base ** (-jnp.arange(half, dtype=jnp.float32) / half)
        c, s = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
        return jnp.concatenate([t[..., :half] * c - t[..., half:] * s, t[..., half:] * c + t[..., :half] * s], -1)

    for i in sorted(p["blocks"]):
        blk = p["blocks"][i]
        h = rms(x, blk["mixer_norm"]["scale"])
        w = blk["mixer"]["qkv_proj"]["kernel"]  # [D, G, R + 2, hd]: group g's R query heads, its key, its value
        g, hd = w.shape[1], w.shape[3]
        q = jnp.einsum("bld,dgrh->blgrh", h, w[:, :, :r]).reshape(b, l, g * r, hd)
        k = jnp.einsum("bld,dgh->blgh", h, w[:, :, r])
        v = jnp.einsum("bld,dgh->blgh", h, w[:, :, r + 1])
        q, k = rot(q), rot(k)
        k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)  # query head n reads KV head n // r
        s = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(hd)
        s = jnp.where(jnp.tril(jnp.ones((l, l), bool)), s, -jnp.inf)
        o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v).reshape(b, l, g * r * hd)
        x = x + o @ blk["mixer"]["o"]["kernel"]
        h = rms(x, blk["mlp_norm"]["scale"])
        gu = blk["mlp"]["gate_up"]["kernel"]
        x = x + (jax.nn.silu(h @ gu[:, 0]) * (h @ gu[:, 1])) @ blk["mlp"]["down"]["kernel"]
    logits = rms(x, p["final_norm"]["scale"]) @ emb.T
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[..., None], -1))


def test_decoder_loss_and_gradients_equal_a_plain_reference():
    """The whole forward and backward (flattened products, split and silu_mul gradients, chunked attention)
    against JAX's derivative of the plain definition, on every parameter."""
    from flax import nnx

    from models.decoder import DecoderConfig, DecoderLM

    cfg = DecoderConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    model = nnx.jit(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))()  # one compile, not op by op
    graph, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    toks = jax.random.randint(jax.random.key(5), (2, 81), 0, 61)  # L 80: two query chunks (64 + 16)

    def ours(p):
        logits, _ = nnx.merge(graph, p)(toks[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[:, 1:, None], -1))

    # both jitted: one compile each (op by op, eager dispatch of the forward and backward took minutes)
    got = jax.jit(jax.value_and_grad(ours))(params)
    want = jax.jit(jax.value_and_grad(lambda p: _plain_decoder_loss(p, toks, r=2)))(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want[1])[0])
    for path, a in jax.tree_util.tree_flatten_with_path(got[1])[0]:
        e = flat_want[path]
        np.testing.assert_allclose(a, e, atol=2e-5 * float(np.abs(e).max()), rtol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("arch", ["decoder", "samba"])
def test_init_model_is_build_model_compiled(arch):
    """One compiled init: the same parameter tree and values (to an ulp) as the eager build, and the same
    non-parameter state."""
    from flax import nnx

    from core.config import from_dict
    from models.registry import build_model
    from train.loop import init_model

    m = {"arch": arch, "d_model": 16, "n_layers": 2, "n_heads": 2}
    cfg = from_dict({"model": m, "data": {"sources": ["x"], "seq_len": 8, "batch_size": 2}}, "t").model
    a, b = nnx.state(init_model(cfg, seed=3)), nnx.state(build_model(cfg, seed=3))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(x, y, rtol=3e-7, atol=1e-7)


def test_rope_rotation_gradient_is_the_inverse_rotation():
    from models.layers import rotate_half

    ks = jax.random.split(jax.random.key(4), 2)
    x = jax.random.normal(ks[0], (2, 5, 3, 8))
    ang = jax.random.uniform(ks[1], (2, 5, 1, 4), maxval=6.0)
    fn = lambda f: lambda x: f(x, jnp.cos(ang), jnp.sin(ang))  # noqa: E731
    plain = lambda x, c, s: jnp.concatenate([x[..., :4] * c - x[..., 4:] * s, x[..., 4:] * c + x[..., :4] * s], -1)  # noqa: E731
    for a, e in zip(jax.tree.leaves(_vjp(fn(rotate_half), x)), jax.tree.leaves(_vjp(fn(plain), x))):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-6)
