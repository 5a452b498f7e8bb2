"""Child processes that `tests/test_reliability.py` kills with SIGKILL or runs to completion.

    python tests/distributed/reliability_child.py train --model DIR --judge_url URL --output_dir OUT --record FILE \
        [--max_steps 3] [--resume_from_checkpoint OUT/checkpoint-1]
    python tests/distributed/reliability_child.py cache-writer --cache FILE

`train` runs `LongContextDPOTrainer` (checkpoint every step, the default `LongRewardFunction` judging at `--judge_url`
with its cache at `OUT/judge_cache.sqlite`) and appends one JSON line per optimizer step to `--record`: the step, the
k samples of each prompt with their rewards, and the chosen/rejected pairs. Each line is flushed and fsynced before the
step's checkpoint is written, so a record survives a kill that comes later.

`cache-writer` puts entries into a `JudgeCallCache` without end and prints each key on stdout (flushed) once its `put`
has returned, until it is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import prompts_dataset, small_dpo_config  # noqa: E402

NUM_PROMPTS = 6


def cache_text(index: int) -> str:
    """The text `cache-writer` stores under key number `index` (large, so a kill often lands mid-write)."""
    return f"entry {index}: " + "judge verdict text [[7]] " * 400


def cache_key_of(index: int) -> str:
    return f"key-{index:06d}"


def run_cache_writer(path: str) -> None:
    from trl_longreward.judges.cache import JudgeCallCache

    cache = JudgeCallCache(path)
    index = 0
    while True:
        cache.put(cache_key_of(index), cache_text(index), meta={"index": index})
        print(cache_key_of(index), flush=True)
        index += 1


class RecordingReward:
    """A TRL reward function: `reward`'s values, remembering the last call's completions for the step record."""

    __name__ = "long_reward"

    def __init__(self, reward: Any) -> None:
        self.reward = reward
        self.completions: list[str] = []
        self.rewards: list[float | None] = []

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        values = self.reward(prompts=prompts, completions=completions, **kwargs)
        self.completions = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        self.rewards = list(values)
        return values


def run_train(cli: argparse.Namespace) -> None:
    from transformers import TrainerCallback

    from trl_longreward import LongContextDPOTrainer, LongRewardConfig, LongRewardFunction

    out = Path(cli.output_dir)
    long_reward = {
        "judge_base_url": cli.judge_url,
        "judge_model": "scripted-judge",
        "judge_max_retries": 0,
        "retriever": "bm25",
        "chunk_tokenizer": "regex",
        "cache_path": str(out / "judge_cache.sqlite"),
    }
    args = small_dpo_config(out, max_steps=cli.max_steps, save_strategy="steps", save_steps=1, long_reward=long_reward)
    reward = RecordingReward(LongRewardFunction(LongRewardConfig(**long_reward)))
    record_path = Path(cli.record)

    class StepRecord(TrainerCallback):
        selections: list = []

        def on_step_judged(self, args: Any, state: Any, control: Any, *, judged: Any, **kwargs: Any) -> None:
            self.selections = judged.selections

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            k = trainer.args.num_generations
            pairs = []
            for i, selection in enumerate(self.selections):
                texts = reward.completions[i * k : (i + 1) * k]
                pairs.append(
                    [texts[selection.chosen], texts[selection.rejected]] if selection.ok else selection.skip_reason
                )
            line = {
                "step": state.global_step,
                "completions": reward.completions,
                "rewards": reward.rewards,
                "pairs": pairs,
            }
            with record_path.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(line) + "\n")
                sink.flush()
                os.fsync(sink.fileno())

    dataset = prompts_dataset(NUM_PROMPTS)
    trainer = LongContextDPOTrainer(
        model=cli.model, args=args, train_dataset=dataset, reward_funcs=[reward], callbacks=[StepRecord()]
    )
    try:
        trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    finally:
        reward.reward.close()
    print(f"finished at step {trainer.state.global_step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train with a checkpoint every step, recording each step's pairs.")
    train.add_argument("--model", required=True, help="Policy model directory.")
    train.add_argument("--judge_url", required=True, help="Base URL of the OpenAI-compatible judge.")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--record", required=True, help="JSONL file that gets one line per optimizer step.")
    train.add_argument("--max_steps", type=int, default=3)
    train.add_argument("--resume_from_checkpoint", default=None)
    writer = commands.add_parser("cache-writer", help="Write judge-cache entries until killed.")
    writer.add_argument("--cache", required=True, help="SQLite file of the judge-call cache.")
    cli = parser.parse_args()
    if cli.command == "train":
        run_train(cli)
    else:
        run_cache_writer(cli.cache)


if __name__ == "__main__":
    main()
