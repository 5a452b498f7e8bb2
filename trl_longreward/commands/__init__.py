"""`trl-longreward` command line: one module per command, sharing helpers through the package's common modules.

    trl-longreward score --input data.jsonl --output scores.jsonl --judge_base_url URL --judge_model NAME
    trl-longreward build-pairs --model SFT_MODEL --input prompts.jsonl --output_dir pairs_out --judge_base_url URL ...
    trl-longreward evaluate --model SFT_MODEL DPO_MODEL --output_dir eval_out --judge_base_url URL ...

`score` judges (context, question, response) rows (`commands/score.py`); `build-pairs` is the paper's offline
pipeline, k sampled responses per prompt judged and paired into a DPO dataset (`commands/build_pairs.py`);
`evaluate` answers a long-context QA set with each model and compares their LongReward (`commands/evaluate.py`).
All are resumable: finished rows are skipped and every judge call already paid for comes from the judge-call cache.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage: trl-longreward COMMAND [options]

commands:
  score        judge (context, question, response) rows:
                 trl-longreward score --input FILE --output FILE [options]
  build-pairs  sample k responses per prompt, judge them, save best-vs-worst DPO pairs:
                 trl-longreward build-pairs --model PATH --input FILE --output_dir DIR [options]
  evaluate     answer a long-context QA set with one or more models and score the answers:
                 trl-longreward evaluate --model PATH [PATH ...] --output_dir DIR [options]

`trl-longreward COMMAND --help` lists the options of a command (the judge's included)."""
COMMANDS = ("score", "build-pairs", "evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    from ..judges.base import JudgeFatalError

    try:
        return _main(argv)
    except JudgeFatalError as err:  # a rejected key, replicas of different models: say what to fix, no traceback
        print(f"trl-longreward: the judge cannot be used: {err}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    from transformers import HfArgumentParser

    from ..reward import LongRewardConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "score":
        from .score import ScoreArguments, run_score

        parser = HfArgumentParser((ScoreArguments, LongRewardConfig), prog="trl-longreward score")
        args, config = parser.parse_args_into_dataclasses(rest)
        summary = run_score(args, config)
    elif command == "build-pairs":
        from .build_pairs import BuildPairsArguments, build_pairs

        parser = HfArgumentParser((BuildPairsArguments, LongRewardConfig), prog="trl-longreward build-pairs")
        pair_args, config = parser.parse_args_into_dataclasses(rest)
        summary = build_pairs(pair_args, config)
    elif command == "evaluate":
        from .evaluate import RESULTS_FILE, EvaluateArguments, evaluate_models, format_results

        parser = HfArgumentParser((EvaluateArguments, LongRewardConfig), prog="trl-longreward evaluate")
        eval_args, config = parser.parse_args_into_dataclasses(rest)
        results = evaluate_models(eval_args, config)
        run = results["run"]
        print(format_results(results))
        print(
            f"this run: {run['new_answers']} new answers, {run['new_judgements']} answers judged, "
            f"{run['judge_calls']} judge calls, {run['cache_hits']} cache hits"
        )
        print(f"results: {Path(eval_args.output_dir) / RESULTS_FILE}")
        return 0
    else:
        print(f"trl-longreward: unknown command {command!r}; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
