"""Tiny random Hugging Face models for tests/test_hf.py, and a transformers check of an exported directory.

Needs the `torch-ref` extra (torch, transformers); the test suite itself never imports torch.

    python scripts/make_hf_fixtures.py make [--out tests/fixtures/hf]
        writes llama/ (GQA, Llama-3 rope scaling, untied head, two safetensors shards + index),
        qwen2/ (q/k/v biases, tied embeddings, stored in bf16), mamba/ (a pure Mamba stack, tied):
        each a `save_pretrained` directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json)
        plus expected.npz: fixed `tokens` [2, 16] and the fp32 `logits` transformers computes for them.
    python scripts/make_hf_fixtures.py big OUT_DIR [--d 1536 --layers 16 ...]
        a random bf16 Llama of realistic shape (650M parameters by default) for timing imports; not checked in.
    python scripts/make_hf_fixtures.py check HF_DIR EXPECTED.npz
        `from_pretrained(HF_DIR)` (what `python scripts/hf.py export` wrote) and the max relative error of its
        logits against EXPECTED's; exit 1 above 1e-4.

Everything is seeded: rerunning `make` rewrites identical files (up to torch's kernels).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

VOCAB = 300
TOKENS_SHAPE = (2, 16)

# A fixed training text for the fixture tokenizers (no download, no dependence on the stdlib's version).
TEXT = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
        "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n\n"
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n") * 4


def fixture_tokenizer(specials: list[str]):
    """A byte-level BPE of VOCAB ids trained on TEXT with `specials` first (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def save_tokenizer(tok, out: Path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(out)


def logits_of(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def make(out_root: Path) -> None:
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    out_root.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=TOKENS_SHAPE).astype(np.int64)

    def finish(name, model, tok, special, dtype=None, shard=None):
        out = out_root / name
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(1)
        with torch.no_grad():  # random weights of a realistic scale (HF's init is std 0.02: near-uniform logits)
            for pname, p in model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.3 if "embed" in pname else 1.0 / p.shape[-1] ** 0.5)
                elif pname.endswith("bias") and "dt_proj" not in pname:
                    p.normal_(0.0, 0.1)
                elif "norm" in pname:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
        if dtype is not None:  # stored in bf16
            model = model.to(dtype)
        model.save_pretrained(out, max_shard_size=shard) if shard else model.save_pretrained(out)
        save_tokenizer(tok, out, **special)
        # The expected logits are what transformers computes from the saved files, in fp32 (for bf16 weights:
        # fp32 math on the bf16 values; casting the live model back would keep a bf16-rounded RoPE table).
        loaded = type(model).from_pretrained(out, dtype=torch.float32).eval()
        np.savez(out / "expected.npz", tokens=tokens, logits=logits_of(loaded, tokens))
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: {sorted(f.name for f in out.iterdir())} {size / 1024:.0f} KiB")

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=10000.0))
    finish("llama", llama, fixture_tokenizer(["<s>", "</s>"]), dict(bos_token="<s>", eos_token="</s>"),
           shard="40KB")

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True,
        rope_theta=1000000.0, bos_token_id=0, eos_token_id=0))
    finish("qwen2", qwen, fixture_tokenizer(["<|endoftext|>"]), dict(eos_token="<|endoftext|>"),
           dtype=torch.bfloat16)

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank=4, layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0))
    finish("mamba", mamba, fixture_tokenizer(["<|endoftext|>"]), dict(eos_token="<|endoftext|>"))
    total = sum(f.stat().st_size for f in out_root.rglob("*") if f.is_file())
    print(f"total {total / 1024:.0f} KiB")


def big(out: Path, *, d: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> None:
    """A random Llama of realistic shape in bf16, in 500 MB shards (for import time and memory; not checked in)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=d // heads, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, max_position_embeddings=8192,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 1024}, rope_theta=500000.0))
    model.save_pretrained(out, max_shard_size="500MB")
    save_tokenizer(fixture_tokenizer(["<s>", "</s>"]), out, bos_token="<s>", eos_token="</s>")
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n / 1e6:.0f}M params, bf16")


def check(hf_dir: Path, expected: Path) -> int:
    from transformers import AutoModelForCausalLM

    ref = np.load(expected)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()
    got = logits_of(model, ref["tokens"])
    want = ref["logits"]
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    cls = type(model).__name__
    print(json.dumps({"dir": str(hf_dir), "class": cls, "max_rel_err": err, "shape": list(got.shape)}))
    return 0 if err < 1e-4 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/hf"))
    c = sub.add_parser("check")
    c.add_argument("hf_dir")
    c.add_argument("expected")
    b = sub.add_parser("big")
    b.add_argument("out")
    b.add_argument("--d", type=int, default=1536)
    b.add_argument("--layers", type=int, default=16)
    b.add_argument("--heads", type=int, default=12)
    b.add_argument("--kv-heads", type=int, default=4)
    b.add_argument("--ffn", type=int, default=6144)
    b.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args(argv)
    if args.cmd == "big":
        big(Path(args.out), d=args.d, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn,
            vocab=args.vocab)
        return 0
    if args.cmd == "make":
        make(Path(args.out))
        return 0
    return check(Path(args.hf_dir), Path(args.expected))


if __name__ == "__main__":
    sys.exit(main())
