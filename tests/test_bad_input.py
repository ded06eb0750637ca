"""The bad-input corpus: configs, CLI arguments and data that a user can get wrong. Every case must end with
exit status 2 and exactly one stderr line "error: ..." that names the problem (`problem`) and what would be
valid (`valid`), with no traceback, and nothing written in the world directory (core.errors.cli).

This extends tests/test_cli_errors.py (argparse usage errors, run-directory mix-ups, every script's own checks)
and tests/test_engine.py (the engine's request checks): the cases here are not repeated there. The mains run
in-process (the same code path as `python -m ...`, minus the interpreter start); a few run as real
subprocesses. Data cases train nothing: they fail before the model is built.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.checkpoint import manager, save
from core.config import dumps, from_dict, save_config
from tests.test_train import _raw

ROOT = Path(__file__).resolve().parents[1]
DLCM = {"arch": "dlcm", "d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "d_concept": 32,
        "bb_layers": 1, "bb_heads": 2, "cross_heads": 2, "attn_block": 16}
SAMBA = {"arch": "samba", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 16}
MAMBA = {"arch": "mamba", "d_model": 32, "n_layers": 2}


def _make_run(path, raw):
    """config.toml + one checkpoint (step 1) of a random model: enough for the decode CLIs' checks."""
    from models.registry import build_model
    from train.loop import make_optimizer

    cfg = from_dict(raw, "bad_input_run")
    path.mkdir(parents=True)
    save_config(cfg, path / "config.toml")
    lm = build_model(cfg.model, seed=0)
    params = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    mngr = manager(path)
    save(mngr, 1, {"params": params, "opt": make_optimizer(cfg.train, lm.decay_mask(params)).init(params),
                   "step": jnp.int32(1)}, cfg)
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("bad_input")
    raw = _raw(w)
    raw["decode"] = {"max_len": 64, "max_new_tokens": 8}
    (w / "good.toml").write_text(dumps(from_dict(raw, "good")))
    for name, model in {"dlcm": DLCM, "samba": SAMBA, "mamba": MAMBA}.items():
        (w / f"{name}.toml").write_text(dumps(from_dict({**raw, "model": model}, name)))
    good = dumps(from_dict(raw, "good"))
    (w / "unknown_section.toml").write_text(good + "\n[optim]\nlr = 1.0\n")
    (w / "unknown_model_key.toml").write_text(good.replace("[model]\n", "[model]\nlayers = 3\n"))
    (w / "no_arch.toml").write_text(good.replace('arch = "decoder"\n', ""))
    (w / "dup_key.toml").write_text(good.replace("[train]\n", "[train]\nsteps = 3\n"))
    (w / "latin1.toml").write_bytes(good.encode() + b"\n# caf\xe9\n")
    (w / "not_a_table.toml").write_text('data = 3\n[model]\narch = "decoder"\nd_model = 32\nn_layers = 1\nn_heads = 2\n')
    _make_run(w / "run", raw)
    # prompts files
    (w / "p_good.jsonl").write_text('{"id": "a", "prompt": "x = 1\\n"}\n')
    (w / "p_plain.txt").write_text("def f(x):\n    return x\n")
    (w / "p_array.jsonl").write_text('["x = 1"]\n')
    (w / "p_noprompt.jsonl").write_text('{"id": 1, "text": "x = 1"}\n')
    (w / "p_empty.jsonl").write_text("")
    (w / "p_blank.jsonl").write_text("\n  \n\n")
    (w / "p_negid.jsonl").write_text('{"id": "n", "tokens": [5, -3]}\n')
    (w / "p_strtok.jsonl").write_text('{"id": "s", "tokens": ["a", "b"]}\n')
    (w / "p_long.jsonl").write_text(json.dumps({"id": "long", "tokens": list(range(100))}) + "\n")
    # static automata whose headers name another corpus / another tokenizer (checked before the arrays load)
    from decode.sam import FORMAT_VERSION
    for name, header in {"sam_other_corpus": {"tokenizer": "byte-v1", "corpus_hash": "0" * 32},
                         "sam_other_tok": {"tokenizer": "bpe-32k", "corpus_hash": "0" * 32}}.items():
        (w / name).mkdir()
        (w / name / "header.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **header}))
    # data
    (w / "empty_src").mkdir()
    for i in range(3):
        (w / "empty_src" / f"e{i}.py").write_bytes(b"")
    (w / "file.txt").write_text("not a directory\n")
    return w


# (cli, argv with {w} for the world directory, problem phrase, valid phrase)
T = ["{w}/good.toml", "--run-dir", "{w}/out"]
CASES = [
    # ---- configs: unknown keys and sections, wrong types --------------------------------------------------
    ("train", ["{w}/unknown_section.toml", "--run-dir", "{w}/out"], "unknown section [optim]", "valid: model, data"),
    ("train", ["{w}/unknown_model_key.toml", "--run-dir", "{w}/out"], "unknown key model.layers", "valid keys: arch"),
    ("train", [*T, "model.n_layer=3"], "unknown key model.n_layer", "valid keys:"),
    ("train", [*T, "decode.beam=4"], "unknown key decode.beam", "valid keys: max_len"),
    ("train", ["{w}/no_arch.toml", "--run-dir", "{w}/out"], "got None", "model.arch must be one of"),
    ("train", ["{w}/dup_key.toml", "--run-dir", "{w}/out"], "cannot parse", "overwrite"),
    ("train", ["{w}/latin1.toml", "--run-dir", "{w}/out"], "cannot parse", "utf-8"),
    ("train", ["{w}/not_a_table.toml", "--run-dir", "{w}/out"], "data = 3", "must be a table [data]"),
    ("train", [*T, "model.d_model=big"], "model.d_model: expected int, got 'big'", "expected int"),
    ("train", [*T, "model.d_model=32.5"], "model.d_model: expected int, got 32.5", "expected int"),
    ("train", [*T, "model.tie_embeddings=1"], "model.tie_embeddings: expected bool, got 1", "expected bool"),
    ("train", [*T, "train.lr=fast"], "train.lr: expected float, got 'fast'", "expected float"),
    ("train", [*T, "data.sources=3"], "data.sources: expected a list of str, got 3", "list of str"),
    ("train", [*T, "train.seed=true"], "train.seed: expected int, got True", "expected int"),
    # ---- configs: negative or zero sizes, out-of-range values ---------------------------------------------
    ("train", [*T, "model.d_model=0"], "positive", "must be"),
    ("train", [*T, "model.n_layers=-1"], "positive", "must be"),
    ("train", [*T, "model.n_heads=0"], "positive", "must be"),
    ("train", [*T, "data.seq_len=1"], "data.seq_len", "must be >= 2"),
    ("train", [*T, "data.batch_size=0"], "data.batch_size", ">= 1"),
    ("train", [*T, "train.steps=0"], "train.steps", "must be >= 1; got 0"),
    ("train", [*T, "train.eval_batches=0"], "train.eval_batches", "must be >= 1; got 0"),
    ("train", [*T, "train.keep_checkpoints=0"], "train.keep_checkpoints", "must be >= 1; got 0"),
    ("train", [*T, "train.lr=-0.001"], "lr", "must be > 0; got -0.001"),
    ("train", [*T, "train.warmup_steps=-1"], "warmup_steps", "must be >= 0; got -1"),
    ("train", [*T, "train.grad_clip=0"], "grad_clip", "must be > 0; got 0.0"),
    ("train", [*T, "train.b2=1.0"], "b2", "must be in [0, 1); got 1.0"),
    ("train", [*T, "train.weight_decay=-0.1"], "weight_decay", "must be >= 0"),
    ("train", [*T, "train.min_lr_ratio=2"], "min_lr_ratio", "must be in [0, 1]; got 2.0"),
    ("train", [*T, "train.stop_after=-3"], "stop_after", "must be >= 0; got -3"),
    ("train", [*T, "data.val_fraction=1.5"], "data.val_fraction", "must be in (0, 1); got 1.5"),
    ("train", [*T, "train.objective=mlm"], "'mlm'", "must be 'causal' or 'prefix'"),
    ("train", [*T, "decode.max_len=0"], "max_len", "must be >= 1; got 0"),
    ("train", [*T, "decode.top_p=0"], "top_p", "must be in (0, 1]; got 0.0"),
    ("train", [*T, "decode.temperature=-1"], "temperature", "must be >= 0"),
    ("train", [*T, "decode.top_k=-2"], "top_k", "must be >= 0"),
    ("train", [*T, "mesh.data=0"], "mesh sizes", "must be >= 1, with at most one -1"),
    ("train", [*T, "mesh.fsdp=-1"], "mesh sizes", "at most one -1"),
    # ---- configs: shapes that do not fit together ---------------------------------------------------------
    ("train", [*T, "model.d_model=30", "model.n_heads=4"], "d_model (30)", "must be divisible by n_heads (4)"),
    ("train", [*T, "model.n_kv_heads=3", "model.n_heads=2"], "n_heads (2)", "multiple of n_kv_heads (3)"),
    ("train", [*T, "model.head_dim=7"], "head_dim", "must be even for RoPE; got 7"),
    ("train", ["{w}/samba.toml", "--run-dir", "{w}/out", "model.window=128"], "model.window 128",
     "valid: window <= max_len"),
    ("train", ["{w}/samba.toml", "--run-dir", "{w}/out", "model.window=0"], "window", "positive"),
    ("train", ["{w}/dlcm.toml", "--run-dir", "{w}/out", "model.target_ratio=1.0"], "target_ratio",
     "must be > 1; got 1.0"),
    ("train", ["{w}/dlcm.toml", "--run-dir", "{w}/out", "model.target_ratio=0.5"], "target_ratio",
     "must be > 1; got 0.5"),
    ("train", ["{w}/dlcm.toml", "--run-dir", "{w}/out", "model.cross_heads=3"], "d_model (32)",
     "divisible by cross_heads (3)"),
    ("train", ["{w}/mamba.toml", "--run-dir", "{w}/out", "model.d_state=0"], "d_state", "positive"),
    ("train", ["{w}/mamba.toml", "--run-dir", "{w}/out", "model.scan_inner=fast"], "'fast'",
     "must be 'auto', 'assoc' or 'seq'"),
    ("train", ["{w}/mamba.toml", "--run-dir", "{w}/out", "model.dt_min=0.5", "model.dt_max=0.1"], "0.5, 0.1",
     "need 0 < dt_min <= dt_max"),
    ("train", [*T, "model.dtype=float8"], "unknown dtype 'float8'", "valid: ["),
    ("train", [*T, "model.param_dtype=int8"], "unknown dtype 'int8'", "valid: ["),
    ("train", ["{w}/good.toml", "data.tokenizer=gpt2", "--run-dir", "{w}/out"], "unknown tokenizer 'gpt2'",
     "valid: byte"),
    ("train", [*T, "model.arch=gpt"], "got 'gpt'", "model.arch must be one of decoder, dlcm, mamba, samba"),
    # ---- CLI arguments ------------------------------------------------------------------------------------
    ("train", [*T, "model.=3"], "bad override 'model.=3'", "expected section.key=value"),
    ("train", [*T, ".steps=3"], "unknown section ''", "valid: model"),
    ("train", ["{w}/good.toml", "--run-dir", "{w}/file.txt/run"], "cannot be created", "is not a directory"),
    ("decode.__main__", ["{w}/no_such_run", "--prompt", "x"], "no such run directory", "no_such_run"),
    ("decode.__main__", ["{w}/run", "--prompt", "a" * 100], "100 prompt tokens do not fit", "max_len"),
    ("decode.__main__", ["{w}/run", "--prompt", "x", "--max-new-tokens", "-4"], "max_new_tokens", "must be a positive integer"),
    ("decode.__main__", ["{w}/run", "--prompt", "x", "--temperature", "-1"], "temperature", ">= 0"),
    ("decode.__main__", ["{w}/run", "--prompt", "x", "--top-p", "1.5"], "top_p", "(0, 1]"),
    ("decode.__main__", ["{w}/run", "--prompt", "x", "--step", "7"], "no checkpoint at step 7", "available: [1]"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_plain.txt", "--out", "{w}/o.jsonl"], "p_plain.txt:1",
     "not a JSON object"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_array.jsonl", "--out", "{w}/o.jsonl"], "got list",
     "expected a JSON object with \"prompt\""),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_noprompt.jsonl", "--out", "{w}/o.jsonl"],
     "p_noprompt.jsonl:1", "expected a string \"prompt\" (or a list \"tokens\")"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_empty.jsonl", "--out", "{w}/o.jsonl"], "holds no prompts",
     "p_empty.jsonl"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_blank.jsonl", "--out", "{w}/o.jsonl"], "holds no prompts",
     "p_blank.jsonl"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_missing.jsonl", "--out", "{w}/o.jsonl"],
     "cannot read prompts file", "No such file"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_negid.jsonl", "--out", "{w}/o.jsonl"],
     "prompt id 'n': token id -3", "out of range [0, 259)"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_strtok.jsonl", "--out", "{w}/o.jsonl"], "\"tokens\"",
     "must be a list of integer ids"),
    ("decode.__main__", ["{w}/run", "--prompts", "{w}/p_long.jsonl", "--out", "{w}/o.jsonl"],
     "prompt id 'long': 100 prompt tokens", "do not fit"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--drafter", "magic"],
     "unknown drafter 'magic'", "valid: none, pld"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--drafter", "pld,nope"],
     "unknown drafter 'nope'", "valid: none, pld"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--max-new-tokens", "-1"],
     "max_new_tokens", "must be a positive integer"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--repeats", "0"],
     "--repeats", "must be >= 1; got 0"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--max-draft", "0"],
     "--max-draft", "must be >= 1; got 0"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--drafter", "sam",
                     "--sam", "{w}/sam_other_corpus"], "built from corpus '0000", "expected corpus"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--drafter", "sam",
                     "--sam", "{w}/sam_other_tok"], "tokenizer 'bpe-32k'", "the model uses 'byte-v1'"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--drafter", "sam",
                     "--sam", "{w}/no_sam"], "no suffix automaton", "build one with"),
    ("decode.eval", ["{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--step", "3"],
     "no checkpoint at step 3", "available: [1]"),
    ("decode.build_sam", ["{w}/run", "--max-tokens", "-1", "--out", "{w}/sam"], "--max-tokens", "must be >= 0"),
    ("decode.build_sam", ["{w}/nothing_here", "--out", "{w}/sam"], "no such run directory or config file",
     "nothing_here"),
    ("decode.prompts", ["{w}/good.toml", "--out", "{w}/p.jsonl", "--n", "0"], "--n", "must be >= 1"),
    # ---- data ---------------------------------------------------------------------------------------------
    ("train", [*T, "data.sources={w}/empty_src/*.py"], "empty training split", "3 files"),
    ("train", [*T, "data.sources={w}/src/*.rs"], "matched no files", "data.sources"),
]


def _main(name):
    import importlib
    if name == "train":
        from train.loop import main
        return main
    return importlib.import_module(name).main


def _snapshot(root: Path) -> dict:
    """Every path under root with its size and mtime (the corpus token cache aside: it is a cache)."""
    return {str(p.relative_to(root)): (p.is_file() and p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if "cache" not in p.relative_to(root).parts}


def _check(world, cli, argv, problem, valid, capsys, monkeypatch):
    monkeypatch.chdir(world)
    main = _main(cli)
    before = _snapshot(world)
    capsys.readouterr()
    code = main([a.format(w=world) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert problem in lines[0] and valid in lines[0], (problem, valid, lines[0])
    assert "Traceback" not in err
    assert _snapshot(world) == before
    cache = world / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("cli,argv,problem,valid", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, cli, argv, problem, valid, capsys, monkeypatch):
    _check(world, cli, argv, problem, valid, capsys, monkeypatch)


def test_an_unreadable_file_in_the_glob_is_one_line(world, tmp_path, capsys, monkeypatch):
    """A file the process cannot read (chmod 000 for a normal user; for root, which reads anything, a link to
    /proc/self/mem, whose reads fail with EIO) among readable ones: one line, and no partial token cache."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"ok{i}.py").write_text("x = 1\n" * 50)
    bad = src / "locked.py"
    if os.geteuid() != 0:
        bad.write_text("secret\n")
        bad.chmod(0)
    else:
        bad.symlink_to("/proc/self/mem")
    argv = [str(world / "good.toml"), "--run-dir", str(tmp_path / "out"), f"data.sources={src}/*.py",
            f"data.cache_dir={tmp_path}/cache"]
    from train.loop import main
    capsys.readouterr()
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot read the corpus" in lines[0] and "locked.py" in lines[0], lines
    assert "must be readable" in lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name != "cache"]  # no partial token cache


def test_files_that_are_not_utf8_are_taken_by_the_byte_tokenizer(tmp_path):
    """Not an error: latin-1, binary and cut UTF-8 files are bytes to the byte tokenizer, kept exactly."""
    from core.data import Corpus
    from core.tokenizer import get_tokenizer

    src = tmp_path / "bytes_src"
    src.mkdir()
    blobs = [b"caf\xe9 = 1\n" * 20, bytes(range(256)) * 4, "naïve".encode()[:-1] * 30]
    for i, b in enumerate(blobs):
        (src / f"f{i}.py").write_bytes(b)
    raw = _raw(tmp_path)
    raw["data"].update(sources=[str(src / "*.py")], val_fraction=0.01)
    cfg = from_dict(raw, "bytes")
    corpus = Corpus.open(cfg.data, get_tokenizer("byte"))
    toks = np.concatenate([np.asarray(corpus.train), np.asarray(corpus.val)])
    assert len(toks) == sum(map(len, blobs)) + 3  # every byte, one EOS per file
    for b in blobs:
        ids = np.frombuffer(b, np.uint8)
        assert any(np.array_equal(toks[i:i + len(ids)], ids) for i in np.flatnonzero(toks == ids[0]))


SUBPROCESS_CASES = [
    (["-m", "train", "{w}/good.toml", "model.n_heads=0", "--run-dir", "{w}/out"], "positive"),
    (["-m", "decode", "{w}/run", "--prompts", "{w}/p_noprompt.jsonl", "--out", "{w}/o.jsonl"],
     "expected a string \"prompt\""),
    (["-m", "decode.eval", "{w}/run", "--prompts", "{w}/p_good.jsonl", "--out", "{w}/e.json", "--drafter", "x"],
     "unknown drafter 'x'"),
]


@pytest.mark.parametrize("argv,phrase", SUBPROCESS_CASES, ids=["train", "decode", "decode.eval"])
def test_real_processes_print_one_line_and_exit_2(world, argv, phrase):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    before = _snapshot(world)
    r = subprocess.run([sys.executable, *[a.format(w=world) for a in argv]], cwd=world, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], r.stderr
    assert r.stdout == "" and _snapshot(world) == before
