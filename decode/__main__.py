"""Generate text from a trained run.

    python -m decode RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T --top-k K --top-p P]
        [--seed S --step STEP --prefix | --no-prefix]
    python -m decode RUN_DIR --prompts FILE.jsonl [--out FILE.jsonl] [--batch-size B] [...]
    ... --drafter {pld,recycle,sam,sam+recycle} [--max-draft N --sam DIR --rule cost|paper]
    ... --mesh data=2,tensor=2   (a device mesh: the [mesh] axes data, fsdp, tensor; the same tokens)

--prompt streams the completion to stdout as it is generated: the jitted loop runs in chunks of
--chunk steps and resumes without recompiling, and bytes are decoded incrementally so that a character cut
between chunks prints whole. --prompts reads JSONL objects with "id" and "prompt" (or "tokens", a list of
ids), decodes them in batches of --batch-size (the last batch is padded, so it reuses the compiled loop)
and writes JSONL lines with id, prompt, completion, tokens and tokens_per_s (the batch's generated tokens
over its wall time). With --drafter the same output comes from speculative decoding (greedy: exactly the plain completion):
--prompt streams the tokens as verify steps accept them and ends with the MAT (mean tokens per model
step); --prompts adds "steps", "mat" and "speedup" (the batch decoded plainly as well, both compiled first,
plain time over speculative time) to each line. The sam drafters read the static automaton from --sam,
or RUN_DIR/sam when it exists, else draft from the request alone. Sampling defaults come from the run's
[decode] config. A run trained as a prefix LM
(train.objective = "prefix") reads the prompt as a bidirectional prefix; --prefix/--no-prefix overrides.
Errors in the run directory, the prompts file or the request end with one line on stderr and exit status 2
(core.errors.cli), before any output file is opened.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time

from core.errors import ArgumentParser, UserError, cli


def _decoder(tok):
    """Incremental text decoding of ids, so a multi-byte character split across chunks prints whole."""
    if hasattr(tok, "decode_bytes"):
        inc = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: inc.decode(tok.decode_bytes(ids), final)
    return lambda ids, final=False: tok.decode(ids)


def sampling_args(args, cfg) -> dict:
    d = cfg.decode
    return dict(max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else d.max_new_tokens,
                temperature=args.temperature if args.temperature is not None else d.temperature,
                top_k=args.top_k if args.top_k is not None else d.top_k,
                top_p=args.top_p if args.top_p is not None else d.top_p, seed=args.seed)


def stream_one(engine, tok, text: str, kw: dict, chunk: int) -> None:
    timing: dict = {}
    dec = _decoder(tok)
    n = 0
    for new in engine.stream([tok.encode(text)], chunk=chunk, timing=timing, **kw):
        n += len(new[0])
        sys.stdout.write(dec(new[0]))
        sys.stdout.flush()
    sys.stdout.write(dec([], True) + "\n")
    secs = timing["prefill_s"] + timing["decode_s"]
    print(f"[{n} tokens in {secs:.2f} s, {n / secs:.1f} tokens/s; prefill {1e3 * timing['prefill_s']:.0f} ms, "
          f"includes compilation]", file=sys.stderr)


def stream_speculative(engine, tok, text: str, kw: dict, make) -> None:
    """--prompt with --drafter: tokens print as verify steps accept them (from the loop's host callback)."""
    dec = _decoder(tok)

    def show(row, ids):
        sys.stdout.write(dec(ids))
        sys.stdout.flush()

    t0 = time.perf_counter()
    res = engine.generate_speculative([tok.encode(text)], [make()], on_tokens=show, **kw)
    secs = time.perf_counter() - t0
    sys.stdout.write(dec([], True) + "\n")
    n = res.n_tokens
    print(f"[{n} tokens in {secs:.2f} s, {n / secs:.1f} tokens/s, MAT {res.mat:.2f} over {res.verify_calls} verify "
          f"steps; prefill {1e3 * res.prefill_s:.0f} ms, includes compilation]", file=sys.stderr)


def run_file(engine, tok, items: list[dict], all_ids: list, kw: dict, batch_size: int, out, make=None) -> None:
    """Plain decoding of every batch, or with `make` (a drafter factory) speculative decoding timed against
    plain decoding of the same batch, both compiled beforehand."""
    total, secs = 0, 0.0
    if make is not None:
        for longest in {max(len(x) for x in all_ids[i:i + batch_size]) for i in range(0, len(all_ids), batch_size)}:
            engine.warmup(batch_size, longest, speculative=True, observe=(make().observes,))
    for i in range(0, len(items), batch_size):
        batch, ids = items[i:i + batch_size], all_ids[i:i + batch_size]
        t0 = time.perf_counter()
        if make is None:
            res = engine.generate(ids, batch_size=batch_size, **kw)
        else:
            res = engine.generate_speculative(ids, [make() for _ in ids], batch_size=batch_size, **kw)
        dt = time.perf_counter() - t0
        extra = {}
        if make is not None:
            t1 = time.perf_counter()
            engine.generate(ids, batch_size=batch_size, **kw)
            plain_s = time.perf_counter() - t1
        n = res.n_tokens
        total, secs = total + n, secs + dt
        for j, (it, toks) in enumerate(zip(batch, res.tokens)):
            prompt = it["prompt"] if "prompt" in it else tok.decode(it["tokens"])
            if make is not None:
                extra = {"steps": res.steps[j], "mat": res.row_mat(j), "speedup": plain_s / dt}
            out.write(json.dumps({"id": it["id"], "prompt": prompt, "completion": tok.decode(toks),
                                  "tokens": toks.tolist(), "tokens_per_s": n / dt, **extra},
                                 ensure_ascii=False) + "\n")
        out.flush()
        more = f", MAT {res.mat:.2f}, speedup {plain_s / dt:.2f}x" if make is not None else ""
        print(f"[batch {i // batch_size + 1}/{-(-len(items) // batch_size)}: {n} tokens, {n / dt:.1f} tokens/s{more}]",
              file=sys.stderr)
    print(f"[{len(items)} prompts, {total} tokens, {total / secs:.1f} tokens/s]", file=sys.stderr)


def drafter_factory(args, engine, cfg, tok, batch_size: int):
    """A zero-argument maker of fresh drafters for --drafter (None for plain decoding)."""
    from pathlib import Path

    from decode.drafters import DRAFTERS, Acceptance, make_drafter

    if args.drafter == "none":
        return None
    if args.drafter not in DRAFTERS:
        raise UserError(f"unknown drafter {args.drafter!r}; valid: {', '.join(DRAFTERS)}")
    sam = None
    if args.drafter.startswith("sam"):
        sam_dir = Path(args.sam) if args.sam else Path(args.run_dir) / "sam"
        if args.sam or (sam_dir / "header.json").is_file():
            from decode.eval import static_automaton

            sam = static_automaton(sam_dir, cfg, tok)
    cost = engine.observed_cost(batch_size) if args.drafter.startswith("sam") and args.rule == "cost" else None
    history = Acceptance()  # sam's acceptance estimates, kept across the prompts of this run
    return lambda: make_drafter(args.drafter, vocab_size=engine.vocab_size, static_sam=sam, cost=cost,
                                history=history, max_len=args.max_draft, rule=args.rule)


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m decode", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue (streamed to stdout)")
    src.add_argument("--prompts", help="JSONL file of {id, prompt}")
    ap.add_argument("--out", help="JSONL output for --prompts (default: stdout)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=16, help="loop steps between streamed prints")
    ap.add_argument("--prefix", action=argparse.BooleanOptionalAction, default=None,
                    help="read the prompt as a bidirectional prefix (default: iff the run trained a prefix LM)")
    ap.add_argument("--drafter", default="none", help="speculative decoding: none (plain), pld, recycle, sam or "
                    "sam+recycle")
    ap.add_argument("--max-draft", type=int, help="longest draft (default: 4 on CPU, 16 on accelerators)")
    ap.add_argument("--sam", help="static suffix automaton directory (default: RUN_DIR/sam if it exists)")
    ap.add_argument("--rule", default="cost", choices=["cost", "paper"],
                    help="sam's draft rule: expected tokens per measured verify cost, or the paper's thresholds")
    ap.add_argument("--mesh", help="decode on a device mesh, the [mesh] axes as axis=size pairs: e.g. "
                    "data=2,tensor=2 (parameters over fsdp/tensor, rows over data x fsdp; unnamed axes 1)")
    args = ap.parse_args(argv)

    from pathlib import Path

    from decode.drafters import DRAFTERS
    from decode.engine import default_max_draft, engine_for_run, prefix_note, verify_sizes_for
    from decode.prompts import encode_all, read_prompts
    from core import compile_cache

    compile_cache.enable()  # $LMARCH_COMPILE_CACHE or ~/.cache/lmarch/jax: a rerun loads, not compiles

    if args.drafter not in DRAFTERS:
        raise UserError(f"unknown drafter {args.drafter!r}; valid: {', '.join(DRAFTERS)}")
    if args.max_draft is not None and args.max_draft < 1:
        raise UserError(f"--max-draft must be >= 1; got {args.max_draft}")
    args.max_draft = args.max_draft or default_max_draft()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1; got {args.chunk}")
    if not Path(args.run_dir).is_dir():
        raise UserError(f"no such run directory: {args.run_dir}")
    mesh = None
    if args.mesh is not None:
        from core.mesh import make_mesh, parse_mesh_spec

        mesh = make_mesh(parse_mesh_spec(args.mesh))
    items = read_prompts(args.prompts) if args.prompts else None
    sizes = {} if args.drafter == "none" else {"verify_sizes": verify_sizes_for(args.max_draft)}
    cfg, tok, engine = engine_for_run(args.run_dir, step=args.step, prefix=args.prefix, mesh=mesh, **sizes)
    prefix_note(engine)
    kw = sampling_args(args, cfg)
    if items is None:
        make = drafter_factory(args, engine, cfg, tok, 1)
        if make is None:
            stream_one(engine, tok, args.prompt, kw, args.chunk)
        else:
            stream_speculative(engine, tok, args.prompt, kw, make)
        return 0
    ids = encode_all(engine, tok, items, kw["max_new_tokens"])  # every prompt checked before --out is opened
    make = drafter_factory(args, engine, cfg, tok, min(args.batch_size, len(ids)))
    bs = args.batch_size if make is None else min(args.batch_size, len(ids))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        run_file(engine, tok, items, ids, kw, bs, out, make)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
