"""Every architecture on a device mesh (issue 16): sharded training, decoding (the Engine and `python -m decode
--mesh`) and checkpoint restore equal one device, DLCM's Global Parser statistics stay global under sharding,
and two processes on localhost (decoder, DLCM), stopped and resumed, equal one.

conftest forces 8 host devices. "dp2_fsdp2_tp2" is the (data=2, fsdp=2, tensor=2) mesh. The configs are tiny
(compile time is the cost); each architecture's training runs (one device and the 8-device mesh, 20 steps)
are shared by the training, decoding and multi-process tests through one module fixture.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core import checkpoint, compile_cache
from core.checkpoint import load_model
from core.config import MeshConfig, dumps, from_dict, save_config
from core.data import Corpus, get_batch, prefix_lengths
from core.mesh import batch_rows_sharding, batch_sharding, cache_shardings, make_mesh, state_shardings
from core.tokenizer import get_tokenizer
from decode.drafters import Drafter
from decode.engine import Engine
from models.registry import build_model
from tests.test_train import _raw
from train.loop import build_trainer, init_model

# The persistent compilation cache (the session's temporary directory, tests/conftest.py): the programs that the
# training fixture compiles are loaded, not compiled again, where a test runs the same step through train(), and
# a resumed two-process run loads those of its first launch.
compile_cache.enable()

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("decoder", "samba", "dlcm", "mamba")
# Tiny models with every layer kind of each architecture, KV heads that tensor=2 splits, a SWA ring that wraps
# (window 8 < seq_len 32), a chunked Mamba scan (4 chunks) and DLCM concepts every few tokens (d_scan < d_model).
MODELS = {
    "decoder": dict(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, attn_block=16),
    "samba": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, window=8, d_state=4,
                  scan_chunk=8),
    "dlcm": dict(d_model=32, n_heads=4, n_kv_heads=2, enc_layers=1, dec_layers=1, d_concept=48, bb_layers=1,
                 bb_heads=2, cross_heads=2, d_scan=16, attn_block=16),
    "mamba": dict(d_model=32, n_layers=1, d_state=4, scan_chunk=8),
}
STEPS = 20
MESHES = {"one": dict(data=1, fsdp=1, tensor=1), "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
          "dp8": dict(data=8, fsdp=1, tensor=1), "fsdp2_tp4": dict(data=1, fsdp=2, tensor=4)}
RTOL = 1e-5  # the target: fp32 losses within 1e-5 relative over 20 steps


def _cfg_raw(arch, tmp_path, **train_kw):
    raw = _raw(tmp_path, steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS, log_every=1, eval_batches=1,
               **train_kw)
    raw["model"] = {"arch": arch, **MODELS[arch]}
    raw["decode"] = {"max_len": 64}
    return raw


def _losses(run_dir, key="loss"):
    return [json.loads(x)[key] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train(raw, mesh_name):
    """STEPS steps of the training loop's own jitted step (train.loop.Trainer) on a mesh: (per-step metrics,
    the final parameters on the host, the model). train() itself runs in the two-process test; here the
    validation and checkpoint compiles are left out (compile time is this file's cost)."""
    cfg = from_dict({**raw, "mesh": MESHES[mesh_name]}, mesh_name)
    mesh = make_mesh(cfg.mesh)
    corpus = Corpus.open(cfg.data, get_tokenizer(cfg.data))
    model = init_model(cfg.model, seed=cfg.train.seed)  # train()'s init: one compile, not op by op
    graphdef, pstate = nnx.split(model, nnx.Param)
    trainer, params = build_trainer(cfg, model, mesh)  # the run's optimizer (DLCM: its muP groups)
    state = trainer.init_state(params)
    rows = batch_sharding(mesh)
    metrics = []
    for step in range(STEPS):
        kw = dict(seed=cfg.train.seed, step=step, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len)
        state, m = trainer.train_step(state, jax.device_put(get_batch(corpus.train, **kw), rows),
                                      jax.device_put(prefix_lengths(**kw), rows))
        metrics.append(m)
    metrics = {k: [float(m[k]) for m in metrics] for k in jax.device_get(metrics[0])}
    params = jax.device_get(state["params"])
    nnx.replace_by_pure_dict(pstate, params)
    return metrics, params, nnx.merge(graphdef, pstate)  # the trained model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """arch -> {"raw", "base", "one", "dp2_fsdp2_tp2"}: the same STEPS training steps on one device and on the
    8-device mesh, (metrics, final parameters, model) each (trained once per module)."""
    done = {}

    def get(arch):
        if arch not in done:
            base = tmp_path_factory.mktemp(arch)
            raw = _cfg_raw(arch, base)
            done[arch] = {"raw": raw, "base": base, **{name: _train(raw, name) for name in ("one", "dp2_fsdp2_tp2")}}
        return done[arch]

    return get


# ---- 1. training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_training_matches_one_device(arch, runs):
    """dp2 x fsdp2 x tp2 on 8 devices: the same 20 losses as one device (fp32, 1e-5 relative) and final
    parameters; DLCM also the same boundary rate and parser loss at every step."""
    r = runs(arch)
    one, sharded = r["one"][0], r["dp2_fsdp2_tp2"][0]
    a, b = one["loss"], sharded["loss"]
    assert len(a) == len(b) == STEPS
    assert a[-1] < a[0] - 0.5  # it trains
    np.testing.assert_allclose(b, a, rtol=RTOL)
    np.testing.assert_allclose(sharded["grad_norm"], one["grad_norm"], rtol=1e-4)
    if arch == "dlcm":
        for key in ("boundary_rate", "parser_aux"):
            np.testing.assert_allclose(sharded[key], one[key], rtol=RTOL, atol=1e-7)
    for x, y in zip(jax.tree.leaves(r["dp2_fsdp2_tp2"][1]), jax.tree.leaves(r["one"][1])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_dlcm_parser_statistics_are_global_under_sharding():
    """F (boundary rate) and G (mean boundary probability) of the Global Parser loss are means over the whole
    batch, also when the batch is split over data x fsdp and the shards have very different boundary rates
    (rows of one repeated byte close almost no concept; random bytes close many). A per-shard loss averaged over
    the shards (what a pmap-style data parallelism would compute) differs from the global one here."""
    from models.dlcm import parser_loss

    cfg_model = from_dict({"model": {"arch": "dlcm", **MODELS["dlcm"]}}, "t").model
    model = init_model(cfg_model, seed=0)
    gdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    toks = np.repeat(rng.integers(0, 256, (8, 1)), 32, axis=1)  # rows 2..7: one byte repeated
    toks[:2] = rng.integers(0, 256, (2, 32))  # rows 0, 1 (the first data x fsdp shard): random bytes
    key = jax.random.key(3)

    def fwd(state, toks):
        m = nnx.merge(gdef, state)
        _, aux = m(toks, rng=key)
        p, bnd = m.boundaries(toks, rng=key)  # the same draws as the forward's
        return aux, p, bnd

    aux1, p, bnd = jax.jit(fwd)(state, jnp.asarray(toks))
    mesh = make_mesh(MeshConfig(**MESHES["dp2_fsdp2_tp2"]))
    state8 = jax.tree.unflatten(jax.tree.structure(state),
                                jax.device_put(jax.tree.leaves(state), state_shardings(state, mesh)))
    toks8 = jax.device_put(toks, batch_rows_sharding(toks, mesh))
    aux8, p8, bnd8 = jax.jit(fwd)(state8, toks8)
    assert toks8.sharding.spec[0] == ("data", "fsdp") and len(toks8.addressable_shards) == 8

    p, bnd = np.asarray(p, np.float64), np.asarray(bnd, np.float64)
    np.testing.assert_array_equal(np.asarray(bnd8), bnd)
    shard_f = bnd.reshape(4, -1).mean(1)  # per data x fsdp shard (2 rows each)
    shard_g = p.reshape(4, -1).mean(1)
    assert shard_f.max() - shard_f.min() > 0.3, shard_f
    f, g = bnd.mean(), p.mean()
    global_loss = parser_loss(f, g, cfg_model.target_ratio)
    per_shard = np.mean([parser_loss(a, b, cfg_model.target_ratio) for a, b in zip(shard_f, shard_g)])
    assert abs(global_loss - per_shard) > 0.01, (global_loss, per_shard)  # >> the 1e-5 tolerance below
    for aux in (aux1, aux8):
        np.testing.assert_allclose(float(aux["boundary_rate"]), f, rtol=1e-6)
        np.testing.assert_allclose(float(aux["boundary_prob"]), g, rtol=1e-5)
        np.testing.assert_allclose(float(aux["parser_aux"]), global_loss, rtol=1e-5, atol=1e-6)


# ---- 2. decoding ------------------------------------------------------------------------------------------
class NoisyOracle(Drafter):
    """Drafts the known greedy continuation with a wrong tail at random: accepted, rejected and empty drafts."""

    def __init__(self, ref, seed):
        super().__init__()
        self.ref, self.rng, self.pos = np.asarray(ref, np.int32), np.random.default_rng(seed), 0

    def reset(self, prompt):
        self.pos = 0

    def accept(self, tokens):
        self.pos += len(tokens)

    def draft(self, k):
        n = int(self.rng.integers(0, k + 1))
        good = int(self.rng.integers(0, n + 1))
        d = self.ref[self.pos:self.pos + n].copy()
        d[good:] = (d[good:] + 1) % 256
        return d


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_decoding_matches_one_device(arch, runs):
    """The model trained on 8 devices, decoded on one device and on the dp2 x fsdp2 x tp2 mesh (parameters
    over fsdp/tensor, cache rows over data x fsdp, KV heads / Mamba channels over tensor): the same greedy
    tokens, plain and speculative."""
    r = runs(arch)
    model = r["dp2_fsdp2_tp2"][2]
    text = (sorted(Path(r["raw"]["data"]["sources"][0]).parent.glob("*.py"))[0]).read_bytes()
    prompts = [list(text[i:i + n]) for i, n in ((0, 5), (40, 11), (90, 3), (200, 8))]
    kw = dict(max_len=64, verify_sizes=(0, 4))
    one = Engine(model, **kw)
    mesh = make_mesh(MeshConfig(**MESHES["dp2_fsdp2_tp2"]))
    sharded = Engine(model, mesh=mesh, **kw)
    ref = one.generate(prompts, max_new_tokens=16, stop_ids=())
    plain = sharded.generate(prompts, max_new_tokens=16, stop_ids=())
    spec = sharded.generate_speculative(prompts, [NoisyOracle(t, i) for i, t in enumerate(ref.tokens)],
                                        max_new_tokens=16, stop_ids=())
    assert len({tuple(t) for t in ref.tokens}) > 1  # not one degenerate continuation
    for r, p, s in zip(ref.tokens, plain.tokens, spec.tokens):
        np.testing.assert_array_equal(p, r)
        np.testing.assert_array_equal(s, r)
    assert sum(spec.steps) < sum(plain.steps)  # drafts were accepted
    # where things live: parameters split over fsdp / tensor, the cache over rows (and KV heads / channels)
    assert any(x.sharding.spec and "tensor" in jax.tree.leaves(tuple(x.sharding.spec)) for x in sharded.params)
    assert any(x.sharding.spec and "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) for x in sharded.params)
    req = sharded._prepare(prompts, max_new_tokens=2, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids=(),
                           batch_size=None)
    cache = sharded._start(req)[0].cache
    want = cache_shardings(cache, mesh)
    for x, sh in zip(jax.tree.leaves(cache), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(sh, x.ndim), (x.shape, x.sharding, sh)
    assert cache.lengths.sharding.spec[0] == ("data", "fsdp")
    heads = [sh.spec for sh in jax.tree.leaves(want) if "tensor" in jax.tree.leaves(tuple(sh.spec))]
    assert heads  # KV heads (attention) or channels (Mamba) split over tensor


def _params_only_run(path, raw, params, step=STEPS):
    """A run directory (config.toml + a checkpoint of the "params" item only, as scripts/hf.py writes it)."""
    import orbax.checkpoint as ocp

    from core.config import to_dict

    cfg = from_dict(raw, "cli_mesh")
    Path(path).mkdir(parents=True)
    save_config(cfg, Path(path) / "config.toml")
    mngr = checkpoint.manager(path)
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             config=ocp.args.JsonSave(to_dict(cfg))))
    mngr.wait_until_finished()
    mngr.close()


def test_decode_cli_mesh_flag_gives_the_one_device_tokens(runs, tmp_path, capsys, monkeypatch):
    """`python -m decode RUN --mesh data=2,tensor=2` (the [mesh] axes): the parameters restored into their
    shardings, the same greedy tokens as one device, plain and with --drafter sam; a bad mesh spec is one
    line, exit 2."""
    import decode.engine
    from decode.__main__ import main

    engines = []
    real = decode.engine.engine_for_run
    monkeypatch.setattr(decode.engine, "engine_for_run", lambda *a, **k: engines.append(real(*a, **k)) or
                        engines[-1])
    r = runs("decoder")
    run = tmp_path / "run"
    _params_only_run(run, r["raw"], r["dp2_fsdp2_tp2"][1])
    text = "x = 1\nx = 1\nif x:\n    x ="  # repeats: sam drafts from them
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": text[i:]}) + "\n" for i in (0, 3, 12, 20)))
    common = [str(run), "--prompts", str(prompts), "--max-new-tokens", "12", "--batch-size", "4"]

    def tokens(*extra):
        out = tmp_path / "o.jsonl"
        assert main([*common, "--out", str(out), *extra]) == 0
        return [json.loads(x)["tokens"] for x in out.read_text().splitlines()]

    one = tokens()
    assert len({tuple(t) for t in one}) > 1 and all(len(t) == 12 for t in one)
    assert tokens("--mesh", "data=2,tensor=2") == one
    spec = tokens("--mesh", "data=2,fsdp=2,tensor=2", "--drafter", "sam", "--max-draft", "2", "--rule", "paper")
    assert spec == one
    meshes = [None if e.mesh is None else dict(e.mesh.shape) for _, _, e in engines]
    assert meshes == [None, dict(data=2, fsdp=1, tensor=2), dict(data=2, fsdp=2, tensor=2)]
    specs = {a for x in engines[2][2].params for a in jax.tree.leaves(tuple(x.sharding.spec))}
    assert {"fsdp", "tensor"} <= specs  # the parameters were restored sharded
    capsys.readouterr()
    for bad, match in (("data=2,tensr=2", "'tensr=2' is not axis=size"), ("data=two", "not an integer"),
                       ("data=2,data=2", "given twice"), ("data=0", "mesh sizes must be"),
                       ("data=16", "needs 16 devices")):
        assert main([*common, "--mesh", bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], (bad, err)


# ---- 3. checkpoint portability ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_restores_across_meshes(arch, tmp_path):
    """A training state (parameters, AdamW moments, step) saved on one mesh restores on another with identical
    values and the target mesh's shardings: 8 -> 1, 1 -> 8 and dp8 -> fsdp2 x tp4; load_model (parameters
    only, for decoding) 1 -> 8 likewise (8 -> 1 in test_two_processes_on_localhost_match_one_device)."""
    cfg = from_dict({"model": {"arch": arch, **MODELS[arch]}, "train": {"steps": 4}}, arch)
    model = nnx.eval_shape(lambda: build_model(cfg.model, seed=0))  # shapes and logical axes only
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(1)
    fill = lambda x: rng.normal(size=x.shape).astype(x.dtype)  # noqa: E731  (numpy: no eager compiles)
    params = jax.tree.map(fill, abstract)
    tx = build_trainer(cfg, model, make_mesh(MeshConfig(**MESHES["one"])))[0].tx  # the run's (DLCM: muP groups)
    opt = jax.tree.map(fill, jax.eval_shape(tx.init, abstract))  # AdamW moments (and counts) of any value
    saved = {"params": params, "opt": opt, "step": np.int32(3)}

    def shardings(name):
        mesh = make_mesh(MeshConfig(**MESHES[name]))
        return mesh, build_trainer(cfg, model, mesh)[0].state_shardings()

    for src, dst in (("dp2_fsdp2_tp2", "one"), ("one", "dp2_fsdp2_tp2"), ("dp8", "fsdp2_tp4")):
        run = tmp_path / f"{src}_to_{dst}"
        _, sh = shardings(src)
        state = jax.device_put(saved, sh)
        mngr = checkpoint.manager(run)
        checkpoint.save(mngr, 3, state, cfg)
        mngr.wait_until_finished()
        save_config(cfg, run / "config.toml")
        mesh, sh = shardings(dst)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, sh)
        got = checkpoint.restore(mngr, 3, target)
        mngr.close()
        flat_got, flat_sh, flat_want = jax.tree.leaves(got), jax.tree.leaves(sh), jax.tree.leaves(saved)
        assert len(flat_got) == len(flat_want)
        for x, s, w in zip(flat_got, flat_sh, flat_want):
            assert x.sharding.is_equivalent_to(s, x.ndim), (src, dst, x.sharding, s)
            np.testing.assert_array_equal(np.asarray(x), w)
        if src != "one":
            continue
        _, m, _ = load_model(run, mesh=mesh)  # parameters only, for decoding
        for x, w, s in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param))),
                           jax.tree.leaves(saved["params"]), jax.tree.leaves(sh["params"])):
            assert x.sharding.is_equivalent_to(s, x.ndim)
            np.testing.assert_array_equal(np.asarray(x), w)


def test_imported_weights_resume_sharded(runs, tmp_path):
    """A run that holds only parameters at step 0 (scripts/hf.py's import) trains from those parameters on the
    dp2 x fsdp2 x tp2 mesh: restored into their shardings with a fresh optimizer. The first step's learning
    rate is 0 (warmup), so its checkpoint holds exactly the imported values (a fresh initialisation would not)."""
    from train.loop import train

    r = runs("decoder")
    raw = {**r["raw"], "mesh": MESHES["dp2_fsdp2_tp2"]}
    raw["train"] = {**raw["train"], "stop_after": 1}  # the fixture's train_step program: a compile-cache hit
    imported = jax.tree.map(lambda x: np.asarray(x) + 0.5, r["one"][1])  # unlike any initialisation
    _params_only_run(tmp_path / "run", raw, imported, step=0)
    summary = train(from_dict(raw, "import"), tmp_path / "run", log=lambda *_: None)
    assert summary["start_step"] == 0 and summary["final_step"] == 1
    _, model, step = load_model(tmp_path / "run")
    assert step == 1
    for x, w in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))), jax.tree.leaves(imported)):
        np.testing.assert_array_equal(np.asarray(x), w)


# ---- 4. multi-host ----------------------------------------------------------------------------------------
def _launch(tmp_path, run_dir, n_proc, extra=()):
    """`python -m train c.toml` in n_proc processes started together (4 host devices each); their outputs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(ROOT), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}
    procs = [subprocess.Popen([sys.executable, "-m", "train", "c.toml", "--run-dir", run_dir, *extra],
                              cwd=tmp_path, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(n_proc)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


STOP = 12  # the two-process run stops (checkpoint) here and a second launch resumes it


@pytest.mark.parametrize("arch", ("decoder", "dlcm"))
def test_two_processes_on_localhost_match_one_device(arch, runs):
    """jax.distributed over two local processes x 4 devices (coordinator and process id from the environment,
    the process count from the config) on the dp2 x fsdp2 x tp2 mesh, each process reading its half of the
    batch, stopped at step STOP and resumed by a second launch from the checkpoint both processes wrote: the
    one-device losses over all STEPS steps (DLCM: also its parser loss and boundary rate); every checkpoint
    carries a manifest of both processes' files; the final checkpoint loads on one device in this process
    with the one-device parameters."""
    r = runs(arch)
    base = r["base"]
    cfg = from_dict({**r["raw"], "mesh": {**MESHES["dp2_fsdp2_tp2"], "num_processes": 2}}, f"{arch}_mp")
    (base / "c.toml").write_text(dumps(cfg))
    run = base / "multi"
    _launch(base, "multi", 2, [f"train.stop_after={STOP}"])
    assert checkpoint.good_steps(run) == [STOP] and len(_losses(run)) == STOP
    outs = _launch(base, "multi", 2)
    assert f"resumed from step {STOP}" in outs[0], outs[0]
    assert checkpoint.good_steps(run) == [STOP, STEPS]
    for step in (STOP, STEPS):  # the manifest (written by process 0) covers the files of both processes
        step_dir = run / "checkpoints" / str(step)
        files = json.loads((step_dir / checkpoint.MANIFEST).read_text())["files"]
        assert set(files) == set(checkpoint._files(step_dir)) and checkpoint.verify(step_dir) is None
    one, _, model = r["one"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, STEPS + 1))
    np.testing.assert_allclose(_losses(run), one["loss"], rtol=RTOL)
    if arch == "dlcm":
        for key in ("parser_aux", "boundary_rate"):
            np.testing.assert_allclose(_losses(run, key), one[key], rtol=RTOL, atol=1e-7)
    # the checkpoint that both processes wrote (8 devices) is complete: it loads on one device in this process
    _, m_multi, step = load_model(run)
    assert step == STEPS
    for x, y in zip(jax.tree.leaves(nnx.state(m_multi, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
