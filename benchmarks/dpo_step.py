"""DPO step on long prompts: LongContextDPOTrainer (prompt-once) vs TRL's DPOTrainer, same model, same pairs.

For each prompt length, both trainers run `training_step` (forward of policy and reference, loss, backward) on the
SAME collated batch with identical weights (no optimizer step, so every repeat sees the same model), interleaved,
in this process. Printed per length: median step time of each, the time ratio TRL / ours, the peak-memory ratio
ours / TRL (memory the step adds on top of what was allocated before it: CUDA allocator peak on GPU, the process's
peak RSS - reset before each step through /proc/self/clear_refs - on CPU), and the loss difference.

    python benchmarks/dpo_step.py                      # CPU: a small config-built Llama, 1k/2k/4k prompts
    python benchmarks/dpo_step.py --device cuda --model 0.5b --lengths 8192 16384 32768 65536 --dtype bfloat16
    python benchmarks/dpo_step.py --family mistral --sliding-window 512 --lengths 2048   # every layer slides

`--family` builds the same shape in another model family; with a sliding window smaller than the prompt, the packed
row's masks carry the window per kind of layer (mistral: every layer; qwen2: the upper half of the layers; gemma3:
five sliding layers to one full one).

The limit of the speed-up is about (2P + C + R) / (P + C + R + 1) for prompt length P and responses C, R.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {  # config-built model shapes (random weights: speed and memory do not depend on the values)
    "tiny": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),  # SmolLM2-135M's shape
    "0.5b": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}


FAMILIES = ("llama", "mistral", "qwen2", "gemma3")


def family_config(family: str, layers: int, window: int) -> dict:
    """The model type and attention options of a family: "llama" full attention, the others a sliding window."""
    if family == "llama":
        return {"model_type": "llama", "rope_theta": 500000.0}
    if family == "mistral":
        return {"model_type": "mistral", "sliding_window": window}
    if family == "qwen2":
        return {
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": window,
            "max_window_layers": layers // 2,
        }
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return {"model_type": "gemma3_text", "sliding_window": window, "layer_types": types}


def build_model(path: Path, name: str, vocab_size: int, max_positions: int, family: str = "llama", window: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = MODELS[name]
    options = family_config(family, shape["num_hidden_layers"], window)
    config = AutoConfig.for_model(
        options.pop("model_type"),
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        **shape,
        **options,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


class PeakMemory:
    """Peak memory a block adds, in GiB: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def _rss(self, field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:  # resets the peak RSS (VmHWM) of this process
                handle.write("5")
            self.start = self._rss("VmRSS:")
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.start) / 2**30
        else:
            self.peak = (self._rss("VmHWM:") - self.start) / 2**30


def make_trainers(model_path: str, args: argparse.Namespace):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_longreward import LongContextDPOConfig, LongContextDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    common = dict(
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        per_device_train_batch_size=args.pairs,
        max_length=None,
        gradient_checkpointing=args.gradient_checkpointing,
        model_init_kwargs={"attn_implementation": args.attn, "dtype": getattr(torch, args.dtype)},
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.1],
        beta=0.15,
    )
    tmp = tempfile.mkdtemp()
    trl_trainer = DPOTrainer(
        model=model_path,
        args=DPOConfig(output_dir=os.path.join(tmp, "trl"), **common),
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=tokenizer,
    )
    ours = LongContextDPOTrainer(
        model=model_path,
        args=LongContextDPOConfig(output_dir=os.path.join(tmp, "ours"), prompt_once=True, **common),
        train_dataset=Dataset.from_list([{"context": "a", "question": "b"}]),
        processing_class=tokenizer,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
    )
    if args.gradient_checkpointing:  # Trainer enables it in train(), which this benchmark does not run
        for trainer in (trl_trainer, ours):
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainer.model.config.use_cache = False
    return trl_trainer, ours


def dpo_step(trainer, batch, device: str) -> tuple[float, float, float]:
    """One DPO forward/backward (TRL's training_step, no optimizer step): seconds, added peak GiB, loss."""
    from trl import DPOTrainer

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark does not run
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        loss = DPOTrainer.training_step(trainer, model, dict(batch))  # skip the online sampling: same pairs for both
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds, memory.peak, float(loss)


def run(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from trl_longreward.models import default_model_path

    work = Path(tempfile.mkdtemp())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_path())
    tokenizer.save_pretrained(work / "model")
    max_positions = max(args.lengths) + 2 * args.response_tokens + 8
    family, window = getattr(args, "family", "llama"), getattr(args, "sliding_window", 512)  # callers' namespaces
    build_model(work / "model", args.model, len(tokenizer), max_positions, family, window)
    trl_trainer, ours = make_trainers(str(work / "model"), args)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=None)
    generator = torch.Generator().manual_seed(0)
    results = []
    for length in args.lengths:

        def ids(n):
            return torch.randint(10, len(tokenizer), (n,), generator=generator).tolist()

        pairs = [
            {
                "prompt_ids": ids(length),
                "chosen_ids": ids(args.response_tokens),
                "rejected_ids": ids(args.response_tokens - 16),
            }
            for _ in range(args.pairs)
        ]
        batch = {k: v.to(ours.accelerator.device) for k, v in collator(pairs).items()}
        runs: dict[str, list[tuple[float, float, float]]] = {"trl": [], "ours": []}
        for repeat in range(args.repeats + 1):  # the first round warms up kernels and allocators
            for name, trainer in (("trl", trl_trainer), ("ours", ours)):
                try:
                    result = dpo_step(trainer, batch, args.device)
                except torch.OutOfMemoryError:
                    result = (float("nan"), float("nan"), float("nan"))
                    torch.cuda.empty_cache()
                if repeat:
                    runs[name].append(result)
        row = {"prompt_tokens": length, "response_tokens": args.response_tokens, "pairs": args.pairs}
        for name, values in runs.items():
            row[f"{name}_seconds"] = statistics.median(v[0] for v in values)
            row[f"{name}_peak_gib"] = max(v[1] for v in values)
            row[f"{name}_loss"] = values[-1][2]
        row["speedup"] = row["trl_seconds"] / row["ours_seconds"]
        row["memory_ratio"] = row["ours_peak_gib"] / row["trl_peak_gib"] if row["trl_peak_gib"] > 0 else float("nan")
        row["loss_abs_diff"] = abs(row["trl_loss"] - row["ours_loss"])
        tokens = args.pairs * (length + 2 * args.response_tokens - 16)
        row["ours_tokens_per_s"] = tokens / row["ours_seconds"]
        row["trl_tokens_per_s"] = tokens / row["trl_seconds"]
        row["speedup_limit"] = (2 * length + 2 * args.response_tokens - 16) / (length + 2 * args.response_tokens - 15)
        if ours._prompt_once_warned:
            raise RuntimeError(f"prompt-once fell back to two rows: {ours._prompt_once_warned}")
        results.append(row)
        print(
            f"P={length:>6}  TRL {row['trl_seconds']:8.3f}s {row['trl_peak_gib']:7.2f}GiB | "
            f"prompt-once {row['ours_seconds']:8.3f}s {row['ours_peak_gib']:7.2f}GiB | "
            f"speed-up x{row['speedup']:.2f} (limit x{row['speedup_limit']:.2f})  "
            f"memory x{row['memory_ratio']:.2f}  |loss diff| {row['loss_abs_diff']:.2e}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--family", choices=FAMILIES, default="llama", help="model family (default: llama)")
    parser.add_argument(
        "--sliding-window", type=int, default=512, help="sliding window of the families that have one (tokens)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--attn", choices=["sdpa", "eager", "flex_attention"], default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tokenizer", help="tokenizer path (default: the embedded SmolLM2's)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "model": args.model,
        "family": args.family,
        "sliding_window": None if args.family == "llama" else args.sliding_window,
        "dtype": args.dtype,
        "attn": args.attn,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    print(json.dumps(info), flush=True)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
