"""Pairs kept for `num_iterations > 1`: each optimizer step's window of prompts comes that many times in a row (TRL's
`RepeatSampler`, as GRPO does), its pairs generated and judged once (the first time) and trained on every time.

A repeat is known by its position, never by its prompts: the window of optimizer step `s` (counted from the start of
training, resumes included) is a repeat when `s % num_iterations != 0`. Two windows that hold the same prompts (a
dataset with duplicate prompts) are two windows. The buffer checks that a repeat holds the prompts it buffered and
refuses to go on otherwise (the data order changed under it). It is saved in checkpoints (`state_dict`, one file per
rank), so a run resumed between two repeats trains on the same pairs instead of generating new ones.

An entry per micro-step of the window: (online examples, selections, rewards, samples, policy step that sampled them).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..pairs import PairSelection


def window_key(window: list[list[dict[str, Any]]]) -> tuple:
    return tuple(tuple(tuple(row["prompt_ids"]) for row in rows) for rows in window)


class PairBuffer:
    def __init__(self, num_iterations: int) -> None:
        self.num_iterations = num_iterations
        self.key: tuple | None = None
        self.uses = 0
        self.entries: list[Any] = []

    def is_repeat(self, step: int) -> bool:
        """Whether the window of optimizer step `step` (from 0) trains on buffered pairs."""
        return self.num_iterations > 1 and step % self.num_iterations != 0

    def peek(self, window: list[list[dict[str, Any]]], step: int) -> list[Any]:
        """The buffered entries for a repeat `window` (not yet counted as used: see `advance`)."""
        if self.key is None or self.uses >= self.num_iterations:
            raise RuntimeError(
                f"num_iterations={self.num_iterations}: optimizer step {step} repeats the pairs of step "
                f"{step - step % self.num_iterations}, but none are buffered (the checkpoint lacks them, or the data "
                "order changed). Resume from a checkpoint saved by this version, with the same data and batch sizes."
            )
        if window_key(window) != self.key:
            raise RuntimeError(
                f"num_iterations={self.num_iterations}: optimizer step {step} should repeat the prompts of step "
                f"{step - step % self.num_iterations}, but its prompts differ (the data order changed: dataset, seed, "
                "batch sizes or number of processes). Resume with the settings the checkpoint was trained with."
            )
        return self.entries

    def advance(self) -> None:
        self.uses += 1
        if self.uses >= self.num_iterations:
            self.key, self.uses, self.entries = None, 0, []

    def remember(self, window: list[list[dict[str, Any]]], entries: list[Any]) -> None:
        if self.num_iterations > 1:
            self.key, self.uses, self.entries = window_key(window), 1, list(entries)

    def state_dict(self) -> dict[str, Any]:
        """The buffered window as a JSON-able record: its prompts, the uses so far, and per micro-step (examples,
        selections, rewards, samples, policy step)."""
        if self.key is None:
            return {}
        return {
            "prompt_ids": [[list(ids) for ids in rows] for rows in self.key],
            "uses": self.uses,
            "entries": [
                {
                    "examples": examples,
                    "selections": [asdict(selection) for selection in selections],
                    "rewards": rewards,
                    "samples": samples,
                    "policy_step": policy_step,
                }
                for examples, selections, rewards, samples, policy_step in self.entries
            ],
        }

    def load_state_dict(self, record: dict[str, Any] | list) -> None:
        if not record or isinstance(record, list):  # nothing buffered (or the per-batch format of older versions)
            self.key, self.uses, self.entries = None, 0, []
            return
        self.key = tuple(tuple(tuple(ids) for ids in rows) for rows in record["prompt_ids"])
        self.uses = int(record["uses"])
        self.entries = [
            (
                entry["examples"],
                [PairSelection(**selection) for selection in entry["selections"]],
                entry["rewards"],
                entry["samples"],
                entry.get("policy_step"),
            )
            for entry in record["entries"]
        ]
