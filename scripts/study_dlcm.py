"""DLCM's claims measured on trained runs against a decoder-only run (same data, same training tokens).

    python scripts/study_dlcm.py DLCM_RUN DECODER_RUN --out study_dlcm.json [--variants RUN ...]
        [--files 40] [--decode-tokens 128] [--repeats 3]

Writes {"ratio": {"overall", "by_content": {code, comments, docstrings, strings}, "target", "paper_code_r4"},
"flops_per_token": {"dlcm", "decoder"}, "train_flops_per_token": {...}, "val_bpb": {"dlcm", "decoder"},
"decode_tokens_per_s": {"dlcm", "decoder"}, "training_tokens": {...}, "variants": [...]}:
- realised tokens per concept with evaluation-mode (threshold) boundaries: overall over the validation windows
  the trainer evaluates on (1 / F), and by content type over whole validation files, each preceded by the
  document separator as in training and read in seq_len windows. Content types come from Python's tokenize:
  comments, docstrings (a string that is a whole statement), other string literals, and everything else
  (code). A type's ratio is its tokens over the concepts that start on them (the window's first token,
  a forced boundary, is left out); `ratio.modes`: the same windows with the training-mode (sampled)
  boundaries the Global Parser drives to 1/R, against the threshold, and the share of sampled boundaries
  drawn where p is below the threshold (they never fire at evaluation: why the two ratios differ);
- inference FLOPs per token at a context of seq_len (2 N per token, the backbone once per realised concept;
  attention counted in full), and the training FLOPs per token the trainer reports;
- validation bits per byte on the trainer's validation windows;
- decode tokens/s at batch 1 (greedy, the jitted engine, fp32), median of --repeats, the two models
  alternating;
- every --variants run (other DLCM runs: weighting, R) gets the ratio, bits per byte and FLOPs too.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402

PAPER_TABLE5 = {"code": {8: 6.14, 4: 3.66, 2: 1.98}}  # realised tokens per concept, paper Table 5
TYPES = ("code", "comments", "docstrings", "strings")
WINDOWS = 8  # windows per boundaries call (files are padded to a multiple)


def content_types(source: bytes):
    """Per byte: 0 code, 1 comment, 2 docstring, 3 other string literal (Python tokenize; code if it fails)."""
    import numpy as np

    labels = np.zeros(len(source), np.int8)
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        return labels
    lines = text.splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln.encode("utf-8")))

    def offset(row, col):
        return starts[row - 1] + len(lines[row - 1][:col].encode("utf-8")) if row - 1 < len(lines) else starts[-1]

    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return labels
    skip = (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
    for i, tk in enumerate(toks):
        if tk.type == tokenize.COMMENT:
            kind = 1
        elif tk.type == tokenize.STRING:
            prev = next((t for t in reversed(toks[:i]) if t.type not in skip), None)
            nxt = next((t for t in toks[i + 1:] if t.type not in skip), None)
            statement = (prev is None or prev.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
                         or (prev.type == tokenize.OP and prev.string == ":" and prev.end[0] < tk.start[0]))
            alone = nxt is None or nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
            kind = 2 if statement and alone else 3
        else:
            continue
        labels[offset(*tk.start):offset(*tk.end)] = kind
    return labels


def load_run(run_dir: Path):
    from core.checkpoint import load_model
    from core.config import load_config

    if not (run_dir / "config.toml").is_file():
        raise UserError(f"not a run directory (no config.toml): {run_dir}")
    cfg, model, step = load_model(run_dir)
    cfg = load_config(run_dir / "config.toml")
    tokens = step * cfg.data.batch_size * cfg.data.seq_len
    return cfg, model, step, tokens


def val_bpb_and_ratio(cfg, model, corpus, tok):
    """Validation bits per byte on the trainer's windows and, for DLCM, 1/F there (threshold boundaries)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from core.data import eval_batches
    from train.loop import LN2, loss_terms

    gdef, state = nnx.split(model)
    dlcm = cfg.model.arch == "dlcm"

    @jax.jit
    def run(toks):
        m = nnx.merge(gdef, state)
        logits, aux = m(toks[:, :-1])
        s, _ = loss_terms(logits, toks[:, 1:], jnp.ones(toks[:, 1:].shape, jnp.float32))
        nb = jnp.sum(tok.n_bytes(toks[:, 1:]))
        return s, nb, aux["boundary_rate"] if dlcm else jnp.float32(0)

    tot = nb = f = 0.0
    batches = eval_batches(corpus.val, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                           n_batches=cfg.train.eval_batches)
    for b in batches:
        s, n, rate = jax.device_get(run(jnp.asarray(b)))
        tot, nb, f = tot + float(s), nb + float(n), f + float(rate)
    return tot / max(nb, 1.0) / LN2, (len(batches) / f if dlcm and f > 0 else None)


def sampled_vs_threshold(cfg, model, corpus, seeds: int = 4):
    """Why the evaluation ratio can miss R: the Global Parser drives the rate of the SAMPLED training-mode
    boundaries (Bernoulli(sharpen(p))) to 1/R, while evaluation thresholds p. On the trainer's validation
    windows: tokens per concept with sampled boundaries (mean over `seeds` draws) and with the threshold, and
    the share of sampled boundaries drawn at tokens whose p is below the threshold (those never fire at
    evaluation)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from core.data import eval_batches

    gdef, state = nnx.split(model)
    thr = cfg.model.eval_threshold

    @jax.jit
    def run(toks, key):
        m = nnx.merge(gdef, state)
        p, b_eval = m.boundaries(toks)
        _, b_samp = m.boundaries(toks, rng=key)
        low = (p < thr) & b_samp
        return jnp.mean(b_samp), jnp.mean(b_eval), jnp.sum(low) / jnp.maximum(jnp.sum(b_samp), 1)

    rows = []
    for i, b in enumerate(eval_batches(corpus.val, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                                       n_batches=cfg.train.eval_batches)):
        for s in range(seeds):
            rows.append(np.asarray(jax.device_get(run(jnp.asarray(b[:, :-1]), jax.random.key(1000 * i + s)))))
    f_samp, f_eval, low = np.mean(rows, axis=0)
    return {"sampled": float(1 / f_samp), "threshold": float(1 / f_eval), "sampled_below_threshold": float(low)}


def ratio_by_content(cfg, model, tok, n_files: int):
    """Tokens per concept by content type over validation files (threshold boundaries, seq_len windows)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from core.data import is_validation, resolve_sources

    files = [p for rel, p in resolve_sources(cfg.data.sources) if is_validation(rel, cfg.data.val_fraction)]
    files = files[:n_files]
    gdef, state = nnx.split(model)
    length = cfg.data.seq_len

    @jax.jit
    def bounds(toks):
        return nnx.merge(gdef, state).boundaries(toks)[1]

    n_tok = np.zeros(len(TYPES))
    n_bnd = np.zeros(len(TYPES))
    for path in files:
        data = path.read_bytes()
        ids = np.asarray(tok.encode(data), np.int64)
        if len(ids) != len(data):  # content types are per byte: only for a byte-level tokenizer
            raise UserError(f"--files needs a byte tokenizer (content types are per byte); got {cfg.data.tokenizer}")
        labels = content_types(data)
        seq = np.concatenate([[tok.eos_id], ids])  # the document separator before the document, as in training
        lab = np.concatenate([[0], labels])
        n_win = -(--(-len(seq) // length) // WINDOWS) * WINDOWS  # a multiple of WINDOWS: one compiled shape
        pad = np.full(n_win * length, tok.pad_id, np.int64)
        pad[:len(seq)] = seq
        wins = pad.reshape(n_win, length)
        b = np.concatenate([np.asarray(jax.device_get(bounds(jnp.asarray(wins[i:i + WINDOWS], jnp.int32))))
                            for i in range(0, n_win, WINDOWS)]).reshape(-1)[:len(seq)]
        keep = np.ones(len(seq), bool)
        keep[::length] = False  # a window's first token: forced, not a decision
        keep[0] = False  # the separator
        for k in range(len(TYPES)):
            sel = keep & (lab == k)
            n_tok[k] += sel.sum()
            n_bnd[k] += (b.astype(bool) & sel).sum()
    out = {t: (float(n_tok[k] / n_bnd[k]) if n_bnd[k] else None) for k, t in enumerate(TYPES)}
    counts = {t: int(n_tok[k]) for k, t in enumerate(TYPES)}
    return out, float(n_tok.sum() / max(n_bnd.sum(), 1)), counts, len(files)


def decode_speed(models, prompt, n_new: int, repeats: int):
    """Batch-1 greedy decode tokens/s per model, the models alternating, median over repeats."""
    from decode.engine import Engine

    engines = [Engine(m, max_len=len(prompt) + n_new + 16, bos_id=None, verify_sizes=(1,)) for m in models]
    for e in engines:
        e.generate([prompt], max_new_tokens=n_new, stop_ids=())  # compile
    speeds = [[] for _ in models]
    for _ in range(repeats):
        for i, e in enumerate(engines):
            r = e.generate([prompt], max_new_tokens=n_new, stop_ids=())
            speeds[i].append(n_new / max(r.decode_s, 1e-9))
    return [statistics.median(s) for s in speeds]


def describe(cfg, model, step, tokens, corpus, tok, n_files):
    bpb, ratio = val_bpb_and_ratio(cfg, model, corpus, tok)
    row = {"run_step": step, "training_tokens": tokens, "val_bpb": bpb,
           "train_flops_per_token": float(model.flops_per_token(cfg.data.seq_len))}
    if cfg.model.arch == "dlcm":
        by, overall_files, counts, nf = ratio_by_content(cfg, model, tok, n_files)
        row.update({"target_ratio": cfg.model.target_ratio, "cross_weighting": cfg.model.cross_weighting,
                    "ratio_modes": sampled_vs_threshold(cfg, model, corpus),
                    "ratio_val_windows": ratio, "ratio_files": overall_files, "by_content": by,
                    "content_tokens": counts, "files": nf,
                    "flops_per_token": float(model.inference_flops_per_token(cfg.data.seq_len, ratio))})
    else:
        row["flops_per_token"] = float(model.flops_per_token(cfg.data.seq_len)) / 3.0  # 2 N + 4 L T d
    return row


@cli
def main(argv=None) -> int:
    import numpy as np

    from core.data import Corpus
    from core.tokenizer import get_tokenizer

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dlcm_run")
    p.add_argument("decoder_run")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="*", default=[], help="more DLCM run directories (weighting, R)")
    p.add_argument("--files", type=int, default=40, help="validation files for the by-content ratios")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_intermixed_args(argv)
    if args.files < 1 or args.decode_tokens < 1 or args.repeats < 1:
        raise UserError("--files, --decode-tokens and --repeats must be >= 1")
    dcfg, dmodel, dstep, dtok = load_run(Path(args.dlcm_run))
    bcfg, bmodel, bstep, btok = load_run(Path(args.decoder_run))
    if dcfg.model.arch != "dlcm" or bcfg.model.arch == "dlcm":
        raise UserError(f"need a DLCM run then a decoder-only run; got {dcfg.model.arch!r} and {bcfg.model.arch!r}")
    if dcfg.data != bcfg.data:
        raise UserError("the two runs were trained on different data settings ([data] differs)")
    tok = get_tokenizer(dcfg.data.tokenizer)
    corpus = Corpus.open(dcfg.data, tok)
    d = describe(dcfg, dmodel, dstep, dtok, corpus, tok, args.files)
    b = describe(bcfg, bmodel, bstep, btok, corpus, tok, args.files)
    prompt = np.asarray(corpus.val[:64], np.int32).tolist()
    speed = decode_speed([dmodel, bmodel], prompt, args.decode_tokens, args.repeats)
    variants = []
    for run in args.variants:
        vcfg, vmodel, vstep, vtok = load_run(Path(run))
        if vcfg.model.arch != "dlcm":
            raise UserError(f"--variants takes DLCM runs; {run} is {vcfg.model.arch!r}")
        variants.append({"run": str(run), **describe(vcfg, vmodel, vstep, vtok, corpus, tok, args.files)})
    r = dcfg.model.target_ratio
    out = {
        "ratio": {"overall": d["ratio_val_windows"], "overall_files": d["ratio_files"], "modes": d["ratio_modes"],
                  "by_content": d["by_content"], "content_tokens": d["content_tokens"], "target": r,
                  "paper_code": PAPER_TABLE5["code"].get(int(r)) if float(r).is_integer() else None},
        "flops_per_token": {"dlcm": d["flops_per_token"], "decoder": b["flops_per_token"]},
        "train_flops_per_token": {"dlcm": d["train_flops_per_token"], "decoder": b["train_flops_per_token"]},
        "val_bpb": {"dlcm": d["val_bpb"], "decoder": b["val_bpb"]},
        "decode_tokens_per_s": {"dlcm": speed[0], "decoder": speed[1]},
        "training_tokens": {"dlcm": dtok, "decoder": btok},
        "runs": {"dlcm": {"run": args.dlcm_run, **d}, "decoder": {"run": args.decoder_run, **b}},
        "variants": variants,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"realised tokens/concept (target {r}): {d['ratio_val_windows']:.2f} on the validation windows; by "
          "content " + ", ".join(f"{k} {v:.2f}" for k, v in d["by_content"].items() if v))
    rm = d["ratio_modes"]
    print(f"  training-mode (sampled) boundaries: {rm['sampled']:.2f} tokens/concept, threshold {rm['threshold']:.2f}; "
          f"{rm['sampled_below_threshold']:.0%} of the sampled ones fall at p < {dcfg.model.eval_threshold}")
    print(f"inference FLOPs/token: dlcm {d['flops_per_token'] / 1e6:.2f}M, decoder {b['flops_per_token'] / 1e6:.2f}M "
          f"({d['flops_per_token'] / b['flops_per_token']:.2f}x)")
    print(f"val bits/byte: dlcm {d['val_bpb']:.4f}, decoder {b['val_bpb']:.4f} "
          f"({d['val_bpb'] / b['val_bpb'] - 1:+.1%}) at {dtok} / {btok} training tokens")
    print(f"decode tokens/s (batch 1): dlcm {speed[0]:.1f}, decoder {speed[1]:.1f} ({speed[0] / speed[1]:.2f}x)")
    for v in variants:
        print(f"variant {v['run']}: R {v['target_ratio']}, {v['cross_weighting']}: ratio {v['ratio_val_windows']:.2f} "
              f"(sampled {v['ratio_modes']['sampled']:.2f}), "
              f"val {v['val_bpb']:.4f} bits/byte, {v['flops_per_token'] / 1e6:.2f}M FLOPs/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
