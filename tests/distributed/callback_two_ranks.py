"""Train `LongContextDPOTrainer` with a `LongRewardCallback` on each rank of a `torchrun` job; a record per rank.

Run by `tests/test_callback.py`::

    torchrun --nproc_per_node 2 tests/distributed/callback_two_ranks.py --judge_url http://127.0.0.1:PORT/v1 \
        --output_dir OUT

The callback's judge requests carry `user="eval-rank-N"` (the training reward's `user="train-rank-N"`), so the server
can tell which rank judged which evaluation prompt. `OUT/rank{N}.json` holds the rank's callback history, its latest
records and the evaluation entries of its `log_history`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for known_answers and tiny_models

from known_answers import CONTEXT, QUESTION  # noqa: E402
from tiny_models import prompts_dataset, small_dpo_config, tiny_llama  # noqa: E402

from trl_longreward import LongRewardFunction, OpenAIJudge  # noqa: E402
from trl_longreward.callback import LongRewardCallback  # noqa: E402
from trl_longreward.trainer import LongContextDPOTrainer  # noqa: E402

EVAL_QUESTIONS = [QUESTION, "When did the town library open?", "What did farmers plant along the banks?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge_url", required=True)
    parser.add_argument("--output_dir", required=True)
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(cli.output_dir)
    model_path = tiny_llama(out / f"model-rank{rank}")  # seed 0: the same weights on every rank

    def reward(tag: str) -> LongRewardFunction:
        judge = OpenAIJudge("scripted-judge", cli.judge_url, extra_body={"user": f"{tag}-rank-{rank}"})
        return LongRewardFunction(judge=judge, retriever="bm25", chunk_tokenizer="regex")

    train_reward, eval_reward = reward("train"), reward("eval")
    args = small_dpo_config(
        out / "trainer",
        ddp_backend="gloo",
        per_device_train_batch_size=1,
        max_steps=2,
        num_generations=2,
        max_completion_length=8,
    )
    prompts = prompts_dataset(4)
    trainer = LongContextDPOTrainer(model=model_path, args=args, train_dataset=prompts, reward_funcs=[train_reward])
    evaluation = Dataset.from_list([{"context": CONTEXT, "question": q} for q in EVAL_QUESTIONS])
    callback = LongRewardCallback(evaluation, reward=eval_reward, eval_steps=1, max_completion_length=8)
    trainer.add_callback(callback.attach(trainer))
    try:
        trainer.train()
    finally:
        train_reward.close()
        eval_reward.close()
    record = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "history": callback.history,
        "questions": [r["question"] for r in callback.last_records],
        "eval_entries": [e for e in trainer.state.log_history if "eval_long_reward/reward" in e],
        "train_steps": [e["step"] for e in trainer.state.log_history if "loss" in e],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
