"""Side-by-side comparison of training runs and their decoding evals: a table, JSON, and plots.

    python scripts/compare.py runs/decoder_tiny runs/samba_tiny --out runs/compare

Each run directory is read for config.toml, metrics.jsonl and eval_<drafter>.json (written by
`python -m decode.eval ... --out RUN_DIR/eval_<drafter>.json`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402


def _json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


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


ORDER = ["none", "pld", "recycle", "sam", "sam+recycle"]


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
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def plot(runs: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[plot]'); skipping plots", file=sys.stderr)
        return []
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        tr = [(m["step"], m["loss"] / 0.6931471805599453) for m in r["metrics"]]
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
    files.append(str(path))
    return files


@cli
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "config.toml").is_file() or not (r / "metrics.jsonl").is_file()]
    if missing:
        raise UserError(f"not a finished run directory (needs config.toml and metrics.jsonl): {', '.join(missing)}")
    runs = [read_run(r) for r in args.runs]  # every input is read before anything is written
    head, rows = table(runs)
    text = render(head, rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(text + "\n")
    (args.out / "compare.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "metrics"} for r in runs], indent=1, default=str))
    for f in plot(runs, args.out):
        print(f"plot: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
