"""`trl-longreward` command line: one module per command, sharing helpers through the package's common modules.

    trl-longreward dpo [--config FILE.yaml] [options]     (no options: the CPU demo)
    trl-longreward score --input data.jsonl --output scores.jsonl --judge_base_url URL --judge_model NAME
    trl-longreward build-pairs --model SFT_MODEL --input prompts.jsonl --output_dir pairs_out --judge_base_url URL ...
    trl-longreward evaluate --model SFT_MODEL DPO_MODEL --output_dir eval_out --judge_base_url URL ...
    trl-longreward merge-shards --shards shard_0 shard_1 --output_dir merged_out
    trl-longreward agreement --input pairs.jsonl --output_dir agreement_out --judge_base_url URL ...

`dpo` trains: online LongReward DPO (`commands/dpo.py`, also `accelerate launch recipes/dpo_longreward.py`).
`score` judges (context, question, response) rows (`commands/score.py`); `build-pairs` is the paper's offline
pipeline, k sampled responses per prompt judged and paired into a DPO dataset (`commands/build_pairs.py`);
`evaluate` answers a long-context QA set with each model and compares their LongReward (`commands/evaluate.py`).
`build-pairs` and `evaluate` split over N machines with `--shard_index I --num_shards N`; `merge-shards` joins the
shards' outputs into what one machine writes (the merge of each command lives in that command's module).
`agreement` measures how often LongReward, per judge and per dimension, prefers the answer people preferred
(`commands/agreement.py`).
All are resumable: finished rows are skipped and every judge call already paid for comes from the judge-call cache.
Every command reads its options from a YAML file too (`--config FILE.yaml`, keys named as the flags); flags given on
the command line win over the file, as in TRL's scripts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USAGE = """usage: trl-longreward COMMAND [options]

commands:
  dpo          online LongReward DPO: sample k answers per prompt, judge them, train on best vs worst
                 trl-longreward dpo [--config FILE.yaml] [options]      (no options: a CPU demo)
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

Every command takes `--config FILE.yaml` (keys named as the flags; flags win over the file).
`trl-longreward COMMAND --help` lists the options of a command (the judge's included)."""
CONFIG_HELP = (
    "--config FILE.yaml reads options from a YAML mapping (keys named as the options above, an `env` mapping sets "
    "environment variables); options given on the command line win over the file."
)
COMMANDS = ("dpo", "score", "build-pairs", "evaluate", "merge-shards", "agreement")


def main(argv: Sequence[str] | None = None) -> int:
    from ..judges.base import JudgeFatalError

    try:
        return _main(argv)
    except JudgeFatalError as err:  # a rejected key, replicas of different models: say what to fix, no traceback
        print(f"trl-longreward: the judge cannot be used: {err}", file=sys.stderr)
        return 1


def parse_with_config(parser: Any, argv: list[str], take: Sequence[str] = ()) -> tuple[tuple, dict[str, Any]]:
    """`parser`'s dataclasses from `argv` and its `--config FILE.yaml`, flags winning over the file (as TRL's
    `TrlParser.parse_args_and_config`: the file's keys become the defaults, its `env` mapping environment variables).

    The keys in `take` are taken out of the file and returned instead (for options a dataclass field cannot hold,
    such as several judges). An unknown key fails, naming it.
    """
    import yaml

    parser.epilog = CONFIG_HELP
    argv, taken, config = list(argv), {}, {}
    for index, item in enumerate(argv):
        if item == "--config" or item.startswith("--config="):
            path = item.partition("=")[2] or (argv[index + 1] if index + 1 < len(argv) else "")
            del argv[index : index + (1 if "=" in item else 2)]
            if not path:
                raise SystemExit("--config needs a YAML file: --config FILE.yaml")
            try:
                with open(path, encoding="utf-8") as handle:
                    config = yaml.safe_load(handle) or {}
            except OSError as err:
                raise SystemExit(f"--config {path}: {err.strerror or err}") from None
            if not isinstance(config, dict):
                raise SystemExit(f"--config {path} must hold a YAML mapping of option names to values.")
            break
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise SystemExit("--config: `env` must be a mapping of environment variables to values.")
    os.environ.update({str(key): str(value) for key, value in env.items()})
    taken = {key: config.pop(key) for key in take if key in config}
    unknown = [key for key in config if key not in {action.dest for action in parser._actions}]
    if unknown:
        raise SystemExit(f"--config: unknown option(s) {unknown}; `{parser.prog} --help` lists the options.")
    parser.set_defaults_with_config(**config)
    return parser.parse_args_into_dataclasses(argv), taken


def _main(argv: Sequence[str] | None) -> int:
    from trl import TrlParser  # HfArgumentParser plus config-file defaults

    from ..reward import LongRewardConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "dpo":
        from .dpo import run

        return run(rest, prog="trl-longreward dpo")
    if command == "score":
        from .score import ScoreArguments, run_score

        parser = TrlParser((ScoreArguments, LongRewardConfig), prog="trl-longreward score")
        (args, config), _ = parse_with_config(parser, rest)
        summary = run_score(args, config)
    elif command == "build-pairs":
        from .build_pairs import BuildPairsArguments, build_pairs

        parser = TrlParser((BuildPairsArguments, LongRewardConfig), prog="trl-longreward build-pairs")
        (pair_args, config), _ = parse_with_config(parser, rest)
        summary = build_pairs(pair_args, config)
    elif command == "evaluate":
        from .evaluate import RESULTS_FILE, EvaluateArguments, evaluate_models, format_results

        parser = TrlParser((EvaluateArguments, LongRewardConfig), prog="trl-longreward evaluate")
        (eval_args, config), _ = parse_with_config(parser, rest)
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
        return _merge_shards(TrlParser, rest)
    elif command == "agreement":
        return _agreement(TrlParser, LongRewardConfig, rest)
    else:
        print(f"trl-longreward: unknown command {command!r}; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _merge_shards(parser_class: type, rest: list[str]) -> int:
    """`merge-shards`: the command named in the shards' manifests merges them."""
    from ..shards import MergeShardsArguments, read_shards

    parser = parser_class(MergeShardsArguments, prog="trl-longreward merge-shards")
    (merge_args,), _ = parse_with_config(parser, rest)
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
    (args, config), taken = parse_with_config(parser, rest, take=("judge_model", "judge_base_url"))
    # Several judges in the file: `judge_model: [A, B]`, `judge_base_url: [URL_A, URL_B]`; flags win.
    models = models or _as_list(taken.get("judge_model"))
    urls = urls or _as_list(taken.get("judge_base_url"))
    results = run_agreement(args, judge_configs(config, models, urls))
    print(format_results(results))
    calls, hits, failures = (sum(c.get(k, 0) for c in results["run"].values()) for k in ("judge_calls", "cache_hits",
                             "parse_failures"))  # fmt: skip
    rate = f", parse rate {(calls - failures) / calls:.3f}" if calls else ""
    print(f"this run: {calls} judge calls, {hits} cache hits, {failures} parse failures{rate}")
    print(f"results: {Path(args.output_dir) / RESULTS_FILE}")
    return 0


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


if __name__ == "__main__":
    raise SystemExit(main())
