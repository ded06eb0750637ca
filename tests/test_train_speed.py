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
