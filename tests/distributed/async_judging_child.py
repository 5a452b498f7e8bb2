"""Training children for `tests/test_async_judging.py`: `async_judging=True` runs that the test kills with SIGKILL,
resumes and compares, and two-rank runs (`torchrun`) on fixed pairs.

    python tests/distributed/async_judging_child.py train --model DIR --judge_url URL --output_dir OUT --record FILE \
        [--max_steps 3] [--resume_from_checkpoint OUT/checkpoint-1]
    torchrun --nproc_per_node 2 tests/distributed/async_judging_child.py ranks --output_dir OUT [--async_judging]

`train`: `LongContextDPOTrainer` with `async_judging=True`, a checkpoint every step and the default
`LongRewardFunction` judging at `--judge_url` (its cache at `OUT/judge_cache.sqlite`); one JSON line per optimizer
step in `--record` (fsynced before the step's checkpoint is written): the step, the policy step that sampled its
batch, the samples, their rewards and the chosen/rejected pairs.

`ranks`: `uneven_pairs.py`'s trainer (fixed samples, rewards by length) on 12 prompts in order, prompts 2 and 3 tied
(rank 1 has no pair in step 1) and prompts 8-11 tied (no pair on any rank in step 3); writes `OUT/rank{N}.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for uneven_pairs

from tiny_models import prompts_dataset, small_dpo_config  # noqa: E402

NUM_PROMPTS = 6
TIED_PROMPTS = {2, 3, 8, 9, 10, 11}


def run_train(cli: argparse.Namespace) -> None:
    from transformers import TrainerCallback

    from trl_longreward import LongContextDPOTrainer

    out = Path(cli.output_dir)
    long_reward = {
        "judge_base_url": cli.judge_url,
        "judge_model": "scripted-judge",
        "judge_max_retries": 0,
        "retriever": "bm25",
        "chunk_tokenizer": "regex",
        "cache_path": str(out / "judge_cache.sqlite"),
    }
    args = small_dpo_config(
        out, max_steps=cli.max_steps, save_strategy="steps", save_steps=1, long_reward=long_reward, async_judging=True
    )
    record_path = Path(cli.record)

    class StepRecord(TrainerCallback):
        judged: Any = None

        def on_step_judged(self, args: Any, state: Any, control: Any, *, judged: Any, **kwargs: Any) -> None:
            self.judged = judged

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            judged, k = self.judged, trainer.args.num_generations
            pairs = [
                [judged.completions[i * k + s.chosen], judged.completions[i * k + s.rejected]]
                if s.ok
                else s.skip_reason
                for i, s in enumerate(judged.selections)
            ]
            line = {
                "step": state.global_step,
                "policy_step": judged.policy_step,
                "completions": judged.completions,
                "rewards": judged.rewards,
                "pairs": pairs,
            }
            with record_path.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(line) + "\n")
                sink.flush()
                os.fsync(sink.fileno())

    trainer = LongContextDPOTrainer(
        model=cli.model, args=args, train_dataset=prompts_dataset(NUM_PROMPTS), callbacks=[StepRecord()]
    )
    trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    print(f"finished at step {trainer.state.global_step}", flush=True)


def run_ranks(cli: argparse.Namespace) -> None:
    import uneven_pairs

    class IndexTies(uneven_pairs.LengthReward):
        """Ties by prompt, whatever the step: with async_judging a batch is judged one step before it trains."""

        def tied(self, step: int, index: int) -> bool:
            return index in TIED_PROMPTS

    # `uneven_pairs` may be the module other tests of this process use (the one-process run is in-process): put its
    # reward back afterwards.
    original = uneven_pairs.LengthReward
    uneven_pairs.LengthReward = IndexTies
    try:
        uneven_pairs.run(
            Path(cli.output_dir),
            ties={},
            num_prompts=12,
            max_steps=3,
            per_device_train_batch_size=cli.per_device_train_batch_size,
            async_judging=cli.async_judging,
        )
    finally:
        uneven_pairs.LengthReward = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train with async judging and a checkpoint every step.")
    train.add_argument("--model", required=True)
    train.add_argument("--judge_url", required=True)
    train.add_argument("--output_dir", required=True)
    train.add_argument("--record", required=True)
    train.add_argument("--max_steps", type=int, default=3)
    train.add_argument("--resume_from_checkpoint", default=None)
    ranks = commands.add_parser("ranks", help="uneven_pairs' trainer, ties by prompt.")
    ranks.add_argument("--output_dir", required=True)
    ranks.add_argument("--per_device_train_batch_size", type=int, default=2)
    ranks.add_argument("--async_judging", action="store_true")
    cli = parser.parse_args()
    run_train(cli) if cli.command == "train" else run_ranks(cli)


if __name__ == "__main__":
    main()
