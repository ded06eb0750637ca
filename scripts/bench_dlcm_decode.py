"""DLCM against a decoder-only LM: batch-1 greedy decode tokens/s on held-out prompts, alternated.

    python scripts/bench_dlcm_decode.py DLCM_RUN DECODER_RUN [--out FILE.json] [--prompts 6]
        [--prompt-tokens 64] [--new-tokens 64] [--repeats 5]

Both runs are trained run directories (their checkpoints); the prompts are code-continuation prompts from the
DLCM run's validation split (decode.prompts.build_prompts, as scripts/compare.py makes them). Each repeat
decodes every prompt at batch 1 with each model in turn (DLCM, decoder, DLCM, ...: the two share the same
machine load), greedy, fp32, exactly --new-tokens new tokens (no stop tokens), with the jitted engine's plain
loop (verify size 1). A model's figure per repeat is its new tokens over its decode seconds summed over the
prompts (prefill excluded); the table gives the medians, the per-step microseconds and the median of the
per-repeat ratios. The concept close rate is what makes DLCM's steps uneven: a step that closes a concept runs
the backbone, the others skip it. It is counted on the generated tokens with the full forward's threshold
boundaries over prompt + output (the same decisions as the cached decoding's, tests/test_dlcm.py). A tiny
model's greedy output can be degenerate (a run of spaces closes no concept), so the script also times
teacher-forced steps (extend one real validation token + commit, batch 1, no sampling, in one jitted loop)
over 2 x --new-tokens tokens after a --prompt-tokens prefill: DLCM closes concepts there at the validation rate.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402


def load(run_dir: str):
    from core.checkpoint import load_model

    cfg, model, step = load_model(Path(run_dir), dtype="float32")
    return cfg, model, step


def close_rate(model, prompt, out) -> tuple[int, int]:
    """(generated tokens, concepts they start): threshold boundaries of the full forward over prompt + out."""
    import jax.numpy as jnp
    import numpy as np

    seq = np.concatenate([np.asarray(prompt, np.int32), np.asarray(out, np.int32)])
    _, b = model.boundaries(jnp.asarray(seq[None]))
    b = np.asarray(b[0])
    return len(out), int(b[len(prompt):].sum())


def bench(models, prompts, n_new: int, repeats: int):
    """Per model: decode seconds and new tokens per repeat (all prompts at batch 1), the models alternating;
    and the last outputs (greedy: the same every repeat)."""
    from decode.engine import Engine

    max_len = max(len(p) for p in prompts) + n_new + 16
    engines = [Engine(m, max_len=max_len, bos_id=None, verify_sizes=(1,)) for m in models]
    outs = [[None] * len(prompts) for _ in models]
    for i, e in enumerate(engines):  # compile every prompt bucket first
        for j, p in enumerate(prompts):
            outs[i][j] = e.generate([p], max_new_tokens=n_new, stop_ids=()).tokens[0]
    secs = [[] for _ in models]
    toks = [[] for _ in models]
    for _ in range(repeats):
        for i, e in enumerate(engines):
            s = n = 0
            for p in prompts:
                r = e.generate([p], max_new_tokens=n_new, stop_ids=())
                s += r.decode_s
                n += int(r.steps[0])
            secs[i].append(s)
            toks[i].append(n)
    return secs, toks, outs


def forced_step_us(models, seq, start: int, n: int, repeats: int, *, raw: bool = False):
    """Per model: microseconds per teacher-forced decode step (extend 1 token + commit, batch 1, no sampling)
    over the real tokens seq[start:start + 2n] after a prefill of seq[:start], the models alternating; the
    per-step time is the difference of a 2n-step and an n-step loop (prefill and call overhead cancel).
    `raw`: per model, the (n-step, 2n-step) loop times in seconds of each repeat instead."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    toks = jnp.asarray(np.asarray(seq[:start + 2 * n], np.int32)[None])
    fns = []
    for m in models:
        gdef, state = nnx.split(m)

        @jax.jit
        def run(state, toks, end, gdef=gdef):
            mm = nnx.merge(gdef, state)
            cache = mm.init_cache(1, toks.shape[1] + 16)
            _, cache = mm.extend(toks[:, :start], cache)
            cache = mm.commit(cache, jnp.full((1,), start, jnp.int32))

            def body(i, carry):
                cache, acc = carry
                lg, cache = mm.extend(jax.lax.dynamic_slice(toks, (0, i), (1, 1)), cache)
                return mm.commit(cache, jnp.ones((1,), jnp.int32)), acc + lg[0, 0, 0]
            return jax.lax.fori_loop(start, end, body, (cache, jnp.float32(0)))[1]
        fns.append((run, state))
    for f, st in fns:
        f(st, toks, start + n).block_until_ready()
    out = [[] for _ in models]
    times = [[] for _ in models]
    for _ in range(repeats):
        for i, (f, st) in enumerate(fns):
            t0 = time.perf_counter()
            f(st, toks, start + n).block_until_ready()
            t1 = time.perf_counter()
            f(st, toks, start + 2 * n).block_until_ready()
            t2 = time.perf_counter()
            out[i].append(1e6 * ((t2 - t1) - (t1 - t0)) / n)
            times[i].append((t1 - t0, t2 - t1))
    return times if raw else out


@cli
def main(argv=None) -> int:
    import jax.numpy as jnp
    import numpy as np

    from core.data import Corpus
    from core.tokenizer import get_tokenizer
    from decode.prompts import build_prompts

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dlcm_run")
    p.add_argument("decoder_run")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_intermixed_args(argv)
    for name in ("prompts", "prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    dcfg, dmodel, dstep = load(args.dlcm_run)
    bcfg, bmodel, bstep = load(args.decoder_run)
    if dcfg.model.arch != "dlcm" or bcfg.model.arch == "dlcm":
        raise UserError(f"need a DLCM run then a decoder-only run; got {dcfg.model.arch!r} and {bcfg.model.arch!r}")
    tok = get_tokenizer(dcfg.data.tokenizer)
    corpus = Corpus.open(dcfg.data, tok)
    items = build_prompts(np.asarray(corpus.val), tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
    prompts = [np.asarray(tok.encode(it["prompt"]), np.int32).tolist() for it in items]
    secs, toks, outs = bench([dmodel, bmodel], prompts, args.new_tokens, args.repeats)

    rows = {}
    for name, s, n in (("dlcm", secs[0], toks[0]), ("decoder", secs[1], toks[1])):
        tps = [k / x for k, x in zip(n, s)]
        rows[name] = {"tokens_per_s": statistics.median(tps), "us_per_step": 1e6 / statistics.median(tps),
                      "tokens_per_s_all": tps}
    ratios = [(toks[0][r] / secs[0][r]) / (toks[1][r] / secs[1][r]) for r in range(args.repeats)]
    gen = con = 0
    for pr, out in zip(prompts, outs[0]):
        g, c = close_rate(dmodel, pr, out)
        gen, con = gen + g, con + c
    # teacher-forced: real validation text closes concepts at the validation rate (greedy output of a tiny
    # model can be degenerate, e.g. a run of spaces that never closes one)
    start = args.prompt_tokens
    seq = np.asarray(corpus.val[:start + 2 * args.new_tokens])
    forced = forced_step_us([dmodel, bmodel], seq, start, args.new_tokens, args.repeats)
    _, fb = dmodel.boundaries(jnp.asarray(seq[None].astype(np.int32)))
    f_con = int(np.asarray(fb[0])[start:].sum())
    f_ratios = [b / d for d, b in zip(*forced)]
    res_forced = {"dlcm_us_per_step": statistics.median(forced[0]), "decoder_us_per_step": statistics.median(forced[1]),
                  "ratio_per_repeat_median": statistics.median(f_ratios), "ratio_per_repeat": f_ratios,
                  "concepts_closed": f_con, "tokens": 2 * args.new_tokens}
    res = {"dlcm": {"run": args.dlcm_run, "step": dstep, **rows["dlcm"]},
           "decoder": {"run": args.decoder_run, "step": bstep, **rows["decoder"]},
           "ratio": rows["dlcm"]["tokens_per_s"] / rows["decoder"]["tokens_per_s"],
           "ratio_per_repeat_median": statistics.median(ratios), "ratio_per_repeat": ratios,
           "concepts_closed": con, "generated_tokens": gen,
           "close_rate": con / max(gen, 1), "tokens_per_concept": gen / max(con, 1),
           "target_ratio": dcfg.model.target_ratio, "prompts": len(prompts), "new_tokens": args.new_tokens,
           "repeats": args.repeats, "teacher_forced": res_forced}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"batch-1 decode, {len(prompts)} validation prompts x {args.new_tokens} new tokens, median of "
          f"{args.repeats} alternated repeats")
    for name in ("dlcm", "decoder"):
        print(f"  {name:8s} {rows[name]['tokens_per_s']:8.1f} tokens/s  {rows[name]['us_per_step']:7.1f} us/step")
    print(f"  dlcm / decoder: {res['ratio']:.3f}x (median of per-repeat ratios {res['ratio_per_repeat_median']:.3f}x)")
    print(f"  concepts closed on the generated tokens: {con} / {gen} (one every {res['tokens_per_concept']:.2f} "
          f"tokens; target R {dcfg.model.target_ratio})")
    print(f"  teacher-forced on validation text ({2 * args.new_tokens} tokens, {f_con} concepts closed): dlcm "
          f"{res_forced['dlcm_us_per_step']:.1f} us/step, decoder {res_forced['decoder_us_per_step']:.1f} us/step, "
          f"dlcm speed {res_forced['ratio_per_repeat_median']:.3f}x the decoder's (median of per-repeat ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
