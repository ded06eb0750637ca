"""Generate text from a trained run.

    python -m decode RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T --top-k K --top-p P]
        [--seed S --step STEP --prefix | --no-prefix]
    python -m decode RUN_DIR --prompts FILE.jsonl [--out FILE.jsonl] [--batch-size B] [...]

--prompt streams the completion to stdout as it is generated: the jitted loop runs in chunks of
--chunk steps and resumes without recompiling, and bytes are decoded incrementally so that a character cut
between chunks prints whole. --prompts reads JSONL objects with "id" and "prompt" (or "tokens", a list of
ids), decodes them in batches of --batch-size (the last batch is padded, so it reuses the compiled loop)
and writes JSONL lines with id, prompt, completion, tokens and tokens_per_s (the batch's generated tokens
over its wall time). Sampling defaults come from the run's [decode] config. A run trained as a prefix LM
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


def run_file(engine, tok, items: list[dict], all_ids: list, kw: dict, batch_size: int, out) -> None:
    total, secs = 0, 0.0
    for i in range(0, len(items), batch_size):
        batch, ids = items[i:i + batch_size], all_ids[i:i + batch_size]
        t0 = time.perf_counter()
        res = engine.generate(ids, batch_size=batch_size, **kw)
        dt = time.perf_counter() - t0
        n = res.n_tokens
        total, secs = total + n, secs + dt
        for it, toks in zip(batch, res.tokens):
            prompt = it["prompt"] if "prompt" in it else tok.decode(it["tokens"])
            out.write(json.dumps({"id": it["id"], "prompt": prompt, "completion": tok.decode(toks),
                                  "tokens": toks.tolist(), "tokens_per_s": n / dt}, ensure_ascii=False) + "\n")
        out.flush()
        print(f"[batch {i // batch_size + 1}/{-(-len(items) // batch_size)}: {n} tokens, {n / dt:.1f} tokens/s]",
              file=sys.stderr)
    print(f"[{len(items)} prompts, {total} tokens, {total / secs:.1f} tokens/s]", file=sys.stderr)


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
    args = ap.parse_args(argv)

    from pathlib import Path

    from decode.engine import engine_for_run, prefix_note
    from decode.prompts import encode_all, read_prompts
    from core import compile_cache

    compile_cache.enable()  # $LMARCH_COMPILE_CACHE or ~/.cache/lmarch/jax: a rerun loads, not compiles

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1; got {args.chunk}")
    if not Path(args.run_dir).is_dir():
        raise UserError(f"no such run directory: {args.run_dir}")
    items = read_prompts(args.prompts) if args.prompts else None
    cfg, tok, engine = engine_for_run(args.run_dir, step=args.step, prefix=args.prefix)
    prefix_note(engine)
    kw = sampling_args(args, cfg)
    if items is None:
        stream_one(engine, tok, args.prompt, kw, args.chunk)
        return 0
    ids = encode_all(engine, tok, items, kw["max_new_tokens"])  # every prompt checked before --out is opened
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        run_file(engine, tok, items, ids, kw, args.batch_size, out)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
