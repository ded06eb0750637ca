import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from core import checkpoint
from core.checkpoint import load_model
from core.config import apply_overrides, dumps, from_dict, load_config, to_dict
from core.errors import UserError
from core.tokenizer import ByteTokenizer
from models.contract import decay_mask
from models.registry import build_model
from train import loop
from train.loop import NonFiniteLoss, Trainer, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]


def _corpus(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "x", "y", "(", ")", ":"]
    for i in range(40):
        lines = [" ".join(rng.choice(words, 6)) for _ in range(30)]
        (src / f"f{i}.py").write_text("\n".join(lines) + "\n")
    return src


def _raw(tmp_path: Path, **train_kw) -> dict:
    src = _corpus(tmp_path)
    return {
        "model": {"arch": "decoder", "d_model": 32, "n_layers": 2, "n_heads": 2, "attn_block": 16},
        "data": {"sources": [str(src / "*.py")], "seq_len": 32, "batch_size": 8, "val_fraction": 0.2,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 2, "eval_every": 4,
                  "eval_batches": 2, "checkpoint_every": 4, **train_kw},
    }


def test_loss_falls_well_below_unigram_entropy(tmp_path):
    raw = _raw(tmp_path, steps=120, lr=1e-2, warmup_steps=10, eval_every=120, checkpoint_every=120, log_every=40)
    cfg = from_dict(raw, "t")
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    from core.data import Corpus
    from core.tokenizer import get_tokenizer
    corpus = Corpus.open(cfg.data, get_tokenizer("byte"))
    counts = np.bincount(np.asarray(corpus.train), minlength=259).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram_bits = float(-(p * np.log2(p)).sum())
    assert summary["val_bpb"] < 0.6 * unigram_bits, (summary["val_bpb"], unigram_bits)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "loss" in r for r in lines) and any("val_bpb" in r for r in lines)


def test_resume_is_bit_identical(tmp_path):
    full = from_dict(_raw(tmp_path), "t")
    train(full, tmp_path / "a", log=lambda *_: None)
    half = from_dict(_raw(tmp_path, stop_after=4), "t")
    train(half, tmp_path / "b", log=lambda *_: None)
    logs = []
    summary = train(full, tmp_path / "b", log=logs.append)
    assert summary["start_step"] == 4 and any("resumed from step 4" in x for x in logs)
    _, ma, sa = load_model(tmp_path / "a")
    _, mb, sb = load_model(tmp_path / "b")
    assert sa == sb == 8
    for x, y in zip(jax.tree.leaves(nnx.state(ma, nnx.Param)), jax.tree.leaves(nnx.state(mb, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = from_dict(_raw(tmp_path, steps=30, lr=1e30, warmup_steps=1, grad_clip=1e30, checkpoint_every=1,
                         log_every=1, eval_every=100), "t")
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        train(cfg, tmp_path / "run", log=lambda *_: None)
    _, model, step = load_model(tmp_path / "run")
    assert step >= 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_weight_decay_mask_skips_norms_and_vectors():
    """models.contract.decay_mask, which the models' decay_mask defaults to."""
    mask = decay_mask({"blk": {"norm": {"scale": np.ones(4)}, "mlp": {"kernel": np.ones((4, 4))},
                               "mix": {"A_log": np.ones((4, 2)), "D": np.ones(4)}}})
    assert mask == {"blk": {"norm": {"scale": False}, "mlp": {"kernel": True},
                            "mix": {"A_log": False, "D": False}}}


def test_config_overrides_types_and_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "decoder_tiny.toml", ["train.steps=7", "train.lr=1e-3",
                                                                "model.tie_embeddings=false", "data.sources=a.py,b.py"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.model.tie_embeddings is False
    assert cfg.data.sources == ("a.py", "b.py")
    (tmp_path / "config.toml").write_text(dumps(cfg))
    assert load_config(tmp_path / "config.toml") == cfg
    with pytest.raises(UserError, match=r"unknown key train\.stepz; valid keys: steps, seed"):
        load_config(ROOT / "configs" / "decoder_tiny.toml", ["train.stepz=3"])
    with pytest.raises(UserError, match=r"train\.steps: expected int, got 'many'"):
        load_config(ROOT / "configs" / "decoder_tiny.toml", ["train.steps=many"])
    with pytest.raises(UserError, match="expected section.key=value"):
        apply_overrides({}, ["steps"])




def _tiny_cfg(tmp_path, **data_kw):
    raw = _raw(tmp_path)
    raw["data"].update(data_kw)
    raw["mesh"] = {"data": 1}
    return from_dict(raw, "t")


def test_optimizer_decays_exactly_what_the_models_mask_says(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    model = build_model(cfg.model, seed=0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = model.decay_mask(params)
    flat_mask = jax.tree.leaves(mask)
    assert any(flat_mask) and not all(flat_mask)  # matrices decay, norm scales do not
    tx = make_optimizer(cfg.train, mask)
    opt = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)

    @jax.jit  # one program (op-by-op dispatch of the update over every leaf was most of this test's time)
    def three_updates(opt, new):
        for _ in range(3):  # the warmup starts at lr 0; with zero gradients only weight decay moves a parameter
            updates, opt = tx.update(zeros, opt, new)
            new = optax.apply_updates(new, updates)
        return new

    new = three_updates(opt, params)
    for m, old, cur in zip(flat_mask, jax.tree.leaves(params), jax.tree.leaves(new)):
        if m:
            assert not np.array_equal(np.asarray(old), np.asarray(cur))
        else:
            np.testing.assert_array_equal(np.asarray(old), np.asarray(cur))


class _PairTokenizer(ByteTokenizer):
    """A test tokenizer whose non-special ids each stand for two bytes."""

    name = "pairs-test"
    bytes_per_id = np.array([2] * 256 + [0] * 3, np.int32)


@pytest.mark.parametrize("tokenizer,per_byte", [("byte", 1), ("pairs", 2)])
def test_eval_counts_bytes_with_the_tokenizers_table(tmp_path, monkeypatch, tokenizer, per_byte):
    """Bits per byte divide by the tokenizer's byte count: specials (EOS) count 0, other ids what the table says."""
    from core import tokenizer as tokenizer_mod
    from core.mesh import make_mesh, param_shardings

    monkeypatch.setitem(tokenizer_mod.TOKENIZERS, "pairs", _PairTokenizer)
    cfg = _tiny_cfg(tmp_path, tokenizer=tokenizer)
    model = build_model(cfg.model, seed=0)
    graphdef, _ = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, graphdef, make_optimizer(cfg.train, model.decay_mask(params)), mesh,
                      param_shardings(model, mesh), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                 params))
    trainer.build_steps()
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (4, 17)).astype(np.int32)
    batch[0, 5] = batch[1, 9] = batch[2, 16] = 257  # EOS as a target three times, and as an input
    batch[3, 0] = 257  # only an input (position 0 is never a target)
    nll, n_bytes = trainer.eval_step(params, batch)
    assert float(n_bytes) == per_byte * (4 * 16 - 3)
    assert np.isfinite(float(nll)) and float(nll) > 0


def _old_names(tree):
    """Parameter names as checkpoints had them before the model contract (attention blocks: attn, attn_norm)."""
    names = {"mixer": "attn", "mixer_norm": "attn_norm"}
    if isinstance(tree, dict):
        return {names.get(k, k): _old_names(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [_old_names(v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return tree


def _hand_checkpoint(cfg, run_dir, step=3, *, old_layout=False, old_names=False):
    """A run directory with one checkpoint, written directly with orbax, of a model after one optimizer step
    (non-zero Adam moments). `old_layout` writes the items of the layout before "params" was its own item
    ("state" + "config"), `old_names` the parameter names of that time. Returns the state (today's names)."""
    from core.config import save_config

    model = nnx.jit(lambda: build_model(cfg.model, seed=1))()  # one compile, not hundreds of eager ops
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(cfg.train, model.decay_mask(params))

    @jax.jit
    def two_steps(params):
        opt = tx.init(params)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
        for _ in range(2):
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
        return params, opt

    params, opt = two_steps(params)
    state = {"params": params, "opt": opt, "step": jnp.int32(step)}
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.toml")
    mngr = checkpoint.manager(run_dir)
    if old_layout:
        written = _old_names(state) if old_names else state
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(written),
                                                config=ocp.args.JsonSave(to_dict(cfg))))
    else:
        checkpoint.save(mngr, step, state, cfg)
    mngr.wait_until_finished()
    mngr.close()
    return state


def test_load_model_restores_params_without_building_an_optimizer(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    saved = _hand_checkpoint(cfg, tmp_path / "run")["params"]

    def no_optimizer(*a, **k):
        raise AssertionError("load_model built an optimizer")

    for name in ("adamw", "adam", "chain", "masked"):
        monkeypatch.setattr(optax, name, no_optimizer)
    monkeypatch.setattr(loop, "make_optimizer", no_optimizer)
    got_cfg, model, step = load_model(tmp_path / "run")
    assert step == 3 and got_cfg == cfg
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_core_and_loading_a_model_import_nothing_from_train_or_decode(tmp_path):
    """core/ is the layer below train/ and decode/: importing all of it and loading a model pulls in neither."""
    cfg = _tiny_cfg(tmp_path)
    _hand_checkpoint(cfg, tmp_path / "run")
    code = ("import sys; import core.errors, core.tokenizer, core.config, core.data, core.mesh, core.checkpoint; "
            "core.checkpoint.load_model(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('train', 'decode')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def _tree_snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def test_old_layout_checkpoint_is_refused_with_one_line(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    run = tmp_path / "old"
    _hand_checkpoint(cfg, run, old_layout=True)
    before = _tree_snapshot(run)
    with pytest.raises(UserError) as e:
        load_model(run)
    msg = str(e.value)
    assert "\n" not in msg and "predates" in msg and "'params'" in msg and "retrain" in msg, msg
    # resuming training from it is refused the same way, before anything in the run directory is written
    with pytest.raises(UserError, match="predates"):
        train(cfg, run, log=lambda *_: None)
    assert _tree_snapshot(run) == before


@pytest.mark.parametrize("old_names", [True, False], ids=["pre-contract-names", "todays-names"])
def test_convert_checkpoint_rewrites_an_old_run_losslessly(tmp_path, old_names):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    cfg = _tiny_cfg(tmp_path)
    saved = _hand_checkpoint(cfg, tmp_path / "old", old_layout=True, old_names=old_names)
    before = _tree_snapshot(tmp_path / "old")
    assert convert.main([str(tmp_path / "old"), str(tmp_path / "new")]) == 0
    assert _tree_snapshot(tmp_path / "old") == before  # the old run is only read
    _, model, step = load_model(tmp_path / "new")
    assert step == 3
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(saved["params"])
    for x, y in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    mngr = checkpoint.manager(tmp_path / "new", create=False)
    zeros = jax.tree.map(jnp.zeros_like, saved)
    state = checkpoint.restore(mngr, 3, zeros)
    mngr.close()
    assert jax.tree.structure(state) == jax.tree.structure(saved)
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(state)):  # Adam's moments and counts included
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
