"""Preference pairs from k scored samples of one prompt: best vs worst (docs/method.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

SKIP_REASONS = ("too_few_scored", "tie", "gap_below_minimum")


@dataclass(frozen=True)
class PairSelection:
    """The chosen/rejected sample indices of one prompt, or why there is no pair."""

    chosen: int | None
    rejected: int | None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    num_scored: int = 0
    skip_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.skip_reason is None

    @property
    def gap(self) -> float | None:
        if self.chosen_reward is None or self.rejected_reward is None:
            return None
        return self.chosen_reward - self.rejected_reward


def _is_scored(reward: float | None) -> bool:
    return reward is not None and not math.isnan(reward)


def select_best_worst(
    rewards: Sequence[float | None],
    *,
    min_scored: int = 2,
    min_gap: float = 0.0,
    ties: Literal["skip", "first_last"] = "skip",
) -> PairSelection:
    """Chosen = highest reward, rejected = lowest, among the samples that were scored.

    - fewer than `min_scored` scored samples (reward None/NaN): no pair (the reference needed 5 of 10);
    - best == worst: no pair with `ties="skip"`; with `"first_last"` the earliest best and latest worst sample still
      form a pair if they differ (only useful with `min_gap=0`, e.g. for smoke tests);
    - best - worst < `min_gap`: no pair (the reference had no gap filter: 0 reproduces it).
    Among equal rewards the earliest sample is the chosen one and the latest the rejected one, so the choice is
    deterministic.
    """
    if min_scored < 2:
        raise ValueError(f"min_scored must be >= 2 (a pair needs two scored samples), got {min_scored}.")
    scored = [(i, float(r)) for i, r in enumerate(rewards) if _is_scored(r)]
    if len(scored) < min_scored:
        return PairSelection(None, None, num_scored=len(scored), skip_reason="too_few_scored")
    best_i, best_r = max(scored, key=lambda item: (item[1], -item[0]))
    worst_i, worst_r = min(scored, key=lambda item: (item[1], -item[0]))
    selection = dict(chosen_reward=best_r, rejected_reward=worst_r, num_scored=len(scored))
    if best_r == worst_r:
        if ties == "skip" or best_i == worst_i:
            return PairSelection(None, None, **selection, skip_reason="tie")
        return PairSelection(best_i, worst_i, **selection)
    if best_r - worst_r < min_gap:
        return PairSelection(None, None, **selection, skip_reason="gap_below_minimum")
    return PairSelection(best_i, worst_i, **selection)


TIE_POLICIES = ("skip", "first_last")


def check_sampling_options(
    *,
    num_generations: int,
    min_scored_samples: int | None,
    temperature: float,
    max_completion_length: int,
    max_prompt_length: int,
    min_reward_gap: float = 0.0,
    tie_policy: str = "skip",
) -> int:
    """Validate the options that sample k responses per prompt and pair them (shared by `LongContextDPOConfig` and
    `trl-longreward build-pairs`); returns `min_scored_samples` resolved (None = ceil(k / 2), at least 2: the
    reference's 5 of 10)."""
    if num_generations < 2:
        raise ValueError(
            f"num_generations={num_generations}: a best-vs-worst pair needs at least 2 samples per prompt "
            "(the paper used 10)."
        )
    if min_scored_samples is None:
        min_scored_samples = max(2, math.ceil(num_generations / 2))
    if not 2 <= min_scored_samples <= num_generations:
        raise ValueError(f"min_scored_samples={min_scored_samples} must be in [2, num_generations={num_generations}].")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (pairs need diverse samples), got {temperature}.")
    check_length_options(max_completion_length=max_completion_length, max_prompt_length=max_prompt_length)
    if min_reward_gap < 0:
        raise ValueError(f"min_reward_gap must be >= 0, got {min_reward_gap}.")
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy={tie_policy!r}: use skip or first_last.")
    return min_scored_samples


def check_length_options(*, max_completion_length: int, max_prompt_length: int) -> None:
    """Token budgets of a response and of the policy's prompt (shared by every command that generates)."""
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}.")
    if max_prompt_length < 16:
        raise ValueError(f"max_prompt_length must be >= 16 (documents are cut to fit it), got {max_prompt_length}.")
