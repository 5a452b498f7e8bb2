"""Train `LongContextDPOTrainer` a few steps on every rank of a `torchrun` job and write one JSON record per rank.

Run by `tests/test_distributed.py`::

    torchrun --nproc_per_node 2 tests/distributed/train_two_ranks.py --judge_url http://127.0.0.1:PORT/v1 \
        --output_dir OUT

The policy is a tiny Llama built from a config (the same seed on every rank) with SmolLM2's tokenizer. The reward is
`LongRewardFunction` against the judge at `--judge_url`, wrapped so that rank `--tie_rank` gives every sample of its
first step the same reward: that rank has no valid pair on that step and trains a stand-in pair weighted 0 while the
other ranks train on real pairs. Each judge request carries `user="rank-N"`, so the server can tell the ranks apart.
`OUT/rank{N}.json` holds the rank's per-step local and global pair counts, its questions, completions and rewards
per step, and parameter checksums before and after training.
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

from known_answers import CONTEXT, QUESTION  # noqa: E402
from tiny_models import FOUR_HEADS, small_dpo_config, tiny_llama  # noqa: E402

from trl_longreward import LongRewardFunction, OpenAIJudge  # noqa: E402
from trl_longreward.trainer import LongContextDPOTrainer  # noqa: E402

QUESTIONS = [
    QUESTION,
    "When did the farmers plant willows along the banks?",
    "Which river floods every spring, and what did the council build?",
    "When did the town library open?",
    "What did the flood barrier cost?",
    "Who planted willows along the river banks?",
]
TIED_REWARD = 5.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge_url", required=True, help="Base URL of the OpenAI-compatible judge.")
    parser.add_argument("--output_dir", required=True, help="Where the model and the per-rank records go.")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--tie_rank", type=int, default=1, help="Rank whose first step gets only tied rewards.")
    return parser.parse_args()


def build_tiny_model(path: Path) -> Path:
    """Save a 2-layer Llama (seed 0, so identical on every rank) and SmolLM2's tokenizer to `path`."""
    return Path(tiny_llama(path, pad_with_eos=True, **FOUR_HEADS))


def checksum(model: torch.nn.Module) -> dict[str, Any]:
    """SHA-256 of every parameter's bytes (in name order) and their float64 sum."""
    digest = hashlib.sha256()
    total = 0.0
    for name, param in sorted(model.named_parameters()):
        data = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        total += data.double().sum().item()
    return {"sha256": digest.hexdigest(), "sum": total}


class TiedOnFirstStep:
    """A reward function: `reward`'s values, except on `rank`'s first step, where every sample gets the same value."""

    __name__ = "long_reward"

    def __init__(self, reward: LongRewardFunction, rank: int, tie_rank: int) -> None:
        self.reward = reward
        self.tied = rank == tie_rank
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts: list[Any], completions: list[Any], trainer_state: Any = None, **kwargs: Any) -> list:
        step = trainer_state.global_step if trainer_state is not None else -1
        if self.tied and step == 0:
            values: list[float | None] = [TIED_REWARD] * len(completions)
        else:
            values = self.reward(prompts=prompts, completions=completions, **kwargs)
        questions = sorted(set(kwargs.get("question", [])))
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        self.calls.append({"step": step, "questions": questions, "completions": texts, "rewards": values})
        return values


class StepRecorder(TrainerCallback):
    """After each optimizer step, store this rank's own number of valid pairs (not reduced over ranks)."""

    def __init__(self) -> None:
        self.trainer: LongContextDPOTrainer | None = None
        self.local_pairs: list[int] = []
        self.selections: list = []

    def on_step_judged(self, args: Any, state: Any, control: Any, *, judged: Any, **kwargs: Any) -> None:
        self.selections = judged.selections

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.trainer is not None
        self.local_pairs.append(sum(1 for s in self.selections if s.ok))


def main() -> None:
    cli = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cli.output_dir)
    # Every rank saves its own (identical) copy: no file is read while another process is writing it.
    model_path = build_tiny_model(out / f"model-rank{rank}")

    dataset = Dataset.from_list([{"context": CONTEXT, "question": q} for q in QUESTIONS])
    args = small_dpo_config(
        out / "trainer",
        ddp_backend="gloo",
        per_device_train_batch_size=cli.per_device_train_batch_size,
        max_steps=cli.max_steps,
        num_generations=cli.num_generations,
        max_completion_length=8,
    )
    judge = OpenAIJudge("scripted-judge", cli.judge_url, max_concurrency=8, extra_body={"user": f"rank-{rank}"})
    long_reward = LongRewardFunction(judge=judge, retriever="bm25", chunk_tokenizer="regex")
    reward = TiedOnFirstStep(long_reward, rank, cli.tie_rank)
    recorder = StepRecorder()
    trainer = LongContextDPOTrainer(
        model=str(model_path), args=args, train_dataset=dataset, reward_funcs=[reward], callbacks=[recorder]
    )
    recorder.trainer = trainer
    before = checksum(trainer.model)
    try:
        trainer.train()
    finally:
        long_reward.close()

    record = {
        "rank": rank,
        "world_size": world_size,
        "accelerate_num_processes": trainer.accelerator.num_processes,
        "accelerate_process_index": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": trainer.accelerator.state.backend,
        "global_step": trainer.state.global_step,
        "local_pairs": recorder.local_pairs,
        "global_pairs": [e["pairs/online"] for e in trainer.state.log_history if "pairs/online" in e],
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "pair_stats": dict(trainer.pair_stats),
        "reward_calls": reward.calls,
        "judge_calls": long_reward.stats()["judge_calls"],
        "before": before,
        "after": checksum(trainer.model),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
