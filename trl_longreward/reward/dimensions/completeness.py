"""Completeness, divide and conquer (docs/method.md section 2.4).

1. The document is split into `completeness_chunk_tokens`-token chunks; one call per chunk extracts the information
   relevant to the question (or `No relevant information`). This depends on (context, question) only, so it runs once
   per prompt and is shared by all k responses.
2. Each chunk's notes are labelled with its position, e.g. "[Relevant information from 30%-45% of the document]".
3. One call per response scores how much of the key information the response covers, from the labelled notes.

If any chunk's extraction fails for good, completeness is missing for every response to that prompt: a score from
partial notes would look like a real one.

Deviation (only beyond the paper's scale): when the notes exceed `completeness_max_notes_tokens` (default 16384, and
at most half the judge's context window when that is known), the scoring call would not fit the judge's window: a
document of a few hundred thousand tokens, relevant throughout. The notes are then condensed the way the document
was: consecutive notes are grouped into `completeness_chunk_tokens`-token groups, the extraction prompt is run on each
group (same template, the notes as the chunk), and each group's answer is labelled with the span of the document its
notes came from. This repeats (at most `MAX_CONDENSE_ROUNDS` times) until the notes fit; notes that still do not fit,
or stop shrinking, make completeness missing, with the reason in the trace. Under the cap (every document of the
paper's length) nothing changes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..inputs import Sample
from ..runner import describe_call
from .base import FAILED, OK, DimensionResult, DimensionScorer, PromptState

NO_NOTES = "No relevant information was found in any part of the document."
MAX_CONDENSE_ROUNDS = 3


@dataclass(frozen=True)
class NotesBlock:
    """The notes taken from document tokens [start, end)."""

    start: int
    end: int
    text: str

    def render(self, total_tokens: int) -> str:
        return f"{position_label(self.start, self.end, total_tokens)}\n{self.text}"


def render_notes(blocks: list[NotesBlock], total_tokens: int) -> str:
    return "\n\n".join(block.render(total_tokens) for block in blocks) if blocks else NO_NOTES


def group_blocks(blocks: list[NotesBlock], sizes: list[int], budget: int) -> list[list[NotesBlock]]:
    """Consecutive blocks in groups of at most `budget` tokens (a block larger than that is a group of its own)."""
    groups: list[list[NotesBlock]] = []
    used = 0
    for block, size in zip(blocks, sizes, strict=True):
        if groups and used + size <= budget:
            groups[-1].append(block)
            used += size
        else:
            groups.append([block])
            used = size
    return groups


def position_label(start_token: int, end_token: int, total_tokens: int) -> str:
    start = round(100 * start_token / total_tokens) if total_tokens else 0
    end = round(100 * end_token / total_tokens) if total_tokens else 100
    return f"[Relevant information from {start}%-{end}% of the document]"


class CompletenessScorer(DimensionScorer):
    name = "completeness"

    async def _extract(self, question: str, chunks: list[str]) -> list[Any]:
        return await asyncio.gather(
            *(
                self.runner.run(
                    "completeness_extract",
                    {"question": question, "chunk": chunk},
                    self.parsers.notes,
                    max_tokens=self.config.extract_max_tokens,
                )
                for chunk in chunks
            )
        )

    async def _extract_notes(self, state: PromptState) -> dict[str, Any]:
        chunk_tokens = self.config.completeness_chunk_tokens
        chunks = await asyncio.to_thread(self.services.chunker.split, state.context, chunk_tokens)
        total = await asyncio.to_thread(self.services.chunker.count_tokens, state.context)
        calls = await self._extract(state.question, chunks)
        blocks = [
            NotesBlock(i * chunk_tokens, min((i + 1) * chunk_tokens, total), call.value)
            for i, call in enumerate(calls)
            if call.ok and call.value
        ]
        extraction: dict[str, Any] = {
            "failed_chunks": [i for i, call in enumerate(calls) if not call.ok],
            "chunks": [describe_call(call) for call in calls],
            "condensed": [],
        }
        if not extraction["failed_chunks"]:
            blocks = await self._condense(state.question, blocks, total, extraction)
        extraction["notes"] = render_notes(blocks, total)
        return extraction

    async def _condense(
        self, question: str, blocks: list[NotesBlock], total: int, extraction: dict[str, Any]
    ) -> list[NotesBlock]:
        """Notes that fit `completeness_max_notes_tokens`, condensed round by round (see the module docstring);
        records each round in `extraction["condensed"]` and a failure in `extraction["error"]`."""
        cap = self.config.completeness_max_notes_tokens or None  # 0 or None: never condense (the paper)
        window = getattr(self.runner.judge, "context_window", None)
        if cap is not None and window:
            cap = min(cap, window // 2)  # the rest: the template, the response and the verdict
        count = self.services.chunker.count_tokens
        previous = None
        for round_index in range(MAX_CONDENSE_ROUNDS + 1):
            sizes = await asyncio.to_thread(lambda bs=blocks: [count(b.render(total)) for b in bs])
            used = sum(sizes)
            if cap is None or used <= cap:
                return blocks
            stuck = len(blocks) == 1 or (previous is not None and used >= previous)
            previous = used
            if round_index == MAX_CONDENSE_ROUNDS or stuck:
                extraction["error"] = (
                    f"the notes are {used} tokens after {round_index} condensing rounds, more than "
                    f"the cap of {cap} (completeness_max_notes_tokens={self.config.completeness_max_notes_tokens}, "
                    f"judge context window {window}); lower completeness_chunk_tokens or extract_max_tokens, or use "
                    "a judge with a longer window"
                )
                return blocks
            groups = group_blocks(blocks, sizes, self.config.completeness_chunk_tokens)
            calls = await self._extract(question, [render_notes(group, total) for group in groups])
            extraction["condensed"].append(
                {
                    "round": round_index + 1,
                    "tokens_before": used,
                    "groups": len(groups),
                    "calls": [describe_call(call) for call in calls],
                }
            )
            if any(not call.ok for call in calls):
                extraction["error"] = f"a condensing call of round {round_index + 1} failed"
                return blocks
            blocks = [
                NotesBlock(group[0].start, group[-1].end, call.value)
                for group, call in zip(groups, calls, strict=True)
                if call.value
            ]
        return blocks

    async def score(self, sample: Sample, state: PromptState) -> DimensionResult:
        extraction = await state.once("completeness_notes", lambda: self._extract_notes(state))
        shared = {"num_chunks": len(extraction["chunks"]), "failed_chunks": extraction["failed_chunks"]}
        if extraction["condensed"]:
            shared["condensed"] = extraction["condensed"]
        if extraction["failed_chunks"] or "error" in extraction:
            state.forget("completeness_notes")  # retried by the next batch; chunks that succeeded come from cache
            trace = {**shared, "extraction": extraction["chunks"]}
            if "error" in extraction:
                trace["error"] = extraction["error"]
            return DimensionResult(score=None, status=FAILED, trace=trace)
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
