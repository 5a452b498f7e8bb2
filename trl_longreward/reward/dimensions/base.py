"""What every dimension shares: its result type, the per-prompt shared state and the scorer base class."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import LongRewardConfig
from ..inputs import Sample
from ..retrieval import Retriever, TokenChunker
from ..runner import JudgeRunner
from ..verdicts import VerdictParsers, verdict_parsers

OK = "ok"
FAILED = "failed"
NOT_APPLICABLE = "not_applicable"


@dataclass
class DimensionResult:
    """A dimension's score (0-10, or None) and how it came about.

    `status` is `ok`, `failed` (the judge failed or never gave a parseable verdict: the score is missing, never made
    up) or `not_applicable` (e.g. faithfulness of a response with no factual statement under the `exclude` policy).
    """

    score: float | None
    status: str
    trace: dict[str, Any] = field(default_factory=dict)


class PromptState:
    """Work that depends only on (context, question), done once and shared by every response to that prompt.

    Completeness notes and the retrieval index are computed by the first response that needs them; the others await
    the same task.
    """

    def __init__(self, context: str, question: str) -> None:
        self.context = context
        self.question = question
        self._tasks: dict[str, asyncio.Future] = {}

    def once(self, name: str, factory: Callable[[], Awaitable[Any]]) -> asyncio.Future:
        task = self._tasks.get(name)
        # A task that raised (an embedding endpoint was down) is not kept: the next response tries again.
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(factory())
            self._tasks[name] = task
        return task

    def forget(self, name: str) -> None:
        """Drop a shared result that came out incomplete (a judge outage), so the next call computes it again."""
        self._tasks.pop(name, None)


@dataclass
class ScoringServices:
    """Shared tools the dimensions use; built once per reward function."""

    config: LongRewardConfig
    runner: JudgeRunner
    chunker: TokenChunker
    retriever_factory: Callable[[], Retriever]
    _retriever: Retriever | None = None

    @property
    def retriever(self) -> Retriever:
        # Built on first use: a reward without faithfulness never loads an embedding model.
        if self._retriever is None:
            self._retriever = self.retriever_factory()
        return self._retriever


class DimensionScorer(ABC):
    """One dimension's pipeline. `parsers` reads the judge's verdicts as `config.verdict_parsing` says."""

    name: str

    def __init__(self, services: ScoringServices) -> None:
        self.services = services
        self.config = services.config
        self.runner = services.runner
        self.parsers: VerdictParsers = verdict_parsers(self.config.verdict_parsing)

    @abstractmethod
    async def score(self, sample: Sample, state: PromptState) -> DimensionResult: ...
