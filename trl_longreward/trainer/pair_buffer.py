"""Pairs kept for `num_iterations > 1`: a batch of prompts comes that many times in a row, its pairs generated and
judged once (the first time) and trained on every time. The buffer is saved in checkpoints (`state_dict`), so a run
resumed between two repeats of a batch trains on the same pairs instead of generating new ones. Each entry is
(examples, selections, rewards, samples, policy step that sampled them)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..pairs import PairSelection


class PairBuffer:
    def __init__(self, num_iterations: int) -> None:
        self.num_iterations = num_iterations
        self._entries: dict[tuple, list] = {}

    @staticmethod
    def _key(rows: list[dict[str, Any]]) -> tuple:
        return tuple(tuple(row["prompt_ids"]) for row in rows)

    def remember(self, rows: list[dict[str, Any]], step: Any) -> None:
        if self.num_iterations > 1:
            self._entries[self._key(rows)] = [1, step]

    def remaining(self) -> dict[tuple, int]:
        """Per buffered batch of prompts (its key), how many more times its pairs will be trained on."""
        return {key: self.num_iterations - entry[0] for key, entry in self._entries.items()}

    def reuse(self, rows: list[dict[str, Any]]) -> Any:
        """What was remembered for exactly these prompts, while it has been used fewer than num_iterations times."""
        if self.num_iterations <= 1:
            return None
        key = self._key(rows)
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry[0] += 1
        if entry[0] >= self.num_iterations:
            del self._entries[key]
        return entry[1]

    def state_dict(self) -> list[dict[str, Any]]:
        """The buffered steps as JSON-able records: the prompts, the uses so far, and (examples, selections,
        rewards, samples, policy step)."""
        records = []
        for key, (uses, (examples, selections, rewards, samples, policy_step)) in self._entries.items():
            records.append(
                {
                    "prompt_ids": [list(ids) for ids in key],
                    "uses": uses,
                    "examples": examples,
                    "selections": [asdict(selection) for selection in selections],
                    "rewards": rewards,
                    "samples": samples,
                    "policy_step": policy_step,
                }
            )
        return records

    def load_state_dict(self, records: list[dict[str, Any]]) -> None:
        self._entries = {
            tuple(tuple(ids) for ids in record["prompt_ids"]): [
                record["uses"],
                (
                    record["examples"],
                    [PairSelection(**selection) for selection in record["selections"]],
                    record["rewards"],
                    record["samples"],
                    record.get("policy_step"),
                ),
            ]
            for record in records
        }
