"""Train `LongContextDPOTrainer` on fixed, known pairs and record what it did: the logged metrics, the parameters and
the optimizer state after each optimizer step, and each rank's prompts and pair counts per micro-step.

Run by `tests/test_ddp_uneven.py` on two ranks, and (its `run`, in the test's process) as the one-process reference
without gradient accumulation whose one micro-batch per step holds the prompts of both ranks' whole window; by hand::

    torchrun --nproc_per_node 2 tests/distributed/uneven_pairs.py --output_dir OUT --per_device_train_batch_size 2 \
        --gradient_accumulation_steps 2 --num_prompts 8 --ties '{"0": [2, 3, 4], "1": [0, 1, 2, 3, 5, 6, 7], "2": "all"}'
    python tests/distributed/uneven_pairs.py --output_dir REF --per_device_train_batch_size 8 --num_prompts 8 --ties ...

The policy is a tiny Llama built from a config (the same seed everywhere). Nothing is generated: `FixedSampler` gives
every prompt the same `num_generations` responses in every process (of different lengths), and `length_reward`
scores a response by its length, except for the prompts that `--ties` lists for a step (keys: the step's index, from
0; values: prompt indices, or "all"), whose responses all get the same reward: they have no valid pair. Prompts are
taken in order (sequential sampling), so with batch size B on two ranks, micro-batch m of a step gives rank r the
prompts `(2m + r) B ... (2m + r + 1) B - 1`, and the reference with batch size 2B the prompts of both ranks.

`OUT/rank{N}.json`: the record; `OUT/rank0/params-step{S}.pt`: the parameters after optimizer step S (0: before
training). The optimizer is SGD with momentum (its update is proportional to the gradient, so a wrongly weighted loss
shows in the parameters; AdamW's first update would hide a loss scale).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for known_answers and tiny_models

from known_answers import CONTEXT  # noqa: E402
from tiny_models import small_dpo_config, tiny_causal_lm, tiny_llama  # noqa: E402

from trl_longreward.trainer import LongContextDPOTrainer  # noqa: E402

TIED_REWARD = 5.0
FIRST_TOKEN = 1000  # response token ids start here (ordinary vocabulary, no special token)


def prompt_rows(count: int) -> Dataset:
    """`count` prompts over the known document, each with its `index` (a column the reward function receives)."""
    return Dataset.from_list(
        [{"context": CONTEXT, "question": f"Question {i}: who built the barrier?", "index": i} for i in range(count)]
    )


class FixedSampler:
    """The trainer's sampler, without generating: prompt `index` i gets responses j = 0..k-1 of 2 + j + i % 3 tokens
    (so the chosen responses of the prompts differ in length, as the "sft" term's token weighting needs), ids derived
    from (i, j), the same in every process and step. `calls`: the prompts of each call, in order (the trainer
    samples a whole accumulation window before it tells the callbacks about its micro-batches)."""

    def __init__(self, tokenizer: Any, num_generations: int) -> None:
        self.tokenizer = tokenizer
        self.num_generations = num_generations
        self.calls: list[list[int]] = []

    def sample(self, model_wrapped: Any, rows: list[dict[str, Any]], *, global_step: int) -> list[list[dict]]:
        self.calls.append([row["index"] for row in rows])
        out = []
        for row in rows:
            per_prompt = []
            for j in range(self.num_generations):
                length = 2 + j + row["index"] % 3
                ids = [FIRST_TOKEN + 97 * row["index"] + 13 * j + t for t in range(length)]
                per_prompt.append({"completion_ids": ids, "text": self.tokenizer.decode(ids)})
            out.append(per_prompt)
        return out


class LengthReward:
    """A reward function: a response's length in tokens, or `TIED_REWARD` for every response of a prompt that
    `ties` lists for the step (`{step: [index, ...] or "all"}`)."""

    __name__ = "length_reward"

    def __init__(self, ties: dict[int, Any]) -> None:
        self.ties = ties

    def tied(self, step: int, index: int) -> bool:
        listed = self.ties.get(step, [])
        return listed == "all" or index in listed

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        index: list[int],
        trainer_state: Any = None,
        **kwargs: Any,
    ) -> list[float]:
        step = trainer_state.global_step if trainer_state is not None else 0
        return [
            TIED_REWARD if self.tied(step, i) else float(len(ids))
            for ids, i in zip(completion_ids, index, strict=True)
        ]


def tensors_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of the names and the exact values (as float64) of `tensors`."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def optimizer_tensors(optimizer: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the optimizer's state (moments, momentum buffers, step counts), in a fixed order."""
    state = optimizer.state_dict()["state"]
    return [
        (f"{index}.{key}", value if torch.is_tensor(value) else torch.tensor(float(value)))
        for index in sorted(state)
        for key, value in sorted(state[index].items())
    ]


class Recorder(TrainerCallback):
    """Each micro-step's prompts and local pairs; after each optimizer step, digests of the parameters and of the
    optimizer state, and (when `save_dir` is given) the parameters themselves."""

    def __init__(self, save_dir: Path | None) -> None:
        self.trainer: LongContextDPOTrainer | None = None
        self.save_dir = save_dir
        self.micro_steps: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []

    def on_step_judged(self, args, state, control, *, judged, **kwargs) -> None:
        assert self.trainer is not None
        pairs = sum(1 for s in judged.selections if s.ok)
        indices = self.trainer.sampler.calls.pop(0)  # the micro-batches are judged in the order they were sampled
        self.micro_steps.append({"step": state.global_step, "pairs": pairs, "indices": indices})

    def on_step_end(self, args, state, control, **kwargs) -> None:
        trainer = self.trainer
        assert trainer is not None
        params = sorted((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
        optimizer_state = optimizer_tensors(trainer.optimizer)
        self.steps.append(
            {
                "step": state.global_step,
                "params_sha256": tensors_digest(params),
                "optimizer_sha256": tensors_digest(optimizer_state),
                "optimizer_entries": len(optimizer_state),
            }
        )
        if self.save_dir is not None:
            snapshot = {n: p.detach().to("cpu", torch.float32).clone() for n, p in params}
            torch.save(snapshot, self.save_dir / f"params-step{state.global_step}.pt")


#: model families of `--family`: a full-attention one (tiny_llama: 2 query heads, 1 key/value head) and a hybrid one
#: (Qwen2, a sliding-window layer of 16 tokens then a full one, 4 query heads, 2 key/value heads)
FAMILIES = ("llama", "qwen2-hybrid")


def build_model(path: Path, family: str) -> str:
    if family == "llama":
        return tiny_llama(path, pad_with_eos=True)
    from transformers import AutoTokenizer

    from trl_longreward.models import default_model_path

    vocab = len(AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True))
    return tiny_causal_lm(
        path,
        "qwen2",
        vocab_size=vocab,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        use_sliding_window=True,
        sliding_window=16,
    )


def build_trainer(
    output_dir: Path,
    *,
    ties: dict[int, Any],
    num_prompts: int,
    save_params: bool,
    family: str = "llama",
    lora: bool = False,
    **config: Any,
) -> tuple[LongContextDPOTrainer, Recorder]:
    """A trainer on `num_prompts` prompts, with `FixedSampler` and `LengthReward`, prompts taken in order; `config`
    overrides `small_dpo_config`. The model (`family`, with LoRA adapters when `lora`) is built in
    `output_dir/model` (seed 0: the same in every process)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = build_model(output_dir / "model", family)
    config.setdefault("train_sampling_strategy", "sequential")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        config.setdefault("ddp_backend", "gloo")
    args = small_dpo_config(output_dir / "trainer", max_completion_length=8, **config)
    recorder = Recorder(output_dir if save_params else None)
    peft_config = None
    if lora:
        from peft import LoraConfig

        torch.manual_seed(0)  # LoRA's A matrices: the same in every process
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=args,
        train_dataset=prompt_rows(num_prompts),
        reward_funcs=[LengthReward(ties)],
        callbacks=[recorder],
        peft_config=peft_config,
    )
    trainer.sampler = FixedSampler(trainer.processing_tokenizer, args.num_generations)
    recorder.trainer = trainer
    return trainer, recorder


def run(output_dir: Path, *, ties: dict[int, Any], num_prompts: int = 4, **config: Any) -> dict[str, Any]:
    """Train in `output_dir/rank{N}` and write `output_dir/rank{N}.json` (also returned); rank 0 saves the parameters
    before training (`params-step0.pt`) and after each optimizer step. `config`: `small_dpo_config` overrides
    (SGD with momentum by default, constant learning rate)."""
    rank = int(os.environ.get("RANK", "0"))
    config = {
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        **config,
    }
    # every rank builds its own (identical) copy of the model: no file is read while another process writes it
    workdir = output_dir / f"rank{rank}"
    trainer, recorder = build_trainer(workdir, ties=ties, num_prompts=num_prompts, save_params=rank == 0, **config)
    initial = sorted(
        (n, p.detach().to("cpu", torch.float32).clone())
        for n, p in trainer.model.named_parameters()
        if p.requires_grad
    )
    if rank == 0:
        torch.save(dict(initial), workdir / "params-step0.pt")
    trainer.train()
    record = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "micro_steps": recorder.micro_steps,
        "steps": recorder.steps,
        "initial_params_sha256": tensors_digest(initial),
        "log_history": trainer.state.log_history,
    }
    (output_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--ties", default="{}", help='JSON: {"step": [prompt index, ...] or "all"}.')
    parser.add_argument("--num_prompts", type=int, default=4, help="The prompts of one optimizer step, all ranks.")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--loss_type", default="sigmoid,sft", help="TRL's loss_type, comma-separated.")
    parser.add_argument("--loss_weights", default="1.0,0.1", help="TRL's loss_weights, comma-separated.")
    parser.add_argument("--sp_size", type=int, default=1, help="Sequence-parallel group size.")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--lora", action="store_true", help="Train LoRA adapters instead of every weight.")
    return parser.parse_args()


def main() -> None:
    cli = parse_args()
    run(
        Path(cli.output_dir),
        ties={int(step): value for step, value in json.loads(cli.ties).items()},
        num_prompts=cli.num_prompts,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.per_device_train_batch_size,
        gradient_accumulation_steps=cli.gradient_accumulation_steps,
        loss_type=cli.loss_type.split(","),
        loss_weights=[float(w) for w in cli.loss_weights.split(",")],
        sp_size=cli.sp_size,
        family=cli.family,
        lora=cli.lora,
    )


if __name__ == "__main__":
    main()
