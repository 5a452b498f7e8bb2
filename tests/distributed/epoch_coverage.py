"""Which prompts each rank judges in one epoch, for `tests/test_epoch_coverage.py`.

    torchrun --nproc_per_node N tests/distributed/epoch_coverage.py --output_dir OUT

For every setting in `SETTINGS` (gradient accumulation x num_iterations x serial/async judging) one fresh
`LongContextDPOTrainer` trains one epoch over `NUM_PROMPTS` distinct prompts, one per rank per micro-step, with a
reward function that records the question of every completion it is asked to score (what the judge would be paid
for) and rewards by length. `OUT/rank{R}.json` maps each setting to the questions this rank judged, in order, and the
optimizer steps taken. The test checks them against the dataset itself: every prompt exactly once over all ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from datasets import Dataset  # noqa: E402
from known_answers import CONTEXT  # noqa: E402
from tiny_models import small_dpo_config, tiny_llama  # noqa: E402

from trl_longreward import LongContextDPOTrainer  # noqa: E402

OFFLINE_ROWS = 200  # more than one epoch draws: a row trained twice is a repeat across ranks, not a cycle
NUM_PROMPTS = 12  # a multiple of 2 x 2 and 3 x 2 ranks x accumulation steps: every epoch ends on a full window
# (gradient_accumulation_steps, num_iterations, async_judging, resumed): every combination, and two runs stopped
# after their first optimizer step (a checkpoint) and resumed from it by a new trainer; with num_iterations=2 the stop
# falls between the two uses of a window's pairs.
SETTINGS = [
    *((ga, it, asynchronous, False) for asynchronous in (False, True) for it in (1, 2) for ga in (1, 2)),
    (2, 1, False, True),
    (1, 2, False, True),
]


def setting_name(accumulation: int, iterations: int, asynchronous: bool, resumed: bool = False) -> str:
    name = f"ga{accumulation}-it{iterations}-{'async' if asynchronous else 'serial'}"
    return f"{name}-resumed" if resumed else name


class RecordingReward:
    """A TRL reward function: the completion's length as its reward; records the question of every completion."""

    __name__ = "recording_length"

    def __init__(self) -> None:
        self.questions: list[str] = []

    def __call__(self, prompts: list[Any], completions: list[Any], question: list[str], **kwargs: Any) -> list[float]:
        # One entry per prompt, not per completion: the k completions of one prompt arrive together.
        for index, q in enumerate(question):
            if index == 0 or q != question[index - 1]:
                self.questions.append(q)
        return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


class RecordingCollator:
    """TRL's preference collator, recording the prompt of every pair the trainer builds a batch of."""

    def __init__(self, tokenizer: Any, max_length: int | None) -> None:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.tokenizer = tokenizer
        self.inner = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
        self.prompts: list[str] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.prompts.extend(self.tokenizer.decode(e["prompt_ids"], skip_special_tokens=True) for e in examples)
        return self.inner(examples)


def offline_run(out: Path, model_path: Path, dataset: Dataset) -> dict[str, Any]:
    """One epoch with offline pairs at offline_ratio=0.5, gradient accumulation 2: which offline rows this rank
    trained on, and the logged pair counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    offline = Dataset.from_list(
        [
            {"prompt": f"Offline question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."}
            for i in range(OFFLINE_ROWS)
        ]
    )
    args = small_dpo_config(
        out / "offline",
        ddp_backend="gloo",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=-1,
        num_train_epochs=1,
        num_generations=2,
        max_completion_length=4,
        max_prompt_length=96,
        offline_ratio=0.5,
        seed=0,
    )
    collator = RecordingCollator(tokenizer, args.max_length)
    trainer = LongContextDPOTrainer(
        model=str(model_path),
        args=args,
        train_dataset=dataset,
        reward_funcs=[RecordingReward()],
        offline_dataset=offline,
        data_collator=collator,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "pairs/online" in entry]
    return {
        "offline_prompts": [p for p in collator.prompts if p.startswith("Offline question")],
        "logged_online": [entry["pairs/online"] for entry in logs],
        "logged_offline": [entry["pairs/offline"] for entry in logs],
        "cursor": trainer.offline_pairs.cursor,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(cli.output_dir)
    model_path = tiny_llama(out / f"model-rank{rank}", pad_with_eos=True)
    dataset = Dataset.from_list(
        [{"context": f"{CONTEXT} Record {i}.", "question": f"What is record {i} about?"} for i in range(NUM_PROMPTS)]
    )
    record: dict[str, Any] = {"rank": rank, "settings": {}}
    for accumulation, iterations, asynchronous, resumed in SETTINGS:
        name = setting_name(accumulation, iterations, asynchronous, resumed)
        reward = RecordingReward()
        values: dict[str, Any] = dict(
            ddp_backend="gloo",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=accumulation,
            num_iterations=iterations,
            async_judging=asynchronous,
            max_steps=-1,
            num_train_epochs=1,
            num_generations=2,
            max_completion_length=4,
            max_prompt_length=96,
            seed=0,
        )
        if resumed:  # stopped after its first step (checkpoint-1), then a new trainer resumes the epoch
            first = small_dpo_config(
                out / name, **{**values, "max_steps": 1, "save_strategy": "steps", "save_steps": 1}
            )
            LongContextDPOTrainer(
                model=str(model_path), args=first, train_dataset=dataset, reward_funcs=[reward]
            ).train()
        args = small_dpo_config(out / name, **values)
        trainer = LongContextDPOTrainer(model=str(model_path), args=args, train_dataset=dataset, reward_funcs=[reward])
        trainer.train(resume_from_checkpoint=True if resumed else None)
        record["settings"][name] = {"questions": reward.questions, "global_step": trainer.state.global_step}
    record["offline"] = offline_run(out, model_path, dataset)
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
