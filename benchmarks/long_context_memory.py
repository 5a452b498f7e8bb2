"""Peak memory of one prompt-once DPO step vs prompt length: the dense [B, 1, L, L] mask vs split attention, and per
rank under sequence parallelism (SP=2) vs one process.

Each point is one `training_step` (policy and reference forwards, DPO loss, backward; no optimizer step) of
`LongContextDPOTrainer` on one pair (prompt P, answers of `--response-tokens`), a config-built Llama (`--model`;
random weights, a 1024-token vocabulary), float32, in this process: the memory the step adds on top of what was allocated before it (the
process's peak RSS, reset through /proc/self/clear_refs, on CPU; the CUDA allocator's peak on GPU). Both modes take
the same batch and must give the same loss. The growth from the shortest to the longest length is reported against
linear growth (new path: goal <= 1.2x linear from 4k to 32k).

    python benchmarks/long_context_memory.py --json benchmarks/results/long_context_memory_cpu.json
    python benchmarks/long_context_memory.py --lengths 4096 8192 --dense-max 8192     # quicker

With `--sp-size 2` the longest length is also run under `torchrun` on 2 gloo ranks (split attention, Ulysses
all-to-all), each rank reporting its own peak; the ratio per-rank / one process is printed (goal <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_step import MODELS, PeakMemory, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: a small vocabulary, so that the per-token LM-head terms (linear in L) do not hide the attention's memory
VOCAB = 1024
MODELS.setdefault(  # small enough that a 32k-token step runs in about a minute on 2 CPU cores
    "mem",
    dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
)
MODELS.setdefault(  # Llama-3.1-8B's shape (the GPU script's model)
    "8b",
    dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
)
#: --modes: TRL's two rows, prompt-once with the dense mask, prompt-once with split attention
MODES = {"two_rows": dict(prompt_once=False), "dense": dict(prompt_once_attention="dense"), "split": {}}


def make_trainer(
    model_path: str, mode: str, device: str, sp_size: int = 1, lora: bool = False, checkpointing: bool = False
):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_longreward import LongContextDPOConfig, LongContextDPOTrainer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = LongContextDPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        per_device_train_batch_size=1,
        max_length=None,
        gradient_checkpointing=checkpointing,
        model_init_kwargs={"attn_implementation": "sdpa", "dtype": dtype},
        sp_size=sp_size,
        ddp_backend=("gloo" if device == "cpu" else "nccl") if sp_size > 1 else None,
        **MODES[mode],
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=args,
        train_dataset=Dataset.from_list([{"context": "a", "question": "b"}]),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        peft_config=peft_config,
    )
    if checkpointing:  # Trainer turns it on in train(), which this benchmark does not run
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainer


def batch_for(length: int, response_tokens: int, vocab: int, device: torch.device) -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    generator = torch.Generator().manual_seed(length)

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=generator).tolist()

    pair = {"prompt_ids": ids(length), "chosen_ids": ids(response_tokens), "rejected_ids": ids(response_tokens - 16)}
    return {k: v.to(device) for k, v in DataCollatorForPreference(pad_token_id=0, max_length=None)([pair]).items()}


def release_freed_memory() -> None:
    """Give the pages freed by earlier steps back to the system (glibc's malloc_trim), so that the next step's
    allocations show in its peak RSS instead of reusing pages already counted as resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def step(trainer, batch: dict, device: str) -> tuple[float, float]:
    """One step's added peak GiB and its loss (TRL's training_step: the online sampling is skipped)."""
    from trl import DPOTrainer

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    release_freed_memory()
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        loss = DPOTrainer.training_step(trainer, model, dict(batch))
        if device == "cuda":
            torch.cuda.synchronize()
        trainer.last_step_s = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return memory.peak, float(loss)


def build(work: Path, model: str, max_positions: int) -> tuple[str, int]:
    from transformers import AutoTokenizer

    from trl_longreward.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.save_pretrained(work / "model")
    build_model(work / "model", model, VOCAB, max_positions)
    return str(work / "model"), VOCAB


def sp_child(args: argparse.Namespace) -> None:
    """One rank of the SP run (under torchrun): the longest length's step, its peak written to args.sp_child."""
    model_path = str(Path(args.sp_child).parent / "model")
    trainer = make_trainer(model_path, "split", args.device, sp_size=args.sp_size, lora=args.lora)
    vocab = trainer.model.config.vocab_size
    batch = batch_for(max(args.lengths), args.response_tokens, vocab, trainer.accelerator.device)
    step(trainer, batch, args.device)  # warm-up
    peak, loss = step(trainer, batch, args.device)
    rank = int(os.environ["RANK"])
    Path(f"{args.sp_child}.rank{rank}").write_text(json.dumps({"peak_gib": peak, "loss": loss}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="mem")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--dense-max", type=int, default=16384, help="longest prompt run with the dense mask")
    parser.add_argument("--sp-size", type=int, default=2, help="0: no SP run")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["dense", "split"])
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (r 16, all linear layers)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--longest", action="store_true", help="per mode, stop at the first length that runs out of memory"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--sp-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sp_child:
        sp_child(args)
        return 0

    work = Path(tempfile.mkdtemp())
    model_path, vocab = build(work, args.model, max(args.lengths) + 2 * args.response_tokens + 8)
    options = dict(lora=args.lora, checkpointing=args.gradient_checkpointing)
    trainers = {mode: make_trainer(model_path, mode, args.device, **options) for mode in args.modes}
    device = next(iter(trainers.values())).accelerator.device
    results, out_of_memory = [], set()
    for length in args.lengths:
        batch = batch_for(length, args.response_tokens, vocab, device)
        row = {"prompt_tokens": length, "response_tokens": args.response_tokens}
        for mode, trainer in trainers.items():
            if (mode == "dense" and length > args.dense_max) or mode in out_of_memory:
                row[f"{mode}_peak_gib"] = None
                continue
            try:
                step(trainer, batch, args.device)  # warm-up
                row[f"{mode}_peak_gib"], row[f"{mode}_loss"] = step(trainer, batch, args.device)
                tokens = length + 2 * args.response_tokens - 16
                row[f"{mode}_tokens_per_s"] = tokens / trainer.last_step_s
            except torch.OutOfMemoryError:
                row[f"{mode}_peak_gib"] = "out of memory"
                if args.longest:
                    out_of_memory.add(mode)
                trainer.model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        losses = [row[f"{m}_loss"] for m in args.modes if f"{m}_loss" in row]
        if len(losses) > 1:
            row["loss_max_abs_diff"] = max(losses) - min(losses)
        results.append(row)
        cells = []
        for m in args.modes:
            peak = row[f"{m}_peak_gib"]
            cells.append(f"{m} {peak:.3f} GiB" if isinstance(peak, float) else f"{m} {peak or 'not run'}")
        print(f"P={length:>6}  " + " | ".join(cells), flush=True)
    if "split" not in args.modes or not isinstance(results[-1].get("split_peak_gib"), float):
        if args.json:
            Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=2) + "\n")
        return 0
    first, last = results[0], results[-1]
    growth = last["split_peak_gib"] / first["split_peak_gib"]
    linear = last["prompt_tokens"] / first["prompt_tokens"]
    summary = {"split_growth": growth, "linear_growth": linear, "split_growth_vs_linear": growth / linear}
    dense_rows = [r for r in results if isinstance(r.get("dense_peak_gib"), float)]
    if len(dense_rows) > 1:
        d_growth = dense_rows[-1]["dense_peak_gib"] / dense_rows[0]["dense_peak_gib"]
        d_linear = dense_rows[-1]["prompt_tokens"] / dense_rows[0]["prompt_tokens"]
        summary |= {"dense_growth": d_growth, "dense_linear_growth": d_linear}
        summary["dense_over_split_at_dense_max"] = dense_rows[-1]["dense_peak_gib"] / next(
            r["split_peak_gib"] for r in results if r["prompt_tokens"] == dense_rows[-1]["prompt_tokens"]
        )
    print(
        f"split: x{growth:.2f} from {first['prompt_tokens']} to {last['prompt_tokens']} tokens "
        f"(linear x{linear:.1f}: ratio {growth / linear:.2f})"
    )
    if args.sp_size > 1:
        del trainers
        out = work / "sp"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.sp_size),
            "--master_addr", "127.0.0.1", "--master_port", "29577", str(Path(__file__).resolve()),
            "--sp-child", str(out), "--sp-size", str(args.sp_size), "--device", args.device,
            "--lengths", str(max(args.lengths)), "--response-tokens", str(args.response_tokens),
        ] + (["--lora"] if args.lora else [])  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.sp_size)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        subprocess.run(command, check=True, env=env, cwd=REPO)
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(args.sp_size)]
        per_rank = max(r["peak_gib"] for r in ranks)
        one = last["split_peak_gib"]
        summary |= {
            "sp_size": args.sp_size,
            "sp_per_rank_peak_gib": [r["peak_gib"] for r in ranks],
            "sp_loss": ranks[0]["loss"],
            "sp_per_rank_over_one_process": per_rank / one,
        }
        print(
            f"SP={args.sp_size} at P={last['prompt_tokens']}: per-rank peak {per_rank:.3f} GiB = x{per_rank / one:.2f}"
        )
    report = {
        "config": {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
            "model": args.model,
            "shape": MODELS[args.model],
            "dtype": "bfloat16" if args.device == "cuda" else "float32",
            "lora": args.lora,
            "gradient_checkpointing": args.gradient_checkpointing,
            "attn": "sdpa",
            "measure": "peak RSS added by one training_step (CPU) / CUDA allocator peak (GPU)",
        },
        "results": results,
        "summary": summary,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
