"""Record every drafting decision of the speculative loop, to prove that a change to the host code drafts the same.

    python scripts/record_drafts.py RUN_DIR --prompts FILE.jsonl --sam SAM_DIR --out drafts.json [--max-draft 4]
        [--drafters oracle,pld,sam,sam+recycle,recycle,sam:paper] [--batch-size 1]

For each drafter and prompt (batch 1, then the prompts as one batch of --batch-size rows when > 1), greedy
speculative decoding through the engine, recording per row every `draft(k)` call (k and the tokens proposed)
and the tokens each `accept` received, the greedy output, steps and MAT, and the sequence of verify sizes the
host fed to sam's ObservedCost. sam's cost rule sizes drafts by measured step times, so it gets a fixed
VerifyCost here (the decisions then depend only on the code); the observed sizes are recorded from a
separate ObservedCost that drafts nothing. Run it with the old and the new code (PYTHONPATH) and compare the
JSON files: they must be equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from core.errors import ArgumentParser, cli  # noqa: E402


class Recorder:
    """Wraps a drafter: forwards every call and logs draft/accept."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    @property
    def observes(self):
        return self.inner.observes

    def reset(self, p):
        self.log.append(["reset", len(p)])
        self.inner.reset(p)

    def draft(self, k):
        d = np.asarray(self.inner.draft(k))
        self.log.append(["draft", int(k), d.tolist(), self.inner.last_source, int(self.inner.last_match_len)])
        return d

    def accept(self, t):
        self.log.append(["accept", np.asarray(t).tolist()])
        self.inner.accept(t)

    def observe(self, i, t):
        self.log.append(["observe", np.asarray(i).tolist(), np.asarray(t).tolist()])
        self.inner.observe(i, t)


class SizeLog:
    """An ObservedCost stand-in that records the sizes the host observes (not the times)."""

    def __init__(self, base):
        self.base, self.sizes_seen = base, []

    def observe(self, size, seconds):
        self.sizes_seen.append(int(size))


@cli
def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--sam", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--drafters", default="oracle,pld,sam,sam+recycle,recycle,sam:paper")
    args = ap.parse_args(argv)
    from decode.drafters import Acceptance, ReferenceDrafter, VerifyCost, make_drafter
    from decode.engine import engine_for_run, verify_sizes_for
    from decode.eval import static_automaton

    cfg, tok, eng = engine_for_run(args.run, verify_sizes=verify_sizes_for(args.max_draft))
    sam = static_automaton(Path(args.sam), cfg, tok)
    items = [json.loads(line) for line in open(args.prompts) if line.strip()]
    ids = [np.asarray(tok.encode(it["prompt"]), np.int32) for it in items]
    plain = [eng.generate([p], max_new_tokens=args.max_new_tokens).tokens[0] for p in ids]
    sizes = tuple(sorted({0} | set(eng.verify_sizes)))
    cost = VerifyCost(sizes, tuple(1.0 + k / 6 for k in sizes))
    sizelog = SizeLog(cost)
    eng._observed[1] = sizelog  # the host feeds it; nothing drafts by it
    eng._observed[args.batch_size] = sizelog
    out = {}
    for spec in args.drafters.split(","):
        name, _, rule = spec.partition(":")
        hist = Acceptance()

        def make(i, name=name, rule=rule, hist=hist):
            if name == "oracle":
                return ReferenceDrafter(plain[i])
            return make_drafter(name, vocab_size=eng.vocab_size, static_sam=sam, cost=cost, history=hist,
                                max_len=args.max_draft, min_len=1, rule=rule or "cost")

        rows = []
        batches = [[i] for i in range(len(ids))]
        if args.batch_size > 1:
            batches += [list(range(j, min(j + args.batch_size, len(ids)))) for j in range(0, len(ids), args.batch_size)]
        for batch in batches:
            logs = [[] for _ in batch]
            sizelog.sizes_seen = []
            res = eng.generate_speculative([ids[i] for i in batch], [Recorder(make(i), lg) for i, lg in zip(batch, logs)],
                                           max_new_tokens=args.max_new_tokens)
            for r, i in enumerate(batch):
                same = bool(np.array_equal(res.tokens[r], plain[i]))
                rows.append({"prompt": i, "batch": batch, "tokens": res.tokens[r].tolist(), "same_as_plain": same,
                             "steps": int(res.steps[r]), "mat": len(res.tokens[r]) / max(int(res.steps[r]), 1),
                             "log": logs[r]})
            rows[-1]["observed_sizes"] = list(sizelog.sizes_seen)
            rows[-1]["calls"] = int(res.verify_calls) if hasattr(res, "verify_calls") else None
        out[spec] = rows
        print(spec, "MAT", [round(r["mat"], 3) for r in rows], "same", all(r["same_as_plain"] for r in rows))
    Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
