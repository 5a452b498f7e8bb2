"""Train `LongContextDPOTrainer` with its default reward (`LongRewardFunction` over an OpenAI-compatible judge) on
every rank of a `torchrun` job, and record what it logged and what each rank judged. Run by
`tests/test_judge_counts_over_ranks.py`::

    torchrun --nproc_per_node 2 tests/distributed/judge_counts.py --judge_url http://127.0.0.1:PORT/v1 \
        --output_dir OUT --settings serial,async

For each setting (`serial`: judged in the step; `async`: `async_judging`) a fresh trainer takes `MAX_STEPS` optimizer
steps of `gradient_accumulation_steps=2` micro-steps, one prompt each, on every rank. The reward is the trainer's own
default (`reward_funcs=None`, configured through `long_reward`), with a fresh judge-call cache per rank and setting,
so no rank answers a call from another rank's cache. Every judge request carries `user="SETTING-rank-N"`, so the
server can tell the settings and ranks apart.

`OUT/rank{N}.json` maps each setting to the rank's `log_history`, its own valid pairs per optimizer step (from
`on_step_judged`, not reduced over ranks) and its reward's own call counters (`stats()`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for known_answers and tiny_models

from known_answers import CONTEXT  # noqa: E402
from tiny_models import small_dpo_config, tiny_llama  # noqa: E402

from trl_longreward.trainer import LongContextDPOTrainer  # noqa: E402

MAX_STEPS = 3
ACCUMULATION = 2
QUESTIONS = [
    "When was the flood barrier built?",
    "What did the flood barrier cost?",
    "When did the farmers plant willows?",
    "When did the town library open?",
    "Which river floods every spring?",
    "Who built the flood barrier?",
    "What did farmers plant along the banks?",
    "How much did the council spend on the barrier?",
    "What opened in the town in 1911?",
    "What happens to the Alder river every spring?",
    "Where did the farmers plant willows?",
    "What did the council build in 1998?",
]  # MAX_STEPS x ACCUMULATION x 2 ranks: one epoch, every prompt once
STAT_KEYS = ("judge_calls", "judge_requests", "cache_hits", "shared_calls", "parse_failures", "judge_errors")


class LocalPairs(TrainerCallback):
    """This rank's own valid pairs per optimizer step (`JudgedStep.step`, from 1), summed over its micro-steps."""

    def __init__(self) -> None:
        self.pairs: Counter = Counter()
        self.micro_steps: Counter = Counter()

    def on_step_judged(self, args: Any, state: Any, control: Any, *, judged: Any, **kwargs: Any) -> None:
        self.pairs[judged.step] += sum(1 for selection in judged.selections if selection.ok)
        self.micro_steps[judged.step] += 1


def run_setting(name: str, out: Path, model_path: str, judge_url: str, rank: int) -> dict[str, Any]:
    dataset = Dataset.from_list([{"context": CONTEXT, "question": q} for q in QUESTIONS])
    args = small_dpo_config(
        out / name,
        ddp_backend="gloo",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=MAX_STEPS,
        num_generations=2,
        max_completion_length=8,
        max_prompt_length=128,
        async_judging=name == "async",
        max_judge_outage_steps=0,  # a step without pairs is no reason to stop here
        long_reward={
            "judge_base_url": judge_url,
            "judge_model": "scripted-judge",
            "judge_max_retries": 1,  # a 500 is retried once; two in a row fail the call for good
            "max_missing_dimensions": 1,  # a sample stays scored when one of its dimensions failed
            "judge_extra_body": {"user": f"{name}-rank-{rank}"},
            "retriever": "bm25",
            "chunk_tokenizer": "regex",
            "cache_path": str(out / f"cache-{name}-rank{rank}.sqlite"),
        },
    )
    recorder = LocalPairs()
    trainer = LongContextDPOTrainer(model=model_path, args=args, train_dataset=dataset, callbacks=[recorder])
    try:
        trainer.train()
    finally:
        for func in trainer.reward_funcs:
            close = getattr(func, "close", None)
            if close is not None:
                close()
    stats = trainer.reward_funcs[0].stats()
    return {
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "local_pairs": {str(step): pairs for step, pairs in sorted(recorder.pairs.items())},
        "micro_steps": {str(step): count for step, count in sorted(recorder.micro_steps.items())},
        "stats": {key: stats[key] for key in STAT_KEYS},
        "reward_is_default": type(trainer.reward_funcs[0]).__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge_url", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--settings", default="serial", help="Comma-separated: serial, async.")
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(cli.output_dir)
    model_path = tiny_llama(out / f"model-rank{rank}", pad_with_eos=True)  # seed 0: the same weights on every rank
    record: dict[str, Any] = {"rank": rank, "settings": {}}
    for name in cli.settings.split(","):
        record["settings"][name] = run_setting(name, out, model_path, cli.judge_url, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
