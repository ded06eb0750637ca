"""Decoding evaluation: tokens/s, MAT and speedup of a drafter against plain decoding on the same prompts.

    python -m decode.eval RUN_DIR --prompts FILE.jsonl --drafter {none,pld,recycle,sam,sam+recycle,oracle}
        --out report.json [--max-new-tokens N --batch-size B --sam DIR --step S --temperature T ...]

A speculative drafter is compared with plain decoding (`none`) run in the same process on the same prompts,
both after compiling every function they use, so that compilation is in neither timing. At temperature 0
the speculative outputs must equal the plain ones; the report says whether they did (`matches_plain`).
`oracle` (greedy only) drafts the plain pass's own output, so every draft is accepted: its speedup is the
ceiling that the verify cost sets at this max draft, the yardstick for the real drafters.
The static automaton of the `sam` drafters is read from --sam (default RUN_DIR/sam) and refused unless it
was built from this run's corpus and tokenizer. A run trained as a prefix LM reads its prompts as a
bidirectional prefix (--prefix/--no-prefix overrides). User errors: one line on stderr, exit status 2, no
report written (core.errors.cli).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import ArgumentParser, UserError, cli


def static_automaton(sam_dir: Path, cfg, tok):
    from core.data import Corpus
    from decode.sam import SuffixAutomaton

    if not (sam_dir / "header.json").is_file():  # before opening (maybe tokenizing) the corpus
        raise UserError(f"no suffix automaton at {sam_dir} (build one with: python -m decode.build_sam RUN_DIR "
                        f"--out {sam_dir})")
    # An automaton of arbitrary text files (build_sam --sources) is checked for the tokenizer only.
    built_from = json.loads((sam_dir / "header.json").read_text()).get("corpus_hash", "")
    corpus_hash = None if str(built_from).startswith("files-") else Corpus.open(cfg.data, tok).key
    try:
        # Read into memory rather than memory-mapped: a timed run should not pay the page faults of its
        # first visits to each part of a 1.2 GB automaton (measured: ~2 ms of drafting per step otherwise).
        return SuffixAutomaton.load(sam_dir, tokenizer=tok.name, corpus_hash=corpus_hash, mmap=False)
    except ValueError as e:
        raise UserError(f"{e} (build one with: python -m decode.build_sam RUN_DIR --out {sam_dir})") from None


def default_max_draft() -> int:
    from decode.engine import default_max_draft as d  # jax loads only once a run is decoded

    return d()


def verify_sizes_for(max_draft: int) -> tuple:
    from decode.engine import verify_sizes_for as v

    return v(max_draft)


def warm_drafter(drafter, prompt, k: int) -> None:
    """Exercise a drafter once before timing: numba kernels load or compile on first use (about a second),
    and a memory-mapped automaton pages in its top states, neither of which belongs in drafting µs/step."""
    import numpy as np

    drafter.reset(np.asarray(prompt))
    drafter.observe(np.asarray(prompt[:2]), np.zeros((min(2, len(prompt)), 8), np.int32))
    for t in prompt[-8:]:
        drafter.draft(k)
        drafter.accept(np.asarray([t], np.int32))
    drafter.reset(np.asarray(prompt))


def oracle_name() -> str:
    """The ceiling's drafter name, `decode.drafters.ReferenceDrafter.name` (it drafts the plain pass's output);
    imported when needed: decode.drafters loads numba."""
    from decode.drafters import ReferenceDrafter

    return ReferenceDrafter.name


def run(engine, ids: list, *, drafter: str, batch_size: int, kw: dict, seed: int, make=None, label: str = ""):
    """Decode all prompts in padded batches; one Result for all of them.

    Prompt i samples with seed + i whatever its batch, so runs with different drafters are comparable.
    """
    from decode.request import Result

    results = []
    n_batches = -(-len(ids) // batch_size)
    for b in range(n_batches):
        batch = ids[b * batch_size:(b + 1) * batch_size]
        seeds = [seed + b * batch_size + i for i in range(len(batch))]
        if drafter == "none":
            res = engine.generate(batch, batch_size=batch_size, seed=seeds, **kw)
        else:
            rows = range(b * batch_size, b * batch_size + len(batch))
            ds = [make(i) for i in rows] if drafter == oracle_name() else [make() for _ in batch]
            res = engine.generate_speculative(batch, ds, batch_size=batch_size, seed=seeds, **kw)
        results.append(res)
        done = Result.concat(results)
        print(f"[eval {label or drafter}] batch {b + 1}/{n_batches}: {done.n_tokens} tokens, "
              f"{done.tokens_per_s:.1f} tokens/s, MAT {done.mat:.2f}", file=sys.stderr, flush=True)
    return Result.concat(results)


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m decode.eval", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--drafter", default="none", help="none, pld, recycle, sam, sam+recycle or oracle (the ceiling: "
                    "drafts plain decoding's own output; greedy only); a comma-separated "
                    "list runs them side by side in one process against one plain baseline (then --out is a "
                    "directory that receives eval_<drafter>.json per drafter)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, help="default: the run's decode.max_new_tokens")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--sam", help="static suffix automaton directory (default: RUN_DIR/sam)")
    ap.add_argument("--step", type=int)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes, plain and each drafter in turn; the "
                    "report keeps each one's median-time pass (a shared machine's noise exceeds small speedups)")
    ap.add_argument("--max-draft", type=int, help="longest draft (default: 4 on CPU, where verifying K tokens costs "
                    "~K/4 plain steps, 16 on accelerators, where it is nearly flat); the "
                    "engine compiles verify steps for powers of two below it and for it")
    ap.add_argument("--prefix", action=argparse.BooleanOptionalAction, default=None,
                    help="read prompts as a bidirectional prefix (default: iff the run trained a prefix LM)")
    ap.add_argument("--rule", default="cost", choices=["cost", "paper"], help="sam's draft rule: expected tokens "
                    "per measured verify cost (default), or SAM-Decoding's published l_bias/l_threshold selection")
    args = ap.parse_args(argv)

    from decode.drafters import DRAFTERS, Acceptance, DraftPolicy, ReferenceDrafter, make_drafter
    from decode.engine import engine_for_run, prefix_note
    from decode.prompts import encode_all, read_prompts
    from core import compile_cache

    compile_cache.enable()  # $LMARCH_COMPILE_CACHE or ~/.cache/lmarch/jax: a rerun loads, not compiles

    oracle = oracle_name()
    drafters = [d for d in args.drafter.split(",") if d]
    valid = list(DRAFTERS) + [oracle]
    bad = [d for d in drafters if d not in valid]
    if not drafters or bad:
        raise UserError(f"unknown drafter {bad[0] if bad else args.drafter!r}; valid: {', '.join(valid)}")
    if oracle in drafters and args.temperature != 0:
        raise UserError(f"--drafter {oracle} drafts plain greedy output: it needs --temperature 0; got "
                        f"{args.temperature}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1; got {args.repeats}")
    if not Path(args.run_dir).is_dir():
        raise UserError(f"no such run directory: {args.run_dir}")
    max_draft = default_max_draft() if args.max_draft is None else args.max_draft
    if max_draft < 1:
        raise UserError(f"--max-draft must be >= 1; got {max_draft}")
    items = read_prompts(args.prompts)
    # 0 (no draft: a plain step), then powers of two up to max_draft
    sizes = verify_sizes_for(max_draft)
    cfg, tok, engine = engine_for_run(args.run_dir, step=args.step, prefix=args.prefix, verify_sizes=sizes)
    prefix_note(engine)
    if args.max_new_tokens is None:
        args.max_new_tokens = cfg.decode.max_new_tokens
    ids = encode_all(engine, tok, items, args.max_new_tokens)
    sam = None
    if any(d.startswith("sam") for d in drafters):
        sam = static_automaton(Path(args.sam) if args.sam else Path(args.run_dir) / "sam", cfg, tok)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p)
    bs = min(args.batch_size, len(ids))
    # Compile, before anything is timed, the speculative loop variants these drafters need: with the
    # verifier's top-k ids only if one of them observes (Token Recycling), without them otherwise.
    observe = sorted({make_drafter(name, vocab_size=engine.vocab_size).observes
                      for name in drafters if name not in ("none", oracle)})
    for longest in {max(len(x) for x in ids[i:i + bs]) for i in range(0, len(ids), bs)}:  # every bucket
        engine.warmup(bs, longest, speculative=bool(observe), observe=observe)
    # The verify cost per size on this machine, measured once: the "cost" rule sizes sam's drafts by it.
    cost = engine.observed_cost(bs) if any(d.startswith("sam") for d in drafters) else None
    makers = {}
    for name in drafters:  # one acceptance history per drafter, kept across prompts and repeats
        makers[name] = lambda name=name, h=Acceptance(): make_drafter(  # noqa: E731
            name, vocab_size=engine.vocab_size, static_sam=sam, cost=cost, history=h, max_len=max_draft,
            min_len=min(max_draft, DraftPolicy().min_len), rule=args.rule)
    for name in drafters:
        if name not in ("none", oracle):
            warm_drafter(makers[name](), ids[0], max_draft)
    # "none" runs first in every repeat: the oracle drafts that pass's output (it is the same in every pass)
    makers[oracle] = lambda i: ReferenceDrafter(passes["none"][-1].tokens[i])  # noqa: E731
    passes: dict = {name: [] for name in ["none"] + [d for d in drafters if d != "none"]}
    for r in range(args.repeats):  # interleaved, so that plain and speculative share the machine's mood
        for name in passes:
            label = name if args.repeats == 1 else f"{name} {r + 1}/{args.repeats}"
            passes[name].append(run(engine, ids, drafter=name, batch_size=bs, kw=kw, seed=args.seed,
                                    make=makers.get(name), label=label))
    median = {name: sorted(rs, key=lambda x: x.seconds)[len(rs) // 2] for name, rs in passes.items()}
    base = median["none"]
    results = {name: median[name] for name in drafters}
    status = 0
    for name, spec in results.items():
        out = Path(args.out) / f"eval_{name}.json" if len(drafters) > 1 else Path(args.out)
        status |= write_report(args, name, items, engine, max_draft, bs, base, spec, out, cost)
    return status


def by_kind(items, base, spec) -> dict:
    """MAT, tokens/s and speedup per prompt `kind` (the prompts file's field; absent: no breakdown)."""
    kinds = sorted({str(it["kind"]) for it in items if "kind" in it})
    out = {}
    bs_, ss_ = base.rows_seconds(), spec.rows_seconds()
    for kind in kinds:
        rows = [i for i, it in enumerate(items) if str(it.get("kind")) == kind]
        tokens = sum(len(spec.tokens[i]) for i in rows)
        after = sum(max(len(spec.tokens[i]) - 1, 0) for i in rows)
        steps = sum(spec.steps[i] for i in rows)
        b_s, s_s = sum(bs_[i] for i in rows), sum(ss_[i] for i in rows)
        base_tokens = sum(len(base.tokens[i]) for i in rows)
        out[kind] = {"n_prompts": len(rows), "n_tokens": tokens, "mat": after / steps if steps else 1.0,
                     "tokens_per_s": tokens / s_s if s_s else None,
                     "baseline_tokens_per_s": base_tokens / b_s if b_s else None,
                     "speedup": (tokens / s_s) / (base_tokens / b_s) if s_s and b_s and base_tokens else None}
    return out


def write_report(args, drafter, items, engine, max_draft, bs, base, spec, out: Path, cost=None) -> int:
    """Write one drafter's report; exit status 1 if greedy speculation did not reproduce plain decoding."""
    matches = [a.tolist() == b.tolist() for a, b in zip(base.tokens, spec.tokens)]
    report = {
        "run_dir": str(args.run_dir), "drafter": drafter, "n_prompts": len(items),
        "max_new_tokens": args.max_new_tokens, "batch_size": bs, "max_draft": max_draft,
        "repeats": args.repeats, "prefix_prompt": engine.prefix_prompt, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p,
        "mat": spec.mat, "tokens_per_s": spec.tokens_per_s, "n_tokens": spec.n_tokens, "seconds": spec.seconds,
        "draft_us_per_step": spec.draft_us_per_step, "verify_calls": spec.verify_calls,
        "speedup": None if drafter == "none" else spec.tokens_per_s / base.tokens_per_s,
        "baseline": {"tokens_per_s": base.tokens_per_s, "n_tokens": base.n_tokens, "seconds": base.seconds},
        "matches_plain": bool(all(matches)) if args.temperature == 0 else None,
        "outputs": [{"id": it["id"], "tokens": t.tolist(), "steps": s, "mat": spec.row_mat(i),
                     **({"kind": it["kind"]} if "kind" in it else {})}
                    for i, (it, t, s) in enumerate(zip(items, spec.tokens, spec.steps))],
        "by_kind": by_kind(items, base, spec),
        "rule": args.rule if drafter.startswith("sam") else None,
        "bound": drafter == oracle_name(),
        "verify_cost_ms": ({str(k): 1e3 * c for k, c in zip(cost.sizes, cost.cost)} if cost is not None
                           and drafter.startswith("sam") else None),
        "per_prompt": [{"id": it["id"], "n_tokens": len(t), "steps": s, "mat": spec.row_mat(i),
                        "matches_plain": m}
                       for i, (it, t, s, m) in enumerate(zip(items, spec.tokens, spec.steps, matches))],
        "compiles": dict(engine.traces),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    sp = f", speedup {report['speedup']:.2f}x" if report["speedup"] else ""
    print(f"[eval {drafter}] {report['n_tokens']} tokens, {report['tokens_per_s']:.1f} tokens/s, "
          f"MAT {report['mat']:.2f}{sp}, drafting {report['draft_us_per_step']:.0f} us/step -> {out}",
          file=sys.stderr)
    for kind, k in report["by_kind"].items():
        sp = f", speedup {k['speedup']:.2f}x" if k["speedup"] and drafter != "none" else ""
        print(f"[eval {drafter}]   kind {kind}: {k['n_prompts']} prompts, MAT {k['mat']:.2f}{sp}", file=sys.stderr)
    if args.temperature == 0 and not all(matches):
        bad = [it["id"] for it, m in zip(items, matches) if not m]
        print(f"error: speculative output differs from plain greedy for prompts {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
