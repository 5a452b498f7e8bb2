"""Completeness, divide and conquer (METHOD.md 2.4).

1. The document is split into `completeness_chunk_tokens`-token chunks; one call per chunk extracts the information
   relevant to the question (or `No relevant information`). This depends on (context, question) only, so it runs once
   per prompt and is shared by all k responses.
2. Each chunk's notes are labelled with its position, e.g. "[Relevant information from 30%-45% of the document]".
3. One call per response scores how much of the key information the response covers, from the labelled notes.

If any chunk's extraction fails for good, completeness is missing for every response to that prompt: a score from
partial notes would look like a real one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..calls import describe_call
from ..inputs import Sample
from .base import FAILED, OK, DimensionResult, DimensionScorer, PromptState

NO_NOTES = "No relevant information was found in any part of the document."


def position_label(start_token: int, end_token: int, total_tokens: int) -> str:
    start = round(100 * start_token / total_tokens) if total_tokens else 0
    end = round(100 * end_token / total_tokens) if total_tokens else 100
    return f"[Relevant information from {start}%-{end}% of the document]"


class CompletenessScorer(DimensionScorer):
    name = "completeness"

    async def _extract_notes(self, state: PromptState) -> dict[str, Any]:
        chunk_tokens = self.config.completeness_chunk_tokens
        chunks = await asyncio.to_thread(self.services.chunker.split, state.context, chunk_tokens)
        total = await asyncio.to_thread(self.services.chunker.count_tokens, state.context)
        calls = await asyncio.gather(
            *(
                self.runner.run(
                    "completeness_extract",
                    {"question": state.question, "chunk": chunk},
                    self.parsers.notes,
                    max_tokens=self.config.extract_max_tokens,
                )
                for chunk in chunks
            )
        )
        blocks = []
        for i, call in enumerate(calls):
            if call.ok and call.value:
                end = min((i + 1) * chunk_tokens, total)
                blocks.append(f"{position_label(i * chunk_tokens, end, total)}\n{call.value}")
        failed = [i for i, call in enumerate(calls) if not call.ok]
        return {
            "notes": "\n\n".join(blocks) if blocks else NO_NOTES,
            "failed_chunks": failed,
            "chunks": [describe_call(call) for call in calls],
        }

    async def score(self, sample: Sample, state: PromptState) -> DimensionResult:
        extraction = await state.once("completeness_notes", lambda: self._extract_notes(state))
        shared = {"num_chunks": len(extraction["chunks"]), "failed_chunks": extraction["failed_chunks"]}
        if extraction["failed_chunks"]:
            state.forget("completeness_notes")  # retried by the next batch; chunks that succeeded come from cache
            return DimensionResult(score=None, status=FAILED, trace={**shared, "extraction": extraction["chunks"]})
        result = await self.runner.run(
            "completeness_score",
            {"question": sample.question, "notes": extraction["notes"], "response": sample.response},
            self.parsers.score,
            max_tokens=self.config.score_max_tokens,
        )
        return DimensionResult(
            score=result.value,
            status=OK if result.ok else FAILED,
            trace={**shared, "notes": extraction["notes"], "call": describe_call(result)},
        )
