"""Faithfulness, break and check (docs/method.md section 2.3, adapted from FactScore).

1. Break: one call lists the response's self-contained factual statements.
2. Retrieve: the document is split into `faithfulness_chunk_tokens`-token chunks (indexed once per prompt, shared by
   all responses); the top-`faithfulness_top_k` chunks per statement are shown in DOCUMENT order.
3. Check: one call per statement: Fully (1) / Partially (0.5) / No support (0).
4. Score = 10 x mean over statements, when at least `faithfulness_min_checked_fraction` of the checks parsed
   (compared exactly, `enough_checked`); else faithfulness is missing.

Zero-statement policy (the reference code crashed here): a response whose breakdown is an explicit
`No factual statements` gets `zero_statement_policy`: `exclude` (default; status `not_applicable`, the reward is the
mean of the other dimensions, as FactScore leaves abstentions out of precision), `full` (10) or `zero` (0).
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

from ..inputs import Sample
from ..retrieval import RetrievalIndex
from ..runner import describe_call
from .base import FAILED, NOT_APPLICABLE, OK, DimensionResult, DimensionScorer, PromptState


def enough_checked(checked: int, total: int, min_fraction: float) -> bool:
    """Whether `checked` of `total` statement checks reach `faithfulness_min_checked_fraction`, compared exactly.

    The fraction is read as the decimal it is written as (`str(0.28)` = 28/100), and the comparison is in integers:
    7 of 25 reach 0.28, where floating point (0.28 x 25 = 7.000000000000001) would say they fall short.
    """
    fraction = Fraction(str(min_fraction))
    return checked * fraction.denominator >= fraction.numerator * total


def format_passages(chunks: list[str], indices: list[int]) -> str:
    """Passages numbered in document order, as the check prompt expects."""
    return "\n".join(f"[{n}] {' '.join(chunks[i].split())}" for n, i in enumerate(indices, start=1))


class FaithfulnessScorer(DimensionScorer):
    name = "faithfulness"

    def _build_index(self, context: str) -> RetrievalIndex:
        chunks = self.services.chunker.split(context, self.config.faithfulness_chunk_tokens)
        return self.services.retriever.index(chunks)

    async def score(self, sample: Sample, state: PromptState) -> DimensionResult:
        broken = await self.runner.run(
            "faithfulness_break",
            {"question": sample.question, "response": sample.response},
            self.parsers.statements,
            max_tokens=self.config.break_max_tokens,
        )
        trace = {"break": describe_call(broken)}
        if not broken.ok:
            return DimensionResult(score=None, status=FAILED, trace=trace)
        statements = broken.value or []
        if self.config.max_statements is not None:
            statements = statements[: self.config.max_statements]
        trace["statements"] = statements
        if not statements:
            return self._zero_statement_result(trace)

        index = await state.once("faithfulness_index", lambda: asyncio.to_thread(self._build_index, state.context))
        top = await asyncio.to_thread(index.top_k, statements, self.config.faithfulness_top_k)
        checks = await asyncio.gather(
            *(
                self.runner.run(
                    "faithfulness_check",
                    {"statement": statement, "passages": format_passages(index.chunks, chunk_ids)},
                    self.parsers.support,
                    max_tokens=self.config.check_max_tokens,
                )
                for statement, chunk_ids in zip(statements, top, strict=True)
            )
        )
        trace["checks"] = [
            {"statement": s, "passages": ids, **describe_call(c)}
            for s, ids, c in zip(statements, top, checks, strict=True)
        ]
        values = [c.value for c in checks if c.ok]
        if not enough_checked(len(values), len(statements), self.config.faithfulness_min_checked_fraction):
            trace["error"] = f"{len(statements) - len(values)} of {len(statements)} statement checks failed"
            return DimensionResult(score=None, status=FAILED, trace=trace)
        return DimensionResult(score=10.0 * sum(values) / len(values), status=OK, trace=trace)

    def _zero_statement_result(self, trace: dict) -> DimensionResult:
        policy = self.config.zero_statement_policy
        trace["zero_statement_policy"] = policy
        if policy == "exclude":
            return DimensionResult(score=None, status=NOT_APPLICABLE, trace=trace)
        return DimensionResult(score=10.0 if policy == "full" else 0.0, status=OK, trace=trace)
