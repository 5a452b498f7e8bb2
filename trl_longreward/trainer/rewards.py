"""Rewards of a step's samples: every reward function called on them (TRL's protocol), weighted and summed.

A sample is scored only when every reward function of nonzero weight scored it: one such function returning None
(or NaN) for it makes its combined reward None, so it is never ranked on the other functions alone (TRL's GRPO, which
`nansum`s the functions, would). A function of weight 0 is still called (its metrics are logged) but never decides
whether a sample is scored.
"""

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
    """The combined reward of every sample (prompt-major, k per prompt: the weighted sum of the reward functions;
    None where any function of nonzero weight could not score it, i.e. returned None or NaN), the metrics the reward
    functions logged (means over their calls), and the `Judgement`s of the first function that gives them
    (`LongRewardFunction.score_batch`), for the report."""

    rewards: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)
    judgements: list[Any] | None = None


def check_reward_weights(reward_funcs: Sequence[Callable], reward_weights: Sequence[float]) -> None:
    """One finite weight per reward function, at least one of them nonzero (all-zero weights would give every
    sample the reward 0: no pair could ever form)."""
    if len(reward_weights) != len(reward_funcs):
        raise ValueError(
            f"reward_weights has {len(reward_weights)} values for {len(reward_funcs)} reward functions: give one "
            "weight per function (or leave reward_weights unset for equal weights)."
        )
    if any(not math.isfinite(float(w)) for w in reward_weights):
        raise ValueError(f"reward_weights={list(reward_weights)} must be finite numbers.")
    if not any(float(w) != 0 for w in reward_weights):
        raise ValueError(
            f"reward_weights={list(reward_weights)} are all 0: every sample would get the reward 0 and no pair could "
            "form. Give at least one reward function a nonzero weight (leave reward_weights unset for equal weights)."
        )


def score_samples(
    reward_funcs: Sequence[Callable],
    reward_weights: Sequence[float],
    rows: list[dict[str, Any]],
    samples: list[list[dict[str, Any]]],
    *,
    num_generations: int,
    trainer_state: Any = None,
) -> StepRewards:
    """Call every reward function on the step's samples and combine them (see `StepRewards`): a sample's reward is
    the weighted sum of the functions' values, or None when any function of nonzero weight gave it None or NaN."""
    check_reward_weights(reward_funcs, reward_weights)
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
    unscored = [False] * len(prompts)
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
        if weight == 0:  # called for its metrics; it neither adds to a reward nor leaves a sample unscored
            continue
        for j, value in enumerate(values):
            if value is None or math.isnan(value):
                unscored[j] = True  # never ranked on the other functions alone
            else:
                totals[j] += weight * float(value)
    rewards = [None if u else t for t, u in zip(totals, unscored, strict=True)]
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
        weight = getattr(config, "weight", None)
        if config.dimension_weights and callable(weight):  # every dimension's weight, unnamed ones' 1.0 included
            info["weights"] = {d: weight(d) for d in config.dimensions}
        else:
            info["weights"] = config.dimension_weights or "equal"
    return info
