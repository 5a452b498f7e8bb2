#!/usr/bin/env python
"""Does a judge follow the verdict protocol? Strict (the paper) vs lenient parse rates per judge prompt.

Sends every LongReward judge prompt once per (context, question, response) row (the notes extraction once per row and
document chunk) and prints, per prompt, how many of the judge's answers the strict parser reads and how many the
lenient one reads (`LongRewardConfig.verdict_parsing`), with their ratio. Calls go through the reward's `JudgeRunner`,
so they are cached like any other (`--cache_path`) and a rerun costs nothing. Unlike a reward run, every prompt is
measured even when an earlier one fails: the statement check gets the first statement the lenient parser finds (else
the response's first sentence), and the completeness score gets whatever notes parsed.

Use it to choose `verdict_parsing` for a judge: a judge that passes strict parsing on nearly every call should stay in
strict mode (the paper).

    python benchmarks/verdict_parsing.py --judge_backend transformers          # the embedded SmolLM2, in process
    python benchmarks/verdict_parsing.py --judge_base_url http://127.0.0.1:8000/v1 --judge_model MODEL \\
        --input rows.jsonl --raw_output runs/verdicts.jsonl                      # any OpenAI-compatible judge

Every `LongRewardConfig` field is a flag (e.g. `--score_max_tokens 96`); the default input is the bundled
`trl_longreward/data/demo_score.jsonl`.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from trl_longreward.data import demo_score_path
from trl_longreward.records import load_rows
from trl_longreward.reward import LongRewardConfig, LongRewardFunction
from trl_longreward.reward.dimensions.completeness import NO_NOTES, position_label
from trl_longreward.reward.dimensions.faithfulness import format_passages
from trl_longreward.reward.verdicts import verdict_parsers

READERS = {  # template -> which parser of a `VerdictParsers` reads its answers
    "helpfulness": "score",
    "logicality": "score",
    "faithfulness_break": "statements",
    "faithfulness_check": "support",
    "completeness_extract": "notes",
    "completeness_score": "score",
}


@dataclass
class BenchmarkArguments:
    input: str | None = field(
        default=None, metadata={"help": "Rows with context, question, response; default: bundled."}
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    raw_output: str | None = field(default=None, metadata={"help": "JSONL file for every judge answer, for reading."})


class VerdictProbe:
    """Sends each judge prompt for a row and records (template, answer) pairs."""

    def __init__(self, reward: LongRewardFunction) -> None:
        self.reward = reward
        self.config = reward.config
        self.lenient = verdict_parsers("lenient")
        self.answers: list[dict[str, Any]] = []

    async def call(self, template: str, values: dict[str, str], budget: int, row: int) -> str:
        result = await self.reward.runner.run(template, values, lambda text: text, max_tokens=budget)
        text = result.value if result.value is not None else ""
        self.answers.append({"row": row, "template": template, "answer": text, "error": result.error})
        return text

    async def probe(self, row: int, context: str, question: str, response: str) -> None:
        config, chunker = self.config, self.reward.services.chunker
        pair = {"question": question, "response": response}
        chunks = chunker.split(context, config.completeness_chunk_tokens)
        total = chunker.count_tokens(context)
        extractions, breakdown, *_ = await asyncio.gather(
            asyncio.gather(
                *(
                    self.call(
                        "completeness_extract", {"question": question, "chunk": c}, config.extract_max_tokens, row
                    )
                    for c in chunks
                )
            ),
            self.call("faithfulness_break", pair, config.break_max_tokens, row),
            self.call("helpfulness", pair, config.score_max_tokens, row),
            self.call("logicality", pair, config.score_max_tokens, row),
        )
        size = config.completeness_chunk_tokens
        blocks = [
            f"{position_label(i * size, min((i + 1) * size, total), total)}\n{notes}"
            for i, notes in enumerate(self.lenient.notes(text) for text in extractions)
            if notes
        ]
        statements = self.lenient.statements(breakdown) or re.split(r"(?<=[.!?])\s+", response.strip())[:1]
        index = self.reward.services.retriever.index(chunker.split(context, config.faithfulness_chunk_tokens))
        (top,) = index.top_k(statements[:1], config.faithfulness_top_k)
        check = {"statement": statements[0], "passages": format_passages(index.chunks, top)}
        notes = {**pair, "notes": "\n\n".join(blocks) or NO_NOTES}
        await asyncio.gather(
            self.call("faithfulness_check", check, config.check_max_tokens, row),
            self.call("completeness_score", notes, config.score_max_tokens, row),
        )


def parse_rates(answers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per template: answers, and how many of them the strict and the lenient parser read."""
    rates = {name: {"answers": 0, "strict": 0, "lenient": 0} for name in READERS}
    for mode in ("strict", "lenient"):
        parsers = verdict_parsers(mode)
        for answer in answers:
            reader = getattr(parsers, READERS[answer["template"]])
            rates[answer["template"]][mode] += reader(answer["answer"]) is not None
    for answer in answers:
        rates[answer["template"]]["answers"] += 1
    return rates


def main() -> None:
    parser = HfArgumentParser((BenchmarkArguments, LongRewardConfig))
    args, config = parser.parse_args_into_dataclasses()
    config.max_attempts = 1  # one answer per prompt: the question is how often a single answer parses
    rows = load_rows(args.input or str(demo_score_path()))
    rows = rows.select(range(min(args.limit or len(rows), len(rows))))
    reward = LongRewardFunction(config)
    probe = VerdictProbe(reward)

    async def run_all() -> None:
        await asyncio.gather(
            *(
                probe.probe(i, r[config.context_column], r[config.question_column], r["response"])
                for i, r in enumerate(rows)
            )
        )

    try:
        reward.run(run_all())
    finally:
        reward.close()
    if args.raw_output:
        Path(args.raw_output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.raw_output).write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in probe.answers))
    print(f"judge: {reward.judge.model_id}, rows: {len(rows)}, judge calls: {reward.stats()['judge_calls']}")
    print(f"{'prompt':22s} {'answers':>8s} {'strict':>7s} {'lenient':>8s} {'lenient/strict':>15s}")
    for name, rate in parse_rates(probe.answers).items():
        ratio = f"{rate['lenient'] / rate['strict']:.1f}x" if rate["strict"] else "-"
        print(f"{name:22s} {rate['answers']:8d} {rate['strict']:7d} {rate['lenient']:8d} {ratio:>15s}")


if __name__ == "__main__":
    main()
