"""The architecture study: train each run of a study config, measure each the same way, write a report and plots.

    python scripts/compare.py configs/compare_tiny.toml [--out DIR]       # a study (trains what is missing)
    python scripts/compare.py runs/decoder_tiny runs/samba_tiny --out runs/compare   # finished run directories

Study mode. The study config (see configs/compare_tiny.toml) names the runs (a run config plus per-run
overrides), one shared budget (training tokens, sequence length, batch, seeds: every run trains on the same
number of tokens of the same data) and the evaluation (prompts, new tokens, drafters, context lengths of the
latency sweep, extrapolation factor). Everything is checked before anything is trained or written: a mistake
is one line and exit status 2, and no study directory is left behind.

The study directory (default runs/<study name>) holds one run directory per run and seed, `prompts.jsonl`,
the static suffix automaton, and per run a `measure/` folder with one JSON file per measurement. Each file
records the settings it was measured with; a rerun reuses every measurement whose settings and checkpoint
are unchanged, resumes or skips training that is done, and retrains a run whose resolved config changed.
Nothing is re-implemented here: training is `train.loop.train`, quality at 1x and 4x the training length is
`bench_context.py --extrapolation`'s function, latency and cache bytes against context are
`bench_context.py`'s timing functions, decode tokens/s at batch 1 and 8 is `bench_decode.py`'s `bench_one`,
speculation (MAT, speedup, exactness) is `python -m decode.eval`, FLOPs and parameters are the models' own
`flops_per_token` and `count_params`.

Outputs: report.md, report.json ({"machine", "budget", "runs": [{"name", "arch", "params", ...}]}) and one
PNG per question (bpb against training tokens and FLOPs; latency and cache against context; speculation;
bpb against inference FLOPs), colours fixed per architecture.

Run-directory mode (the older form) reads config.toml, metrics.jsonl and eval_<drafter>.json of finished runs
and writes compare.md, compare.json and compare.png.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):  # the repository, and the sibling benchmark scripts the measurements reuse
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402
from decode.drafters import ReferenceDrafter  # noqa: E402  (numpy and numba only: no JAX)

ORACLE = ReferenceDrafter.name  # drafts plain decoding's own output: the ceiling, never a drafter to use

LN2 = math.log(2.0)
COLORS = {"decoder": "#1f77b4", "samba": "#ff7f0e", "dlcm": "#2ca02c", "mamba": "#d62728"}
EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def arch_color(arch: str) -> str:
    if arch in COLORS:
        return COLORS[arch]
    return EXTRA_COLORS[sum(map(ord, arch)) % len(EXTRA_COLORS)]


# ==== run-directory mode (the older form) ======================================================================
def read_run(run_dir: Path) -> dict:
    from core.config import load_config

    cfg = load_config(run_dir / "config.toml")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [_json(metrics_path, x) for x in metrics_path.read_text().splitlines() if x.strip()]
    train_tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    vals = [(m["step"], m["val_bpb"]) for m in metrics if "val_bpb" in m]
    evals = {}
    for path in sorted(run_dir.glob("eval_*.json")):
        rep = _json(path, path.read_text())
        evals[rep["drafter"]] = rep
    if evals and "none" not in evals:  # every speculative report carries its plain baseline
        base = next(iter(evals.values()))["baseline"]
        evals["none"] = {"drafter": "none", "tokens_per_s": base["tokens_per_s"], "mat": 1.0, "speedup": None}
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = _json(run_dir / "summary.json", (run_dir / "summary.json").read_text())
    return {"name": cfg.name, "arch": cfg.model.arch, "params": summary.get("params"), "metrics": metrics,
            "val": vals, "train_tokens_per_s": sorted(train_tps)[len(train_tps) // 2] if train_tps else None,
            "evals": evals, "steps": metrics[-1]["step"] if metrics else 0}


ORDER = ["none", "pld", "recycle", "sam", "sam+recycle", ORACLE]


def drafter_order(runs: list[dict]) -> list[str]:
    """The drafters evaluated in any run: the known ones in a fixed order, then any others by name."""
    names = {d for r in runs for d in r["evals"]}
    return sorted(names, key=lambda d: (ORDER.index(d) if d in ORDER else len(ORDER), d))


def table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    drafters = drafter_order(runs)
    head = ["run", "arch", "params", "steps", "train tok/s", "val bpb"]
    for d in drafters:
        head += [f"{d} tok/s", f"{d} MAT"] + ([f"{d} speedup"] if d != "none" else [])
    rows = []
    for r in runs:
        row = [r["name"], r["arch"], f"{r['params'] / 1e6:.2f}M" if r["params"] else "?", str(r["steps"]),
               f"{r['train_tokens_per_s']:,.0f}" if r["train_tokens_per_s"] else "-",
               f"{r['val'][-1][1]:.3f}" if r["val"] else "-"]
        for d in drafters:
            e = r["evals"].get(d)
            row += [f"{e['tokens_per_s']:.1f}" if e else "-", f"{e['mat']:.2f}" if e else "-"]
            if d != "none":
                row += [f"{e['speedup']:.2f}x" if e and e.get("speedup") else "-"]
        rows.append(row)
    return head, rows


def render(head, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[plot]'); skipping plots", file=sys.stderr)
        return None
    return plt


def plot(runs: list[dict], out: Path) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        tr = [(m["step"], m["loss"] / LN2) for m in r["metrics"]]
        axes[0].plot(*zip(*tr), label=f"{r['name']} train") if tr else None
        if r["val"]:
            axes[0].plot(*zip(*r["val"]), "o--", label=f"{r['name']} val")
    axes[0].set(xlabel="step", ylabel="bits per byte", title="Training and validation")
    axes[0].legend(fontsize=8)
    drafters = drafter_order(runs)
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        ds = [d for d in drafters if d in r["evals"]]
        xs = [drafters.index(d) + i * width for d in ds]
        axes[1].bar(xs, [r["evals"][d]["tokens_per_s"] for d in ds], width=width, label=r["name"])
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(drafters))], drafters)
    axes[1].set(ylabel="decoded tokens/s (greedy, batch 1)", title="Decoding with and without speculation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


def compare_run_dirs(run_dirs: list[Path], out: Path) -> int:
    missing = [str(r) for r in run_dirs if not (r / "config.toml").is_file() or not (r / "metrics.jsonl").is_file()]
    if missing:
        raise UserError(f"not a finished run directory (needs config.toml and metrics.jsonl): {', '.join(missing)}")
    runs = [read_run(r) for r in run_dirs]  # every input is read before anything is written
    head, rows = table(runs)
    text = render(head, rows)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "metrics"} for r in runs], indent=1, default=str))
    for f in plot(runs, out):
        print(f"plot: {f}")
    return 0


# ==== the study config ========================================================================================
STUDY_KEYS = {"name", "out", "budget", "eval", "run"}
BUDGET_KEYS = {"tokens": int, "seq_len": int, "batch_size": int, "seeds": list}
EVAL_DEFAULTS = {
    "prompts": "val",          # a prompts JSONL file, or "val": generated from the validation split
    "n_prompts": 6,            # with prompts = "val"
    "prompt_tokens": 96,       # with prompts = "val"
    "new_tokens": 64,
    "drafters": ["pld", "sam"],
    "max_draft": 0,            # 0: decode.eval's default
    "sam_max_tokens": 0,       # training tokens indexed by the static automaton (0: all)
    "repeats": 3,              # interleaved timed passes of decode.eval (medians)
    "decode_batches": [1, 8],
    "decode_prompt_len": 64,
    "decode_new_tokens": 64,
    "contexts": [256, 1024, 4096],
    "latency_steps": 20,
    "extrapolation": [1, 4],   # evaluation lengths as multiples of the training length (same tokens at each)
    "extrapolation_tokens": 16384,
    "batch_tokens": 8192,
}
# the keys the budget sets in every run config: a run's overrides may not change them
BUDGET_OWNED = {"data.seq_len", "data.batch_size", "train.steps", "train.seed", "train.stop_after"}


class Study:
    def __init__(self, path: Path, raw: dict, out: Path | None):
        self.path = path
        self.name = str(raw.get("name", path.stem))
        self.out = Path(out or raw.get("out") or Path("runs") / self.name)
        self.budget = raw["budget"]
        self.eval = raw["eval"]
        self.runs = raw["runs"]  # [{"name", "config", "overrides", "cfgs": [(seed, Config)]}]

    @property
    def steps(self) -> int:
        return self.budget["tokens"] // (self.budget["batch_size"] * self.budget["seq_len"])

    @property
    def tokens_per_step(self) -> int:
        return self.budget["batch_size"] * self.budget["seq_len"]


def _ints(where: str, v, *, minimum: int = 1) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise UserError(f"{where} must be a non-empty list of integers; got {v!r}")
    if min(v) < minimum:
        raise UserError(f"{where} values must be >= {minimum}; got {v!r}")
    return v


def load_study(path: Path, out: Path | None = None) -> Study:
    """Parse and check a study config completely (run configs included) without writing anything."""
    from core.config import load_config
    from decode.drafters import DRAFTERS

    if not path.is_file():
        raise UserError(f"study config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(STUDY_KEYS))}")

    budget = raw.get("budget")
    if not isinstance(budget, dict):
        raise UserError(f"{path}: missing [budget] (tokens, seq_len, batch_size, seeds)")
    for key in BUDGET_KEYS:
        if key not in budget:
            raise UserError(f"{path}: budget.{key} is missing; [budget] needs {', '.join(BUDGET_KEYS)}")
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise UserError(f"{path}: unknown key budget.{key}; valid: {', '.join(BUDGET_KEYS)}")
        if key == "seeds":
            _ints(f"budget.seeds", value, minimum=0)
            if len(set(value)) != len(value):
                raise UserError(f"budget.seeds has a repeated seed: {value}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: budget.{key} must be a positive integer; got {value!r}")
    if budget["seq_len"] < 2:
        raise UserError(f"budget.seq_len must be >= 2; got {budget['seq_len']}")
    if budget["tokens"] < budget["seq_len"] * budget["batch_size"]:
        raise UserError(f"budget.tokens {budget['tokens']} is less than one step of batch_size x seq_len = "
                        f"{budget['seq_len'] * budget['batch_size']} tokens")

    ev = dict(EVAL_DEFAULTS)
    given = raw.get("eval", {})
    if not isinstance(given, dict):
        raise UserError(f"{path}: [eval] must be a table")
    for key, value in given.items():
        if key not in EVAL_DEFAULTS:
            raise UserError(f"{path}: unknown key eval.{key}; valid: {', '.join(EVAL_DEFAULTS)}")
        want = type(EVAL_DEFAULTS[key])
        if want is int and (not isinstance(value, int) or isinstance(value, bool)) or \
                want is not int and not isinstance(value, want):
            raise UserError(f"{path}: eval.{key} must be a {want.__name__}; got {value!r}")
        ev[key] = value
    drafters = ev["drafters"]
    if not isinstance(drafters, list) or not all(isinstance(d, str) for d in drafters):
        raise UserError(f"eval.drafters must be a list of names; valid: {', '.join(DRAFTERS)}")
    bad = [d for d in drafters if (d not in DRAFTERS and d != ORACLE) or d == "none"]
    if bad:
        raise UserError(f"unknown drafter {bad[0]!r} in eval.drafters; valid: "
                        f"{', '.join(d for d in DRAFTERS if d != 'none')}, {ORACLE} (the ceiling: drafts the plain "
                        f"output itself) (plain decoding is always measured)")
    for key in ("contexts", "decode_batches", "extrapolation"):
        _ints(f"eval.{key}", ev[key])
    for key in ("n_prompts", "prompt_tokens", "new_tokens", "repeats", "decode_prompt_len", "latency_steps",
                "extrapolation_tokens", "batch_tokens"):
        if ev[key] < 1:
            raise UserError(f"eval.{key} must be >= 1; got {ev[key]}")
    if ev["decode_new_tokens"] < 2 or ev["max_draft"] < 0 or ev["sam_max_tokens"] < 0:
        raise UserError("eval.decode_new_tokens must be >= 2, eval.max_draft and eval.sam_max_tokens >= 0")
    top = max(ev["extrapolation"])
    if any(top % f for f in ev["extrapolation"]):
        raise UserError(f"every eval.extrapolation factor must divide the largest ({top}); got {ev['extrapolation']}")
    if ev["prompts"] != "val":
        prompts = Path(ev["prompts"])
        if not prompts.is_absolute() and not prompts.is_file():
            prompts = ROOT / prompts
        if not prompts.is_file():
            raise UserError(f"eval.prompts: no such prompts file {ev['prompts']!r} (or \"val\" to generate them)")
        from decode.prompts import read_prompts
        read_prompts(prompts)  # a malformed file is refused now
        ev["prompts"] = str(prompts)

    runs_raw = raw.get("run")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise UserError(f"{path}: no [[run]] tables; each names a config (and optional overrides)")
    runs, names = [], set()
    for i, r in enumerate(runs_raw):
        if not isinstance(r, dict) or "config" not in r:
            raise UserError(f"{path}: run {i + 1} has no config")
        extra = set(r) - {"name", "config", "overrides"}
        if extra:
            raise UserError(f"{path}: unknown key run.{sorted(extra)[0]}; valid: name, config, overrides")
        config = Path(r["config"])
        if not config.is_absolute() and not config.is_file():
            config = ROOT / config
        if not config.is_file():
            raise UserError(f"run {i + 1}: config file not found: {r['config']}")
        overrides = r.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise UserError(f"run {i + 1}: overrides must be a list of \"section.key=value\" strings")
        owned = [o for o in overrides if o.partition("=")[0].strip() in BUDGET_OWNED]
        if owned:
            raise UserError(f"run {i + 1}: override {owned[0]!r} changes the shared budget; set it in [budget]")
        name = str(r.get("name") or config.stem)
        if name in names:
            raise UserError(f"{path}: two runs are named {name!r}; give each a distinct name")
        names.add(name)
        steps = budget["tokens"] // (budget["batch_size"] * budget["seq_len"])
        cfgs = []
        for seed in budget["seeds"]:
            ov = overrides + [f"data.seq_len={budget['seq_len']}", f"data.batch_size={budget['batch_size']}",
                              f"train.steps={steps}", f"train.seed={seed}"]
            try:
                cfg = load_config(config, ov)
            except UserError as e:
                raise UserError(f"run {name!r} ({config.name}): {e}") from None
            if cfg.train.warmup_steps >= steps:
                raise UserError(f"run {name!r}: train.warmup_steps {cfg.train.warmup_steps} >= the budget's "
                                f"{steps} steps")
            cfgs.append((seed, cfg))
        runs.append({"name": name, "config": str(config), "overrides": overrides, "cfgs": cfgs})
    return Study(path, {"name": raw.get("name"), "out": raw.get("out"), "budget": budget, "eval": ev,
                        "runs": runs}, out)


# ==== progress ================================================================================================
def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per stage and run: elapsed time and an ETA for the whole study. A stage's cost is estimated
    from the same stage of earlier runs (training: from the measured seconds per training FLOP)."""

    DEFAULTS = {"train_flops_per_s": 3e10, "extrapolation": 20.0, "context": 20.0, "decode": 30.0,
                "speculation": 60.0, "prompts": 5.0, "sam": 20.0, "info": 5.0, "concepts": 10.0}

    def __init__(self, plan: list[tuple[str, str, float]], log):
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.records: list[dict] = []  # per stage: wall and CPU seconds (CPU time is what a loaded machine gave us)
        self.plan = plan  # [(stage, run, train FLOPs or 0)]
        self.done: set[int] = set()
        self.seen: dict[str, list[float]] = {}
        self.flop_rate: list[tuple[float, float]] = []  # (flops, seconds)
        self.log = log

    def estimate(self, i: int) -> float:
        stage, _, flops = self.plan[i]
        if stage == "train":
            if self.flop_rate:
                rate = sum(f for f, _ in self.flop_rate) / max(sum(s for _, s in self.flop_rate), 1e-9)
            else:
                rate = self.DEFAULTS["train_flops_per_s"]
            return flops / rate
        past = self.seen.get(stage)
        return sum(past) / len(past) if past else self.DEFAULTS.get(stage, 10.0)

    def eta(self) -> float:
        return sum(self.estimate(i) for i in range(len(self.plan)) if i not in self.done)

    @contextlib.contextmanager
    def stage(self, i: int, what: str):
        stage, run, flops = self.plan[i]
        t, c = time.perf_counter(), time.process_time()
        info: dict = {"note": ""}
        try:
            yield info
        finally:
            dt, cpu = time.perf_counter() - t, time.process_time() - c
            self.done.add(i)
            self.records.append({"stage": stage, "run": run, "wall_s": round(dt, 2), "cpu_s": round(cpu, 2),
                                 "cached": bool(info.get("cached"))})
            if info.get("cached"):
                note = "cached"
            else:
                note = f"{dt:.0f}s, cpu {cpu:.0f}s"
                if stage == "train" and flops and info.get("trained_flops"):
                    self.flop_rate.append((info["trained_flops"], dt))
                elif stage != "train":
                    self.seen.setdefault(stage, []).append(dt)
            extra = f", {info['note']}" if info.get("note") else ""
            self.log(f"[{_hms(time.perf_counter() - self.t0)} elapsed | eta {_hms(self.eta())}] "
                     f"{stage:<12s} {run:<16s} {what} ({note}{extra})")


# ==== measurements ============================================================================================
def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def cached(path: Path, key: dict, compute, info: dict):
    """The measurement in `path` if it was made with exactly `key`; otherwise compute, store and return it."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("key") == json.loads(json.dumps(key, default=str)):
                info["cached"] = True
                return old["value"]
        except json.JSONDecodeError:
            pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"key": key, "value": value, "measured_at": _now()})
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@contextlib.contextmanager
def _quiet(log_path: Path):
    """Send a measurement's own chatter (stdout and stderr) to the run's log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield f


def run_done(cfg, run_dir: Path) -> bool:
    from core.config import load_config, to_dict

    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.toml").is_file():
        return False
    try:
        saved = load_config(run_dir / "config.toml")
        summary = json.loads((run_dir / "summary.json").read_text())
    except (UserError, json.JSONDecodeError):
        return False
    return to_dict(saved) == to_dict(cfg) and summary.get("final_step") == cfg.train.steps


def stale(cfg, run_dir: Path) -> bool:
    """A run directory trained under other settings (a changed study config): it is retrained from scratch."""
    from core.config import load_config, to_dict

    if not (run_dir / "config.toml").is_file():
        return run_dir.exists() and any(run_dir.iterdir())
    try:
        return to_dict(load_config(run_dir / "config.toml")) != to_dict(cfg)
    except UserError:
        return True


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one record per step: a resumed run appends the steps after its checkpoint again, and the
    later record of a step is the one that led to the final model."""
    path = run_dir / "metrics.jsonl"
    by_step = {}
    for x in path.read_text().splitlines():
        if x.strip():
            m = _json(path, x)
            by_step[m["step"]] = m
    return [by_step[k] for k in sorted(by_step)]


def model_info(model, cfg, tokens_per_concept: float | None = None) -> dict:
    """Parameters (total and without the embedding table) and FLOPs per token from the model's own count.

    Training FLOPs per token are `flops_per_token(seq_len)` (forward and backward, 6 N + attention); inference
    FLOPs per token are the model's `inference_flops_per_token(seq_len)` if it has one (a concept model's at
    `tokens_per_concept`, the realised ratio, else its target ratio), else one third of the training count (the
    forward pass of the same count, at the training length)."""
    import jax
    from flax import nnx

    from models.contract import count_params

    total = count_params(model)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    emb = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(state)
              if "embedding" in jax.tree_util.keystr(p) or "embed" in jax.tree_util.keystr(p).split("]")[0])
    train_f = float(model.flops_per_token(cfg.data.seq_len))
    infer = getattr(model, "inference_flops_per_token", None)
    if infer is None:
        infer_f = train_f / 3.0
    elif hasattr(model, "boundaries"):  # a concept model: its cost per token depends on tokens per concept
        ratio = tokens_per_concept if tokens_per_concept is not None else cfg.model.target_ratio
        infer_f = float(infer(cfg.data.seq_len, ratio))
    else:
        infer_f = float(infer(cfg.data.seq_len))
    return {"params": int(total), "params_no_embed": int(total - emb), "flops_per_token_train": train_f,
            "flops_per_token_infer": infer_f, "infer_flops_source": "model" if infer else "train / 3"}


def measure_concepts(model, cfg, corpus, n_tokens: int) -> dict | None:
    """Realised tokens per concept at evaluation (boundaries p >= 0.5) on validation windows, for models that
    expose `boundaries` (DLCM)."""
    if not hasattr(model, "boundaries"):
        return None
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from core.data import eval_batches

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s).boundaries(t)[1])
    bs = max(1, n_tokens // cfg.data.seq_len // 4)
    tot, nb = 0, 0
    for batch in eval_batches(corpus.val, batch_size=bs, seq_len=cfg.data.seq_len, n_batches=4):
        b = fn(state, jnp.asarray(batch[:, :-1]))
        tot += int(b.size)
        nb += int(jnp.sum(b))
    return {"tokens_per_concept": tot / max(nb, 1), "tokens": tot, "concepts": nb,
            "target_ratio": getattr(cfg.model, "target_ratio", None)}


def measure_context(model, contexts: list[int], steps: int, rounds: int = 3) -> list[dict]:
    """bench_context's per-token latency at each context, in `rounds` interleaved rounds of steps/rounds timed
    steps; ms_per_token is the lowest of the rounds' medians (load on a shared machine only ever adds time)."""
    import bench_context as bc

    params, step = bc.decode_step_fn(model)
    per = {c: [] for c in contexts}
    for _ in range(rounds):
        for c in contexts:
            per[c].append(bc.time_context(model, params, step, c, max(1, -(-steps // rounds))))
    rows = []
    for c in contexts:
        best = min(per[c], key=lambda r: r["ms_per_token"])
        rows.append({"context": c, "ms_per_token": best["ms_per_token"], "cache_bytes": best["cache_bytes"],
                     "ms_rounds": [r["ms_per_token"] for r in per[c]]})
    return rows


def measure_decode(model, cfg, batches: list[int], prompt_len: int, new: int, repeats: int) -> dict:
    import bench_decode as bd

    from decode.engine import Engine

    max_len = prompt_len + new + 17
    engine = Engine(model, max_len=max_len)
    bw = bd.ReadBandwidth(gib=0.25)
    out = {}
    for b in batches:
        r = bd.bench_one(engine, model, max_len, b, prompt_len, new, repeats, bw, cfg.model.arch, cfg.model.dtype)
        out[f"batch_{b}"] = {k: r[k] for k in ("tokens_per_s", "ms_per_step", "prefill_tokens_per_s",
                                                "roofline_fraction", "read_gb_per_s")}
    return out


def measure_forced(model, val, start: int, n: int, repeats: int) -> dict:
    """Batch-1 decode steps teacher-forced on validation text (extend one real token, commit; no sampling): the
    per-step time of tokens start+m .. start+2m, m = max(n, 32), as the difference of the fastest m-step and
    the fastest 2m-step loop over `repeats` (load only ever adds time; scripts/bench_dlcm_decode.forced_step_us).
    A concept model closes concepts there at the validation rate; greedy output of a tiny model need not close
    any (a run of spaces), and then the greedy decode figure measures only its steps that close none."""
    import bench_dlcm_decode as bdd
    import numpy as np

    m = max(int(n), 32)  # fewer steps: the difference drowns in the noise of a shared machine
    seq = np.asarray(val[:start + 2 * m], np.int32)
    t = np.asarray(bdd.forced_step_us([model], seq, start, m, repeats, raw=True)[0])
    us = 1e6 * max(float(t[:, 1].min() - t[:, 0].min()), 1e-9) / m
    closed = None
    if hasattr(model, "boundaries"):
        import jax.numpy as jnp

        _, b = model.boundaries(jnp.asarray(seq[None]))
        closed = int(np.asarray(b[0])[start + m:start + 2 * m].sum())
    return {"us_per_token": us, "tokens_per_s": 1e6 / us, "tokens": m, "concepts_closed": closed}


def measure_extrapolation(run_dir: Path, seq_len: int, factors: list[int], n_tokens: int, batch_tokens: int):
    import argparse

    import bench_context as bc

    lengths = [seq_len * f for f in factors]
    args = argparse.Namespace(extrapolation=[run_dir], lengths=lengths, eval_tokens=max(n_tokens, max(lengths)),
                              batch_tokens=max(batch_tokens, max(lengths)))
    res = bc.run_extrapolation(args)
    return {str(r["eval_len"] // seq_len): r["bpb"] for r in res["rows"]}


def measure_speculation(run_dir: Path, prompts: Path, sam_dir: Path, ev: dict, out_dir: Path) -> dict:
    """`python -m decode.eval` (in this process) with all drafters side by side against one plain baseline."""
    from decode import eval as deval

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.glob("eval_*.json"):
        f.unlink()
    drafters = ev["drafters"]
    argv = [str(run_dir), "--prompts", str(prompts), "--drafter", ",".join(drafters), "--sam", str(sam_dir),
            "--max-new-tokens", str(ev["new_tokens"]), "--repeats", str(ev["repeats"])]
    if ev["max_draft"]:
        argv += ["--max-draft", str(ev["max_draft"])]
    single = len(drafters) == 1
    argv += ["--out", str(out_dir / f"eval_{drafters[0]}.json") if single else str(out_dir)]
    rc = deval.main(argv)
    if rc == 2:
        raise RuntimeError(f"decode.eval refused its arguments for {run_dir} (see the run's study.log)")
    out = {}
    for d in drafters:
        rep = json.loads((out_dir / f"eval_{d}.json").read_text())
        n_exact = sum(bool(p["matches_plain"]) for p in rep["per_prompt"])
        out[d] = {"mat": rep["mat"], "speedup": rep["speedup"], "exact": n_exact, "n_prompts": rep["n_prompts"],
                  "tokens_per_s": rep["tokens_per_s"], "plain_tokens_per_s": rep["baseline"]["tokens_per_s"],
                  "draft_us_per_step": rep["draft_us_per_step"], "max_draft": rep["max_draft"]}
    return out


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"backend": jax.default_backend(), "device": f"{d.platform}:{getattr(d, 'device_kind', '')}",
            "n_devices": jax.device_count(), "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "load_avg_1m_start": round(load[0], 2) if load else None}


# ==== the study ===============================================================================================
def _say(line: str) -> None:
    print(line, flush=True)


def run_study(study: Study, *, log=_say) -> dict:
    import jax  # noqa: F401  (imported here so that validation above needs no devices)
    from flax import nnx

    if str(ROOT / "scripts") not in sys.path:  # bench_context.py and bench_decode.py are imported from there
        sys.path.insert(0, str(ROOT / "scripts"))
    from core.checkpoint import load_model
    from core.data import Corpus
    from core.tokenizer import get_tokenizer
    from models.registry import build_model
    from train.loop import train

    ev, out = study.eval, study.out
    out.mkdir(parents=True, exist_ok=True)
    t_study = time.perf_counter()
    mach = machine()

    # the plan, for the ETA: per run and seed a training stage; evaluation stages per run
    plan, train_flops = [], {}
    for r in study.runs:
        model = nnx.eval_shape(lambda: build_model(r["cfgs"][0][1].model, seed=0))  # shapes only
        fpt = float(model.flops_per_token(study.budget["seq_len"]))
        del model
        for seed, _ in r["cfgs"]:
            train_flops[(r["name"], seed)] = fpt * study.steps * study.tokens_per_step
            plan.append(("train", f"{r['name']}/s{seed}", train_flops[(r["name"], seed)]))
    plan.append(("prompts", "study", 0.0))
    if any(d.startswith("sam") for d in ev["drafters"]):
        plan.append(("sam", "study", 0.0))
    for r in study.runs:
        for seed, _ in r["cfgs"]:
            plan.append(("extrapolation", f"{r['name']}/s{seed}", 0.0))
        plan += [(s, r["name"], 0.0) for s in ("concepts", "info", "context", "decode", "speculation")]
    prog = Progress(plan, log)
    idx = iter(range(len(plan)))
    log(f"study {study.name}: {len(study.runs)} runs x {len(study.budget['seeds'])} seeds, "
        f"{study.budget['tokens']:,} training tokens each ({study.steps} steps of {study.budget['batch_size']} x "
        f"{study.budget['seq_len']}), -> {out}")

    # 1. training (resumes a partial run, skips a finished one, retrains one whose config changed)
    train_time = {}
    for r in study.runs:
        for seed, cfg in r["cfgs"]:
            run_dir = out / "runs" / f"{r['name']}_s{seed}"
            with prog.stage(next(idx), f"{study.steps} steps") as info:
                if run_done(cfg, run_dir):
                    info["cached"] = True
                else:
                    if stale(cfg, run_dir):
                        shutil.rmtree(run_dir)
                        info["note"] = "settings changed: retrained"
                    elif run_dir.exists() and not any((run_dir / "checkpoints").glob("*")):
                        shutil.rmtree(run_dir)  # an interrupted start with nothing to resume from
                    with _quiet(out / "logs" / f"{r['name']}_s{seed}.log") as f:
                        t0 = time.perf_counter()
                        start = train(cfg, run_dir, log=lambda *a: print(*a, file=f, flush=True))["start_step"]
                    done_steps = cfg.train.steps - start
                    info["trained_flops"] = train_flops[(r["name"], seed)] * done_steps / cfg.train.steps
                    train_time[(r["name"], seed)] = time.perf_counter() - t0
                metrics = read_metrics(run_dir)
                vals = [m["val_bpb"] for m in metrics if "val_bpb" in m]
                info["note"] = (info["note"] + ", " if info["note"] else "") + f"val bpb {vals[-1]:.3f}"

    # 2. prompts and the static automaton (one per corpus; all runs of a study share the data settings)
    first_cfg = study.runs[0]["cfgs"][0][1]
    tok = get_tokenizer(first_cfg.data.tokenizer)
    corpus = Corpus.open(first_cfg.data, tok)
    with prog.stage(next(idx), "held-out prompts") as info:
        if ev["prompts"] == "val":
            prompts = out / "prompts.jsonl"
            key = {"corpus": corpus.key, "n": ev["n_prompts"], "prompt_tokens": ev["prompt_tokens"]}

            def make_prompts():
                from decode.prompts import build_prompts
                items = build_prompts(corpus.val, tok, n=ev["n_prompts"], prompt_tokens=ev["prompt_tokens"])
                if not items:
                    raise UserError(f"no validation line fits in eval.prompt_tokens = {ev['prompt_tokens']}")
                prompts.write_text("".join(json.dumps(x) + "\n" for x in items))
                return {"n": len(items)}
            if not prompts.is_file():
                (out / "measure").mkdir(parents=True, exist_ok=True)
                (out / "measure" / "prompts.json").unlink(missing_ok=True)
            n = cached(out / "measure" / "prompts.json", key, make_prompts, info)["n"]
            info["note"] = f"{n} prompts from the validation split"
        else:
            prompts = Path(ev["prompts"])
            info["cached"] = True
    sam_dir = out / "sam"
    if any(d.startswith("sam") for d in ev["drafters"]):
        with prog.stage(next(idx), "static suffix automaton") as info:
            key = {"corpus": corpus.key, "tokenizer": tok.name, "max_tokens": ev["sam_max_tokens"]}

            def make_sam():
                from decode.build_sam import build
                if sam_dir.exists():
                    shutil.rmtree(sam_dir)
                first_dir = out / "runs" / f"{study.runs[0]['name']}_s{study.runs[0]['cfgs'][0][0]}"
                with _quiet(out / "logs" / "sam.log"):
                    build(str(first_dir), max_tokens=ev["sam_max_tokens"], out=str(sam_dir))
                n = len(corpus.train) if not ev["sam_max_tokens"] else min(ev["sam_max_tokens"], len(corpus.train))
                return {"tokens": n}
            if not (sam_dir / "header.json").is_file():
                (out / "measure" / "sam.json").unlink(missing_ok=True)
            info["note"] = f"{cached(out / 'measure' / 'sam.json', key, make_sam, info)['tokens']:,} tokens"

    # 3. measurements, each cached in RUN_DIR/measure/<what>.json with its settings and checkpoint step
    results = []
    for r in study.runs:
        seeds = {}
        for seed, cfg in r["cfgs"]:
            run_dir = out / "runs" / f"{r['name']}_s{seed}"
            step = cfg.train.steps
            with prog.stage(next(idx), f"bpb at {ev['extrapolation']} x {cfg.data.seq_len} tokens") as info:
                key = {"step": step, "factors": ev["extrapolation"], "tokens": ev["extrapolation_tokens"]}
                with _quiet(out / "logs" / f"{r['name']}_s{seed}.log"):
                    bpb = cached(run_dir / "measure" / "extrapolation.json", key, lambda: measure_extrapolation(
                        run_dir, cfg.data.seq_len, ev["extrapolation"], ev["extrapolation_tokens"],
                        ev["batch_tokens"]), info)
                info["note"] = ", ".join(f"{k}x {v:.3f}" for k, v in bpb.items())
            metrics = read_metrics(run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            seeds[seed] = {"metrics": metrics, "bpb_by_factor": bpb, "summary": summary}

        seed0, cfg = r["cfgs"][0]
        run_dir = out / "runs" / f"{r['name']}_s{seed0}"
        mdir = run_dir / "measure"
        log_path = out / "logs" / f"{r['name']}_s{seed0}.log"
        loaded = {}

        def model():  # loaded only when a measurement needs it (a rerun with everything cached loads nothing)
            if "m" not in loaded:
                loaded["m"] = load_model(run_dir)[1]
            return loaded["m"]
        base_key = {"step": cfg.train.steps}
        with prog.stage(next(idx), "tokens per concept") as info:
            key = {**base_key, "tokens": ev["extrapolation_tokens"]}
            conc = cached(mdir / "concepts.json", key,
                          lambda: measure_concepts(model(), cfg, corpus, ev["extrapolation_tokens"]), info)
            info["note"] = f"{conc['tokens_per_concept']:.2f} tokens/concept" if conc else "not a concept model"
        with prog.stage(next(idx), "params and FLOPs per token") as info:
            ratio = conc["tokens_per_concept"] if conc else None  # a concept model's inference FLOPs at its realised ratio
            inf = cached(mdir / "info.json", {**base_key, "tokens_per_concept": ratio},
                         lambda: model_info(model(), cfg, ratio), info)
        with prog.stage(next(idx), f"latency and cache at contexts {ev['contexts']}") as info:
            key = {**base_key, "contexts": ev["contexts"], "steps": ev["latency_steps"], "rounds": 3}
            with _quiet(log_path):
                ctx = cached(mdir / "context.json", key,
                             lambda: measure_context(model(), ev["contexts"], ev["latency_steps"]), info)
            info["note"] = ", ".join(f"{c['context']}: {c['ms_per_token']:.2f} ms" for c in ctx)
        with prog.stage(next(idx), f"decode tokens/s at batch {ev['decode_batches']}") as info:
            key = {**base_key, "batches": ev["decode_batches"], "prompt_len": ev["decode_prompt_len"],
                   "new": ev["decode_new_tokens"], "repeats": ev["repeats"]}
            with _quiet(log_path):
                dec = cached(mdir / "decode.json", key, lambda: measure_decode(
                    model(), cfg, ev["decode_batches"], ev["decode_prompt_len"], ev["decode_new_tokens"],
                    ev["repeats"]), info)
            fkey = {**base_key, "start": ev["decode_prompt_len"], "n": ev["decode_new_tokens"],
                    "repeats": ev["repeats"], "corpus": corpus.key}
            with _quiet(log_path):
                forced = cached(mdir / "forced.json", fkey, lambda: measure_forced(
                    model(), corpus.val, ev["decode_prompt_len"], ev["decode_new_tokens"], ev["repeats"]), info)
            info["note"] = ", ".join(f"b{k.split('_')[1]}: {v['tokens_per_s']:.0f} tok/s" for k, v in dec.items()) \
                + f", teacher-forced b1: {forced['tokens_per_s']:.0f} tok/s"
        with prog.stage(next(idx), f"speculation {', '.join(ev['drafters'])} vs plain") as info:
            pkey = prompts.read_text() if prompts.is_file() else ""
            key = {**base_key, "drafters": ev["drafters"], "new_tokens": ev["new_tokens"], "repeats": ev["repeats"],
                   "max_draft": ev["max_draft"], "sam_max_tokens": ev["sam_max_tokens"],
                   "prompts_hash": __import__("hashlib").sha256(pkey.encode()).hexdigest()[:16]}
            with _quiet(log_path):
                spec = cached(mdir / "speculation.json", key,
                              lambda: measure_speculation(run_dir, prompts, sam_dir, ev, mdir / "eval"), info)
            info["note"] = ", ".join(f"{d} {v['speedup']:.2f}x MAT {v['mat']:.2f} exact {v['exact']}/{v['n_prompts']}"
                                     for d, v in spec.items())
        loaded.clear()
        results.append(assemble(r, cfg, study, seeds, inf, conc, ctx, dec, spec, train_time, forced))

    wall = time.perf_counter() - t_study
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    mach["load_avg_1m_end"] = round(load[0], 2) if load else None
    report = {"study": study.name, "config": str(study.path), "date": _now(), "machine": mach,
              "budget": {**study.budget, "steps": study.steps, "tokens_per_step": study.tokens_per_step},
              "eval": ev, "wall_s": round(wall, 1), "cpu_s": round(time.process_time() - prog.cpu0, 1),
              "stages": prog.records, "train_wall_s": round(sum(train_time.values()), 1), "runs": results}
    _write_json(out / "report.json", report)
    plots = make_plots(report, out)
    report["plots"] = plots
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(render_report(report))
    return report


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def assemble(r, cfg, study, seeds, inf, conc, ctx, dec, spec, train_time, forced=None) -> dict:
    vals = [[m["val_bpb"] for m in s["metrics"] if "val_bpb" in m][-1] for s in seeds.values()]
    top = str(max(study.eval["extrapolation"]))
    v4 = [s["bpb_by_factor"][top] for s in seeds.values()]
    v1 = [s["bpb_by_factor"].get("1") for s in seeds.values() if "1" in s["bpb_by_factor"]]
    tps = []
    for s in seeds.values():
        xs = sorted(m["tokens_per_s"] for m in s["metrics"] if "tokens_per_s" in m)
        if xs:
            tps.append(xs[len(xs) // 2])
    val_bpb, val_std = _mean_std(vals)
    v4m, v4s = _mean_std(v4)
    fpt = inf["flops_per_token_train"]
    curves = {}
    for seed, s in seeds.items():
        curves[str(seed)] = [{"step": m["step"], "tokens": m["step"] * study.tokens_per_step,
                              "flops": m["step"] * study.tokens_per_step * fpt, "val_bpb": m["val_bpb"]}
                             for m in s["metrics"] if "val_bpb" in m]
    out = {
        "name": r["name"], "arch": cfg.model.arch, "config": os.path.relpath(r["config"], ROOT)
        if r["config"].startswith(str(ROOT)) else r["config"], "overrides": r["overrides"],
        "params": inf["params"], "params_no_embed": inf["params_no_embed"],
        "flops_per_token_train": fpt, "flops_per_token_infer": inf["flops_per_token_infer"],
        "infer_flops_source": inf["infer_flops_source"],
        "train_tokens_per_s": sum(tps) / len(tps) if tps else None,
        "train_wall_s": {str(k[1]): round(v, 1) for k, v in train_time.items() if k[0] == r["name"]},
        "train_tokens": study.steps * study.tokens_per_step, "train_flops": study.steps * study.tokens_per_step * fpt,
        "val_bpb": val_bpb, "val_bpb_std": val_std, "val_bpb_seeds": vals, "n_seeds": len(vals),
        "val_bpb_1x": _mean_std(v1)[0] if v1 else None,
        "val_bpb_4x": v4m, "val_bpb_4x_std": v4s, "extrapolation_factor": int(top),
        "decode": dec, "forced_decode": forced, "context": ctx, "drafters": spec, "curves": curves,
        "tokens_per_concept": conc["tokens_per_concept"] if conc else None,
    }
    return out


# ==== report ==================================================================================================
def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _pm(m, s, n) -> str:
    return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def report_tables(rep: dict) -> str:
    runs = rep["runs"]
    f = rep["runs"][0]["extrapolation_factor"] if runs else 4
    head = ["run", "arch", "params (non-emb)", "train FLOPs/tok", "infer FLOPs/tok", "train tok/s",
            "val bpb", f"bpb @{f}x len", "tok/concept"]
    rows = [[r["name"], r["arch"], f"{_si(r['params'])} ({_si(r['params_no_embed'])})",
             _si(r["flops_per_token_train"]), _si(r["flops_per_token_infer"]),
             f"{r['train_tokens_per_s']:,.0f}" if r["train_tokens_per_s"] else "-",
             _pm(r["val_bpb"], r["val_bpb_std"], r["n_seeds"]), _pm(r["val_bpb_4x"], r["val_bpb_4x_std"], r["n_seeds"]),
             f"{r['tokens_per_concept']:.2f}" if r["tokens_per_concept"] else "-"] for r in runs]
    parts = ["### Quality and cost\n", render(head, rows)]
    batches = list(runs[0]["decode"]) if runs else []
    contexts = [c["context"] for c in runs[0]["context"]] if runs else []
    forced = any(r.get("forced_decode") for r in runs)
    head = ["run"] + [f"decode tok/s b{b.split('_')[1]}" for b in batches] + \
        (["teacher-forced tok/s b1 (concepts closed)"] if forced else []) + \
        [f"ms/tok @{c}" for c in contexts] + [f"cache @{c}" for c in contexts]
    rows = []
    for r in runs:
        bycx = {c["context"]: c for c in r["context"]}
        f = r.get("forced_decode")
        fcell = ([f"{f['tokens_per_s']:,.0f}" + (f" ({f['concepts_closed']} in {f['tokens']})"
                                                 if f["concepts_closed"] is not None else "") if f else "-"]
                 if forced else [])
        rows.append([r["name"]] + [f"{r['decode'][b]['tokens_per_s']:,.0f}" for b in batches] + fcell
                    + [f"{bycx[c]['ms_per_token']:.3f}" for c in contexts]
                    + [_bytes(bycx[c]["cache_bytes"]) for c in contexts])
    parts += ["\n### Decoding speed and context (batch 1 latency, cache bytes per sequence)\n", render(head, rows)]
    if forced:
        parts.append("\nDecode tok/s: greedy generation from random prompts. Teacher-forced: batch-1 steps over "
                     "validation text, where a concept model closes concepts at the validation rate (its greedy "
                     "output may close none, which would leave its costlier steps out of the greedy figure).")
    drafters = list(runs[0]["drafters"]) if runs else []
    head = ["run", "plain tok/s"] + [x for d in drafters for x in (f"{d} MAT", f"{d} speedup", f"{d} exact")]
    # oracle: the ceiling (drafts the plain output itself), not a drafter one could use
    rows = []
    for r in runs:
        plain = next(iter(r["drafters"].values()))["plain_tokens_per_s"] if r["drafters"] else 0
        rows.append([r["name"], f"{plain:.0f}"] + [x for d in drafters for x in (
            f"{r['drafters'][d]['mat']:.2f}", f"{r['drafters'][d]['speedup']:.2f}x",
            f"{r['drafters'][d]['exact']}/{r['drafters'][d]['n_prompts']}")])
    parts += ["\n### Speculative decoding (greedy, batch 1; speedup = wall clock over plain on the same prompts)\n",
              render(head, rows)]
    return "\n".join(parts)


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def summary_lines(rep: dict) -> list[str]:
    """Who wins what, read off the numbers."""
    runs = rep["runs"]
    if not runs:
        return []
    out = []
    best = min(runs, key=lambda r: r["val_bpb"])
    worst = max(runs, key=lambda r: r["val_bpb"])
    out.append(f"Lowest validation bits/byte at the matched budget: **{best['name']}** ({best['val_bpb']:.3f}; "
               f"highest: {worst['name']} {worst['val_bpb']:.3f}).")
    f = runs[0]["extrapolation_factor"]
    best4 = min(runs, key=lambda r: r["val_bpb_4x"])
    deg = ", ".join(f"{r['name']} {r['val_bpb_4x'] - (r['val_bpb_1x'] if r['val_bpb_1x'] is not None else r['val_bpb']):+.3f}"
                    for r in runs)
    out.append(f"At {f}x the training length: **{best4['name']}** is best ({best4['val_bpb_4x']:.3f}); change "
               f"from 1x: {deg}.")
    fast = max(runs, key=lambda r: r["train_tokens_per_s"] or 0)
    out.append(f"Fastest training: **{fast['name']}** ({fast['train_tokens_per_s']:,.0f} tokens/s); cheapest "
               f"inference per token: **{min(runs, key=lambda r: r['flops_per_token_infer'])['name']}**.")
    for b in runs[0]["decode"]:
        w = max(runs, key=lambda r: r["decode"][b]["tokens_per_s"])
        out.append(f"Fastest decoding at batch {b.split('_')[1]}: **{w['name']}** "
                   f"({w['decode'][b]['tokens_per_s']:,.0f} tokens/s).")
    fr = [r for r in runs if r.get("forced_decode")]
    if fr:
        w = max(fr, key=lambda r: r["forced_decode"]["tokens_per_s"])
        out.append(f"Fastest teacher-forced decoding on validation text (batch 1): **{w['name']}** "
                   f"({w['forced_decode']['tokens_per_s']:,.0f} tokens/s; "
                   + ", ".join(f"{r['name']} {r['forced_decode']['tokens_per_s']:,.0f}" for r in fr) + ").")
    if runs[0]["context"] and len(runs[0]["context"]) > 1:
        lo, hi = runs[0]["context"][0]["context"], runs[0]["context"][-1]["context"]
        growth = {r["name"]: r["context"][-1]["ms_per_token"] / r["context"][0]["ms_per_token"] for r in runs}
        cache = {r["name"]: r["context"][-1]["cache_bytes"] for r in runs}
        flat = min(growth, key=growth.get)
        small = min(cache, key=cache.get)
        out.append(f"Latency from context {lo} to {hi}: " + ", ".join(f"{k} {v:.2f}x" for k, v in growth.items())
                   + f"; flattest: **{flat}**. Smallest cache at {hi}: **{small}** ({_bytes(cache[small])}).")
    pairs = [(r["name"], d, v) for r in runs for d, v in r["drafters"].items()]
    real = [x for x in pairs if x[1] != ORACLE]
    if real:
        n, d, v = max(real, key=lambda x: x[2]["speedup"])
        out.append(f"Best speculation: **{d} on {n}**, {v['speedup']:.2f}x plain (MAT {v['mat']:.2f}).")
    bound = {r["name"]: r["drafters"][ORACLE] for r in runs if ORACLE in r["drafters"]}
    if bound:
        k = next(iter(bound.values())).get("max_draft")
        best = {r["name"]: max((v for d, v in r["drafters"].items() if d != ORACLE), key=lambda v: v["speedup"],
                               default=None) for r in runs}
        out.append(f"Ceiling (the oracle drafts plain decoding's own output, so all {k} draft tokens are accepted): "
                   + ", ".join(f"{n} {v['speedup']:.2f}x" + (f" (best real drafter {best[n]['speedup']:.2f}x)"
                                                            if best.get(n) else "") for n, v in bound.items())
                   + ". Where the ceiling itself is near 1x, a verify step costs about as much as the plain steps "
                     "it replaces on this machine, and no drafter can make speculation pay.")
    if pairs:
        inexact = [f"{n}/{d} ({v['exact']}/{v['n_prompts']})" for n, d, v in pairs if v["exact"] != v["n_prompts"]]
        out.append("Greedy speculative output equals plain decoding on every prompt for every run and drafter."
                   if not inexact else f"NOT exact: {', '.join(inexact)}.")
    return out


def caveats(rep: dict) -> list[str]:
    b = rep["budget"]
    lines = []
    if rep["machine"]["backend"] == "cpu" or b["tokens"] < 50_000_000:
        lines += [
            f"This is a tiny budget ({b['tokens']:,} tokens per run, {len(b['seeds'])} seed(s)). What it can show: "
            "that every architecture trains and decodes through the same code, the relative training and decoding "
            "cost per token of each architecture, how latency and cache memory grow with context (these do not "
            "depend on training), whether speculation is exact, and gross differences in early learning speed.",
            "What it cannot show: which architecture is better at scale. Rankings at a few million tokens are "
            "dominated by optimisation speed (learning rate, warmup, width) rather than capacity; a single seed "
            "gives no spread (differences below ~0.05 bits/byte are within run-to-run noise at this size); byte "
            "models this small are far from converged, so extrapolation and speculation figures (MAT depends on "
            "how predictable the model's own output is) describe immature models; and CPU timings on a shared "
            "machine move with the load (the load average is recorded above).",
        ]
    if len(b["seeds"]) > 1:
        lines.append(f"Bits per byte are the mean ± sample standard deviation over {len(b['seeds'])} seeds; speed, "
                     "context and speculation are measured on the first seed's model.")
    return lines


def render_report(rep: dict) -> str:
    m, b = rep["machine"], rep["budget"]
    lines = [f"# Architecture study: {rep['study']}", "",
             f"- date: {rep['date']}; study wall time {_hms(rep['wall_s'])} (training {_hms(rep['train_wall_s'])} "
             f"of it; reused results cost nothing); CPU time of the study process {_hms(rep['cpu_s'])}",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['device']} (jax {m['jax']}, {m['platform']}); load "
             f"average {m['load_avg_1m_start']} at start, {m['load_avg_1m_end']} at end",
             f"- budget (matched): {b['tokens']:,} training tokens per run = {b['steps']} steps x {b['batch_size']} x "
             f"{b['seq_len']} tokens; seeds {b['seeds']}",
             f"- evaluation: validation bits/byte from training; bits/byte at {rep['eval']['extrapolation']} x the "
             f"training length on the same {rep['eval']['extrapolation_tokens']:,} target tokens; decode at batch "
             f"{rep['eval']['decode_batches']}; latency at contexts {rep['eval']['contexts']}; drafters "
             f"{rep['eval']['drafters']} on {Path(rep['eval']['prompts']).name if rep['eval']['prompts'] != 'val' else 'held-out validation prompts'}"
             f" ({rep['eval']['new_tokens']} new tokens, {rep['eval']['repeats']} interleaved passes, medians)",
             f"- config: `{rep['config']}`", "", report_tables(rep), "", "## Who wins what", ""]
    lines += [f"- {x}" for x in summary_lines(rep)]
    lines += ["", "## What this budget can and cannot show", ""] + [f"{x}\n" for x in caveats(rep)]
    lines += ["## Plots", ""] + [f"- `{Path(p).name}`" for p in rep.get("plots", [])]
    lines += ["", "FLOPs are the models' own `flops_per_token` (training: forward + backward at the training length; "
              "inference: the model's `inference_flops_per_token`, or one third of the training count). Parameters "
              "without embeddings exclude the (tied) embedding table."]
    return "\n".join(lines) + "\n"


def make_plots(rep: dict, out: Path) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    runs = rep["runs"]
    files = []
    m = rep["machine"]
    where = f"{m['cpu']}, {m['cores']} cores" if m["backend"] == "cpu" else m["device"]
    label = f"{where}, {rep['date']}, {rep['budget']['tokens']:,} tokens/run"

    def save(fig, name):
        fig.suptitle(f"{rep['study']}: {label}", fontsize=9)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    # 1. quality against training tokens and FLOPs
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        c = arch_color(r["arch"])
        for i, (seed, pts) in enumerate(r["curves"].items()):
            lab = r["name"] if i == 0 else None
            axes[0].plot([p["tokens"] for p in pts], [p["val_bpb"] for p in pts], "o-", color=c, label=lab, alpha=0.9)
            axes[1].plot([p["flops"] for p in pts], [p["val_bpb"] for p in pts], "o-", color=c, label=lab, alpha=0.9)
    axes[0].set(xlabel="training tokens", ylabel="validation bits per byte", title="Quality vs training tokens")
    axes[1].set(xlabel="training FLOPs", ylabel="validation bits per byte", title="Quality vs training FLOPs")
    axes[1].set_xscale("log")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    save(fig, "bpb_vs_training.png")

    # 2. latency and cache bytes against context
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        xs = [c["context"] for c in r["context"]]
        axes[0].plot(xs, [c["ms_per_token"] for c in r["context"]], "o-", color=arch_color(r["arch"]), label=r["name"])
        axes[1].plot(xs, [c["cache_bytes"] / 2**20 for c in r["context"]], "o-", color=arch_color(r["arch"]),
                     label=r["name"])
    axes[0].set(xlabel="context (tokens)", ylabel="ms per token (batch 1)", title="Decode latency vs context")
    axes[1].set(xlabel="context (tokens)", ylabel="cache MiB per sequence", title="Cache memory vs context")
    for a in axes:
        a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    save(fig, "context.png")

    # 3. speculation: MAT and speedup per drafter and architecture
    drafters = list(runs[0]["drafters"]) if runs else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(drafters))]
        axes[0].bar(xs, [r["drafters"][d]["mat"] for d in drafters], width, color=arch_color(r["arch"]),
                    label=r["name"])
        axes[1].bar(xs, [r["drafters"][d]["speedup"] for d in drafters], width, color=arch_color(r["arch"]),
                    label=r["name"])
    for a, t, y in ((axes[0], "Mean accepted tokens per step", "MAT"),
                    (axes[1], "Wall-clock speedup over plain (same prompts)", "speedup")):
        a.set_xticks([j + 0.4 - width / 2 for j in range(len(drafters))], drafters)
        a.set(title=t, ylabel=y)
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=8)
    axes[1].axhline(1.0, color="k", lw=0.8)
    save(fig, "speculation.png")

    # 4. quality against inference FLOPs per token
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.errorbar([r["flops_per_token_infer"]], [r["val_bpb"]], yerr=[r["val_bpb_std"]], fmt="o",
                    color=arch_color(r["arch"]), label=r["name"], capsize=3)
        ax.annotate(r["name"], (r["flops_per_token_infer"], r["val_bpb"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xlabel="inference FLOPs per token", ylabel="validation bits per byte", title="Quality vs inference cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "bpb_vs_infer_flops.png")
    return files


# ==== CLI =====================================================================================================
@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path, help="a study config (.toml), or finished run directories")
    p.add_argument("--out", type=Path, default=None,
                   help="study directory (default: the study's `out`, else runs/<study name>); with run "
                        "directories: the output directory (default runs/compare)")
    args = p.parse_args(argv)
    if len(args.inputs) == 1 and args.inputs[0].suffix == ".toml":
        study = load_study(args.inputs[0], args.out)  # every check before anything is trained or written
        created = not study.out.exists()
        try:
            rep = run_study(study)
        except BaseException:
            if created and not any((study.out / "runs").glob("*/checkpoints")):
                shutil.rmtree(study.out, ignore_errors=True)  # nothing worth keeping
            raise
        print()
        print(report_tables(rep))
        print()
        for x in summary_lines(rep):
            print("- " + x.replace("**", ""))
        print(f"\nreport: {study.out / 'report.md'}\nreport: {study.out / 'report.json'}")
        for f in rep["plots"]:
            print(f"plot: {f}")
        return 0
    return compare_run_dirs(args.inputs, args.out or Path("runs/compare"))


if __name__ == "__main__":
    sys.exit(main())
