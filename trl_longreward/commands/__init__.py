"""`trl-longreward` command line: one module per command, sharing helpers through the package's common modules.

    trl-longreward score --input data.jsonl --output scores.jsonl --judge_base_url URL --judge_model NAME
    trl-longreward build-pairs --model SFT_MODEL --input prompts.jsonl --output_dir pairs_out --judge_base_url URL ...
    trl-longreward evaluate --model SFT_MODEL DPO_MODEL --output_dir eval_out --judge_base_url URL ...
    trl-longreward merge-shards --shards shard_0 shard_1 --output_dir merged_out
    trl-longreward agreement --input pairs.jsonl --output_dir agreement_out --judge_base_url URL ...

`score` judges (context, question, response) rows (`commands/score.py`); `build-pairs` is the paper's offline
pipeline, k sampled responses per prompt judged and paired into a DPO dataset (`commands/build_pairs.py`);
`evaluate` answers a long-context QA set with each model and compares their LongReward (`commands/evaluate.py`).
`build-pairs` and `evaluate` split over N machines with `--shard_index I --num_shards N`; `merge-shards` joins the
shards' outputs into what one machine writes (the merge of each command lives in that command's module).
`agreement` measures how often LongReward, per judge and per dimension, prefers the answer people preferred
(`commands/agreement.py`).
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
  merge-shards join the outputs of a build-pairs or evaluate run split with --shard_index/--num_shards:
                 trl-longreward merge-shards --shards DIR [DIR ...] --output_dir DIR [--input FILE]
  agreement    how often LongReward (per judge, per dimension) prefers the answer people preferred:
                 trl-longreward agreement --output_dir DIR [--input FILE] [--judge_model A B ...] [options]

`trl-longreward COMMAND --help` lists the options of a command (the judge's included)."""
COMMANDS = ("score", "build-pairs", "evaluate", "merge-shards", "agreement")


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
    elif command == "merge-shards":
        return _merge_shards(HfArgumentParser, rest)
    elif command == "agreement":
        return _agreement(HfArgumentParser, LongRewardConfig, rest)
    else:
        print(f"trl-longreward: unknown command {command!r}; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _merge_shards(parser_class: type, rest: list[str]) -> int:
    """`merge-shards`: the command named in the shards' manifests merges them."""
    from ..shards import MergeShardsArguments, read_shards

    parser = parser_class(MergeShardsArguments, prog="trl-longreward merge-shards")
    (merge_args,) = parser.parse_args_into_dataclasses(rest)
    kind = read_shards(merge_args.shards)[0][1]["command"]
    if kind == "evaluate":
        from .evaluate import RESULTS_FILE, format_results, merge_evaluation_shards

        results = merge_evaluation_shards(merge_args)
        print(format_results(results))
        print(f"results: {Path(merge_args.output_dir) / RESULTS_FILE}")
        return 0
    from .build_pairs import merge_pair_shards

    print(json.dumps(merge_pair_shards(merge_args), indent=2, ensure_ascii=False))
    return 0


def _agreement(parser_class: type, config_class: type, rest: list[str]) -> int:
    """`agreement`: several `--judge_model` / `--judge_base_url` values are several judges, side by side."""
    from ..reward.agreement_table import format_results
    from .agreement import RESULTS_FILE, AgreementArguments, judge_configs, run_agreement, split_judge_flags

    rest, models, urls = split_judge_flags(rest)
    parser = parser_class((AgreementArguments, config_class), prog="trl-longreward agreement")
    args, config = parser.parse_args_into_dataclasses(rest)
    results = run_agreement(args, judge_configs(config, models, urls))
    print(format_results(results))
    calls, hits, failures = (sum(c.get(k, 0) for c in results["run"].values()) for k in ("judge_calls", "cache_hits",
                             "parse_failures"))  # fmt: skip
    rate = f", parse rate {(calls - failures) / calls:.3f}" if calls else ""
    print(f"this run: {calls} judge calls, {hits} cache hits, {failures} parse failures{rate}")
    print(f"results: {Path(args.output_dir) / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
