import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from train.checkpoint import load_model
from train.config import ConfigError, apply_overrides, dumps, from_dict, load_config
from train.loop import NonFiniteLoss, decay_mask, train

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
    from train.data import Corpus
    from train.tokenizer import get_tokenizer
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
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz; valid keys: steps, seed"):
        load_config(ROOT / "configs" / "decoder_tiny.toml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_config(ROOT / "configs" / "decoder_tiny.toml", ["train.steps=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["steps"])


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path):
    raw = _raw(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(dumps(from_dict(raw, "good")))
    (tmp_path / "bad.toml").write_text("[model\narch=")
    cases = [
        ["missing.toml"],
        [str(tmp_path / "bad.toml")],
        [str(good), "train.nope=1"],
        [str(good), "train.steps=x"],
        [str(good), "steps=3"],
        [str(good), f"data.sources={tmp_path}/none/*.py"],
        [str(good), "model.arch=transformerxl"],
    ]
    for i, args in enumerate(cases):
        run = tmp_path / f"run{i}"
        r = _cli([*args, "--run-dir", str(run)], tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        err = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr, (args, r.stderr)
        assert not run.exists(), args
    # overrides may also follow --run-dir (the bad one is still reported in one line)
    run = tmp_path / "run_after"
    r = _cli([str(good), "--run-dir", str(run), "train.nope=1"], tmp_path)
    err = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
    assert r.returncode == 2 and len(err) == 1 and "nope" in err[0] and not run.exists(), r.stderr
    # a run directory holding another architecture's config is refused and left untouched
    for name, model in {"samba": {"arch": "samba", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 16},
                        "wider": {"arch": "decoder", "d_model": 48, "n_layers": 2, "n_heads": 2}}.items():
        other = tmp_path / f"other_{name}"
        other.mkdir()
        (other / "config.toml").write_text(dumps(from_dict(raw | {"model": model}, name)))
        before = (other / "config.toml").read_text()
        r = _cli([str(good), "--run-dir", str(other)], tmp_path)
        assert r.returncode == 2, r.stderr
        assert ("holds a 'samba' run" if name == "samba" else "different settings") in r.stderr
        assert (other / "config.toml").read_text() == before and sorted(os.listdir(other)) == ["config.toml"]
