"""Prompt files: build code-continuation prompts from the validation split, and read prompt JSONL.

    python -m decode.prompts CONFIG_OR_RUN_DIR --out prompts.jsonl [--n 16 --prompt-tokens 256 --seed 0]

Each prompt is a run of whole lines from one held-out document (documents are separated by EOS), at most
`--prompt-tokens` tokens long and ending at a line break, so it is valid UTF-8 and the model continues
code at the start of a line. Lines: {"id", "prompt", "reference", "source"}, where reference is the text
that really followed (up to --prompt-tokens/2 tokens) and source is the document's index in the split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from core.errors import ArgumentParser, UserError, cli


def read_prompts(path) -> list[dict]:
    """[{"id", "prompt"} or {"id", "tokens"}] from JSONL; a missing id becomes the line number.

    Raises UserError naming the file and line for a missing file, bytes that are not UTF-8, bad JSON,
    or an object without a string "prompt" (or a list "tokens").
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file {path} is not valid UTF-8 (byte {e.start})") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{i}: expected a JSON object with \"prompt\", got {type(obj).__name__}")
        if isinstance(obj.get("tokens"), list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in obj["tokens"]):
                raise UserError(f"{path}:{i}: \"tokens\" must be a list of integer ids")
        elif not isinstance(obj.get("prompt"), str):
            raise UserError(f"{path}:{i}: expected a string \"prompt\" (or a list \"tokens\")")
        obj.setdefault("id", i)
        out.append(obj)
    if not out:
        raise UserError(f"prompts file {path} holds no prompts")
    return out


def encode_all(engine, tok, items: list[dict], max_new_tokens: int) -> list[np.ndarray]:
    """Token ids of every prompt item (its "tokens", or its "prompt" encoded), all checked against the
    engine's limits before any decoding starts; UserError naming the prompt's id."""
    ids = []
    for it in items:
        try:
            ids.append(engine.check_prompt(it["tokens"] if "tokens" in it else tok.encode(it["prompt"]),
                                           max_new_tokens))
        except UserError as e:
            raise UserError(f"prompt id {it['id']!r}: {e}") from None
    return ids


def documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [len(tokens)]])
    return [np.asarray(tokens[s:e]) for s, e in zip(starts, ends) if e > s]


def line_window(text: str, start: int, budget: int, encode) -> str:
    """Whole lines of text from the line holding `start`, as many as fit in `budget` tokens."""
    start = text.rfind("\n", 0, start) + 1
    lines = text[start:].splitlines(keepends=True)
    out, used = [], 0
    for line in lines:
        n = len(encode(line))
        if used + n > budget:
            break
        out.append(line)
        used += n
    return "".join(out)


def build_prompts(val_tokens: np.ndarray, tok, *, n: int, prompt_tokens: int, seed: int = 0) -> list[dict]:
    docs = documents(val_tokens, tok.eos_id)
    texts = [(i, tok.decode(d)) for i, d in enumerate(docs)]
    # Room for a prompt and a continuation; U+FFFD means bytes that were not UTF-8 (skip such files).
    eligible = [(i, t) for i, t in texts if len(docs[i]) >= prompt_tokens * 3 // 2 and "\ufffd" not in t]
    if not eligible:
        raise UserError(f"no validation document has {prompt_tokens * 3 // 2} tokens; lower --prompt-tokens")
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, len(eligible), n, endpoint=False).astype(int)
    out = []
    for j, k in enumerate(picks):
        src, text = eligible[k]
        # A start within the first quarter of the document, so that real text follows the prompt.
        start = int(rng.integers(0, max(1, len(text) - 3 * len(text) // 4)))
        prompt = line_window(text, start, prompt_tokens, tok.encode)
        if not prompt:  # the line at the start alone is longer than the budget
            continue
        begin = text.rfind("\n", 0, start) + 1
        rest = text[begin + len(prompt):]
        ref = tok.decode(tok.encode(rest)[:prompt_tokens // 2])
        out.append({"id": len(out), "prompt": prompt, "reference": ref, "source": int(src)})
    return out


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m decode.prompts", description=__doc__.splitlines()[0])
    ap.add_argument("target", help="a run directory (with config.toml) or a config file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from core.config import load_config
    from core.data import Corpus
    from core.tokenizer import get_tokenizer

    if args.n < 1 or args.prompt_tokens < 8:
        raise UserError("--n must be >= 1 and --prompt-tokens >= 8")
    path = Path(args.target)
    config = path / "config.toml" if path.is_dir() else path
    cfg = load_config(config)
    tok = get_tokenizer(cfg.data)
    val = Corpus.open(cfg.data, tok).val
    prompts = build_prompts(val, tok, n=args.n, prompt_tokens=args.prompt_tokens, seed=args.seed)
    if not prompts:
        raise UserError(f"no line of the validation documents fits in {args.prompt_tokens} tokens; raise "
                        f"--prompt-tokens")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: an error leaves no partial file
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    lens = [len(tok.encode(p["prompt"])) for p in prompts]
    print(f"wrote {len(prompts)} prompts ({min(lens)}-{max(lens)} tokens) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
