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

NUM_PROMPTS = 12  # a multiple of 2 x 2 and 3 x 2 ranks x accumulation steps: every epoch ends on a full window
# (gradient_accumulation_steps, num_iterations, async_judging)
SETTINGS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)]


def setting_name(accumulation: int, iterations: int, asynchronous: bool) -> str:
    return f"ga{accumulation}-it{iterations}-{'async' if asynchronous else 'serial'}"


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
    for accumulation, iterations, asynchronous in SETTINGS:
        name = setting_name(accumulation, iterations, asynchronous)
        reward = RecordingReward()
        args = small_dpo_config(
            out / name,
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
        trainer = LongContextDPOTrainer(model=str(model_path), args=args, train_dataset=dataset, reward_funcs=[reward])
        trainer.train()
        record["settings"][name] = {"questions": reward.questions, "global_step": trainer.state.global_step}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
