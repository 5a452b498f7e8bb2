#!/usr/bin/env python
"""The same judge work, two engines: the in-process transformers judge vs the vLLM OpenAI-compatible server.

Both score the 4 rows of the bundled `demo_score.jsonl` (all four dimensions) with the bundled SmolLM2-135M-Instruct
as judge, the CPU demo's judge budgets, greedy calls, no call cache, one after the other in this process. The vLLM
server (the CPU build, from the vLLM environment, `--enforce-eager`) is started first and its start-up time is
reported apart: it is paid once per run, not per step. Printed and written: both wall times, their ratio
transformers / vLLM, calls and parse failures of each, and how many rows each rewarded.

    python benchmarks/judge_backends.py --vllm_python .venv-vllm/bin/python
    python benchmarks/judge_backends.py --vllm_python .venv-vllm/bin/python --json benchmarks/results/judge_backends_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = Path(__file__).resolve().parent.parent / "trl_longreward" / "data" / "demo_score.jsonl"
# The CPU demo's judge budgets (recipes/dpo_longreward.py), greedy: both engines answer the same calls.
SETTINGS = {
    "max_attempts": 1,
    "first_temperature": 0.0,
    "verdict_followup": True,
    "verdict_parsing": "lenient",
    "score_max_tokens": 32,
    "break_max_tokens": 64,
    "check_max_tokens": 32,
    "extract_max_tokens": 64,
    "max_statements": 1,
    "completeness_chunk_tokens": 1024,
    "max_missing_dimensions": 3,
    "retriever": "bm25",
}


def _run(reward, rows) -> dict:
    start = time.perf_counter()
    judgements = reward.score(
        completions=[r["response"] for r in rows],
        context=[r["context"] for r in rows],
        question=[r["question"] for r in rows],
    )
    seconds = time.perf_counter() - start
    counts = reward.call_counts()
    reward.close()
    return {
        "seconds": round(seconds, 2),
        "judge_calls": counts["judge_calls"],
        "parse_failures": counts["parse_failures"],
        "verdict_followups": counts["verdict_followups"],
        "rows_rewarded": sum(j.reward is not None for j in judgements),
        "rewards": [j.reward for j in judgements],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm_python", default=".venv-vllm/bin/python", help="the vLLM environment's interpreter")
    parser.add_argument("--max_concurrency", type=int, default=16, help="judge calls in flight (both engines)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    from trl_longreward.judges.vllm_server import VLLMServer
    from trl_longreward.models import default_model_path
    from trl_longreward.records import read_jsonl
    from trl_longreward.reward import LongRewardFunction

    model = str(default_model_path())
    rows = list(read_jsonl(ROWS))
    results: dict = {
        "rows": len(rows),
        "judge": "SmolLM2-135M-Instruct (bundled)",
        "settings": SETTINGS,
        "max_concurrency": args.max_concurrency,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    reward = LongRewardFunction(
        judge_backend="transformers", judge_model=model, judge_max_concurrency=args.max_concurrency, **SETTINGS
    )
    results["transformers"] = _run(reward, rows)
    print(f"in-process transformers: {results['transformers']['seconds']:.1f} s", flush=True)

    start = time.perf_counter()
    with VLLMServer.start(model, python=args.vllm_python, served_model_name="judge", timeout=600) as server:
        results["vllm_server_start_seconds"] = round(time.perf_counter() - start, 1)
        reward = LongRewardFunction(
            judge_base_url=server.base_url,
            judge_model="judge",
            judge_max_concurrency=args.max_concurrency,
            **SETTINGS,
        )
        results["vllm_server"] = _run(reward, rows)
    print(
        f"vLLM server: {results['vllm_server']['seconds']:.1f} s (start-up {results['vllm_server_start_seconds']} s)"
    )
    import subprocess

    version = subprocess.run(
        [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
    ).stdout.strip()
    results["vllm_version"] = version.splitlines()[-1] if version else None
    results["ratio_transformers_over_vllm"] = round(
        results["transformers"]["seconds"] / results["vllm_server"]["seconds"], 2
    )
    print(f"ratio transformers / vLLM server: {results['ratio_transformers_over_vllm']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
