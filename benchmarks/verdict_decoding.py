"""Verdict decoding with a weak judge: strict parsing vs lenient parsing + follow-up vs structured verdicts.

    .venv/bin/python benchmarks/verdict_decoding.py --json benchmarks/results/verdict_decoding_smollm2.json

The embedded SmolLM2-135M-Instruct judges the bundled agreement set (`trl_longreward/data/agreement_demo.jsonl`,
8 pairs, 12 distinct answers) three times through `trl-longreward agreement`, each from an empty cache, greedy, one
try per call (`max_attempts=1`), scoring helpfulness and logicality (the verdict calls that need no document; see `DIMENSIONS`) with a 48-token
budget:
- `strict`: the paper (`verdict_parsing="strict"`, no follow-up, free decoding);
- `lenient+followup`: the weak-judge deviations (`verdict_parsing="lenient"`, `verdict_followup=True`); its first
  answers are the same greedy calls as `strict`'s;
- `structured`: `verdict_decoding="structured"` with strict parsing.
Reported per mode: the parse rate of the calls (calls that gave a valid verdict / calls, follow-ups not counted as
calls), the share of answers with a LongReward, and the agreement table (LongReward, each dimension alone, without
each). A 135M judge is noise: the figures show the parsing machinery, not a judge worth using.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

MODES = {
    "strict": {"verdict_parsing": "strict", "verdict_followup": False, "verdict_decoding": "free"},
    "lenient+followup": {"verdict_parsing": "lenient", "verdict_followup": True, "verdict_decoding": "free"},
    "structured": {"verdict_parsing": "strict", "verdict_followup": False, "verdict_decoding": "structured"},
}
BUDGETS = {"score_max_tokens": 48}
# The verdict calls that need no document: 2 CPU cores judge all 12 answers in each mode in minutes. Faithfulness
# checks and completeness scores end in the same kind of verdict; statement lists and notes are not constrained.
DIMENSIONS = ["helpfulness", "logicality"]


def run_mode(name: str, settings: dict, out: Path, limit: int | None) -> dict:
    from trl_longreward.commands.agreement import AgreementArguments, load_jsonl, run_agreement
    from trl_longreward.reward import LongRewardConfig

    config = LongRewardConfig(
        judge_backend="transformers", retriever="bm25", max_attempts=1, first_temperature=0.0,
        dimensions=DIMENSIONS, max_missing_dimensions=1, **BUDGETS, **settings,
    )  # fmt: skip
    args = AgreementArguments(output_dir=str(out / name), limit=limit)
    start = time.perf_counter()
    results = run_agreement(args, {name: config})
    seconds = time.perf_counter() - start
    cost = results["run"][name]
    calls = cost["judge_calls"] - cost["verdict_followups"]
    judged = load_jsonl(out / name / "judged.jsonl")
    table = results["judges"][name]
    return {
        "settings": settings,
        "judge_calls": calls,
        "verdict_followups": cost["verdict_followups"],
        "parse_failures": cost["parse_failures"],
        "parse_rate": (calls - cost["parse_failures"]) / calls if calls else None,
        "answers": len(judged),
        "answers_with_reward": sum(r["reward"] is not None for r in judged),
        "dimension_scored": {d: sum(r["scores"].get(d) is not None for r in judged) for d in config.dimensions},
        "agreement": {m: {k: v for k, v in e.items()} for m, e in table.items()},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    cli = parser.parse_args()
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "judge": "SmolLM2-135M-Instruct",
              "data": "bundled agreement demo set", "dimensions": DIMENSIONS, "budgets": BUDGETS,
              "max_attempts": 1, "modes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in MODES.items():
            report["modes"][name] = found = run_mode(name, settings, Path(tmp), cli.limit)
            lr = found["agreement"]["longreward"]
            rate = "-" if lr["agreement"] is None else f"{lr['agreement']:.3f}"
            print(
                f"{name:18s} parse rate {found['parse_rate']:.3f} ({found['judge_calls']} calls, "
                f"{found['verdict_followups']} follow-ups), answers with a reward {found['answers_with_reward']}/"
                f"{found['answers']}, LongReward agreement {rate} ({lr['agree']}/{lr['compared']}, "
                f"{lr['ties']} ties, {lr['unscored']} unscored), {found['seconds']} s"
            )
    if cli.json:
        Path(cli.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
