"""Train `LongContextDPOTrainer` under the engine the launcher set up (FSDP2, DeepSpeed ZeRO-2/3, DDP) and write what
each rank saw to one JSON record per rank.

Run by `tests/test_engines.py` and `benchmarks/gpu_engine_check.sh`::

    accelerate launch --config_file accelerate_configs/fsdp2_cpu.yaml tests/distributed/engine_step.py \
        --judge_url http://127.0.0.1:PORT/v1 --output_dir OUT --mode full --tag first

The policy is a tiny Llama (the same seed on every rank) with SmolLM2's tokenizer; `--mode lora` trains LoRA adapters
on it. The reward is the trainer's default `LongRewardFunction` against the judge at `--judge_url`, so the judge-call
cache is `OUT/trainer/judge_cache.sqlite`. A checkpoint is saved after every step; `--resume_from_checkpoint` resumes
from one. `OUT/{tag}-rank{N}.json` holds the engine the trainer ran under, how the policy looked inside TRL's
`unwrap_model_for_generation`, the shapes of the DPO forwards (prompt-once packs a pair into one row), and digests of
the gathered parameters before and after training; rank 0 also saves the gathered parameters after training to
`OUT/{tag}-params.safetensors` and says whether the last checkpoint holds the same values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models and known_answers

from tiny_models import FOUR_HEADS, prompts_dataset, small_dpo_config, tiny_llama  # noqa: E402

import trl_longreward.trainer.generation as generation_module  # noqa: E402
import trl_longreward.trainer.trainer as trainer_module  # noqa: E402
from trl_longreward.judges.cache import JudgeCallCache  # noqa: E402
from trl_longreward.trainer import LongContextDPOTrainer  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TIED_REWARD = 5.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge_url", required=True, help="Base URL of the OpenAI-compatible judge.")
    parser.add_argument("--output_dir", required=True, help="Where the model, the checkpoints and the records go.")
    parser.add_argument(
        "--mode", choices=["full", "lora", "qlora"], default="full", help="Full fine-tuning, LoRA or QLoRA (4-bit)."
    )
    parser.add_argument(
        "--quant_storage", default="uint8", help="QLoRA: dtype the 4-bit weights are packed in (bf16 for FSDP)."
    )
    parser.add_argument("--tag", default="run", help="Name of this run's records.")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint directory to resume from.")
    parser.add_argument("--num_generations", type=int, default=2)
    parser.add_argument("--max_completion_length", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="Train in bf16 (GPUs).")
    parser.add_argument("--ddp_timeout", type=int, default=600, help="Seconds before a collective gives up.")
    parser.add_argument(
        "--early_eos_rank",
        type=int,
        default=-1,
        help="Make this rank's policy end every response after its first token (every token counts as EOS), so the "
        "ranks' `generate` calls run different numbers of forwards.",
    )
    parser.add_argument(
        "--async_judging", action="store_true", help="Judge the next step's samples in the background."
    )
    parser.add_argument("--sp_size", type=int, default=1, help="Sequence-parallel group size.")
    parser.add_argument(
        "--pairless_rank",
        type=int,
        default=-1,
        help="Give every sample of this rank's first step the same reward: that rank has no pair on that step.",
    )
    return parser.parse_args()


def allow_fsdp_on_cpu() -> None:
    """Let accelerate 1.15 set up FSDP on a gloo CPU rank.

    `AcceleratorState` turns FSDP on (from `ACCELERATE_USE_FSDP` or an `fsdp_plugin`) only when the process came up
    as a GPU-like rank (MULTI_GPU, MULTI_XPU, ...); a CPU rank is MULTI_CPU and silently gets DDP. While the state is
    built, the CPU rank is presented as MULTI_GPU; the device (CPU) and the backend (gloo) are already fixed then, and
    the state ends up FSDP exactly as on GPUs. Nothing else is changed: the sharding is accelerate's and torch's.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: AcceleratorState, *args: Any, **kwargs: Any) -> None:
        shared = PartialState._shared_state
        cpu_rank = shared.get("distributed_type") == DistributedType.MULTI_CPU
        if cpu_rank:
            shared["distributed_type"] = DistributedType.MULTI_GPU
        try:
            original(self, *args, **kwargs)
        finally:
            if cpu_rank and shared.get("distributed_type") == DistributedType.MULTI_GPU:
                shared["distributed_type"] = DistributedType.MULTI_CPU  # FSDP was not asked for after all

    AcceleratorState.__init__ = init


def engine(trainer: LongContextDPOTrainer) -> str:
    """What the trainer's accelerator runs: "fsdp2", "zero2", "zero3", "ddp" or "single"."""
    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    if getattr(state, "deepspeed_plugin", None) is not None:
        return f"zero{state.deepspeed_plugin.zero_stage}"
    return "ddp" if trainer.accelerator.num_processes > 1 else "single"


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3 parameters gathered while inside (a no-op for other parameters)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def checkpoint_name(name: str) -> str:
    """A parameter's name in a saved checkpoint (PEFT saves adapters without the adapter name; a DeepSpeed engine
    holds the model as `module`)."""
    return name.removeprefix("module.").replace(".default.", ".")


def full_parameters(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Every (trainable) parameter as one full CPU float32 tensor, FSDP2 shards and ZeRO-3 partitions gathered.

    A collective under FSDP2 and ZeRO-3: every rank must call it, in the same order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    out: dict[str, torch.Tensor] = {}
    with gathered([p for _, p in named]):
        for name, param in named:
            data = param.detach()
            if hasattr(data, "full_tensor"):  # an FSDP2 DTensor shard
                data = data.full_tensor()
            out[checkpoint_name(name)] = data.to("cpu", torch.float32).clone()
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].contiguous().numpy().tobytes())
    return sha.hexdigest()


def spy_on_generation(calls: list[dict[str, Any]]) -> None:
    """Record what TRL's `unwrap_model_for_generation` hands the trainer's sampler, on each call."""
    original = generation_module.unwrap_model_for_generation

    @contextlib.contextmanager
    def spy(model_wrapped: Any, accelerator: Any, **kwargs: Any) -> Iterator[Any]:
        with original(model_wrapped, accelerator, **kwargs) as model:
            params = list(model.parameters())
            calls.append(
                {
                    "wrapped": type(model_wrapped).__name__,
                    "unwrapped": type(model).__name__,
                    "dtensor_params": sum(hasattr(p, "full_tensor") for p in params),
                    "zero3_params": sum(hasattr(p, "ds_id") for p in params),
                    "empty_params": sum(p.numel() == 0 for p in params),  # partitioned, not gathered
                }
            )
            yield model

    generation_module.unwrap_model_for_generation = spy


def spy_on_dpo_forwards(model: torch.nn.Module, shapes: list[dict[str, Any]]) -> None:
    """Record the batch each DPO forward of the policy really computes (after the prompt-once packing hook)."""
    forward = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("fused_lm_head"):
            shapes.append({"input_ids": list(kwargs["input_ids"].shape), "mask_dim": kwargs["attention_mask"].dim()})
        return forward(*args, **kwargs)

    model.forward = spy


def spy_on_samples(trainer: LongContextDPOTrainer, lengths: list[list[int]]) -> None:
    """Record the length of every sampled response, per step."""
    sample = trainer.sampler.sample

    def spy(*args: Any, **kwargs: Any) -> list[list[dict[str, Any]]]:
        samples = sample(*args, **kwargs)
        lengths.append([len(s["completion_ids"]) for per_prompt in samples for s in per_prompt])
        return samples

    trainer.sampler.sample = spy


def tie_first_step() -> None:
    """On this rank's first step, every sample gets the same reward (so no pair: the zero-weighted stand-in step)."""
    original = trainer_module.score_samples
    calls = [0]

    def tied(*args: Any, **kwargs: Any) -> Any:
        scored = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 1:
            scored = dataclasses.replace(scored, rewards=[TIED_REWARD] * len(scored.rewards))
        return scored

    trainer_module.score_samples = tied


class LocalPairs(TrainerCallback):
    """This rank's own number of valid pairs per micro-step (the logged counts are summed over the ranks)."""

    def __init__(self) -> None:
        self.pairs: list[int] = []

    def on_step_judged(self, args: Any, state: Any, control: Any, *, judged: Any, **kwargs: Any) -> None:
        self.pairs.append(sum(1 for s in judged.selections if s.ok))


def saved_weights(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The model (or adapter) weights of a checkpoint, or None if it has no safetensors file."""
    from safetensors.torch import load_file

    for filename in ("adapter_model.safetensors", "model.safetensors"):
        if (checkpoint / filename).is_file():
            return {k: v.to(torch.float32) for k, v in load_file(checkpoint / filename).items()}
    return None


def main() -> None:
    cli = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not on_gpu:
        allow_fsdp_on_cpu()
    # Every rank saves its own (identical) copy: no file is read while another process is writing it.
    model_path = tiny_llama(out / f"model-rank{rank}", hidden_size=cli.hidden_size, pad_with_eos=True, **FOUR_HEADS)

    long_reward = {
        "judge_base_url": cli.judge_url,
        "judge_model": "scripted-judge",
        "judge_max_retries": 0,
        "judge_timeout": 60,  # one call's worst wait fits in the short ddp_timeout the tests give
        "dimensions": ["helpfulness", "logicality"],
        "retriever": "bm25",
        "chunk_tokenizer": "regex",
    }
    args = small_dpo_config(
        out / "trainer",
        # accelerate sets DeepSpeed up only for processes not forced onto the CPU (a CPU rank is then DeepSpeed's
        # CPU accelerator, with gloo); FSDP and DDP CPU ranks are MULTI_CPU ranks.
        use_cpu=not on_gpu and not deepspeed_launch,
        ddp_backend=None if on_gpu else "gloo",
        ddp_timeout=cli.ddp_timeout,
        sp_size=cli.sp_size,
        per_device_train_batch_size=1,
        max_steps=cli.max_steps,
        num_generations=cli.num_generations,
        max_completion_length=cli.max_completion_length,
        save_strategy="steps",
        save_steps=1,
        long_reward=long_reward,
        async_judging=cli.async_judging,
        bf16=cli.bf16,
        model_init_kwargs={"attn_implementation": "sdpa", **({"dtype": torch.bfloat16} if cli.bf16 else {})},
    )
    # Two ranks creating the judge-call cache at the same moment can fail with "database is locked" (SQLite's switch to
    # WAL mode, see docs/engines.md); the first rank creates it here before the others open it.
    with args.main_process_first(desc="judge-call cache"):
        JudgeCallCache(out / "trainer" / "judge_cache.sqlite").close()
    peft_config = quantization_config = None
    if cli.mode == "qlora":
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=getattr(torch, cli.quant_storage)
        )
    if cli.mode in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
        )

    generations: list[dict[str, Any]] = []
    spy_on_generation(generations)
    if rank == cli.pairless_rank:
        tie_first_step()
    local_pairs = LocalPairs()
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=args,
        train_dataset=prompts_dataset(4),
        peft_config=peft_config,
        quantization_config=quantization_config,
        callbacks=[local_pairs],
    )
    forwards: list[dict[str, Any]] = []
    spy_on_dpo_forwards(trainer.model, forwards)
    completion_lengths: list[list[int]] = []
    spy_on_samples(trainer, completion_lengths)
    if rank == cli.early_eos_rank:
        trainer.model.generation_config.eos_token_id = list(range(trainer.model.config.vocab_size))
    trainable = cli.mode != "full"
    before = full_parameters(trainer.model, trainable_only=trainable)
    trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    after = full_parameters(trainer.model, trainable_only=trainable)
    reference = None if trainer.ref_model is None else full_parameters(trainer.ref_model, trainable_only=False)

    checkpoint = out / "trainer" / f"checkpoint-{trainer.state.global_step}"
    trainer.accelerator.wait_for_everyone()
    saved_matches = None
    if rank == 0:
        from safetensors.torch import save_file

        save_file(after, out / f"{cli.tag}-params.safetensors")
        saved = saved_weights(checkpoint)
        if saved is not None:
            names = sorted(set(saved) & set(after))
            saved_matches = {
                "compared": len(names),
                "missing": sorted(set(after) - set(saved))[:5],
                "max_abs_diff": max((float((saved[n] - after[n]).abs().max()) for n in names), default=None),
            }
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    record = {
        "rank": rank,
        "engine": engine(trainer),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": trainer.accelerator.state.backend,
        "num_processes": trainer.accelerator.num_processes,
        "device": str(trainer.accelerator.device),
        "wrapped": type(trainer.model_wrapped).__name__,
        "model": type(model).__name__,
        "mode": cli.mode,
        "sp_size": cli.sp_size,
        "trainable": sum(p.numel() for p in after.values()),
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "online_pairs": [e["pairs/online"] for e in trainer.state.log_history if "pairs/online" in e],
        "local_pairs": local_pairs.pairs,
        "judge_calls": [e.get("long_reward/judge_calls") for e in trainer.state.log_history if "loss" in e],
        "generations": generations,
        "completion_lengths": completion_lengths,
        "dpo_forwards": forwards,
        "before": digest(before),
        "after": digest(after),
        "reference": None if reference is None else digest(reference),
        "checkpoint": str(checkpoint),
        "checkpoint_files": sorted(p.name for p in checkpoint.iterdir()) if checkpoint.is_dir() else [],
        "saved_matches": saved_matches,
    }
    (out / f"{cli.tag}-rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
