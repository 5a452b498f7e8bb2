"""Helpfulness and logicality: one judge call each, seeing the question and the response but NOT the document."""

from __future__ import annotations

from ..inputs import Sample
from ..runner import describe_call
from .base import FAILED, OK, DimensionResult, DimensionScorer, PromptState


class _QuestionResponseScorer(DimensionScorer):
    async def score(self, sample: Sample, state: PromptState) -> DimensionResult:
        result = await self.runner.run(
            self.name,
            {"question": sample.question, "response": sample.response},
            self.parsers.score,
            max_tokens=self.config.score_max_tokens,
        )
        return DimensionResult(
            score=result.value, status=OK if result.ok else FAILED, trace={"call": describe_call(result)}
        )


class HelpfulnessScorer(_QuestionResponseScorer):
    """Relevance, meeting the user's purpose, detail, format (docs/method.md section 2.1)."""

    name = "helpfulness"


class LogicalityScorer(_QuestionResponseScorer):
    """Internal consistency and correct reasoning, without outside knowledge (docs/method.md section 2.2)."""

    name = "logicality"
