"""Speculative decoding benchmark: verify cost by size, and MAT / speedup by architecture, drafter and prompt kind.

    python scripts/bench_spec.py --runs runs/decoder_tiny runs/samba_tiny runs/dlcm_tiny \
        --prompts configs/prompts/spec_kinds.jsonl --out bench_spec.json [--max-new-tokens 64] [--repeats 3]
        [--drafters pld,sam,sam:paper,oracle] [--max-draft 4] [--sam DIR]
    python scripts/bench_spec.py --configs configs/decoder_tiny.toml configs/samba_tiny.toml ... --out v.json
        (verify cost only, random init)

Verify cost: the CPU seconds of one step of the speculative loop at each verify size (size 0 = a token when
nothing is drafted: the longest plain stretch, per token; decode.engine.measure_verify_cost), measured with
drafts that are always rejected, against a step of the plain loop (CPU time: on a
shared machine wall time is mostly waiting for a core) (the ratio is what
the issue targets: 1 + 4 tokens <= 1.5x a plain step on decoder_tiny). For runs, each prompt is decoded
(batch 1, greedy) plainly and with every drafter, the variants alternating in one process for --repeats
rounds; each prompt's median time per variant is kept, and a kind's speedup is the sum of its plain
medians over the sum of its drafter medians. Greedy outputs must equal plain (checked). `sam:paper` is sam
with SAM-Decoding's published l_bias/l_threshold rule; `sam` uses the cost rule. `oracle` drafts the plain
greedy continuation itself (max-draft tokens, all accepted): the speedup no drafter can beat with this engine,
model and machine at this max draft (the bound the verify cost sets). On a shared machine, the
medians and ratios are what to quote. Writes JSON (`verify`, `rows`) and prints markdown tables.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from core.errors import ArgumentParser, UserError, cli  # noqa: E402
from decode.engine import Engine, default_max_draft, engine_for_run, measure_verify_cost, verify_sizes_for  # noqa: E402


def plain_step_s(engine: Engine, steps: int = 24, rounds: int = 5, prompt_len: int = 64) -> float:
    """CPU seconds of one plain-loop step (the difference of a 2*steps and a steps run, as the verify costs)."""
    rng = np.random.default_rng(0)
    p = [rng.integers(1, 256, prompt_len).astype(np.int32)]
    engine.generate(p, max_new_tokens=steps + 1, stop_ids=())
    out = []
    for _ in range(rounds):
        c = []
        for n in (steps, 2 * steps):
            c0 = time.process_time()
            engine.generate(p, max_new_tokens=n + 1, stop_ids=())
            c.append(time.process_time() - c0)
        out.append((c[1] - c[0]) / steps)
    return float(np.median(out))


def verify_table(name: str, engine: Engine, rounds: int) -> dict:
    """Plain loop step and speculative step per verify size, alternated, medians (ms) and ratios."""
    plain, costs = [], []
    for _ in range(rounds):
        plain.append(plain_step_s(engine, rounds=1))
        costs.append(measure_verify_cost(engine, rounds=1).cost)
    sizes = tuple(sorted({0} | set(engine.verify_sizes)))
    p = float(np.median(plain))
    c = np.median(np.asarray(costs), axis=0)
    return {"name": name, "plain_ms": 1e3 * p, "verify_ms": {str(k): 1e3 * float(x) for k, x in zip(sizes, c)},
            "ratio": {str(k): float(x) / p for k, x in zip(sizes, c)}}


def make_maker(variant: str, engine, cost, max_draft: int, sam):
    from decode.drafters import Acceptance, make_drafter

    name, _, rule = variant.partition(":")
    history = Acceptance()  # sam's acceptance estimates, kept across the prompts and repeats of a variant
    return lambda: make_drafter(name, vocab_size=engine.vocab_size, static_sam=sam, cost=cost, max_len=max_draft,
                                history=history, rule=rule or "cost")


def bench_run(run_dir: str, items: list, variants: list, args) -> tuple[dict, list]:
    from decode.drafters import ReferenceDrafter
    from decode.prompts import encode_all

    sizes = verify_sizes_for(args.max_draft)
    cfg, tok, engine = engine_for_run(run_dir, verify_sizes=sizes)
    arch = cfg.model.arch
    ids = encode_all(engine, tok, items, args.max_new_tokens)
    sam = None
    sam_dir = Path(args.sam) if args.sam else Path(run_dir) / "sam"
    if (sam_dir / "header.json").is_file() and any(v.startswith("sam") for v in variants):
        from decode.eval import static_automaton
        sam = static_automaton(sam_dir, cfg, tok)
    for n in sorted({len(x) for x in ids}):
        engine.warmup(1, n, speculative=True, observe=(False,) if not any("recycle" in v for v in variants)
                      else (False, True))
    verify = verify_table(arch, engine, args.verify_rounds)
    cost = engine.observed_cost(1)
    oracle = ReferenceDrafter.name  # made per prompt from the plain output of the same round
    makers = {v: make_maker(v, engine, cost, args.max_draft, sam) for v in variants if v not in ("none", oracle)}
    kw = dict(max_new_tokens=args.max_new_tokens, stop_ids=())
    times: dict = {v: [[] for _ in ids] for v in ["none"] + [v for v in dict.fromkeys(variants) if v != "none"]}
    res: dict = {}
    for r in range(args.repeats):
        for i, p in enumerate(ids):
            for v in times:  # alternate the variants prompt by prompt ("none" first: the oracle copies its output)
                drafter = None if v == "none" else \
                    ReferenceDrafter(res[("none", i)].tokens[0]) if v == oracle else makers[v]()
                t0 = time.perf_counter()
                out = engine.generate([p], **kw) if v == "none" else engine.generate_speculative([p], [drafter], **kw)
                times[v][i].append(time.perf_counter() - t0)
                res[(v, i)] = out
        print(f"[bench_spec {arch}] round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    rows = []
    kinds = sorted({str(it["kind"]) for it in items if "kind" in it})  # a file without kinds: "all" only
    for v in times:
        for kind in kinds + ["all"]:
            sel = [i for i, it in enumerate(items) if kind == "all" or str(it.get("kind")) == kind]
            if not sel:
                continue
            med = [float(np.median(times[v][i])) for i in sel]
            base = [float(np.median(times["none"][i])) for i in sel]
            toks = [res[(v, i)].tokens[0] for i in sel]
            steps = sum(res[(v, i)].steps[0] for i in sel)
            after = sum(max(len(t) - 1, 0) for t in toks)
            same = all(res[(v, i)].tokens[0].tolist() == res[("none", i)].tokens[0].tolist() for i in sel)
            calls = sum(res[(v, i)].verify_calls for i in sel)
            draft_s = sum(res[(v, i)].draft_s for i in sel)
            host_s = sum(res[(v, i)].host_s for i in sel)
            rows.append({"arch": arch, "run": str(run_dir), "drafter": v, "kind": kind, "n_prompts": len(sel),
                         "mat": after / steps if steps else 1.0, "speedup": sum(base) / sum(med),
                         "tokens_per_s": sum(len(t) for t in toks) / sum(med), "matches_plain": same,
                         "drafting_us_per_step": 1e6 * draft_s / calls if calls else 0.0,
                         "host_us_per_step": 1e6 * host_s / calls if calls else 0.0,
                         "decode_ms_per_step": 1e3 * sum(res[(v, i)].decode_s for i in sel) / max(calls, 1)})
    return verify, rows


def print_tables(verify: list, rows: list) -> None:
    if verify:
        sizes = sorted({int(k) for v in verify for k in v["ratio"]})
        # size 0: a token of the longest plain stretch (no draft), per token; k > 0: one verify step of 1+k tokens
        print("| arch | plain step ms | " + " | ".join("no draft, per token (x plain)" if k == 0 else
                                                       f"verify 1+{k} (x plain)" for k in sizes) + " |")
        print("|---|---|" + "---|" * len(sizes))
        for v in verify:
            cells = [f"{v['verify_ms'][str(k)]:.3f} ms ({v['ratio'][str(k)]:.2f}x)" if str(k) in v["ratio"] else "-"
                     for k in sizes]
            print(f"| {v['name']} | {v['plain_ms']:.3f} | " + " | ".join(cells) + " |")
    if rows:
        print("\n| arch | kind | drafter | MAT | speedup | host us/step | same as plain |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["arch"], r["kind"], r["drafter"])):
            if r["drafter"] == "none":
                continue
            print(f"| {r['arch']} | {r['kind']} | {r['drafter']} | {r['mat']:.2f} | {r['speedup']:.2f}x | "
                  f"{r['host_us_per_step']:.0f} | {r['matches_plain']} |")


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--configs", nargs="*", default=[], help="verify cost only, random init of each config's model")
    ap.add_argument("--prompts", default=str(ROOT / "configs/prompts/spec_kinds.jsonl"))
    ap.add_argument("--drafters", default="pld,sam,sam:paper,oracle")
    ap.add_argument("--sam", help="static suffix automaton directory for every run (default: RUN_DIR/sam; the "
                    "study keeps one at <study out>/sam)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verify-rounds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts per kind (0: all)")
    args = ap.parse_args(argv)
    if not args.runs and not args.configs:
        raise UserError("give --runs and/or --configs")
    args.max_draft = args.max_draft or default_max_draft()
    variants = [v for v in args.drafters.split(",") if v]
    from decode.drafters import DRAFTERS, RULES, ReferenceDrafter

    oracle = ReferenceDrafter.name
    bad = [v for v in variants if v != oracle and (v.partition(":")[0] not in DRAFTERS
                                                     or v.partition(":")[2] not in ("",) + RULES)]
    if bad or not variants:
        raise UserError(f"unknown drafter {bad[0] if bad else args.drafters!r} in --drafters; valid: "
                        f"{', '.join(DRAFTERS)} (sam and sam+recycle also as NAME:RULE, RULE one of "
                        f"{', '.join(RULES)}), {oracle}")
    verify, rows = [], []
    for c in args.configs:
        from core.config import load_config
        from models.registry import build_model

        cfg = load_config(c)
        eng = Engine(build_model(cfg.model, seed=0), max_len=cfg.decode.max_len,
                     verify_sizes=verify_sizes_for(args.max_draft))
        eng.warmup(1, 64, speculative=True, observe=(False,))
        verify.append(verify_table(cfg.model.arch, eng, args.verify_rounds))
        print_tables(verify[-1:], [])
        Path(args.out).write_text(json.dumps({"verify": verify}, indent=1))
    if args.runs:  # read before anything is measured: a bad file fails fast
        from decode.prompts import read_prompts

        items = read_prompts(args.prompts)
        if args.limit:
            seen: dict = {}
            items = [it for it in items if seen.setdefault(it.get("kind"), []).append(it) or
                     len(seen[it.get("kind")]) <= args.limit]
    meta = {"backend": jax.default_backend(), "max_draft": args.max_draft, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "argv": sys.argv[1:], "note": "medians of alternating runs in one process"}
    Path(args.out).write_text(json.dumps({"meta": meta, "verify": verify, "rows": rows}, indent=1))
    if args.runs:
        for run in args.runs:
            v, r = bench_run(run, items, variants, args)
            verify.append(v)
            rows += r
            print_tables([v], r)
            Path(args.out).write_text(json.dumps({"meta": meta, "verify": verify, "rows": rows}, indent=1))
    print_tables(verify, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
