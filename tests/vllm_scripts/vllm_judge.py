"""In-process `VLLMJudge` on the CPU build of vLLM, built from a `LongRewardConfig` (run by tests/test_vllm_inprocess.py
with the vLLM environment's Python). Prints one JSON object on its last line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(model_dir: str, rows_path: str, cache_path: str, dtype: str) -> dict:
    from trl_longreward.judges.base import ChatRequest, JudgeError
    from trl_longreward.records import read_jsonl
    from trl_longreward.reward import LongRewardConfig, LongRewardFunction

    config = LongRewardConfig(
        judge_backend="vllm",
        judge_model=model_dir,
        # The engine's arguments, as a user passes them on the command line (a JSON object).
        judge_engine_kwargs=json.dumps({"enforce_eager": True, "max_model_len": 4096, "dtype": dtype, "seed": 0}),
        cache_path=cache_path,
        max_attempts=1,
        first_temperature=0.0,
        verdict_followup=True,
        verdict_parsing="lenient",
        score_max_tokens=32,
        break_max_tokens=64,
        check_max_tokens=32,
        extract_max_tokens=64,
        max_statements=1,
        completeness_chunk_tokens=1024,
        max_missing_dimensions=3,
        retriever="bm25",
    )
    start = time.perf_counter()
    reward = LongRewardFunction(config)
    judge = reward.judge
    engine_config = judge.llm.llm_engine.model_config
    built_s = time.perf_counter() - start
    rows = list(read_jsonl(Path(rows_path)))[:2]  # two rows: every dimension's pipeline, sized by judge calls
    start = time.perf_counter()
    judgements = reward.score(
        completions=[r["response"] for r in rows],
        context=[r["context"] for r in rows],
        question=[r["question"] for r in rows],
    )
    scored_s = time.perf_counter() - start
    counts = reward.call_counts()
    # Direct calls: a continuation of an assistant message, a new turn, and a prompt longer than the window.
    continued, fresh, too_long = judge.generate(
        [
            ChatRequest(
                messages=(
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is"},
                ),
                max_tokens=8,
            ),
            ChatRequest.from_prompt("What is the capital of France?", max_tokens=8),
            ChatRequest.from_prompt("word " * 5000, max_tokens=8),
        ]
    )
    identity = judge.cache_identity()
    # Structured verdicts on the same engine (vLLM's StructuredOutputsParams), the paper's strict parsing: every
    # verdict parses (an answer cut by its budget is completed by the follow-up, constrained to the verdict too).
    import dataclasses

    structured = LongRewardFunction(
        dataclasses.replace(config, verdict_decoding="structured", verdict_parsing="strict", cache_path=None),
        judge=judge,
    )
    structured_judgements = structured.score(
        completions=[r["response"] for r in rows[:1]],
        context=[r["context"] for r in rows[:1]],
        question=[r["question"] for r in rows[:1]],
    )
    structured_counts = structured.call_counts()
    reward.close()
    return {
        "engine": {
            "max_model_len": engine_config.max_model_len,
            "enforce_eager": bool(engine_config.enforce_eager),
            "dtype": str(engine_config.dtype),
            "seed": engine_config.seed,
        },
        "context_window": judge.context_window,
        "backend": type(judge).__name__,
        "rewards": [j.reward for j in judgements],
        "statuses": [j.status for j in judgements],
        "counts": counts,
        "continued": continued,
        "fresh": fresh,
        "too_long_error": str(too_long) if isinstance(too_long, JudgeError) else None,
        "identity_keys": sorted(identity),
        "structured_counts": structured_counts,
        "structured_rewards": [j.reward for j in structured_judgements],
        "built_s": built_s,
        "scored_s": scored_s,
    }


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from re-running this
    print(json.dumps(main(*sys.argv[1:5])), flush=True)
