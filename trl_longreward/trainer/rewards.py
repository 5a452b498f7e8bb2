"""Rewards of a step's samples: every reward function called on them (TRL's protocol), weighted and summed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl.trainer.utils import get_callable_name

# Row fields the trainer adds for itself; every other dataset column reaches the reward functions.
_TRAINER_FIELDS = ("prompt", "prompt_ids", "policy_prompt", "truncated")


@dataclass
class StepRewards:
    """The combined reward of every sample (prompt-major, k per prompt; None: no function scored it), the metrics
    the reward functions logged (means over their calls), and the `Judgement`s of the first function that gives
    them (`LongRewardFunction.score_batch`), for the report."""

    rewards: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)
    judgements: list[Any] | None = None


def score_samples(
    reward_funcs: Sequence[Callable],
    reward_weights: Sequence[float],
    rows: list[dict[str, Any]],
    samples: list[list[dict[str, Any]]],
    *,
    num_generations: int,
    trainer_state: Any = None,
) -> StepRewards:
    k = num_generations
    prompts = [row["prompt"] for row in rows for _ in range(k)]
    conversational = isinstance(rows[0]["prompt"], list)
    completions = [
        [{"role": "assistant", "content": s["text"]}] if conversational else s["text"]
        for per_prompt in samples
        for s in per_prompt
    ]
    completion_ids = [s["completion_ids"] for per_prompt in samples for s in per_prompt]
    columns = {key: [row[key] for row in rows for _ in range(k)] for key in rows[0] if key not in _TRAINER_FIELDS}
    logged: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(name, []).append(float(value))

    totals = [0.0] * len(prompts)
    present = [False] * len(prompts)
    judgements = None
    for func, weight in zip(reward_funcs, reward_weights, strict=True):
        if hasattr(func, "score_batch"):  # a LongRewardFunction: keep its judgements for the report
            batch_judgements, metrics = func.score_batch(prompts=prompts, completions=completions, **columns)
            values = [j.reward for j in batch_judgements]
            for name, value in metrics.items():
                log_metric(name, value)
            judgements = batch_judgements if judgements is None else judgements
        else:
            values = func(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                trainer_state=trainer_state,
                log_metric=log_metric,
                **columns,
            )
        if len(values) != len(prompts):
            raise ValueError(
                f"Reward function {get_callable_name(func)} returned {len(values)} values for {len(prompts)}."
            )
        for j, value in enumerate(values):
            if value is not None and not math.isnan(value):
                totals[j] += weight * float(value)
                present[j] = True
    rewards = [t if p else None for t, p in zip(totals, present, strict=True)]
    return StepRewards(rewards, {name: sum(v) / len(v) for name, v in logged.items()}, judgements)


def describe_reward(func: Callable) -> dict[str, Any]:
    """What the model card and the report say about a reward function: never its secrets (the judge's `describe()`
    holds none)."""
    info: dict[str, Any] = {"name": get_callable_name(func)}
    config = getattr(func, "config", None)
    judge = getattr(func, "judge", None)
    if judge is not None and hasattr(judge, "describe"):
        info["judge"] = judge.describe()
    if config is not None and hasattr(config, "dimensions"):
        info["dimensions"] = list(config.dimensions)
        info["weights"] = config.dimension_weights or "equal"
    return info
