"""Summaries of judged answers, shared by `trl-longreward evaluate` and `LongRewardCallback`: per-dimension means
and per-prompt win rates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REFERENCE_SCORE = "reference_score"


def mean_scores(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float | None]:
    """The mean of each name over the rows where it is not None (None when no row has it)."""
    means: dict[str, float | None] = {}
    for name in names:
        present = [float(row[name]) for row in rows if row.get(name) is not None]
        means[name] = sum(present) / len(present) if present else None
    return means


def flat_scores(record: dict[str, Any]) -> dict[str, float | None]:
    """A judged record's numbers side by side: each dimension, `reward`, and the reference rating if any."""
    flat: dict[str, float | None] = {**record.get("scores", {}), "reward": record.get("reward")}
    if record.get("reference") is not None:
        flat[REFERENCE_SCORE] = record["reference"]["score"]
    return flat


def win_rate(
    values: Sequence[float | None], baseline: Sequence[float | None], *, tie_margin: float = 0.0
) -> dict[str, Any]:
    """Per-prompt comparison of `values` with `baseline`: wins, ties, losses, prompts where either is unscored, and
    the win rate over the compared prompts (ties count as compared, not as wins)."""
    counts = {"wins": 0, "ties": 0, "losses": 0, "unscored": 0}
    for value, base in zip(values, baseline, strict=True):
        if value is None or base is None:
            counts["unscored"] += 1
        elif value - base > tie_margin:
            counts["wins"] += 1
        elif base - value > tie_margin:
            counts["losses"] += 1
        else:
            counts["ties"] += 1
    compared = counts["wins"] + counts["ties"] + counts["losses"]
    return {**counts, "compared": compared, "win_rate": counts["wins"] / compared if compared else None}
