"""The judge comparing two answers directly: the baseline LongReward is measured against (paper: agreement 0.571).

Not part of LongReward. The judge reads the document, the question and both answers and names the better one,
`[[A]]` or `[[B]]` (the prompt `prompts/pairwise_comparison.txt`, written fresh). Each pair is judged in both orders;
the pair's verdict is the answer both orders pick, and a tie when they disagree, so a judge that always prefers one
position scores no agreement from it. Calls go through the reward's own `JudgeRunner` settings (cache, re-samples,
structured verdicts), like `ReferenceRater`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runner import JudgeRunner, describe_call

if TYPE_CHECKING:
    from .function import LongRewardFunction

PAIRWISE_TEMPLATE = "pairwise_comparison"
_VERDICT = re.compile(r"\[\[\s*([AB])\s*\]\]")
FIRST, SECOND, TIE = "first", "second", "tie"


def parse_choice(text: str) -> str | None:
    """The last `[[A]]` / `[[B]]` of the judge's answer, as "A" or "B"; None if there is none."""
    found = _VERDICT.findall(text)
    return found[-1] if found else None


def combine_orders(forward: str | None, backward: str | None) -> str | None:
    """The pair's verdict from both orders: `FIRST` or `SECOND` (of the pair as given) when both orders pick that
    answer, `TIE` when the two orders pick different answers, None when either order has no verdict.

    `forward` judged (first, second) as (A, B); `backward` judged (second, first) as (A, B)."""
    if forward is None or backward is None:
        return None
    first_forward = forward == "A"
    first_backward = backward == "B"
    if first_forward and first_backward:
        return FIRST
    if not first_forward and not first_backward:
        return SECOND
    return TIE


class PairwiseComparer:
    """Asks a reward function's judge which of two answers is better, in both orders.

    A `prompt_dir` of the reward's config is used when it holds `pairwise_comparison.txt`, else the packaged prompt.
    """

    def __init__(self, reward: LongRewardFunction, *, max_tokens: int | None = None) -> None:
        config = reward.config
        own = config.prompt_dir is not None and (Path(config.prompt_dir) / f"{PAIRWISE_TEMPLATE}.txt").is_file()
        self.reward = reward
        self.max_tokens = max_tokens or config.score_max_tokens
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

    async def acompare(self, context: str, question: str, first: str, second: str) -> dict[str, Any]:
        """Both orders and the pair's verdict: `{"verdict": FIRST | SECOND | TIE | None, "orders": [...]}`."""
        calls = [
            self.runner.run(
                PAIRWISE_TEMPLATE,
                {"document": context, "question": question, "response_a": a, "response_b": b},
                parse_choice,
                max_tokens=self.max_tokens,
            )
            for a, b in ((first, second), (second, first))
        ]
        forward, backward = await asyncio.gather(*calls)
        return {
            "verdict": combine_orders(forward.value, backward.value),
            "orders": [describe_call(forward), describe_call(backward)],
        }

    def compare(
        self, contexts: Sequence[str], questions: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Compare every pair, all calls in flight together (up to the judge's limit), on the reward's loop."""

        async def compare_all() -> list[dict[str, Any]]:
            pairs = zip(contexts, questions, firsts, seconds, strict=True)
            return list(await asyncio.gather(*(self.acompare(*pair) for pair in pairs)))

        return self.reward.run(compare_all())

    def stats(self) -> dict[str, int]:
        """Comparison calls sent to the judge, answered from the cache, unparseable, failed."""
        return self.runner.counters.totals()
