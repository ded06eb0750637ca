"""Speculative decoding through the engine: greedy output identical to plain greedy for any drafter."""

import dataclasses
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.tokenizer import get_tokenizer
from decode.drafters import Drafter, VerifyCost, make_drafter
from decode.engine import Engine
from models.decoder import DecoderConfig, DecoderLM
from models.registry import MODELS

TOK = get_tokenizer("byte")
MAX_LEN = 96
SIZES = (1, 4, 8)
ROWS = 3  # every multi-row test pads to this batch, so they share one set of compiles
CHEAP = VerifyCost((0, 1, 2, 4, 8), (1.0, 1.01, 1.02, 1.04, 1.08))


class Oracle(Drafter):
    """Drafts the true greedy continuation, known in advance."""

    def __init__(self, ref):
        super().__init__()
        self.ref = np.asarray(ref, np.int32)
        self.pos = -1
        self.accepted = []

    def reset(self, prompt):
        self.pos = 0
        self.accepted = []

    def accept(self, tokens):
        self.pos += len(tokens)
        self.accepted += [int(t) for t in tokens]

    def draft(self, k):
        return self.ref[self.pos:self.pos + k]


class Adversarial(Oracle):
    """Every draft token is wrong."""

    def draft(self, k):
        return (self.ref[self.pos:self.pos + k] + 1) % 256


class Noisy(Oracle):
    """A correct prefix of random length, then random tokens; random draft lengths (including empty)."""

    def __init__(self, ref, seed):
        super().__init__(ref)
        self.rng = np.random.default_rng(seed)

    def draft(self, k):
        n = int(self.rng.integers(0, k + 1))
        good = int(self.rng.integers(0, n + 1))
        d = self.ref[self.pos:self.pos + n].copy()
        d[good:] = self.rng.integers(0, 256, size=len(d) - good)
        return d


class Alternating(Oracle):
    """Drafts the true continuation (all accepted) on even calls and nothing on odd ones: a step with no
    draft right after a step that accepted drafts must not read stale recurrent or concept state."""

    def __init__(self, ref):
        super().__init__(ref)
        self.calls = 0

    def draft(self, k):
        self.calls += 1
        return self.ref[self.pos:self.pos + k] if self.calls % 2 else self.ref[:0]


class ModelGreedy(Drafter):
    """Drafts the model's own greedy continuation of the current context (a strong, honest drafter)."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def reset(self, prompt):
        self.ctx = [int(t) for t in prompt]

    def accept(self, tokens):
        self.ctx += [int(t) for t in tokens]

    def draft(self, k):
        return self.engine.generate([self.ctx], max_new_tokens=k, stop_ids=()).tokens[0]


class Observing(Oracle):
    """Records what the observe hook receives."""

    observes = True

    def __init__(self, ref):
        super().__init__(ref)
        self.seen = []

    def observe(self, inputs, topk):
        self.seen.append((np.array(inputs), np.array(topk)))


@pytest.fixture(scope="module")
def model():
    return DecoderLM(DecoderConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16),
                     rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, max_len=MAX_LEN, bos_id=TOK.bos_id, verify_sizes=SIZES)


def prompts(*lengths, seed=0):
    # Text-like prompts: repeated byte patterns make the random model's continuations more varied.
    rng = np.random.default_rng(seed)
    return [rng.integers(32, 127, size=n).astype(np.int32) for n in lengths]


def reference(engine, ps, n):
    return engine.generate(ps, max_new_tokens=n, stop_ids=(), batch_size=pad(ps)).tokens


def pad(ps):
    return 1 if len(ps) == 1 else ROWS


@pytest.mark.parametrize("kind", ["oracle", "adversarial", "noisy"])
def test_greedy_speculative_equals_plain_batch1(engine, kind):
    ps = prompts(13, seed=1)
    ref = reference(engine, ps, 30)
    make = {"oracle": lambda r: Oracle(r), "adversarial": lambda r: Adversarial(r),
            "noisy": lambda r: Noisy(r, 0)}[kind]
    drafters = [make(r) for r in ref]
    res = engine.generate_speculative(ps, drafters, max_new_tokens=30, stop_ids=())
    assert res.tokens[0].tolist() == ref[0].tolist()
    assert drafters[0].accepted == ref[0].tolist()  # the drafter saw exactly the final tokens
    if kind == "oracle":  # 29 tokens after prefill at up to 9 per step: 4 steps (8+1, 8+1, 8+1, 2)
        assert res.steps == [4] and res.mat == pytest.approx(29 / 4)
        assert res.verify_calls == 4
    if kind == "adversarial":
        assert res.mat == 1.0 and res.steps == [29]


def test_greedy_speculative_equals_plain_batch3_with_stops_and_budgets(engine):
    ps = prompts(5, 21, 9, seed=2)
    ref = reference(engine, ps, 40)
    stop = int(ref[1][17])
    cut = ref[1].tolist().index(stop)
    plain = engine.generate(ps, max_new_tokens=[40, 40, 23], stop_ids=(stop,), batch_size=ROWS)
    assert len(plain.tokens[1]) == cut + 1 and len(plain.tokens[2]) <= 23
    make = [lambda r, s: Oracle(r), lambda r, s: Noisy(r, s), lambda r, s: Adversarial(r)]
    for seed in range(3):  # each row meets each kind of drafter
        drafters = [make[(i + seed) % 3](r, seed) for i, r in enumerate(ref)]
        res = engine.generate_speculative(ps, drafters, max_new_tokens=[40, 40, 23], stop_ids=(stop,),
                                          batch_size=ROWS)
        assert [t.tolist() for t in res.tokens] == [t.tolist() for t in plain.tokens]


@pytest.mark.parametrize("rule", ["cost", "paper"])
def test_greedy_speculative_equals_plain_for_every_drafter(engine, rule):
    """The real drafters, with sam's cost rule (cheap verify: it drafts from every match) and the paper's."""
    rng = np.random.default_rng(5)
    motif = rng.integers(32, 127, 7)
    ps = [np.resize(motif, n).astype(np.int32) for n in (15, 30)] + prompts(9, seed=5)
    plain = engine.generate(ps, max_new_tokens=30, stop_ids=(), batch_size=ROWS)
    names = ("pld", "recycle", "sam", "sam+recycle") if rule == "cost" else ("sam", "sam+recycle")
    for name in names:
        drafters = [make_drafter(name, vocab_size=engine.vocab_size, cost=CHEAP, rule=rule, max_len=8) for _ in ps]
        res = engine.generate_speculative(ps, drafters, max_new_tokens=30, stop_ids=(), batch_size=ROWS)
        assert [t.tolist() for t in res.tokens] == [t.tolist() for t in plain.tokens], name
        assert res.mat >= 1.0


def test_sampling_speculative_with_point_mass_target_equals_greedy(engine):
    """top_k = 1 makes the target distribution one-hot, so sampled acceptance must reproduce greedy."""
    ps = prompts(7, 16, seed=3)
    ref = reference(engine, ps, 25)
    drafters = [Noisy(ref[0], 1), Oracle(ref[1])]
    res = engine.generate_speculative(ps, drafters, max_new_tokens=25, temperature=1.3, top_k=1, seed=4,
                                      stop_ids=(), batch_size=ROWS)
    assert [t.tolist() for t in res.tokens] == [t.tolist() for t in ref]


def test_sampling_speculative_is_reproducible_and_accepts_likely_drafts(engine):
    ps = prompts(10, seed=4)
    runs = [engine.generate_speculative(ps, [ModelGreedy(engine)], max_new_tokens=20, temperature=0.2, seed=[9],
                                        stop_ids=()) for _ in range(2)]
    assert runs[0].tokens[0].tolist() == runs[1].tokens[0].tolist()
    assert len(runs[0].tokens[0]) == 20
    assert runs[0].mat > 1.5  # at a low temperature the greedy draft is usually the sample


def test_observe_hook_gets_verified_inputs_and_their_topk(engine):
    ps = prompts(6, seed=5)
    ref = reference(engine, ps, 12)
    d = Observing(ref[0])
    engine.generate_speculative(ps, [d], max_new_tokens=12, stop_ids=())
    prompt_inputs, prompt_topk = d.seen[0]
    assert prompt_inputs.tolist() == ps[0].tolist() and prompt_topk.shape == (6, engine.observe_k)
    assert prompt_topk[-1, 0] == ref[0][0]  # the argmax after the prompt is the first token
    seq = list(ref[0])
    pos = 0
    for inputs, topk in d.seen[1:]:
        assert topk.shape == (len(inputs), engine.observe_k)
        assert inputs.tolist() == seq[pos:pos + len(inputs)]  # oracle drafts: every input was correct
        assert topk[:, 0].tolist() == seq[pos + 1:pos + 1 + len(inputs)]
        pos += len(inputs)


class Blind(Oracle):
    """Has an observe method but declares `observes = False`: the engine must not call it."""

    def __init__(self, ref):
        super().__init__(ref)
        self.seen = []

    def observe(self, inputs, topk):
        self.seen.append(inputs)


def test_only_drafters_that_declare_observes_are_fed_topk(engine):
    ps = prompts(6, 11, seed=5)
    ref = reference(engine, ps, 12)
    a, b = Observing(ref[0]), Blind(ref[1])
    res = engine.generate_speculative(ps, [a, b], max_new_tokens=12, stop_ids=(), batch_size=ROWS)
    assert [t.tolist() for t in res.tokens] == [t.tolist() for t in ref]
    assert len(a.seen) >= 2 and b.seen == []


def test_prefix_prompt_speculative_greedy_equals_plain_greedy(model, engine):
    """With prefix_prompt the speculative prefill reads the prompt as a prefix too, and the verify steps stay
    causal: speculative greedy equals the prefix engine's plain greedy (which test_engine checks against a
    naive prefix recompute), and differs from the causal engine's."""
    pre = Engine(model, max_len=MAX_LEN, bos_id=TOK.bos_id, verify_sizes=SIZES, prefix_prompt=True)
    ps = prompts(9, 23, 14, seed=11)
    ref = reference(pre, ps, 30)
    assert any(a.tolist() != b.tolist() for a, b in zip(ref, reference(engine, ps, 30)))
    for seed in range(2):
        drafters = [Oracle(ref[0]), Noisy(ref[1], seed), Observing(ref[2])]
        res = pre.generate_speculative(ps, drafters, max_new_tokens=30, stop_ids=(), batch_size=ROWS)
        assert [t.tolist() for t in res.tokens] == [t.tolist() for t in ref]
    assert res.mat > 1.0


def test_warmup_takes_arguments_and_leaves_drafters_alone():
    """warmup compiles the variants it is asked for with its own stub drafters; the caller's drafters and the
    Drafter class are untouched, and afterwards real drafters decode without a new compile."""
    model = DecoderLM(DecoderConfig(d_model=32, n_layers=1, n_heads=2, attn_block=16), rngs=nnx.Rngs(3))
    eng = Engine(model, max_len=64, bos_id=TOK.bos_id, verify_sizes=(2, 4))
    mine = [make_drafter("pld", vocab_size=eng.vocab_size), make_drafter("sam+recycle", vocab_size=eng.vocab_size)]
    before = [dict(vars(d)) for d in mine]
    base = dict(vars(Drafter))
    eng.warmup(2, 5, speculative=True, observe=(False,))
    assert eng.traces == {"prefill": 1, "generate": 1, "speculate": 1}
    eng.warmup(2, 5, speculative=True)  # observe=(False, True): adds the observing prefill and loop
    assert eng.traces == {"prefill": 2, "generate": 1, "speculate": 2}
    assert dict(vars(Drafter)) == base and not Drafter().observes and Drafter(observes=True).observes
    assert [dict(vars(d)) for d in mine] == before
    assert [d.observes for d in mine] == [False, True]
    ps = prompts(5, 3, seed=12)
    plain = eng.generate(ps, max_new_tokens=16, stop_ids=())
    spec = eng.generate_speculative(ps, mine, max_new_tokens=16, stop_ids=())
    assert [t.tolist() for t in spec.tokens] == [t.tolist() for t in plain.tokens]
    assert eng.traces == {"prefill": 2, "generate": 1, "speculate": 2}


def test_one_compile_for_all_verify_sizes_and_no_donation_warnings():
    model = DecoderLM(DecoderConfig(d_model=32, n_layers=1, n_heads=2, attn_block=16), rngs=nnx.Rngs(2))
    eng = Engine(model, max_len=64, bos_id=TOK.bos_id, verify_sizes=(2, 4))
    ps = prompts(5, 3, seed=6)
    ref = [np.zeros(20, np.int32)] * 2  # drafts of arbitrary tokens: only compiles are checked here
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Dd]onat.*")
        for seed in range(3):
            eng.generate_speculative(ps, [Noisy(r, seed) for r in ref], max_new_tokens=20, stop_ids=())
    # one speculative loop holds every verify size; observing drafters add one prefill variant and one loop
    assert eng.traces == {"prefill": 1, "speculate": 1}


class Buggy(Oracle):
    """Drafts correctly, then proposes an id outside the vocabulary on its `bad_call`-th draft."""

    def __init__(self, ref, bad_call):
        super().__init__(ref)
        self.calls, self.bad_call = 0, bad_call

    def draft(self, k):
        self.calls += 1
        return np.array([10_000], np.int32) if self.calls == self.bad_call else super().draft(k)


@pytest.mark.parametrize("bad_call", [1, 2])  # the first draft is made before the loop
def test_drafter_bug_inside_the_loop_raises_and_leaves_the_engine_usable(engine, bad_call):
    """The host callback catches the drafter's error, ends the jitted loop and re-raises it."""
    ps = prompts(9, seed=7)
    ref = reference(engine, ps, 20)
    with pytest.raises(ValueError, match="outside"):
        engine.generate_speculative(ps, [Buggy(ref[0], bad_call)], max_new_tokens=20, stop_ids=())
    res = engine.generate_speculative(ps, [Oracle(ref[0])], max_new_tokens=20, stop_ids=())
    assert res.tokens[0].tolist() == ref[0].tolist()


def test_drafter_count_must_match_prompts(engine):
    with pytest.raises(ValueError, match="one drafter per prompt"):
        engine.generate_speculative(prompts(4, 4), [Oracle([1, 2])], max_new_tokens=3)


# ---- the decoding eval and its prompts -----------------------------------------------------------------

def test_eval_reports_speedup_and_matches_plain(tmp_path, capsys):
    from decode.eval import main
    from test_engine import make_run

    run = tmp_path / "run"
    make_run(run)
    prompts_file = tmp_path / "p.jsonl"
    text = "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\ndef h(x):\n"
    rows = [{"id": i, "prompt": text[i:], "kind": "ab"[i % 2]} for i in range(3)]
    prompts_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r.json"
    assert main([str(run), "--prompts", str(prompts_file), "--drafter", "pld", "--out", str(out),
                 "--max-new-tokens", "16", "--batch-size", "2", "--repeats", "1"]) == 0
    rep = json.loads(out.read_text())
    assert rep["drafter"] == "pld" and rep["matches_plain"] is True
    assert rep["speedup"] > 0 and rep["tokens_per_s"] > 0 and rep["mat"] >= 1.0
    assert rep["draft_us_per_step"] > 0
    assert [o["id"] for o in rep["outputs"]] == [0, 1, 2]
    assert [o["steps"] for o in rep["outputs"]] == [p["steps"] for p in rep["per_prompt"]]
    assert all(o["mat"] == (len(o["tokens"]) - 1) / o["steps"] and o["kind"] == "ab"[i % 2]
               for i, o in enumerate(rep["outputs"]))
    kinds = rep["by_kind"]
    assert sorted(kinds) == ["a", "b"] and kinds["a"]["n_prompts"] == 2 and kinds["b"]["n_prompts"] == 1
    assert kinds["a"]["n_tokens"] + kinds["b"]["n_tokens"] == rep["n_tokens"]
    assert all(k["mat"] >= 1.0 and k["speedup"] > 0 for k in kinds.values())
    assert sum(p["n_tokens"] for p in rep["per_prompt"]) == rep["n_tokens"]
    assert all(p["matches_plain"] for p in rep["per_prompt"])
    assert "[eval pld] batch 2/2" in capsys.readouterr().err
    # warm-up compiled exactly what the timed passes ran, and they compiled nothing more: one prefill per
    # bucket (the batches' prompts of 66/65 and 64 tokens pad to 128 and 64), one plain loop, and one
    # speculative loop (pld does not observe: no variant with the verifier's top-k ids)
    assert rep["compiles"] == {"prefill": 2, "generate": 1, "speculate": 1}, rep["compiles"]
    assert main([str(run), "--prompts", str(prompts_file), "--drafter", "sam", "--out", str(out),
                 "--sam", str(tmp_path / "nosam"), "--max-new-tokens", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no suffix automaton" in err[0]


def test_eval_oracle_drafts_the_plain_output_and_is_the_ceiling(tmp_path):
    """`--drafter oracle` drafts each prompt's own plain greedy output: every draft is accepted, so each verify
    step emits max draft + 1 tokens (fewer only where the budget cuts the draft)."""
    from decode.eval import main
    from test_engine import make_run

    run = tmp_path / "run"
    make_run(run)
    prompts_file = tmp_path / "p.jsonl"
    text = "def f(x):\n    return x + 1\n\ndef g(x):\n"
    prompts_file.write_text("\n".join(json.dumps({"id": i, "prompt": text[3 * i:]}) for i in range(3)) + "\n")
    out = tmp_path / "o.json"
    assert main([str(run), "--prompts", str(prompts_file), "--drafter", "oracle", "--out", str(out),
                 "--max-new-tokens", "17", "--max-draft", "2", "--repeats", "1"]) == 0
    rep = json.loads(out.read_text())
    assert rep["matches_plain"] is True and rep["bound"] is True
    for o in rep["outputs"]:
        assert o["steps"] == -(-(len(o["tokens"]) - 1) // 3), o  # all accepted: 3 tokens per step


@pytest.mark.parametrize("argv, match", [
    (["--drafter", "eagle"], "unknown drafter 'eagle'; valid: none, pld"),
    (["--drafter", "oracle", "--temperature", "0.5"], "needs --temperature 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--max-draft", "0"], "--max-draft must be >= 1"),
    (["--run", "nope"], "no such run directory"),
    (["--prompts-text", '{"prompt": 3}\n'], "expected a string \"prompt\""),
])
def test_eval_errors_are_one_line_exit_2_and_write_no_report(tmp_path, capsys, argv, match):
    from decode.eval import main

    run = tmp_path / "run"
    run.mkdir()
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"prompt": "a"}\n')
    if argv[0] == "--run":
        run, argv = tmp_path / argv[1], []
    elif argv[0] == "--prompts-text":
        prompts_file.write_text(argv[1])
        argv = []
    out = tmp_path / "r.json"
    assert main([str(run), "--prompts", str(prompts_file), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("case, match", [
    ("missing", "missing"),
    ("n", "--n must be >= 1"),
    ("unwritable", "cannot write"),
])
def test_prompts_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, case, match):
    from decode.prompts import main

    from test_sam import _tiny_run

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.py").write_text("".join(f"value_{j} = compute({j})\n" for j in range(60)))
    run = _tiny_run(tmp_path, [str(src / "*.py")])
    out = tmp_path / "prompts.jsonl"
    argv = [str(run), "--out", str(out), "--n", "2", "--prompt-tokens", "64"]
    if case == "missing":
        argv[0] = str(tmp_path / "missing")
    elif case == "n":
        argv[4] = "0"
    elif case == "unwritable":
        out.mkdir()  # a directory where the file should go
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.is_file() and not (tmp_path / "prompts.jsonl.tmp").exists()
    if case == "n":  # the same run and arguments are fine otherwise
        argv[4] = "2"
        assert main(argv) == 0
        got = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(got) == 2 and all(g["prompt"].startswith("value_") for g in got)


def test_prompts_are_whole_lines_within_budget():
    from decode.prompts import build_prompts

    lines = [f"    value_{i} = compute({i}, 'é')\n".encode() for i in range(400)]
    doc = np.frombuffer(b"".join(lines), np.uint8).astype(np.uint16)
    val = np.concatenate([doc, [TOK.eos_id], doc[:100], [TOK.eos_id], doc])
    ps = build_prompts(val, TOK, n=4, prompt_tokens=120, seed=0)
    assert len(ps) == 4
    text = b"".join(lines).decode()
    for p in ps:
        n = len(TOK.encode(p["prompt"]))
        assert 120 - len(lines[0]) < n <= 120
        assert p["prompt"].endswith("\n") and p["prompt"].startswith("    value_")
        assert p["prompt"] + p["reference"] in text
        assert p["source"] in (0, 2)  # the short middle document has no room for a prompt


# ---- every registered architecture through the same engine ----------------------------------------------

@functools.cache
def _small_model(arch):
    """One small model per architecture, shared by its causal and prefix cases (nothing mutates it)."""
    cls = MODELS[arch]
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    small = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_block=16, window=8)
    return cls(cls.config_class(**{k: v for k, v in small.items() if k in names}), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prefix", [False, True], ids=["causal", "prefix"])
@pytest.mark.parametrize("arch", sorted(set(MODELS) - {"decoder"}))
def test_engine_is_architecture_agnostic(arch, prefix):
    """Plain greedy equals the training forward, and speculative greedy equals plain, for each model; with
    prefix_prompt the forward reads the prompt as a prefix (a model that cannot, decodes causally)."""
    model = _small_model(arch)
    eng = Engine(model, max_len=64, bos_id=TOK.bos_id, verify_sizes=(4,), prefix_prompt=prefix)
    assert eng.prefix_prompt == (prefix and model.supports_prefix)
    ps = prompts(5, 19, seed=8)
    plain = eng.generate(ps, max_new_tokens=12, stop_ids=())
    fwd = jax.jit(lambda t, plen: model(t, plen if prefix else None)[0])
    for p, got in zip(ps, plain.tokens):
        seq = [int(t) for t in p]
        plen = jnp.array([len(p)], jnp.int32)
        for t in got:
            buf = np.zeros((1, 32), np.int32)
            buf[0, :len(seq)] = seq
            assert int(jnp.argmax(fwd(buf, plen)[0, len(seq) - 1])) == int(t)
            seq.append(int(t))
    spec = eng.generate_speculative(ps, [Noisy(t, 3) for t in plain.tokens], max_new_tokens=12, stop_ids=())
    assert [t.tolist() for t in spec.tokens] == [t.tolist() for t in plain.tokens]
    assert spec.mat > 1.0
    alt = eng.generate_speculative(ps, [Alternating(t) for t in plain.tokens], max_new_tokens=12, stop_ids=())
    assert [t.tolist() for t in alt.tokens] == [t.tolist() for t in plain.tokens]
    assert 2.0 < alt.mat < 5.0  # full acceptance on half of the steps (verify size 4: 5 tokens)
    # the real drafters with the cost rule; a cheap verify table makes sam draft from every match it has
    for name in ("pld", "sam"):
        got = eng.generate_speculative(ps, [make_drafter(name, vocab_size=model.vocab_size, cost=CHEAP, max_len=4)
                                            for _ in ps], max_new_tokens=12, stop_ids=())
        assert [t.tolist() for t in got.tokens] == [t.tolist() for t in plain.tokens], name


def test_verify_cost_is_measured_once_and_then_read_from_disk(monkeypatch, tmp_path):
    """The cost table is kept per (model, engine settings, batch, machine, code) next to the compilation
    cache: a second engine of the same model (a rerun of the CLI) reads it and measures nothing."""
    import decode.engine as engine_mod

    monkeypatch.setenv("LMARCH_COMPILE_CACHE", str(tmp_path))
    model = DecoderLM(DecoderConfig(d_model=32, n_layers=1, n_heads=2, attn_block=16), rngs=nnx.Rngs(4))
    calls = []
    measure = engine_mod.measure_verify_cost
    monkeypatch.setattr(engine_mod, "measure_verify_cost", lambda *a, **k: calls.append(1) or measure(*a, **k))
    first = Engine(model, max_len=128, verify_sizes=(1, 4))
    cost = first.verify_cost(1)
    assert calls == [1] and cost.sizes == (0, 1, 4) and all(c > 0 for c in cost.cost)
    assert list(cost.cost) == sorted(cost.cost)
    again = Engine(model, max_len=128, verify_sizes=(1, 4))
    assert again.verify_cost(1) == cost and calls == [1]  # from disk: no step was run
    path = engine_mod.verify_cost_path(again, 1)
    assert path.is_file() and path.parent.parent == tmp_path
    # another batch size, other verify sizes or another model are other entries
    other = DecoderLM(DecoderConfig(d_model=32, n_layers=2, n_heads=2, attn_block=16), rngs=nnx.Rngs(4))
    assert len({path, engine_mod.verify_cost_path(again, 2),
                engine_mod.verify_cost_path(Engine(model, max_len=128, verify_sizes=(1, 2, 4)), 1),
                engine_mod.verify_cost_path(Engine(other, max_len=128, verify_sizes=(1, 4)), 1)}) == 4
    path.write_text("{not json")  # a damaged entry is measured again
    first._verify_cost.clear()
    assert first.verify_cost(1).sizes == (0, 1, 4) and calls == [1, 1]


def test_verify_cost_of_size_0_is_a_token_of_the_longest_plain_stretch(model, engine, monkeypatch):
    """The cost table's size 0 is what a token costs when nothing is drafted: an interval between host calls at
    the longest plain stretch (engine.max_stretch tokens), per token; the ramp's shorter stretches are left out.
    With every interval between host calls costing 1, size 0 costs 1/16 and every verify size 1."""
    import decode.engine as engine_mod

    monkeypatch.setattr(engine_mod, "step_elapsed", lambda a, b: 1.0)
    stretching = Engine(model, max_len=MAX_LEN, verify_sizes=(0, 1, 4))
    assert stretching.max_stretch == 16
    cost = engine_mod.measure_verify_cost(stretching, prompt_len=8, steps=3, rounds=1)
    assert cost.sizes == (0, 1, 4) and cost.cost == (1 / 16, 1.0, 1.0)
    cost = engine_mod.measure_verify_cost(engine, prompt_len=8, steps=3, rounds=1)  # no size 0: no stretches
    assert cost.sizes == (0, *SIZES) and cost.cost == (1.0, 1.0, 1.0, 1.0)
