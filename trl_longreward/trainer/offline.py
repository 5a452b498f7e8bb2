"""Offline preference pairs (e.g. ordinary short-context DPO data) mixed into each optimizer step at `offline_ratio`."""

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
    """Tokenized offline pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`), drawn in order, cycling, per optimizer
    step (its accumulation window over all ranks).

    The window's count is set from the window's online pairs over all ranks (the same number on every rank), so that
    offline pairs make up `ratio` of the window's pairs; its rows are the next ones from `cursor`, dealt round-robin
    to the ranks and then to the micro-steps, so that no two ranks train the same row. `cursor` is global (every rank
    holds the same value) and saved in checkpoints, so a resumed run draws the rows that come next."""

    def __init__(self, dataset: Any, ratio: float) -> None:
        self.dataset = dataset
        self.ratio = ratio
        self.cursor = 0

    def window_count(self, online_pairs: int, prompts: int) -> int:
        """The offline pairs of a window with `online_pairs` online pairs over all ranks: `ratio` of its pairs; with
        no online pair, taken relative to the window's prompts, so the step still trains on offline data."""
        if self.dataset is None or self.ratio <= 0:
            return 0
        base = online_pairs or prompts
        return max(1, round(base * self.ratio / (1.0 - self.ratio)))

    def draw_window(
        self, online_pairs: int, prompts: int, *, world_size: int, rank: int, micro_steps: int
    ) -> list[list[dict[str, Any]]]:
        """This rank's offline pairs for each micro-step of a window (advancing the cursor past all ranks' rows):
        row j of the window goes to rank j % world_size, micro-step (j // world_size) % micro_steps."""
        out: list[list[dict[str, Any]]] = [[] for _ in range(micro_steps)]
        count = self.window_count(online_pairs, prompts)
        for j in range(count):
            if j % world_size == rank:
                row = self.dataset[(self.cursor + j) % len(self.dataset)]
                out[(j // world_size) % micro_steps].append(
                    {key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
                )
        self.cursor += count
        return out
