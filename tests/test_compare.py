"""The architecture study (scripts/compare.py): a miniature study end to end, its rerun, and its input checks."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

COMMON = """
[data]
sources = ["{src}/*.py"]
val_fraction = 0.2
cache_dir = "{cache}"
[train]
lr = 3e-3
warmup_steps = 1
log_every = 2
eval_every = 2
eval_batches = 1
checkpoint_every = 100
[decode]
max_len = 128
[mesh]
data = 1
"""
RUNS = {
    "decoder": 'name = "dec"\n[model]\narch = "decoder"\nd_model = 16\nn_layers = 1\nn_heads = 2\nattn_block = 16\n',
    "dlcm": ('name = "dlcm"\n[model]\narch = "dlcm"\nd_model = 16\nn_heads = 2\nn_kv_heads = 1\nenc_layers = 1\n'
             'dec_layers = 1\nd_concept = 16\nbb_layers = 1\nbb_heads = 2\ncross_heads = 2\nattn_block = 16\n'),
}
STUDY = """name = "mini"
[budget]
tokens = 768
seq_len = 32
batch_size = 8
seeds = [0]
[eval]
prompts = "val"
n_prompts = 2
prompt_tokens = 48
new_tokens = 6
drafters = ["pld", "sam"]
sam_max_tokens = 4000
repeats = 1
decode_batches = [1]
decode_prompt_len = 8
decode_new_tokens = 4
contexts = [32, 64]
latency_steps = 2
extrapolation = [1, 2]
extrapolation_tokens = 256
batch_tokens = 256
[[run]]
name = "decoder"
config = "{dir}/decoder.toml"
overrides = ["model.n_heads=2"]
"""
# A second run, for the input checks (training two architectures end to end in the suite would cost more than
# its time budget; the DLCM-only measurement is tested on its own below)
DLCM_RUN = """[[run]]
name = "dlcm"
config = "{dir}/dlcm.toml"
overrides = ["model.target_ratio=3.0"]
"""


def _write_study(d: Path, text: str = STUDY) -> Path:
    src = d / "src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "x", "y", "(", ")", ":"]
    for i in range(30):
        (src / f"f{i}.py").write_text("\n".join(" ".join(rng.choice(words, 5)) for _ in range(30)) + "\n")
    for name, head in RUNS.items():
        (d / f"{name}.toml").write_text(head + COMMON.format(src=src, cache=d / "cache"))
    path = d / "study.toml"
    path.write_text(text.format(dir=d))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    path = _write_study(d)
    out = d / "out"
    assert compare.main([str(path), "--out", str(out)]) == 0
    return path, out


def test_study_report_has_every_field(study):
    _, out = study
    rep = json.loads((out / "report.json").read_text())
    assert {"machine", "budget", "runs"} <= set(rep) and rep["budget"]["tokens"] == 768
    assert rep["budget"]["steps"] == 3  # 768 tokens / (8 x 32)
    assert [r["name"] for r in rep["runs"]] == ["decoder"]
    (r,) = rep["runs"]
    for key, value in r.items():
        if key != "tokens_per_concept":  # None for models without concepts
            assert value is not None, key
    assert r["arch"] == "decoder" and r["tokens_per_concept"] is None
    assert 0 < r["params_no_embed"] < r["params"]
    assert r["flops_per_token_train"] > r["flops_per_token_infer"] > 0
    assert 0 < r["val_bpb"] < 12 and 0 < r["val_bpb_4x"] < 12
    assert set(r["decode"]) == {"batch_1"}
    assert r["forced_decode"]["tokens_per_s"] > 0 and r["forced_decode"]["concepts_closed"] is None
    assert all(v["tokens_per_s"] > 0 for v in r["decode"].values())
    assert [c["context"] for c in r["context"]] == [32, 64]
    assert all(c["ms_per_token"] > 0 for c in r["context"])
    assert r["context"][1]["cache_bytes"] > r["context"][0]["cache_bytes"] > 0  # a KV cache grows with context
    assert set(r["drafters"]) == {"pld", "sam"}
    for v in r["drafters"].values():
        assert v["mat"] >= 1.0 and v["speedup"] > 0
        assert v["exact"] == v["n_prompts"] == 2  # greedy speculation reproduces plain decoding
    assert r["curves"]["0"][-1]["tokens"] == 768
    assert [s["stage"] for s in rep["stages"]][:3] == ["train", "prompts", "sam"]
    md = (out / "report.md").read_text()
    for text in ("machine:", "budget (matched): 768", "Who wins what", "What this budget can and cannot show",
                 "| decoder", "pld MAT", "sam exact", "teacher-forced tok/s b1", "Fastest teacher-forced decoding"):
        assert text in md, text
    assert "None" not in md and "nan" not in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["bpb_vs_infer_flops.png", "bpb_vs_training.png", "context.png", "speculation.png"]


def test_report_of_several_runs_and_seeds(study):
    """The tables, summary and plots for several architectures and seeds (from the measured run, relabelled)."""
    _, out = study
    rep = json.loads((out / "report.json").read_text())
    (r,) = rep["runs"]
    other = json.loads(json.dumps(r))
    other.update(name="samba", arch="samba", val_bpb=r["val_bpb"] - 0.5, val_bpb_std=0.1, n_seeds=2,
                 tokens_per_concept=None)
    other["drafters"]["sam"]["exact"] = 1
    rep["runs"].append(other)
    rep["budget"]["seeds"] = [0, 1]
    md = compare.render_report(rep)
    assert "| samba" in md and "± 0.100" in md
    assert "Lowest validation bits/byte at the matched budget: **samba**" in md
    assert "NOT exact: samba/sam (1/2)" in md
    # the oracle (the ceiling) is reported as such and never as the best drafter
    for run in rep["runs"]:
        run["drafters"]["oracle"] = dict(run["drafters"]["sam"], speedup=9.5, mat=5.0, exact=2)
    md = compare.render_report(rep)
    assert "Best speculation: **oracle" not in md and "Best speculation: **" in md
    assert "Ceiling (the oracle drafts plain decoding's own output" in md and "decoder 9.50x (best real drafter" in md
    assert compare.arch_color("samba") != compare.arch_color("decoder")  # (plots: drawn in the study above)


def test_tokens_per_concept_of_a_concept_model(tmp_path):
    from core.config import load_config
    from core.data import Corpus
    from core.tokenizer import get_tokenizer
    from models.registry import build_model

    path = _write_study(tmp_path)
    cfg = load_config(tmp_path / "dlcm.toml", ["data.seq_len=32"])
    corpus = Corpus.open(cfg.data, get_tokenizer(cfg.data.tokenizer))
    got = compare.measure_concepts(build_model(cfg.model, seed=0), cfg, corpus, 256)
    assert got["tokens"] == 4 * 2 * 32 and 1 <= got["concepts"] <= got["tokens"]
    assert got["tokens_per_concept"] == got["tokens"] / got["concepts"]
    # teacher-forced decode: the concepts closed are those of the timed tokens (start + n .. start + 2n)
    dlcm = build_model(cfg.model, seed=0)
    forced = compare.measure_forced(dlcm, corpus.val, 16, 8, 1)  # at least 32 timed steps
    _, b = dlcm.boundaries(np.asarray(corpus.val[:80], np.int32)[None])
    assert forced["tokens"] == 32 and forced["us_per_token"] > 0
    assert forced["concepts_closed"] == int(np.asarray(b)[0, 48:80].sum())
    assert compare.measure_concepts(build_model(load_config(tmp_path / "decoder.toml").model, seed=0), cfg,
                                    corpus, 256) is None
    assert path.is_file()


def test_rerun_trains_and_measures_nothing(study, monkeypatch, capsys):
    path, out = study
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "measure" in p.parts}
    assert len(files) >= 10

    def fail(*a, **k):
        raise AssertionError("the rerun recomputed something")

    import train.loop
    monkeypatch.setattr(train.loop, "train", fail)
    for name in ("measure_extrapolation", "measure_context", "measure_decode", "measure_speculation",
                 "measure_concepts", "model_info"):
        monkeypatch.setattr(compare, name, fail)
    capsys.readouterr()
    assert compare.main([str(path), "--out", str(out)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "elapsed | eta" in x]
    assert lines and all("(cached" in x for x in lines), lines
    assert {p: p.stat().st_mtime_ns for p in files} == files


@pytest.mark.parametrize("edit, match", [
    (lambda s: s + DLCM_RUN.replace("dlcm.toml", "nope.toml"), "config file not found"),
    (lambda s: s.replace('drafters = ["pld", "sam"]', 'drafters = ["pld", "oracel"]'), "unknown drafter 'oracel'"),
    (lambda s: s.replace("tokens = 768", 'tokens = "lots"'), "budget.tokens must be a positive integer"),
    (lambda s: s.replace("seeds = [0]\n", ""), "budget.seeds is missing"),
    (lambda s: s + DLCM_RUN.replace("model.target_ratio=3.0", "train.steps=5"), "changes the shared budget"),
    (lambda s: s + DLCM_RUN.replace('"dlcm"', '"decoder"'), "two runs are named 'decoder'"),
    (lambda s: s.replace("contexts = [32, 64]", "contexts = [32, -1]"), "eval.contexts values must be >= 1"),
])
def test_bad_study_fails_before_training_with_one_line(tmp_path, monkeypatch, capsys, edit, match):
    import train.loop

    monkeypatch.setattr(train.loop, "train", lambda *a, **k: pytest.fail("training started"))
    path = _write_study(tmp_path, edit(STUDY))
    out = tmp_path / "out"
    assert compare.main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert not out.exists()


def test_run_directory_form_still_works(study, tmp_path, capsys):
    _, out = study
    runs = sorted((out / "runs").iterdir())
    assert compare.main([*map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.md").is_file()
    assert compare.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["compare_tiny", "compare_small"])
def test_shipped_studies_are_valid(name):
    study = compare.load_study(ROOT / "configs" / f"{name}.toml")
    assert study.steps * study.tokens_per_step <= study.budget["tokens"] < (study.steps + 1) * study.tokens_per_step
    for run in study.runs:  # the budget is the same for every run
        for seed, cfg in run["cfgs"]:
            assert (cfg.data.seq_len, cfg.data.batch_size, cfg.train.steps, cfg.train.seed) == (
                study.budget["seq_len"], study.budget["batch_size"], study.steps, seed)


def test_model_info_of_a_concept_model_counts_inference_at_the_given_ratio(tmp_path):
    """The study's info stage for DLCM (the miniature study trains a decoder only): inference FLOPs per token come
    from the model's own count at the realised tokens per concept; more tokens per concept, fewer FLOPs."""
    from core.config import load_config
    from models.registry import build_model

    _write_study(tmp_path)
    cfg = load_config(tmp_path / "dlcm.toml", ["data.seq_len=32"])
    model = build_model(cfg.model, seed=0)
    at2, at4 = (compare.model_info(model, cfg, r) for r in (2.0, 4.0))
    assert at2["infer_flops_source"] == "model" and at2["params"] == at4["params"] > 0
    assert at2["flops_per_token_infer"] == model.inference_flops_per_token(32, 2.0)
    assert at4["flops_per_token_infer"] < at2["flops_per_token_infer"]
    default = compare.model_info(model, cfg)  # no measured ratio: the config's target
    assert default["flops_per_token_infer"] == model.inference_flops_per_token(32, cfg.model.target_ratio)
