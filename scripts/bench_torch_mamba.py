"""Reference point for SAMBA's decode speed: PyTorch/transformers `MambaForCausalLM` on the same CPU.

    python scripts/bench_torch_mamba.py --out FILE.json [--context 1024] [--new-tokens 128]
        [--d-model 512] [--layers 16] [--threads N]

Needs torch and transformers, which the project does not depend on; install them into a separate
environment (on this machine class `pip install torch==2.13.0 transformers` takes the local CPU build):

    python -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 transformers numpy
    .venv-torch/bin/python scripts/bench_torch_mamba.py --out runs/bench/torch_mamba.json

Random init (a config, no hub download), fp32, batch 1, greedy `generate()` with the model's recurrent
cache. Decode tokens/s = (new tokens - 1) / (time of generate(new tokens) - time of generate(1 token)),
medians over repeats, so prefill is excluded as in scripts/bench_decode.py. Compare with

    python scripts/bench_decode.py --arch samba --batch 1 --prompt-len 1024 --out FILE.json

Writes a list of rows with `arch`, `context`, `tokens_per_s`, `ms_per_token` and `params`.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.errors import ArgumentParser, UserError, cli  # noqa: E402  (standard library only: works in the torch venv)


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16, help="16 Mamba layers at d_model 512: ~26M parameters")
    ap.add_argument("--vocab-size", type=int, default=259)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.context < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise UserError("--context and --repeats must be >= 1 and --new-tokens >= 2")
    try:
        import torch
        from transformers import MambaConfig, MambaForCausalLM
    except ImportError as e:
        raise UserError(f"{e}; this benchmark needs torch and transformers (see its docstring)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=args.vocab_size, hidden_size=args.d_model, num_hidden_layers=args.layers,
                      state_size=16, expand=2, conv_kernel=4, tie_word_embeddings=True, use_cache=True,
                      pad_token_id=0, bos_token_id=0, eos_token_id=1)
    model = MambaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(2, args.vocab_size, (1, args.context))

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
        dt = time.perf_counter() - t0
        assert out.shape[1] == args.context + n, out.shape
        return dt

    run(2)  # warm-up
    prefill = statistics.median(run(1) for _ in range(args.repeats))
    full = statistics.median(run(args.new_tokens) for _ in range(args.repeats))
    ms = 1e3 * (full - prefill) / (args.new_tokens - 1)
    row = {"arch": "hf_mamba", "impl": f"transformers MambaForCausalLM (torch {torch.__version__})",
           "context": args.context, "batch": 1, "new_tokens": args.new_tokens, "params": int(params),
           "ms_per_token": ms, "tokens_per_s": 1e3 / ms, "prefill_s": prefill, "threads": torch.get_num_threads(),
           "platform": platform.platform()}
    print(f"hf_mamba: {params / 1e6:.1f}M params, context {args.context}: {row['tokens_per_s']:.1f} tokens/s "
          f"({ms:.2f} ms/token), prefill {prefill:.2f} s, {row['threads']} threads")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([row], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
