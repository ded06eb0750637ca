"""Hugging Face import/export (scripts/hf.py) against the tiny fixtures of scripts/make_hf_fixtures.py.

The fixtures are transformers models (a GQA Llama with Llama-3 rope scaling, untied, in four safetensors
shards; a Qwen2 with q/k/v biases, tied, stored in bf16; a Mamba stack) with the logits transformers computed
for fixed tokens. No torch here: the imported models must reproduce those logits.
"""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.config import load_config
from core.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "hf"
sys.path.insert(0, str(ROOT / "scripts"))
import hf  # noqa: E402

FAMILIES = ("llama", "qwen2", "mamba")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each fixture imported once: name -> run directory."""
    root = tmp_path_factory.mktemp("hf_runs")
    return {name: Path(hf.import_hf(FIX / name, root / name, log=lambda m: None)["run_dir"]) for name in FAMILIES}


def saved_params(run_dir):
    """The params item of step 0 as saved (no model is built: load_model's random init costs seconds)."""
    import orbax.checkpoint as ocp

    from core import checkpoint

    mngr = checkpoint.manager(run_dir, create=False)
    try:
        return mngr.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    finally:
        mngr.close()


def model_of(run_dir, dtype=None):
    """(cfg, model) of an imported run: an abstract model filled with the saved params. What load_model does,
    without its eager random initialisation (seconds per model on 8 host devices)."""
    import dataclasses

    from models.registry import build_model

    cfg = load_config(run_dir / "config.toml")
    if dtype:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model)), nnx.Param)
    nnx.replace_by_pure_dict(params, saved_params(run_dir))
    return cfg, nnx.merge(graphdef, params)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", FAMILIES)
def test_import_matches_transformers_logits(imported, name):
    """Full forward and cached decoding (extend + commit, four tokens at a time) both match."""
    cfg, model = model_of(imported[name], dtype="float32")
    ref = np.load(FIX / name / "expected.npz")
    toks = jnp.asarray(ref["tokens"], jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, toks):
        return nnx.merge(graphdef, state)(toks)[0]

    @jax.jit
    def step_(state, toks, cache):
        m = nnx.merge(graphdef, state)
        logits, cache = m.extend(toks, cache)
        return logits, m.commit(cache, jnp.full((toks.shape[0],), toks.shape[1], jnp.int32))

    assert rel_err(forward(state, toks), ref["logits"]) < 1e-4
    b, n = toks.shape
    cache, steps = model.init_cache(b, 32), []
    for t in range(0, n, 4):  # four tokens at a time through the cache (one compile)
        logits, cache = step_(state, toks[:, t:t + 4], cache)
        steps.append(logits)
    assert rel_err(jnp.concatenate(steps, axis=1), ref["logits"]) < 1e-4


def test_import_keeps_config_and_dtype(imported):
    """bf16 stays bf16; the family's features land in the config; the tokenizer is the fixture's."""
    qcfg = load_config(imported["qwen2"] / "config.toml")
    assert qcfg.model.param_dtype == "bfloat16" and qcfg.model.qkv_bias and qcfg.model.tie_embeddings
    assert saved_params(imported["qwen2"])["embed"]["embedding"].dtype == jnp.bfloat16
    lcfg = load_config(imported["llama"] / "config.toml")
    assert (lcfg.model.rope_scaling, lcfg.model.rope_original_max_len, lcfg.model.n_kv_heads) == ("llama3", 16, 2)
    assert not lcfg.model.tie_embeddings and lcfg.model.param_dtype == "float32"
    mcfg = load_config(imported["mamba"] / "config.toml")
    assert mcfg.model.arch == "mamba" and not mcfg.model.mlp and mcfg.model.dt_rank == 4
    tok = get_tokenizer(lcfg.data)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (300, 0, 1)
    text = "def norm(self):\n    return x ** 0.5  # é ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and int(tok.n_bytes(ids).sum()) == len(text.encode())


def test_import_export_import_is_identity(imported, tmp_path):
    for name in FAMILIES:
        hf.export_hf(imported[name], tmp_path / f"hf_{name}", log=lambda m: None)
        cfg_json = json.loads((tmp_path / f"hf_{name}" / "config.json").read_text())
        assert cfg_json["architectures"] == json.loads((FIX / name / "config.json").read_text())["architectures"]
        hf.import_hf(tmp_path / f"hf_{name}", tmp_path / f"run_{name}", log=lambda m: None)
        assert_trees_equal(saved_params(imported[name]), saved_params(tmp_path / f"run_{name}"))
        ta, tb = (get_tokenizer(load_config(d / "config.toml").data)
                  for d in (imported[name], tmp_path / f"run_{name}"))
        assert (ta.name, ta.eos_id) == (tb.name, tb.eos_id)


def test_resume_from_imported_weights_builds_a_fresh_optimizer(imported):
    """`python -m train` resumes an imported run: step 0 holds params only, so `checkpoint.restore` returns
    the imported parameters with the caller's fresh optimizer state."""
    from core import checkpoint

    want = saved_params(imported["llama"])
    target = {"params": jax.tree.map(jnp.zeros_like, want), "opt": {"mu": jnp.ones(3)}, "step": jnp.zeros((), jnp.int32)}
    mngr = checkpoint.manager(imported["llama"], create=False)
    try:
        assert mngr.latest_step() == 0
        got = checkpoint.restore(mngr, 0, target)
    finally:
        mngr.close()
    assert_trees_equal(got["params"], want)
    assert got["opt"] is target["opt"] and int(got["step"]) == 0


def test_sam_over_text_files_and_speculative_greedy_equals_plain_on_an_imported_bpe_model(imported, tmp_path):
    """decode.build_sam --sources indexes any text files with the imported model's BPE tokenizer; decode.eval
    accepts that automaton for the run (tokenizer checked, no corpus); speculative greedy decoding with it
    (and with pld) emits exactly plain greedy's tokens."""
    from decode.build_sam import build
    from decode.drafters import make_drafter
    from decode.engine import Engine
    from decode.eval import static_automaton

    text = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    for i in range(3):
        (tmp_path / f"doc{i}.py").write_text(text * (i + 1))
    run = imported["llama"]
    sam_dir = build(str(run), sources=[str(tmp_path / "*.py")], out=str(tmp_path / "sam"), log=lambda m: None)
    cfg, model = model_of(run)
    tok = get_tokenizer(cfg.data)
    engine = Engine(model, max_len=cfg.decode.max_len, bos_id=tok.bos_id, pad_id=tok.pad_id, verify_sizes=(4,))
    sam = static_automaton(sam_dir, cfg, tok)
    assert sam.header["tokenizer"] == tok.name and sam.header["corpus_hash"].startswith("files-")
    assert sam.n_tokens == sum(len(tok.encode(text * (i + 1))) + 1 for i in range(3))
    prompt = tok.encode(text[:40])
    plain = engine.generate([prompt, prompt[:7]], max_new_tokens=24, stop_ids=()).tokens
    for name in ("sam", "pld"):
        drafters = [make_drafter(name, vocab_size=tok.vocab_size, static_sam=sam) for _ in range(2)]
        spec = engine.generate_speculative([prompt, prompt[:7]], drafters, max_new_tokens=24, stop_ids=())
        assert [t.tolist() for t in spec.tokens] == [t.tolist() for t in plain]
    assert tok.vocab_size == 300 and tok.name.startswith("hf-")


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------------------------
def _copy(tmp_path, name="llama", tag=""):
    dst = tmp_path / f"src_{name}{tag}"
    shutil.copytree(FIX / name, dst)
    return dst


def _edit_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def _bad(tmp_path, capsys, argv, match):
    out = Path(argv[-1])
    assert hf.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, imported):
    src = _copy(tmp_path)
    _edit_config(src, architectures=["GPT2LMHeadModel"])
    _bad(tmp_path, capsys, ["import", str(src), str(tmp_path / "a")],
         "supported: LlamaForCausalLM, Qwen2ForCausalLM, MambaForCausalLM")

    src = _copy(tmp_path, "qwen2")
    _edit_config(src, intermediate_size=48)
    _bad(tmp_path, capsys, ["import", str(src), str(tmp_path / "b")], "config.json implies [48, 32]")

    src = _copy(tmp_path, "mamba")
    _edit_config(src, vocab_size=200)
    _bad(tmp_path, capsys, ["import", str(src), str(tmp_path / "c")], "tokenizer.json has 300 ids")

    src = _copy(tmp_path, tag="2")
    (src / "model-00002-of-00004.safetensors").unlink()
    _bad(tmp_path, capsys, ["import", str(src), str(tmp_path / "d")], "missing safetensors shard")

    src = tmp_path / "src_llama2"
    shutil.copy(FIX / "llama" / "model-00002-of-00004.safetensors", src)
    shard = src / "model-00003-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    _bad(tmp_path, capsys, ["import", str(src), str(tmp_path / "e")], "cannot read safetensors shard")

    run = tmp_path / "samba_run"
    run.mkdir()
    (run / "config.toml").write_text('name = "s"\n[model]\narch = "samba"\n')
    _bad(tmp_path, capsys, ["export", str(run), str(tmp_path / "f")], "no transformers class")


def test_samba_layer_pattern_without_mlp_is_the_pure_mamba_stack():
    """SAMBA's `pattern = "mamba"`, `mlp = false` builds the `mamba` architecture (the same parameter tree and
    shapes, the same blocks); `pattern = "attention"` has no Mamba layer."""
    from models.mamba_lm import MambaLM, MambaLMConfig
    from models.samba import SambaConfig, SambaLM

    dims = dict(vocab_size=40, d_model=16, n_layers=2, d_state=4, scan_chunk=8)
    samba = nnx.eval_shape(lambda: SambaLM(SambaConfig(pattern="mamba", mlp=False, **dims), rngs=nnx.Rngs(0)))
    mamba = nnx.eval_shape(lambda: MambaLM(MambaLMConfig(**dims), rngs=nnx.Rngs(0)))
    a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (samba, mamba))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.shape, a)) == jax.tree.leaves(jax.tree.map(lambda x: x.shape, b))
    assert all(blk.mlp is None for blk in samba.blocks)  # same parameters, same blocks: the same function
    attn = nnx.eval_shape(lambda: SambaLM(SambaConfig(pattern="attention", window=4, **dims), rngs=nnx.Rngs(0)))
    assert all(type(blk.mixer).__name__ == "SlidingWindowAttention" and blk.mlp is not None for blk in attn.blocks)
    with pytest.raises(ValueError, match="pattern must be one of"):
        SambaConfig(pattern="zigzag").validate()
