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
