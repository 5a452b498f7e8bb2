"""k samples of one long prompt: shared prefill (one prefill, KV cache repeated k times) vs `num_return_sequences`.

Both run `sample_responses` (the trainer's sampler) on the same prompt and model in this process, interleaved;
printed: the median time of each and the ratio plain / shared.

    python benchmarks/generation.py                       # CPU: SmolLM2-shaped config-built model, 2k-token prompt
    python benchmarks/generation.py --device cuda --model 0.5b --prompt-tokens 8192 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_step import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small", help="tiny | small | 0.5b | 1b (see dpo_step.py)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", help="tokenizer path (default: the embedded SmolLM2's)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_longreward.generation import sample_responses
    from trl_longreward.models import default_model_path

    work = Path(tempfile.mkdtemp())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_path())
    tokenizer.save_pretrained(work)
    build_model(work, args.model, len(tokenizer), max(args.prompt_tokens) + args.max_new_tokens + 8)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work, dtype=dtype, attn_implementation="sdpa").to(args.device)
    model.generation_config.eos_token_id = None  # every sample runs max_new_tokens: same work in both
    generator = torch.Generator().manual_seed(0)
    results = []
    for length in args.prompt_tokens:
        prompt = torch.randint(10, len(tokenizer), (length,), generator=generator).tolist()
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for shared in (False, True):
                torch.manual_seed(repeat)
                started = time.perf_counter()
                sample_responses(
                    model,
                    tokenizer,
                    [prompt],
                    num_generations=args.num_samples,
                    temperature=1.0,
                    top_p=1.0,
                    max_completion_length=args.max_new_tokens,
                    shared_prefill=shared,
                )
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if repeat:
                    times[shared].append(time.perf_counter() - started)
        row = {
            "prompt_tokens": length,
            "num_samples": args.num_samples,
            "max_new_tokens": args.max_new_tokens,
            "plain_seconds": statistics.median(times[False]),
            "shared_seconds": statistics.median(times[True]),
        }
        row["speedup"] = row["plain_seconds"] / row["shared_seconds"]
        results.append(row)
        print(
            f"P={length:>6} k={args.num_samples}: num_return_sequences {row['plain_seconds']:.3f}s | "
            f"shared prefill {row['shared_seconds']:.3f}s | speed-up x{row['speedup']:.2f}",
            flush=True,
        )
    if args.json:
        config = {"device": args.device, "model": args.model, "dtype": str(dtype)}
        Path(args.json).write_text(json.dumps({"config": config, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
