"""One optimizer step's numbers over all ranks: what each rank judged and paired in the step's accumulation window,
gathered once (`gather_object`) and merged the same way on every rank.

- counts (prompts, pairs, skipped prompts, the judge's calls, requests, errors, ...) are summed;
- the per-dimension statistics of the judge (`long_reward/<dimension>/mean`, `std`, `missing_rate`,
  `not_applicable_rate`) are computed from the window's judgements over all ranks, as one batch of them would give;
- other metrics the reward functions log are means over their batches, weighted by the batch's samples.

So a logged number is the number of the whole step, never rank 0's or one micro-step's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..pairs import SKIP_REASONS
from ..reward.dimensions.base import NOT_APPLICABLE
from ..reward.runner import CallCounters

#: Reward metrics that are counts of one batch's judge calls: summed over the window and the ranks.
COUNT_METRICS = frozenset(f"long_reward/{name}" for name in CallCounters().totals())
_DIMENSION_STATS = ("mean", "std", "missing_rate", "not_applicable_rate")


def window_payload(batches: Sequence[Any]) -> dict[str, Any]:
    """What this rank contributes to its step's numbers, from the window's `_StepPairs` (this rank's micro-steps)."""
    counts: Counter = Counter()
    weighted: dict[str, list[float]] = {}
    moments: dict[str, list[float]] = {}
    for step in batches:
        rows, selections, rewards = step.rows, step.selections, step.rewards
        counts["prompts"] += len(rows)
        counts["truncated"] += sum(1 for row in rows if row.get("truncated"))
        counts["samples"] += len(rewards)
        counts["unscored"] += sum(1 for r in rewards if r is None)
        counts["online"] += len(step.online)
        counts["chosen_sum"] += sum(s.chosen_reward for s in selections if s.ok)
        counts["rejected_sum"] += sum(s.rejected_reward for s in selections if s.ok)
        for reason in SKIP_REASONS:
            counts[f"skipped_{reason}"] += sum(1 for s in selections if s.skip_reason == reason)
        if not step.new:  # a num_iterations repeat: no judging happened for it
            continue
        counts["judged_prompts"] += len(rows)
        judgements = step.judgements
        for name, value in step.metrics.items():
            if name in COUNT_METRICS:
                counts[name] += value
            elif judgements is not None and _is_dimension_stat(name):
                continue  # computed from the judgements below
            else:
                total = weighted.setdefault(name, [0.0, 0.0])
                total[0] += value * len(rewards)
                total[1] += len(rewards)
        for judgement in judgements or ():
            for name in [*judgement.scores, "reward"]:
                value = judgement.reward if name == "reward" else judgement.scores[name]
                applicable = name == "reward" or judgement.status.get(name) != NOT_APPLICABLE
                m = moments.setdefault(name, [0.0] * 6)  # values, present, sum, sum of squares, missing, applicable
                m[0] += 1
                m[5] += applicable
                if value is not None:
                    m[1] += 1
                    m[2] += value
                    m[3] += value * value
                elif applicable:
                    m[4] += 1
    return {"counts": dict(counts), "weighted": weighted, "moments": moments}


def _is_dimension_stat(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == "long_reward" and parts[2] in _DIMENSION_STATS


def merge_payloads(payloads: Sequence[dict[str, Any]]) -> tuple[Counter, dict[str, float]]:
    """(summed counts, reward metrics) of a step, from every rank's `window_payload`."""
    counts: Counter = Counter()
    weighted: dict[str, list[float]] = {}
    moments: dict[str, list[float]] = {}
    for payload in payloads:
        counts.update(payload["counts"])
        for name, (total, weight) in payload["weighted"].items():
            entry = weighted.setdefault(name, [0.0, 0.0])
            entry[0] += total
            entry[1] += weight
        for name, values in payload["moments"].items():
            entry = moments.setdefault(name, [0.0] * 6)
            for i, value in enumerate(values):
                entry[i] += value
    metrics: dict[str, float] = {}
    if counts.get("judged_prompts"):  # a step that judged something (not a num_iterations repeat)
        for name in COUNT_METRICS & counts.keys():
            metrics[name] = float(counts[name])
        for name, (total, weight) in weighted.items():
            if weight:
                metrics[name] = total / weight
        for name, (values, present, total, squares, missing, applicable) in moments.items():
            if present:
                mean = total / present
                metrics[f"long_reward/{name}/mean"] = mean
                metrics[f"long_reward/{name}/std"] = math.sqrt(max(squares / present - mean * mean, 0.0))
            metrics[f"long_reward/{name}/missing_rate"] = missing / values if values else 0.0
            if name != "reward" and values:
                metrics[f"long_reward/{name}/not_applicable_rate"] = 1 - applicable / values
    return counts, metrics
