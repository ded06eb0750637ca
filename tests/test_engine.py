"""The plain decoding engine: cache equivalences, greedy vs naive, padding, compiles, stops, bad input,
prefix-LM prefill, and the `python -m decode` CLI."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.tokenizer import get_tokenizer
from decode.engine import Engine
from models.decoder import DecoderConfig, DecoderLM

TOK = get_tokenizer("byte")
MAX_LEN = 96
ROWS = 4  # multi-row tests pad to this batch, so they share the module engine's compiles


@pytest.fixture(scope="module")
def model():
    return DecoderLM(DecoderConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16),
                     rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, max_len=MAX_LEN, bos_id=TOK.bos_id, stop_ids=(TOK.eos_id,))


def prompts(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).astype(np.int32) for n in lengths]


_FORWARDS = {}


def naive_greedy(model, prompt, n, *, prefix=False):
    """Recompute the whole sequence for every token through the training forward, no cache.

    The sequence is right-padded to MAX_LEN (one compile); the mask is causal, so the logits at the last
    real token do not see the padding. With `prefix`, every forward reads the prompt as a bidirectional
    prefix (prefix_len_B = prompt length), as a prefix LM was trained.
    """
    if id(model) not in _FORWARDS:
        _FORWARDS[id(model)] = (jax.jit(lambda t: model(t)[0]), jax.jit(lambda t, plen: model(t, plen)[0]))
    causal, with_prefix = _FORWARDS[id(model)]
    seq = [int(t) for t in prompt] or [TOK.bos_id]
    plen = jnp.array([len(seq)], jnp.int32)
    fwd = (lambda t: with_prefix(t, plen)) if prefix else causal
    out = []
    for _ in range(n):
        buf = np.zeros((1, MAX_LEN), np.int32)
        buf[0, :len(seq) + len(out)] = seq + out
        out.append(int(jnp.argmax(fwd(jnp.asarray(buf))[0, len(seq) + len(out) - 1])))
    return out


def until_eos(tokens):
    return tokens[:tokens.index(TOK.eos_id) + 1] if TOK.eos_id in tokens else tokens


def split_fns(model):
    graphdef, params = nnx.split(model)

    @jax.jit
    def extend_commit(params, tokens, cache, n):
        m = nnx.merge(graphdef, params)
        logits, cache = m.extend(tokens, cache)
        return logits, m.commit(cache, n)

    return params, extend_commit


def test_extend_prompt_then_tokens_equals_full_forward(model):
    seq = prompts(40, seed=1)[0]
    full = np.asarray(model(jnp.asarray(seq[None]))[0])[0]
    params, ec = split_fns(model)
    cache = model.init_cache(1, 64)
    # Prefill a right-padded bucket of 32 holding 23 prompt tokens, then one token at a time.
    bucket = np.zeros((1, 32), np.int32)
    bucket[0, :23] = seq[:23]
    logits, cache = ec(params, bucket, cache, jnp.array([23]))
    got = [np.asarray(logits)[0, :23]]
    for t in seq[23:]:
        logits, cache = ec(params, jnp.array([[t]]), cache, jnp.array([1]))
        got.append(np.asarray(logits)[0])
    np.testing.assert_allclose(np.concatenate(got), full, rtol=0, atol=2e-5)
    assert int(cache.lengths[0]) == 40


def test_commit_fewer_than_extended_equals_never_seeing_the_rest(model):
    seq = prompts(12, seed=2)[0]
    params, ec = split_fns(model)
    a = model.init_cache(2, 64)
    b = model.init_cache(2, 64)
    _, a = ec(params, np.stack([seq[:8], seq[:8]]), a, jnp.array([8, 5]))
    _, b = ec(params, np.stack([seq[:8], seq[:8]]), b, jnp.array([8, 5]))
    # a: four tokens, of which row 0 keeps 1 and row 1 keeps 3; b: only the kept ones.
    junk = np.array([[seq[8], 7, 9, 11], [seq[5], seq[6], seq[7], 200]], np.int32)
    _, a = ec(params, junk, a, jnp.array([1, 3]))
    _, b = ec(params, np.array([[seq[8], 0, 0, 0], [seq[5], seq[6], seq[7], 0]], np.int32), b,
              jnp.array([1, 3]))
    nxt = np.array([[seq[9], seq[10]], [seq[8], seq[9]]], np.int32)
    la, a = ec(params, nxt, a, jnp.array([2, 2]))
    lb, b = ec(params, nxt, b, jnp.array([2, 2]))
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=0, atol=1e-6)
    full = np.asarray(model(jnp.asarray(seq[None, :11]))[0])[0]
    np.testing.assert_allclose(np.asarray(la)[0], full[9:11], rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(la)[1], full[8:10], rtol=0, atol=2e-5)


def test_greedy_equals_naive_recompute(model, engine):
    ps = prompts(5, 17, 1)
    res = engine.generate(ps, max_new_tokens=12, stop_ids=(), batch_size=ROWS)
    for p, got in zip(ps, res.tokens):
        assert got.tolist() == naive_greedy(model, p, 12)
    assert res.steps == [11, 11, 11] and res.mat == 1.0


def test_empty_prompt_decodes_from_bos(engine):
    a = engine.generate([[]], max_new_tokens=6, stop_ids=())
    b = engine.generate([[TOK.bos_id]], max_new_tokens=6, stop_ids=())
    assert a.tokens[0].tolist() == b.tokens[0].tolist()


def test_padded_batch_equals_each_prompt_alone(engine):
    ps = prompts(3, 20, 9, 14, seed=3)
    for kw in ({}, {"temperature": 0.9, "top_k": 40, "top_p": 0.95}):
        seeds = [5, 6, 7, 8]
        batch = engine.generate(ps, max_new_tokens=10, seed=seeds, stop_ids=(), batch_size=ROWS, **kw)
        for p, s, got in zip(ps, seeds, batch.tokens):
            alone = engine.generate([p], max_new_tokens=10, seed=[s], stop_ids=(), **kw)
            assert got.tolist() == alone.tokens[0].tolist()
    # Sampling is reproducible for a fixed seed and differs across seeds.
    a = engine.generate(ps[:1], max_new_tokens=10, seed=[1], temperature=1.0)
    b = engine.generate(ps[:1], max_new_tokens=10, seed=[1], temperature=1.0)
    c = engine.generate(ps[:1], max_new_tokens=10, seed=[2], temperature=1.0)
    assert a.tokens[0].tolist() == b.tokens[0].tolist() != c.tokens[0].tolist()


def test_one_compile_per_bucket_and_none_for_lengths_or_sampling(model):
    eng = Engine(model, max_len=MAX_LEN, bos_id=TOK.bos_id)
    for n in (17, 20, 32, 25):  # one bucket: 32
        eng.generate(prompts(n, n - 3), max_new_tokens=5)
    for t, k, p in ((0.7, 0, 1.0), (1.3, 5, 0.9), (0.0, 3, 0.5)):
        eng.generate(prompts(30, 18), max_new_tokens=7, temperature=t, top_k=k, top_p=p, seed=3)
    assert eng.traces == {"prefill": 1, "generate": 1}
    eng.generate(prompts(40, 3), max_new_tokens=4)  # bucket 64: a second prefill, the same loop
    eng.generate(prompts(5, 3), max_new_tokens=4)  # bucket 16
    assert eng.traces == {"prefill": 3, "generate": 1}


def test_stop_id_ends_a_row_and_others_keep_running(engine):
    ps = prompts(6, 9, seed=4)
    eng = engine
    free = eng.generate(ps, max_new_tokens=16, stop_ids=(), batch_size=ROWS)
    stop = int(free.tokens[0][4])
    assert stop not in free.tokens[1].tolist()  # the other row never emits it
    first = free.tokens[0].tolist().index(stop)
    res = eng.generate(ps, max_new_tokens=16, stop_ids=(stop,), batch_size=ROWS)
    assert res.tokens[0].tolist() == free.tokens[0][:first + 1].tolist()
    assert res.tokens[1].tolist() == free.tokens[1].tolist()
    assert res.steps == [first, 15]


def test_per_row_max_new_tokens(engine):
    ps = prompts(4, 7, seed=5)
    res = engine.generate(ps, max_new_tokens=[3, 9], stop_ids=(), batch_size=ROWS)
    full = engine.generate(ps, max_new_tokens=9, stop_ids=(), batch_size=ROWS)
    assert [len(t) for t in res.tokens] == [3, 9]
    assert res.tokens[0].tolist() == full.tokens[0][:3].tolist()


def test_streaming_chunks_equal_one_block_without_recompiling(engine):
    eng = engine
    ps = prompts(11, 4, seed=6)
    whole = eng.generate(ps, max_new_tokens=20, stop_ids=(), batch_size=ROWS)
    traces = dict(eng.traces)
    pieces = list(eng.stream(ps, max_new_tokens=20, chunk=3, stop_ids=(), batch_size=ROWS))
    assert len(pieces) == 1 + 7  # the first token after prefill, then ceil(19 / 3) chunks
    for i in range(2):
        assert np.concatenate([p[i] for p in pieces]).tolist() == whole.tokens[i].tolist()
    assert eng.traces == traces


def test_batch_padding_rows_are_inert(engine):
    ps = prompts(8, 12, 5, seed=7)
    a = engine.generate(ps, max_new_tokens=6, batch_size=ROWS, stop_ids=())
    assert len(a.tokens) == 3
    for p, t in zip(ps, a.tokens):
        assert t.tolist() == engine.generate([p], max_new_tokens=6, stop_ids=()).tokens[0].tolist()


def test_no_unusable_donation_warnings(model):
    eng = Engine(model, max_len=MAX_LEN, bos_id=TOK.bos_id)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Dd]onat.*")
        eng.generate(prompts(9, 2), max_new_tokens=5)
    assert eng.traces == {"prefill": 1, "generate": 1}


@pytest.mark.parametrize("call, match", [
    (dict(prompts=[np.arange(MAX_LEN)], max_new_tokens=1), "prompt 0: 96 prompt tokens do not fit"),
    (dict(prompts=[np.arange(60)], max_new_tokens=30), "exceed max_len"),
    (dict(prompts=[[1, 2, 259]], max_new_tokens=3), "token id 259 out of range"),
    (dict(prompts=[[1, -1]], max_new_tokens=3), "token id -1 out of range"),
    (dict(prompts=[[1.5, 2.0]], max_new_tokens=3), "integer token ids"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1, 2]], max_new_tokens=3, temperature=-1.0), "temperature"),
    (dict(prompts=[[1, 2]], max_new_tokens=3, top_p=0.0), "top_p"),
    (dict(prompts=[[1, 2]], max_new_tokens=3, top_k=-2), "top_k"),
    (dict(prompts=[[1, 2]], max_new_tokens=3, stop_ids=(300,)), "stop ids"),
    (dict(prompts=[[1], [2]], max_new_tokens=3, batch_size=1), "batch_size"),
    (dict(prompts=[], max_new_tokens=3), "no prompts"),
])
def test_bad_input_raises_clear_value_error(engine, call, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(call.pop("prompts"), **call)


def test_empty_prompt_without_bos_is_an_error(model):
    with pytest.raises(ValueError, match="bos_id"):
        Engine(model, max_len=MAX_LEN).generate([[]], max_new_tokens=2)


def test_longest_prompt_and_budget_that_fit_are_accepted(model, engine):
    room = MAX_LEN - engine.slack
    p = prompts(room - 5, seed=8)[0]
    res = engine.generate([p], max_new_tokens=5, stop_ids=())
    assert res.tokens[0].tolist() == naive_greedy(model, p, 5)


# ---- prefix LM ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prefix_engine(model):
    return Engine(model, max_len=MAX_LEN, bos_id=TOK.bos_id, stop_ids=(TOK.eos_id,), prefix_prompt=True)


def test_prefix_prompt_greedy_equals_naive_prefix_recompute(model, engine, prefix_engine):
    """prefix_prompt reads the prompt bidirectionally at prefill, then decodes causally: the same tokens as
    recomputing the full forward with prefix_len = prompt length for every new token."""
    assert prefix_engine.prefix_prompt and not prefix_engine.prefix_unsupported
    ps = prompts(5, 17, 1, 30, seed=9)
    res = prefix_engine.generate(ps, max_new_tokens=10, stop_ids=(), batch_size=ROWS)
    causal = engine.generate(ps, max_new_tokens=10, stop_ids=(), batch_size=ROWS)
    for p, got in zip(ps, res.tokens):
        assert got.tolist() == naive_greedy(model, p, 10, prefix=True)
    # The flag matters: the causal engine continues some prompt differently. A one-token prefix is causal.
    assert any(a.tolist() != b.tolist() for a, b in zip(res.tokens, causal.tokens))
    assert res.tokens[2].tolist() == causal.tokens[2].tolist()


def test_prefix_prompt_streaming_equals_one_block(prefix_engine):
    ps = prompts(13, 6, seed=10)
    whole = prefix_engine.generate(ps, max_new_tokens=12, stop_ids=(), batch_size=ROWS)
    pieces = list(prefix_engine.stream(ps, max_new_tokens=12, chunk=5, stop_ids=(), batch_size=ROWS))
    for i in range(2):
        assert np.concatenate([p[i] for p in pieces]).tolist() == whole.tokens[i].tolist()


def test_prefix_prompt_on_a_causal_only_model_decodes_causally(model, engine):
    """A model that cannot read a prefix (supports_prefix False, e.g. pure Mamba) decodes causally and says so
    through `prefix_unsupported`: it was trained that way, so this is not an error."""
    class CausalOnly(DecoderLM):
        supports_prefix = False

    same = CausalOnly(model.cfg, rngs=nnx.Rngs(0))  # the fixture's weights
    eng = Engine(same, max_len=MAX_LEN, bos_id=TOK.bos_id, prefix_prompt=True)
    assert eng.prefix_unsupported and not eng.prefix_prompt
    ps = prompts(5, 17, 1, 30, seed=9)
    got = eng.generate(ps, max_new_tokens=10, stop_ids=(), batch_size=ROWS)
    want = engine.generate(ps, max_new_tokens=10, stop_ids=(), batch_size=ROWS)
    assert [t.tolist() for t in got.tokens] == [t.tolist() for t in want.tokens]


# ---- the CLI -----------------------------------------------------------------------------------------

SMALL_DECODER = {"arch": "decoder", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "attn_block": 16}


def make_run(path, seed=0, *, model=None, objective="causal"):
    """A run directory (config.toml + one orbax checkpoint) holding a small random model (a decoder unless
    `model` gives another [model] table), trained with `objective` as far as its config says."""
    from core.checkpoint import manager, save
    from core.config import from_dict, save_config
    from models.registry import build_model
    from train.loop import make_optimizer

    cfg = from_dict({"model": model or SMALL_DECODER, "train": {"objective": objective},
                     "decode": {"max_len": 160, "max_new_tokens": 12}}, "cli_test")
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "config.toml")
    lm = build_model(cfg.model, seed=seed)
    mngr = manager(path)
    params = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    state = {"params": params, "opt": make_optimizer(cfg.train, lm.decay_mask(params)).init(params),
             "step": jnp.int32(1)}
    save(mngr, 1, state, cfg)
    mngr.wait_until_finished()
    mngr.close()
    return lm


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    return path, make_run(path)


def test_cli_streams_the_greedy_completion(run_dir, capsys):
    from decode.__main__ import main

    path, model = run_dir
    text = "def add(a, b):\n    return"
    assert main([str(path), "--prompt", text, "--max-new-tokens", "10", "--chunk", "3"]) == 0
    out = capsys.readouterr().out
    assert out == TOK.decode(until_eos(naive_greedy(model, TOK.encode(text), 10))) + "\n"


def test_cli_prompts_file_writes_jsonl(run_dir, tmp_path, capsys):
    import json

    from decode.__main__ import main

    path, model = run_dir
    prompts_file = tmp_path / "p.jsonl"
    rows = [{"id": "a", "prompt": "import os\n"}, {"id": 7, "prompt": "x = [1, 2,"}, {"id": "e", "prompt": ""}]
    prompts_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out_file = tmp_path / "o.jsonl"
    assert main([str(path), "--prompts", str(prompts_file), "--out", str(out_file), "--batch-size", "2",
                 "--max-new-tokens", "6"]) == 0
    got = [json.loads(x) for x in out_file.read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in got] == ["a", 7, "e"]
    for r, g in zip(rows, got):
        want = until_eos(naive_greedy(model, TOK.encode(r["prompt"]), 6))
        assert g["tokens"] == want and g["completion"] == TOK.decode(want) and g["prompt"] == r["prompt"]
        assert g["tokens_per_s"] > 0


def test_cli_drafter_prints_exactly_the_plain_greedy_completion(run_dir, tmp_path, capsys):
    """--drafter sam streams speculative output (no static automaton in this run: the request's own) that is
    the plain greedy completion; --prompts with --drafter adds steps, mat and speedup to each line."""
    import json

    from decode.__main__ import main

    path, model = run_dir
    text = "x = 1\nx = 1\nx = 1\nx ="  # repeats: sam drafts from them
    assert main([str(path), "--prompt", text, "--max-new-tokens", "10"]) == 0
    plain = capsys.readouterr().out
    assert plain == TOK.decode(until_eos(naive_greedy(model, TOK.encode(text), 10))) + "\n"
    assert main([str(path), "--prompt", text, "--max-new-tokens", "10", "--drafter", "sam"]) == 0
    got = capsys.readouterr()
    assert got.out == plain and "MAT" in got.err
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text(json.dumps({"id": "r", "prompt": text}) + "\n")
    out_file = tmp_path / "o.jsonl"
    assert main([str(path), "--prompts", str(prompts_file), "--out", str(out_file), "--max-new-tokens", "10",
                 "--drafter", "pld", "--max-draft", "2"]) == 0
    line = json.loads(out_file.read_text())
    assert TOK.decode(line["tokens"]) + "\n" == plain and line["completion"] + "\n" == plain
    assert line["steps"] >= 1 and line["mat"] >= 1.0 and line["speedup"] > 0
    capsys.readouterr()
    assert main([str(path), "--prompt", "x", "--drafter", "eagle"]) == 2
    assert "unknown drafter 'eagle'" in capsys.readouterr().err


@pytest.mark.parametrize("case, match", [
    ("missing_run", "no such run directory"),
    ("no_checkpoint", "no config.toml"),
    ("not_utf8", "not valid UTF-8"),
    ("bad_json", ":2: not a JSON object"),
    ("bad_ids", "prompt id 'x': token id 300 out of range"),
    ("too_long", "prompt id 'y':"),
    ("batch_size", "--batch-size must be >= 1"),
    ("chunk", "--chunk must be >= 1"),
])
def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys, case, match):
    """Through core.errors.cli: one line on stderr, exit 2, and no --out file (every prompt is checked first)."""
    from decode.__main__ import main

    path, _ = run_dir
    f = tmp_path / "p.jsonl"
    out = tmp_path / "o.jsonl"
    argv = [str(path), "--prompts", str(f), "--out", str(out)]
    if case == "missing_run":
        argv[0] = str(tmp_path / "nope")
        f.write_text('{"prompt": "a"}\n')
    elif case == "no_checkpoint":
        argv[0] = str(tmp_path)
        f.write_text('{"prompt": "a"}\n')
    elif case == "not_utf8":
        f.write_bytes(b'{"prompt": "caf\xe9"}\n')
    elif case == "bad_json":
        f.write_text('{"prompt": "a"}\n{"prompt": \n')
    elif case == "bad_ids":
        f.write_text('{"id": "x", "tokens": [1, 300]}\n')
    elif case == "too_long":
        f.write_text('{"id": "y", "prompt": "' + "a" * 200 + '"}\n')
    elif case in ("batch_size", "chunk"):
        f.write_text('{"prompt": "a"}\n')
        argv += [f"--{case.replace('_', '-')}", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix_run")
    return path, make_run(path, objective="prefix")


def test_cli_reads_the_prompt_as_a_prefix_for_a_prefix_lm_run(prefix_run, capsys):
    """The run's objective decides (prefix), --no-prefix overrides; engine_for_run likewise."""
    from decode.__main__ import main
    from decode.engine import engine_for_run

    path, model = prefix_run
    text = "class Stack:\n    def push(self, x):"
    ids = TOK.encode(text)
    want = {flag: TOK.decode(until_eos(naive_greedy(model, ids, 10, prefix=flag))) + "\n" for flag in (True, False)}
    assert want[True] != want[False]  # this prompt tells the two apart
    for argv, prefix in (([], True), (["--no-prefix"], False), (["--prefix"], True)):
        assert main([str(path), "--prompt", text, "--max-new-tokens", "10", *argv]) == 0
        got = capsys.readouterr()
        assert got.out == want[prefix] and "note:" not in got.err
    assert engine_for_run(path)[2].prefix_prompt
    assert not engine_for_run(path, prefix=False)[2].prefix_prompt


def test_cli_prefix_on_a_causal_only_model_says_so_once(tmp_path, capsys):
    from decode.__main__ import main

    model = make_run(tmp_path / "run", model={"arch": "mamba", "d_model": 32, "n_layers": 2}, objective="prefix")
    assert not model.supports_prefix
    text = "x = 1\n"
    assert main([str(tmp_path / "run"), "--prompt", text, "--max-new-tokens", "6"]) == 0
    got = capsys.readouterr()
    notes = [line for line in got.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "causal" in notes[0]
    assert got.out == TOK.decode(until_eos(naive_greedy(model, TOK.encode(text), 6))) + "\n"


def test_decode_imports_nothing_from_train(run_dir):
    """decode/ sits on core/ and models/: no module in it names train/, and loading a run for decoding (all
    CLI modules imported) pulls in none of it."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for f in sorted((root / "decode").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "train" for n in names), f"{f.name} imports {names}"
    path, _ = run_dir
    code = ("import sys; import decode.engine, decode.eval, decode.prompts, decode.build_sam, decode.__main__; "
            "decode.engine.engine_for_run(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'train'))")
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_speculative_loop_options_keep_xla_default_for_mamba_models(model):
    """YNNPACK fusion is switched off for the speculative loop only where it was measured to help (attention-only
    models); a model with a Mamba layer keeps XLA's default (its verify was slower without it)."""
    from decode.engine import spec_default_options
    from models.samba import SambaConfig, SambaLM

    samba = SambaLM(SambaConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8,
                                d_state=4), rngs=nnx.Rngs(0))
    assert spec_default_options(samba) == {}
    assert spec_default_options(model) == (
        {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {})
    assert Engine(samba, max_len=64)._loops.spec_options == {}
