"""Asynchronous judging (`LongContextDPOConfig.async_judging`): the judge scores the next batch while the policy trains.

At optimizer step t the trainer samples the prompts of step t+1 with the current weights, hands the samples to one
background thread that runs the reward functions on them, and trains on the pairs of step t, judged while step t-1
trained. Generation stays on the policy (it needs the weights); judging, which waits on a remote judge, overlaps
training. The pairs trained at step t+1 were sampled by the policy of step t: one step of staleness, which online DPO
tolerates (it is already off-policy by one step for the second use of a batch with `num_iterations=2`).

`BackgroundJudging` keeps every batch that was sampled but not yet trained on, in order: its prompts, its samples, the
policy step that sampled it and its judging (a future of the reward functions' `StepRewards`). Checkpoints save those
batches (`state_dict`); a resumed run judges their samples again, which the judge cache answers, so a kill -9 costs
no judge call twice and the resumed run trains on the same pairs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..judges.base import JudgeFatalError
from .rewards import StepRewards

logger = logging.getLogger(__name__)

Scorer = Callable[[list[dict[str, Any]], list[list[dict[str, Any]]], Any], StepRewards]
"""(rows, samples, trainer_state) -> the samples' rewards."""


def rows_key(rows: list[dict[str, Any]]) -> tuple:
    """A micro-batch's identity: its prompts' token ids, in order."""
    return tuple(tuple(row["prompt_ids"]) for row in rows)


@dataclass(eq=False)
class SampledBatch:
    """A micro-batch sampled by the policy of `policy_step` and not yet trained on.

    `future`: its judging, giving (`StepRewards`, seconds the judging took); None for a batch restored from a
    checkpoint until it is judged again. `taken`: a training step has claimed it."""

    key: tuple
    samples: list[list[dict[str, Any]]]
    policy_step: int
    future: concurrent.futures.Future | None = field(default=None, repr=False)
    taken: bool = False


class BackgroundJudging:
    """One worker thread that runs `score` on sampled batches, in the order they were submitted.

    One thread, so that reward functions that are not thread-safe are only ever called from it; a
    `LongRewardFunction` runs all the calls of a batch concurrently on its own event loop anyway."""

    def __init__(self, score: Scorer) -> None:
        self._score = score
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.batches: list[SampledBatch] = []

    def _timed(self, rows, samples, trainer_state) -> tuple[StepRewards, float]:
        started = time.perf_counter()
        scored = self._score(rows, samples, trainer_state)
        return scored, time.perf_counter() - started

    def _start(self, batch: SampledBatch, rows: list[dict[str, Any]], trainer_state: Any) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-judging")
        batch.future = self._executor.submit(self._timed, rows, batch.samples, trainer_state)

    def submit(self, rows, samples, *, policy_step: int, trainer_state: Any) -> SampledBatch:
        """Start judging `samples` of `rows` in the background."""
        batch = SampledBatch(key=rows_key(rows), samples=samples, policy_step=policy_step)
        self._start(batch, rows, trainer_state)
        self.batches.append(batch)
        return batch

    def find(self, rows: list[dict[str, Any]]) -> SampledBatch | None:
        """The oldest batch of these prompts that no step has claimed yet."""
        key = rows_key(rows)
        return next((b for b in self.batches if not b.taken and b.key == key), None)

    def untaken(self) -> list[SampledBatch]:
        return [b for b in self.batches if not b.taken]

    def judge_again(self, batch: SampledBatch, rows: list[dict[str, Any]], trainer_state: Any) -> None:
        """Judge a restored `batch` (of `rows`) again: the judge cache answers what was judged before."""
        if batch.future is None:
            self._start(batch, rows, trainer_state)

    def drop_restored(self, keep: set[tuple]) -> int:
        """Forget restored batches whose prompts are not in `keep` (the data order changed); returns how many."""
        stale = [b for b in self.batches if b.future is None and b.key not in keep]
        self.batches = [b for b in self.batches if b not in stale]
        return len(stale)

    def take(self, batch: SampledBatch) -> tuple[StepRewards, float, float]:
        """Claim `batch` and wait for its judging: (rewards, seconds waited here, seconds the judging took)."""
        assert batch.future is not None, "a restored batch is judged again before it is taken"
        batch.taken = True
        started = time.perf_counter()
        scored, busy = batch.future.result()
        return scored, time.perf_counter() - started, busy

    def trained(self, batch: SampledBatch) -> None:
        self.batches.remove(batch)

    def state_dict(self) -> list[dict[str, Any]]:
        """The batches sampled and not yet trained on: prompts, samples and the policy step that sampled them."""
        return [
            {"prompt_ids": [list(ids) for ids in b.key], "samples": b.samples, "policy_step": b.policy_step}
            for b in self.batches
        ]

    def load_state_dict(self, records: list[dict[str, Any]]) -> None:
        self.batches = [
            SampledBatch(
                key=tuple(tuple(ids) for ids in r["prompt_ids"]), samples=r["samples"], policy_step=r["policy_step"]
            )
            for r in records
        ]

    def finish(self) -> list[tuple[SampledBatch, StepRewards | None]]:
        """Wait for the judging still running, stop the thread, and return the batches never trained on (with their
        rewards; None when not judged in this run, or when the judging failed)."""
        left = []
        for batch in self.batches:
            scored = None
            if batch.future is not None:
                try:
                    scored = batch.future.result()[0]
                except (Exception, JudgeFatalError) as err:  # judging a batch never trained on failed: report it
                    logger.warning("Judging a batch that was never trained on failed: %r", err)
            left.append((batch, scored))
        self.batches = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        return left
