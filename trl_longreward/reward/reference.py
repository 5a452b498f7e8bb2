"""Reference-based rating, LongBench-Chat style: the judge rates an answer 1-10 against a reference answer.

This is not part of LongReward (which needs no reference); it is the evaluation the paper reports on LongBench-Chat,
where a judge compares each answer with a human-written reference, guided by a few scored examples. The prompt is the
package data file `prompts/reference_rating.txt` (written fresh, in English); it goes through the same `JudgeRunner`
as LongReward's calls, so it is cached, re-sampled when the verdict does not parse, and never made up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .parsing import parse_score
from .runner import JudgeRunner, describe_call
from .verdicts import verdict_parsers

if TYPE_CHECKING:
    from .function import LongRewardFunction

REFERENCE_TEMPLATE = "reference_rating"
MIN_RATING = 1.0


def parse_rating(text: str, parse: Callable[[str], float | None] = parse_score) -> float | None:
    """The last `[[N]]` (or what `parse` reads, e.g. the lenient score parser), clipped to [1, 10]; None if none."""
    score = parse(text)
    return None if score is None else max(MIN_RATING, score)


class ReferenceRater:
    """Rates answers 1-10 against reference answers with the judge (and the judge-call cache) of a reward function.

    The rater shares `reward`'s judge, cache and event loop, so an in-process judge model is loaded once and an HTTP
    judge keeps one client; its own call counters (`stats()`) tell the rating calls apart from LongReward's. A
    `prompt_dir` of the reward's config is used when it holds `reference_rating.txt`, else the packaged prompt.

    Deviation from LongBench-Chat: its judge saw the same few-shot examples but no delimiters; here the question, the
    reference and the answer are tagged and defused like every other judge input, and a verdict below 1 is clipped.
    """

    def __init__(self, reward: LongRewardFunction, *, max_tokens: int | None = None) -> None:
        config = reward.config
        own = config.prompt_dir is not None and (Path(config.prompt_dir) / f"{REFERENCE_TEMPLATE}.txt").is_file()
        self.reward = reward
        self.max_tokens = max_tokens or config.score_max_tokens
        self._parse_score = verdict_parsers(config.verdict_parsing).score
        self.runner = JudgeRunner(
            reward.judge,
            reward.cache,
            max_attempts=config.max_attempts,
            first_temperature=config.first_temperature,
            retry_temperature=config.retry_temperature,
            verdict_followup=config.verdict_followup,
            verdict_decoding=config.verdict_decoding,
            prompt_dir=config.prompt_dir if own else None,
        )

    async def arate(self, question: str, reference: str, response: str) -> dict[str, Any]:
        """One rating: `{"score": float | None, "judge_outputs": [...], "error": str | None}`."""
        result = await self.runner.run(
            REFERENCE_TEMPLATE,
            {"question": question, "reference": reference, "response": response},
            lambda text: parse_rating(text, self._parse_score),
            max_tokens=self.max_tokens,
        )
        trace = describe_call(result)
        return {"score": trace.pop("value"), **trace}

    def rate(
        self, questions: Sequence[str], references: Sequence[str], responses: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Rate every (question, reference, response), all calls in flight together (up to the judge's limit)."""
        if not len(questions) == len(references) == len(responses):
            raise ValueError("rate() needs one question and one reference per response.")

        async def rate_all() -> list[dict[str, Any]]:
            return list(
                await asyncio.gather(
                    *(self.arate(q, r, a) for q, r, a in zip(questions, references, responses, strict=True))
                )
            )

        # The judge's async client is bound to the reward function's private loop: run there.
        return self.reward.run(rate_all())

    def stats(self) -> dict[str, int]:
        """Rating calls sent to the judge, answered from the cache, unparseable, failed."""
        return self.runner.counters.totals()
