"""Offline preference pairs (e.g. ordinary short-context DPO data) mixed into each step at `offline_ratio`."""

from __future__ import annotations

from typing import Any


def check_offline_columns(dataset: Any) -> None:
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"offline_dataset lacks columns {sorted(missing)} (has {dataset.column_names}): it must be preference data "
            "with prompt, chosen and rejected columns, e.g. an ordinary DPO dataset."
        )


class OfflinePairs:
    """Tokenized offline pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`), drawn in order, cycling. `cursor` is
    saved in checkpoints so a resumed run draws the same pairs."""

    def __init__(self, dataset: Any, ratio: float) -> None:
        self.dataset = dataset
        self.ratio = ratio
        self.cursor = 0

    def draw(self, num_online: int, per_device_batch_size: int) -> list[dict[str, Any]]:
        """Pairs so that they make up `ratio` of the step's pairs. With no online pair this step, the count is taken
        relative to the per-device batch size, so the step still trains on offline data."""
        if self.dataset is None or self.ratio <= 0:
            return []
        base = num_online or per_device_batch_size
        count = max(1, round(base * self.ratio / (1.0 - self.ratio)))
        out = []
        for _ in range(count):
            row = self.dataset[self.cursor % len(self.dataset)]
            self.cursor += 1
            out.append({key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")})
        return out
