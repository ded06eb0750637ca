"""Fault tests with real processes (no mocks): `python -m train` children are killed (SIGKILL), preempted
(SIGTERM / SIGINT), given damaged checkpoints, a non-finite learning rate, a read-only run directory and a
file-size limit that fails a save. After each fault, rerunning the same command must end with parameters
bit-identical to one uninterrupted run (CPU).

Kill points are hit deterministically with core/faults.py: LM_FAULT_PAUSE="point@step" makes the child write a
flag file and wait at that point; the test then sends the real signal. The children share a persistent JAX
compilation cache (the uninterrupted reference run fills it), so each rerun costs about the imports plus a
few steps. Tiny configs: d_model 32, 2 layers (DLCM: 1 + 1 + 1), seq 32, 8 steps, one CPU device.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from core.checkpoint import load_model
from core.config import dumps, from_dict
from tests.test_train import _raw

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "decoder": {"arch": "decoder", "d_model": 32, "n_layers": 2, "n_heads": 2, "attn_block": 16},
    "dlcm": {"arch": "dlcm", "d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "d_concept": 32,
             "bb_layers": 1, "bb_heads": 2, "cross_heads": 2, "attn_block": 16},
}
TRAIN = dict(steps=8, checkpoint_every=2, eval_every=4, log_every=2, eval_batches=1, keep_checkpoints=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Configs for both architectures, a shared compile cache, and one uninterrupted reference run per arch
    (started together: the two compile at the same time)."""
    w = tmp_path_factory.mktemp("faults")
    raw = _raw(w, **TRAIN)
    for arch, model in MODELS.items():
        (w / f"{arch}.toml").write_text(dumps(from_dict({**raw, "model": model}, arch)))
    procs = {arch: _start(w, arch, w / f"ref_{arch}") for arch in MODELS}
    for arch, p in procs.items():
        _finish(p, 0)
    return w


def _env(w, pause=None, flag=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": str(w / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("LM_FAULT_PAUSE", None)
    if pause:
        env.update(LM_FAULT_PAUSE=pause, LM_FAULT_FLAG=str(flag))
    return env


def _start(w, arch, run_dir, pause=None, *, fsize=None, extra=()):
    flag = w / f"flag_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "train", str(w / f"{arch}.toml"), "--run-dir", str(run_dir), *extra]
    if fsize is not None:  # a file-size limit stands in for a full disk: writes past it fail with EFBIG
        cmd = [sys.executable, "-c", "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, "
               f"signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
               "os.execv(sys.executable, sys.argv[1:])", *cmd]
    p = subprocess.Popen(cmd, cwd=w, env=_env(w, pause, flag), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    p.flag = flag
    return p


def _finish(p, rc):
    out, err = p.communicate(timeout=600)
    assert p.returncode == rc, (p.returncode, out, err)
    return out, err


def _kill_at(w, arch, run_dir, pause, sig=signal.SIGKILL, rc=-signal.SIGKILL):
    """Start the child, wait until it sits at `pause`, send `sig`; returns (stdout, stderr)."""
    p = _start(w, arch, run_dir, pause)
    deadline = time.monotonic() + 600
    while not p.flag.exists():
        assert p.poll() is None and time.monotonic() < deadline, (pause, p.poll(), p.communicate())
        time.sleep(0.05)
    assert p.flag.read_text().strip() == pause
    p.send_signal(sig)
    return _finish(p, rc)


def _steps(run_dir):
    return sorted(int(x.name) for x in (Path(run_dir) / "checkpoints").iterdir() if x.name.isdigit())


def _params(run_dir):
    _, model, step = load_model(run_dir)
    return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_bit_identical(w, arch, run_dir):
    step_ref, ref = _params(w / f"ref_{arch}")
    step, got = _params(run_dir)
    assert step == step_ref == TRAIN["steps"]
    assert len(ref) == len(got)
    for x, y in zip(ref, got):
        np.testing.assert_array_equal(x, y)


def _largest_file(step_dir, item):
    return max((p for p in (Path(step_dir) / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_decoder_kills_preemption_and_a_cut_checkpoint_resume_bit_identical(world):
    w, run = world, world / "chain_decoder"
    # SIGKILL mid-step (step 3 dispatched; the asynchronous save of step 2 may or may not have committed)
    _kill_at(w, "decoder", run, "step@3")
    assert _steps(run) in ([], [2])
    # SIGKILL inside orbax's asynchronous save of step 4: written, not committed
    _kill_at(w, "decoder", run, "ckpt-write@4")
    assert _steps(run) == [2] and any(".orbax-checkpoint-tmp" in x.name for x in (run / "checkpoints").iterdir())
    # SIGKILL during the validation at step 4
    _kill_at(w, "decoder", run, "eval@4")
    assert _steps(run) == [2]
    # SIGTERM (preemption) mid-step 5: step 5 is saved, one message, exit 128 + 15
    _, err = _kill_at(w, "decoder", run, "step@5", signal.SIGTERM, 128 + signal.SIGTERM)
    assert "stopped by SIGTERM at step 5: checkpoint 5 saved" in err and "rerun the same command" in err, err
    assert "Traceback" not in err
    assert _steps(run) == [2, 4, 5]
    # SIGINT (Ctrl-C) mid-step 7
    _, err = _kill_at(w, "decoder", run, "step@7", signal.SIGINT, 128 + signal.SIGINT)
    assert "stopped by SIGINT at step 7: checkpoint 7 saved" in err and "Traceback" not in err, err
    assert _steps(run) == [2, 4, 5, 6, 7]
    # the newest checkpoint cut short by hand: found, reported in one line, the run falls back to step 6
    victim = _largest_file(run / "checkpoints" / "7", "params")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out, _ = _finish(_start(w, "decoder", run), 0)
    damaged = [x for x in out.splitlines() if "is damaged" in x]
    assert len(damaged) == 1 and "checkpoint 7" in damaged[0] and "bytes" in damaged[0], out
    assert "resuming from step 6" in out and "resumed from step 6" in out, out
    assert (run / "damaged_checkpoints" / "7").is_dir()
    _assert_bit_identical(w, "decoder", run)
    # the metrics of steps logged twice (before a kill and after the resume) appear once
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8, steps


def test_dlcm_kills_preemption_and_an_emptied_checkpoint_resume_bit_identical(world):
    """DLCM's boundary draws are random and keyed by the step: a resume must redraw the same ones."""
    w, run = world, world / "chain_dlcm"
    _kill_at(w, "dlcm", run, "ckpt-write@4")  # (mid-step kills are the decoder chain's; same driver code)
    assert _steps(run) == [2]
    # SIGTERM during validation: the step's regular checkpoint is written, then the run stops
    _, err = _kill_at(w, "dlcm", run, "eval@4", signal.SIGTERM, 128 + signal.SIGTERM)
    assert "stopped by SIGTERM at step 4: checkpoint 4 saved" in err, err
    assert _steps(run) == [2, 4]
    # a file of the newest checkpoint emptied by hand: the run falls back to step 2
    victim = _largest_file(run / "checkpoints" / "4", "train_state")
    victim.write_bytes(b"")
    out, _ = _finish(_start(w, "dlcm", run), 0)
    assert sum("is damaged" in x for x in out.splitlines()) == 1 and "resumed from step 2" in out, out
    _assert_bit_identical(w, "dlcm", run)


# orbax closes its save's event loop with the other writes still in flight when one fails; core/checkpoint.py
# drains them first (without that, a screen of asyncio tracebacks followed the one line).
def test_a_full_disk_during_a_save_is_one_line_and_the_last_good_checkpoint_survives(world):
    w, run = world, world / "disk_full"
    shutil.copytree(w / "ref_decoder", run)
    for s in (6, 8):  # a run that stopped after its step-4 checkpoint
        shutil.rmtree(run / "checkpoints" / str(s))
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    _, err = _finish(_start(w, "decoder", run, fsize=32 * 1024), 1)
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "saving" in lines[0] and "failed" in lines[0], err
    assert "last good checkpoint: step 4" in lines[0], lines
    assert "Traceback" not in err, err
    after = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file() and p in before}
    assert after == before and _steps(run) == [2, 4]
    _finish(_start(w, "decoder", run), 0)  # the disk has room again
    _assert_bit_identical(w, "decoder", run)


def test_a_non_finite_loss_stops_naming_the_step_and_a_sane_rerun_resumes(world):
    """lr 1e9: the warmup's first step has lr 0 (finite, saved), the next ones diverge."""
    w, run = world, world / "diverged"
    _, err = _finish(_start(w, "decoder", run, extra=["train.lr=1e9", "train.checkpoint_every=1"]), 1)
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "non-finite loss" in lines[0] and "at step 3;" in lines[0], err
    assert "checkpoint 2 (the state that diverged) moved to damaged_checkpoints/" in lines[0], lines
    assert "last good checkpoint: step 1" in lines[0], lines
    assert "Traceback" not in err and _steps(run) == [1]
    out, _ = _finish(_start(w, "decoder", run), 0)  # the sane command
    assert "resumed from step 1" in out, out
    # step 1 ran at lr 0 in both runs (the same Adam moments, unchanged parameters): the sane rerun is
    # bit-identical to the uninterrupted sane run
    _assert_bit_identical(w, "decoder", run)


def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(path).rglob("*"))}


def _one_line_exit_2(argv, capsys):
    from train.loop import main
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def test_a_checkpoint_of_another_model_is_refused_and_nothing_is_loaded_or_written(world, capsys, tmp_path):
    from tests.test_train import _hand_checkpoint
    w = world
    # DLCM checkpoints copied into a decoder run (its config.toml says decoder)
    run = tmp_path / "foreign_arch"
    shutil.copytree(w / "ref_decoder", run)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(w / "ref_dlcm" / "checkpoints", run / "checkpoints")
    before = _tree(run)
    line = _one_line_exit_2([w / "decoder.toml", "--run-dir", run], capsys)
    assert "is of a 'dlcm' model; this config is 'decoder': refused" in line, line
    assert _tree(run) == before
    # a decoder checkpoint of another width under a d_model-32 run's config
    cfg48 = from_dict({**_raw(tmp_path, **TRAIN), "model": {**MODELS["decoder"], "d_model": 48}}, "decoder")
    run = tmp_path / "foreign_width"
    _hand_checkpoint(cfg48, run, step=2)
    shutil.copy(w / "ref_decoder" / "config.toml", run / "config.toml")
    before = _tree(run)
    line = _one_line_exit_2([w / "decoder.toml", "--run-dir", run], capsys)
    assert "other settings (d_model=48); this config has d_model=32: refused" in line, line
    assert _tree(run) == before


def _readonly_dir(tmp_path):
    """A directory no write reaches: chmod for a normal user; for root (which ignores modes) a read-only tmpfs
    mount, skipped where mounting is not allowed."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        return d, lambda: d.chmod(0o755)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs")
    return d, lambda: subprocess.run(["umount", str(d)], check=True)


def test_an_unwritable_run_directory_is_one_line_before_anything_is_built(world, tmp_path, capsys):
    d, undo = _readonly_dir(tmp_path)
    try:
        t = time.perf_counter()
        line = _one_line_exit_2([world / "decoder.toml", "--run-dir", d / "run"], capsys)
        assert "is not writable" in line and "writable --run-dir" in line, line
        assert time.perf_counter() - t < 5  # before the corpus, the model or a compile
        assert not (d / "run").exists()
    finally:
        undo()
