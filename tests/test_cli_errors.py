"""Every CLI answers a user's mistake with exit status 2, exactly one stderr line starting with
"error: ", no traceback, and nothing written (core.errors.cli). The CLIs' own
checks live here for those outside decode/ (decode's are in tests/test_engine.py); argparse's usage errors
(core.errors.ArgumentParser) are checked here for all of them. The mains run in-process; one test runs
`python -m train` as a subprocess end to end."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from core import checkpoint
from core.config import dumps, from_dict, save_config, to_dict
from models.registry import build_model
from tests.test_train import _raw

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _train_main(argv):
    from train.loop import main
    return main(argv)


MAINS = {"train": lambda: _train_main, **{n: (lambda n=n: _script(n)) for n in (
    "compare", "bench_train", "bench_context", "bench_decode", "bench_sam", "bench_spec", "bench_torch_mamba",
    "transfer_params",
    "convert_checkpoint")}}


def _module_main(module):
    def load():
        return importlib.import_module(module).main
    return load


MAINS.update({m: _module_main(m) for m in ("decode.__main__", "decode.eval", "decode.prompts", "decode.build_sam")})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by every case: a good config, broken ones, and run directories of several kinds."""
    w = tmp_path_factory.mktemp("world")
    raw = _raw(w)
    cfg = from_dict(raw, "good")
    (w / "good.toml").write_text(dumps(cfg))
    (w / "bad.toml").write_text("[model\narch=")
    (w / "bad_value.toml").write_text(dumps(cfg).replace("steps = 8", 'steps = "eight"'))
    (w / "nonempty").mkdir()
    (w / "nonempty" / "notes.txt").write_text("mine\n")
    for name, model in {"samba": {"arch": "samba", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 16},
                        "wider": {"arch": "decoder", "d_model": 48, "n_layers": 2, "n_heads": 2}}.items():
        (w / f"other_{name}").mkdir()
        (w / f"other_{name}" / "config.toml").write_text(dumps(from_dict(raw | {"model": model}, name)))
    # a run whose checkpoint has the layout before "params" became its own item
    old = w / "old_run"
    old.mkdir()
    save_config(cfg, old / "config.toml")
    (old / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    params = nnx.to_pure_dict(nnx.state(build_model(cfg.model, seed=0), nnx.Param))
    mngr = checkpoint.manager(old)
    mngr.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt": optax.adam(1e-3).init(params), "step": jnp.int32(1)}),
        config=ocp.args.JsonSave(to_dict(cfg))))
    mngr.wait_until_finished()
    mngr.close()
    (w / "badmetrics").mkdir()
    save_config(cfg, w / "badmetrics" / "config.toml")
    (w / "badmetrics" / "metrics.jsonl").write_text("{not json\n")
    (w / "export_no_manifest").mkdir()
    (w / "export_no_manifest" / "config.toml").write_text(dumps(cfg))
    return w


# (cli, argv with {w} for the world directory, a phrase the one error line must contain)
CASES = [
    ("train", ["{w}/good.toml", "data.tokenizer=nope", "--run-dir", "{w}/out"], "unknown tokenizer 'nope'; valid: byte"),
    ("train", ["{w}/good.toml", "train.nope=1", "--run-dir", "{w}/out"], "unknown key train.nope"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/out", "train.nope=1"], "unknown key train.nope"),
    ("train", ["{w}/good.toml", "steps=3", "--run-dir", "{w}/out"], "bad override 'steps=3'"),
    ("train", ["{w}/good.toml", "nosection.x=3", "--run-dir", "{w}/out"], "unknown section"),
    ("train", ["{w}/missing.toml", "--run-dir", "{w}/out"], "config file not found"),
    ("train", ["{w}/bad.toml", "--run-dir", "{w}/out"], "cannot parse"),
    ("train", ["{w}/good.toml", "train.steps=x", "--run-dir", "{w}/out"], "train.steps: expected int, got 'x'"),
    ("train", ["{w}/bad_value.toml", "--run-dir", "{w}/out"], "train.steps: expected int"),
    ("train", ["{w}/good.toml", "model.arch=transformerxl", "--run-dir", "{w}/out"], "model.arch must be one of"),
    ("train", ["{w}/good.toml", "model.vocab_size=100", "--run-dir", "{w}/out"], "vocabulary 259"),
    ("train", ["{w}/good.toml", "data.sources={w}/none/*.py", "--run-dir", "{w}/out"], "matched no files"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/nonempty"], "is not empty and holds no config.toml"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/other_samba"], "holds a 'samba' run"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/other_wider"], "different settings (d_model"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/out", "--num-processes", "2"], "need --coordinator"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/out", "--coordinator", "nohostport"], "host:port"),
    ("compare", ["{w}/nothing", "--out", "{w}/out"], "not a finished run directory"),
    ("compare", ["{w}/badmetrics", "--out", "{w}/out"], "not valid JSON"),
    ("bench_train", ["{w}/good.toml", "data.tokenizer=nope", "--out", "{w}/out.json"], "unknown tokenizer"),
    ("bench_train", ["{w}/missing.toml", "--out", "{w}/out.json"], "config file not found"),
    ("bench_train", ["{w}/good.toml", "--steps", "0", "--out", "{w}/out.json"], "--steps and --rounds must be >= 1"),
    ("bench_train", ["{w}/good.toml", "--baseline", "{w}/nothing", "--out", "{w}/out.json"], "not a source tree"),
    ("bench_train", ["{w}/good.toml", "--baseline-config", "{w}/missing.toml", "--out", "{w}/out.json"],
     "missing.toml: no such file"),
    ("bench_context", ["--extrapolation", "{w}/nothing", "--out", "{w}/out.json"], "not a run directory"),
    ("bench_context", ["--extrapolation", "{w}/old_run", "--lengths", "512,768", "--out", "{w}/out.json"],
     "must divide the longest"),
    ("bench_context", ["--extrapolation", "{w}/old_run", "--lengths", "64", "--out", "{w}/out.json"],
     "predates the separate 'params' checkpoint item"),
    ("bench_decode", ["--config", "{w}/missing.toml", "--out", "{w}/out.json"], "config file not found"),
    ("bench_decode", ["--new-tokens", "1", "--out", "{w}/out.json"], "--new-tokens >= 2"),
    ("bench_sam", ["--tokens", "-1", "--out", "{w}/out.json"], "--tokens must be >= 0"),
    ("bench_spec", ["--runs", "{w}/old_run", "--drafters", "pld,eagle", "--out", "{w}/out.json"],
     "unknown drafter 'eagle'"),
    ("bench_spec", ["--out", "{w}/out.json"], "give --runs and/or --configs"),
    ("bench_torch_mamba", ["--new-tokens", "1", "--out", "{w}/out.json"], "--new-tokens >= 2"),
    ("transfer_params", ["export", "{w}/nothing", "{w}/out"], "not a run directory"),
    ("transfer_params", ["export", "{w}/old_run", "{w}/out"], "predates the separate 'params' checkpoint item"),
    ("transfer_params", ["export", "{w}/old_run", "{w}/out", "--dtype", "float7"], "unknown dtype"),
    ("transfer_params", ["import", "{w}/export_no_manifest", "{w}/out"], "not an export"),
    ("transfer_params", ["import", "{w}/nothing", "{w}/out"], "not an export"),
    ("convert_checkpoint", ["{w}/nothing", "{w}/out"], "not a run directory"),
    ("convert_checkpoint", ["{w}/old_run", "{w}/nonempty"], "already exists"),
]
# argparse's own mistakes (unknown flag, missing argument, bad type) are one line too, for every CLI
CASES += [(name, ["--no-such-flag"], "--help)") for name in MAINS
          if name not in ("train", "compare", "convert_checkpoint", "transfer_params") and not name.startswith("decode")]
CASES += [
    ("train", ["{w}/good.toml", "--run-dir", "{w}/out", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("train", [], "the following arguments are required: config"),
    ("compare", [], "the following arguments are required: inputs"),
    ("transfer_params", ["export"], "the following arguments are required"),
    ("convert_checkpoint", ["{w}/old_run"], "the following arguments are required"),
    ("decode.__main__", ["{w}/old_run"], "one of the arguments --prompt --prompts is required"),
    ("decode.__main__", ["{w}/old_run", "--prompt", "x", "--max-new-tokens", "many"], "invalid int value: 'many'"),
    ("decode.eval", [], "the following arguments are required"),
    ("decode.prompts", ["{w}/old_run", "--out", "{w}/p.jsonl", "--no-such-flag"], "unrecognized arguments"),
    ("decode.build_sam", [], "the following arguments are required"),
]
if importlib.util.find_spec("torch") is None:
    CASES.append(("bench_torch_mamba", ["--out", "{w}/out.json"], "needs torch and transformers"))


def _snapshot(root: Path) -> dict:
    """Every path under root (the corpus token cache aside) with its size and mtime."""
    return {str(p.relative_to(root)): (p.is_file() and p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if "cache" not in p.relative_to(root).parts}


@pytest.mark.parametrize("cli,argv,phrase", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_user_error_is_one_line_exit_2_and_writes_nothing(world, cli, argv, phrase, capsys, monkeypatch):
    monkeypatch.chdir(world)
    main = MAINS[cli]()
    before = _snapshot(world)
    capsys.readouterr()
    code = main([a.format(w=world) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], (phrase, lines[0])
    assert "Traceback" not in err
    assert _snapshot(world) == before  # nothing written, nothing changed (outputs absent, run dirs untouched)


def test_python_m_train_unknown_tokenizer_subprocess(tmp_path):
    """End to end: the one-line error is all a user sees, and no run directory appears."""
    (tmp_path / "c.toml").write_text(dumps(from_dict(_raw(tmp_path), "c")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "train", "c.toml", "data.tokenizer=nope"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: [data]: unknown tokenizer 'nope'; valid: byte, hf:PATH"), r.stderr
    assert r.stdout == "" and not (tmp_path / "runs").exists()


def test_non_finite_loss_is_exit_1_not_a_user_error(tmp_path, capsys):
    """A diverged run is not the user's input mistake: one line, exit status 1, the last good checkpoint kept."""
    from train.loop import main

    cfg = from_dict(_raw(tmp_path, steps=30, lr=1e30, warmup_steps=1, grad_clip=1e30, checkpoint_every=1,
                         log_every=1, eval_every=100), "nan")
    (tmp_path / "nan.toml").write_text(dumps(cfg))
    capsys.readouterr()
    code = main([str(tmp_path / "nan.toml"), "--run-dir", str(tmp_path / "run")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 1 and len(err) == 1 and err[0].startswith("error: non-finite loss"), err
    assert (tmp_path / "run" / "checkpoints").is_dir()
