#!/usr/bin/env python
"""The in-process transformers judge on a real LongReward workload: plain prefill vs prefix caching.

One `LongRewardFunction` per judge scores the same answers (k answers to each of a few bundled long-context
questions, all four dimensions) in this process, one after the other, with greedy judge calls and no call cache, so
both judges see exactly the same requests. Plain = `TransformersJudge(prefix_cache_size=0)`: every request of a batch
is left-padded to the longest and prefilled in full, one batch per `max_tokens`. Cached = the default: the shared
instructions, worked examples and question of each prompt kind come from the prefix cache, each prompt's rest is
prefilled alone, and requests with different budgets share one `generate` call. Printed: both wall times, the ratio
plain / cached, the share of prompt tokens served from the cache, and whether every score is the same.

    python benchmarks/judge_prefix_cache.py                         # the embedded SmolLM2 on the CPU
    python benchmarks/judge_prefix_cache.py --questions 2 --answers 4 --json benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Small judge budgets as in the CPU demo (a little larger), greedy, one try, no verdict follow-up: the same work twice.
DEMO_BUDGETS = {
    "score_max_tokens": 64,
    "break_max_tokens": 96,
    "check_max_tokens": 48,
    "extract_max_tokens": 96,
    "max_statements": 1,
    "completeness_chunk_tokens": 1024,
    "max_attempts": 1,
    "first_temperature": 0.0,
    "verdict_parsing": "lenient",
    "max_missing_dimensions": 3,
    "retriever": "bm25",
}


def answers_for(rows: list[dict], k: int) -> list[dict]:
    """k answers per row that differ the way sampled answers do: the reference, a fragment, a hedge, a refusal."""
    variants = [
        lambda a: a,
        lambda a: a.split(".")[0] + ".",
        lambda a: f"I think {a[0].lower()}{a[1:]} But I am not sure.",
        lambda a: "The document does not say.",
    ]
    out = []
    for row in rows:
        for i in range(k):
            out.append({**row, "completion": variants[i % len(variants)](row["answer"])})
    return out


def run(judge, samples: list[dict]) -> tuple[float, list]:
    from trl_longreward import LongRewardFunction

    reward = LongRewardFunction(judge=judge, **DEMO_BUDGETS)
    try:
        started = time.perf_counter()
        judgements = reward.score(
            prompts=[s["question"] for s in samples],
            completions=[s["completion"] for s in samples],
            context=[s["context"] for s in samples],
            question=[s["question"] for s in samples],
        )
        return time.perf_counter() - started, [j.scores for j in judgements]
    finally:
        reward.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2, help="bundled English train questions")
    parser.add_argument("--answers", type=int, default=4, help="answers per question (k)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    from trl_longreward.data import load_long_qa
    from trl_longreward.judges.transformers_judge import TransformersJudge

    rows = [row for row in load_long_qa("train") if row["language"] == "en"][: args.questions]
    samples = answers_for(rows, args.answers)
    plain = TransformersJudge(prefix_cache_size=0)
    cached = TransformersJudge(plain.model, plain.tokenizer)
    plain_s, plain_scores = run(plain, samples)
    cached_s, cached_scores = run(cached, samples)
    share = cached.prefix_stats["cached_tokens"] / max(cached.prefix_stats["prompt_tokens"], 1)
    result = {
        "config": {"judge": plain.model_id, "device": str(plain.model.device), **DEMO_BUDGETS},
        "questions": len(rows),
        "answers": len(samples),
        "judge_requests": plain.stats.requests,
        "plain_seconds": plain_s,
        "cached_seconds": cached_s,
        "speedup": plain_s / cached_s,
        "cached_prompt_token_share": share,
        "same_scores": plain_scores == cached_scores,
    }
    print(
        f"{len(samples)} answers, {plain.stats.requests} judge calls each: plain {plain_s:.1f} s, prefix-cached "
        f"{cached_s:.1f} s, ratio {plain_s / cached_s:.2f}x; {share:.0%} of prompt tokens from the cache; "
        f"same scores: {plain_scores == cached_scores}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
