"""Preference pairs from k scored samples of one prompt: best vs worst (METHOD.md section 3)."""

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
