"""`trl-longreward agreement`: how often does LongReward, with your judge, prefer the answer people preferred?

    trl-longreward agreement --input pairs.jsonl --output_dir agreement_out \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct --pairwise true

The paper's central evidence (docs/method.md section 5): on 464 human-labelled long-context pairs LongReward agreed
with the label 0.662, a short-context reward model 0.583, the judge comparing the two answers directly 0.571, and
LongReward without helpfulness / logicality / faithfulness / completeness 0.631 / 0.623 / 0.578 / 0.578. This command
gives that table for your judges and your data: per judge, the agreement of LongReward, of each dimension alone and of
LongReward without each dimension (from the same judge calls), with a bootstrap confidence interval; optionally the
judge comparing the answers directly in both orders (`--pairwise true`) and sequence-classification reward models
(`--reward_model PATH`). Several judges go side by side: `--judge_model A B` (one endpoint or in-process), or
`--judge_base_url URL1 URL2` (one judge per URL; a comma joins replicas of one judge), or both, paired in order.

Input (`--input`, default the bundled demo set `trl_longreward/data/agreement_demo.jsonl`), `--layout`:
- `columns` (default): `context`, `question` (`--context_column`, `--question_column`), two answers
  (`--response_a_column`, `--response_b_column`) and the preferred one, "a" or "b" (`--preference_column`);
- `chosen_rejected`: `context`, `question`, `chosen`, `rejected` (`--chosen_column`, `--rejected_column`);
- `long_rewardbench`: Long-RewardBench's rows (LCM-Lab, Apache-2.0, not shipped here): `prompt_template` (chat
  messages whose user text holds the long context), `question`, `chosen`, `rejected` and `tasktype`; rows whose
  `tasktype` is not `pair` (the Best-of-N rows) are skipped.

Agreement = pairs where the preferred answer scored higher / pairs where both answers were scored (a tie counts as
compared, not as agreement: `summaries.win_rate`); ties and unscored pairs are reported apart. Written to
`--output_dir`: `judged.jsonl` (every distinct answer's scores and traces, per judge), `pairwise.jsonl`,
`reward_models.jsonl`, `results.json`, `agreement.html` (the table and a bar plot) and `judge_cache.sqlite`.
Resumable like `evaluate`: answers already judged by the same judge settings are not judged again, a line with a
failed judge call is, its answered calls coming from the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..documents import message_text
from ..judges.base import identity_digest
from ..records import check_judge_answered, judge_error_dimensions, load_jsonl, load_rows
from ..reward import LongRewardConfig, LongRewardFunction
from ..reward.agreement_table import bootstrap_interval, render_page
from ..reward.dimensions import FAILED, DimensionResult
from ..reward.function import aggregate
from ..reward.pairwise import FIRST, SECOND, TIE, PairwiseComparer
from ..summaries import win_rate

JUDGED_FILE = "judged.jsonl"
PAIRWISE_FILE = "pairwise.jsonl"
REWARD_MODELS_FILE = "reward_models.jsonl"
RESULTS_FILE = "results.json"
PAGE_FILE = "agreement.html"
JUDGE_CACHE_FILE = "judge_cache.sqlite"
LAYOUTS = ("columns", "chosen_rejected", "long_rewardbench")
# Settings that cannot change a judged score: left out of the judge identity a judged line is checked against.
_NOT_SCORING = ("judge_base_url", "judge_api_key_env", "judge_max_concurrency", "judge_endpoint_cooldown",
                "judge_timeout", "judge_max_retries", "cache_path", "show_progress")  # fmt: skip


@dataclass
class AgreementArguments:
    """Arguments of `trl-longreward agreement` (each judge is configured by `LongRewardConfig`)."""

    output_dir: str = field(metadata={"help": "Directory for judged.jsonl, results.json, agreement.html, the cache."})
    input: str | None = field(
        default=None, metadata={"help": "JSONL/JSON/Parquet/CSV file or datasets directory; default: the demo set."}
    )
    layout: Literal["columns", "chosen_rejected", "long_rewardbench"] = field(
        default="columns",
        metadata={"help": "columns (two answers + a, b label), chosen_rejected, or long_rewardbench (pair rows)."},
    )
    response_a_column: str = field(default="response_a", metadata={"help": "Column of the first answer."})
    response_b_column: str = field(default="response_b", metadata={"help": "Column of the second answer."})
    preference_column: str = field(
        default="preferred", metadata={"help": "Column naming the answer people preferred: a or b."}
    )
    chosen_column: str = field(default="chosen", metadata={"help": "Preferred answer (chosen_rejected layout)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Other answer (chosen_rejected layout)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N pairs."})
    pairwise: bool = field(
        default=False, metadata={"help": "Also ask each judge to compare the two answers directly (both orders)."}
    )
    reward_model: list[str] = field(
        default_factory=list, metadata={"help": "Sequence-classification reward models to compare as baselines."}
    )
    reward_model_max_length: int = field(
        default=8192, metadata={"help": "Reward-model token budget; longer documents are cut in the middle."}
    )
    resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples of the confidence intervals."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    judge_batch_size: int = field(
        default=32, metadata={"help": "Answers judged together (all their calls in flight)."}
    )
    tie_margin: float = field(default=0.0, metadata={"help": "Score differences up to this count as ties."})

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}: use one of {', '.join(LAYOUTS)}.")
        if isinstance(self.reward_model, str):
            self.reward_model = [self.reward_model]
        if self.resamples < 1 or not 0 < self.confidence < 1:
            raise ValueError("--resamples must be >= 1 and --confidence in (0, 1), e.g. 0.95.")
        if self.judge_batch_size < 1 or self.tie_margin < 0:
            raise ValueError("--judge_batch_size must be >= 1 and --tie_margin >= 0.")


@dataclass(frozen=True)
class Pair:
    """One labelled pair: the document, the question, the answers as given (a, b) and which one people preferred."""

    context: str
    question: str
    response_a: str
    response_b: str
    preferred: str  # "a" or "b"

    @property
    def chosen(self) -> str:
        return self.response_a if self.preferred == "a" else self.response_b

    @property
    def rejected(self) -> str:
        return self.response_b if self.preferred == "a" else self.response_a


def answer_digest(context: str, question: str, response: str) -> str:
    """What identifies a judged answer: a hash of its document, question and text."""
    return hashlib.sha256(f"{context}\x00{question}\x00{response}".encode()).hexdigest()


# ----- input -----


def load_pairs(args: AgreementArguments, config: LongRewardConfig) -> list[Pair]:
    """The labelled pairs of `--input` in `--layout`, with errors that name the missing column and the fix."""
    if args.input is None:
        from ..data import agreement_demo_path

        rows = load_rows(str(agreement_demo_path()))
    else:
        rows = load_rows(args.input)
    columns = set(rows.column_names)
    if args.layout == "long_rewardbench":
        needed = {"prompt_template": "--layout long_rewardbench", "question": "--layout long_rewardbench"}
        needed.update({args.chosen_column: "--chosen_column", args.rejected_column: "--rejected_column"})
    else:
        needed = {config.context_column: "--context_column", config.question_column: "--question_column"}
        if args.layout == "chosen_rejected":
            needed.update({args.chosen_column: "--chosen_column", args.rejected_column: "--rejected_column"})
        else:
            needed.update(
                {
                    args.response_a_column: "--response_a_column",
                    args.response_b_column: "--response_b_column",
                    args.preference_column: "--preference_column",
                }
            )
    for column, option in needed.items():
        if column not in columns:
            raise ValueError(
                f"The input has no column {column!r} (columns: {sorted(columns)}); name the right one with {option}, "
                f"or pick another --layout ({', '.join(LAYOUTS)})."
            )
    pairs = [_pair(rows[i], i, args, config) for i in range(len(rows))]
    pairs = [pair for pair in pairs if pair is not None]
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        raise ValueError("The input holds no labelled pair to measure agreement on.")
    return pairs


def _pair(row: dict[str, Any], index: int, args: AgreementArguments, config: LongRewardConfig) -> Pair | None:
    if args.layout == "long_rewardbench":
        if str(row.get("tasktype", "pair")).lower() != "pair":
            return None  # a Best-of-N row
        context = message_text(row["prompt_template"], what="prompt_template", index=index, role="user")
        return Pair(context, row["question"], row[args.chosen_column], row[args.rejected_column], "a")
    context, question = row[config.context_column], row[config.question_column]
    if args.layout == "chosen_rejected":
        return Pair(context, question, row[args.chosen_column], row[args.rejected_column], "a")
    label = str(row[args.preference_column]).strip().lower()
    if label not in ("a", "b"):
        raise ValueError(
            f"Row {index}: --preference_column {args.preference_column!r} holds {row[args.preference_column]!r}; "
            "it must name the preferred answer as a or b (or use --layout chosen_rejected)."
        )
    return Pair(context, question, row[args.response_a_column], row[args.response_b_column], label)


def judge_configs(
    config: LongRewardConfig, models: list[str] | None = None, urls: list[str] | None = None
) -> dict[str, LongRewardConfig]:
    """One `LongRewardConfig` per judge, named for the table: several `--judge_model`s, several `--judge_base_url`s
    (a comma inside one joins replicas of one judge), or both, paired in order."""
    models, urls = list(models or []), list(urls or [])
    if len(models) > 1 and len(urls) > 1 and len(models) != len(urls):
        raise ValueError(
            f"{len(models)} --judge_model values and {len(urls)} --judge_base_url values: give one URL per model, "
            "one URL for every model, or one model for every URL."
        )
    count = max(len(models), len(urls), 1)
    judges: dict[str, LongRewardConfig] = {}
    for i in range(count):
        model = models[i if len(models) > 1 else 0] if models else config.judge_model
        url = urls[i if len(urls) > 1 else 0] if urls else config.judge_base_url
        name = model or "SmolLM2-135M-Instruct"
        if name in judges or (len(urls) > 1 and len(models) <= 1):
            name = f"{name} @ {url}"
        judges[name] = dataclasses.replace(config, judge_model=model, judge_base_url=url)
    return judges


def split_judge_flags(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Take every value of `--judge_model` and `--judge_base_url` out of `argv` (each may list several judges)."""
    rest: list[str] = []
    found: dict[str, list[str]] = {"--judge_model": [], "--judge_base_url": []}
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag in found:
            if inline:
                found[flag].append(inline)
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                found[flag].append(argv[i])
                i += 1
            continue
        rest.append(argv[i])
        i += 1
    return rest, found["--judge_model"], found["--judge_base_url"]


# ----- statistics -----


def agreement_of(chosen: list[float | None], rejected: list[float | None], args: AgreementArguments) -> dict[str, Any]:
    """Agree / tie / disagree / unscored counts, the agreement over the compared pairs and its interval."""
    counts = win_rate(chosen, rejected, tie_margin=args.tie_margin)
    outcomes = [
        1 if c - r > args.tie_margin else 0 for c, r in zip(chosen, rejected, strict=True) if None not in (c, r)
    ]
    interval = bootstrap_interval(outcomes, resamples=args.resamples, confidence=args.confidence, seed=args.seed)
    return {
        "agree": counts["wins"],
        "ties": counts["ties"],
        "disagree": counts["losses"],
        "unscored": counts["unscored"],
        "compared": counts["compared"],
        "agreement": counts["win_rate"],
        "interval": interval,
    }


def _value(record: dict[str, Any] | None, method: str, config: LongRewardConfig) -> float | None:
    """An answer's value under `method`: `longreward`, a dimension alone, or `without_<dimension>`."""
    if record is None:
        return None
    if method == "longreward":
        return record.get("reward")
    if not method.startswith("without_"):
        return record["scores"].get(method)
    left_out = method.removeprefix("without_")
    results = {
        d: DimensionResult(score=record["scores"].get(d), status=record["status"].get(d, FAILED))
        for d in config.dimensions
        if d != left_out
    }
    return aggregate(results, config)


def methods_of(config: LongRewardConfig) -> list[str]:
    """The table's LongReward rows for a judge: LongReward, each dimension alone, LongReward without each."""
    dims = list(config.dimensions)
    return ["longreward", *dims, *([f"without_{d}" for d in dims] if len(dims) > 1 else [])]


# ----- the command -----


def judge_identity(name: str, config: LongRewardConfig) -> dict[str, Any]:
    """Who judged with which scoring settings: a judged line of other settings is judged again."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_SCORING}
    return {"name": name, "backend": config.judge_backend, "model": config.judge_model,
            "settings": identity_digest(settings)}  # fmt: skip


def run_agreement(args: AgreementArguments, judges: dict[str, LongRewardConfig]) -> dict[str, Any]:
    """Judge what is missing, write `results.json` and `agreement.html`; return the results and this run's cost."""
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(judges.values()))
    pairs = load_pairs(args, first)
    answers = {answer_digest(p.context, p.question, r): (p.context, p.question, r)
               for p in pairs for r in (p.response_a, p.response_b)}  # fmt: skip
    judged = _records(out / JUDGED_FILE, "answer_sha")
    compared = _records(out / PAIRWISE_FILE, "pair_sha")
    run: dict[str, dict[str, int]] = {}
    total = len(judges) * (len(answers) + (len(pairs) if args.pairwise else 0))
    with tqdm(total=total, desc="agreement", unit="item") as bar:
        for name, config in judges.items():
            if config.cache_path is None:
                config = dataclasses.replace(config, cache_path=str(out / JUDGE_CACHE_FILE))
            identity = judge_identity(name, config)
            todo = [k for k in answers if _stale(judged.get((name, k)), identity)]
            todo_pairs = [p for p in pairs if args.pairwise and _stale(compared.get((name, _pair_sha(p))), identity)]
            bar.update(len(answers) - len(todo) + (len(pairs) - len(todo_pairs) if args.pairwise else 0))
            if not todo and not todo_pairs:
                continue
            reward = LongRewardFunction(config)
            try:
                run[name] = _judge_answers(reward, name, identity, todo, answers, judged, out, args, bar)
                if todo_pairs:
                    cost = _compare_pairs(reward, name, identity, todo_pairs, compared, out / PAIRWISE_FILE, bar)
                    run[name] = {k: run[name].get(k, 0) + v for k, v in cost.items()}
            finally:
                reward.close()
    model_scores = _reward_model_scores(args, answers, out / REWARD_MODELS_FILE) if args.reward_model else {}
    results = _results(args, judges, pairs, judged, compared, model_scores)
    _write_atomically(out / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    _write_atomically(out / PAGE_FILE, render_page(results))
    return {**results, "run": run}


def _pair_sha(pair: Pair) -> str:
    return answer_digest(pair.context, pair.question, f"{pair.response_a}\x00{pair.response_b}")


def _records(path: Path, key: str) -> dict[tuple[str, str], dict[str, Any]]:
    def keyed(record: dict[str, Any]) -> bool:
        return isinstance(record.get("judge"), dict) and isinstance(record.get(key), str)

    return {(r["judge"]["name"], r[key]): r for r in load_jsonl(path, keep=keyed)}


def _stale(record: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    return record is None or record["judge"] != identity or bool(record.get("judge_errors"))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _judge_answers(reward, name, identity, todo, answers, judged, out, args, bar) -> dict[str, int]:
    """Score the answers `todo` in batches, appending one judged.jsonl line per answer."""
    config = reward.config
    path = out / JUDGED_FILE
    with path.open("a", encoding="utf-8") as sink:
        for start in range(0, len(todo), args.judge_batch_size):
            batch = todo[start : start + args.judge_batch_size]
            contexts, questions, texts = zip(*(answers[k] for k in batch), strict=True)
            with reward.counting() as cost:
                judgements = reward.score(
                    completions=list(texts),
                    **{config.context_column: list(contexts), config.question_column: list(questions)},
                )
            check_judge_answered(judgements, cost.totals(), rows=f"{len(batch)} answers", output=path)
            for key, judgement in zip(batch, judgements, strict=True):
                data = judgement.to_dict()
                record = {"judge": identity, "answer_sha": key, **{k: data[k] for k in ("reward", "scores", "status")}}
                record.update(trace=data["trace"], judge_errors=judge_error_dimensions(judgement.trace))
                judged[(name, key)] = record
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(len(batch))
    return reward.call_counts()


def _compare_pairs(reward, name, identity, todo, compared, path, bar) -> dict[str, int]:
    """Ask the judge to compare each pair directly, both orders; one pairwise.jsonl line per pair."""
    comparer = PairwiseComparer(reward)
    found = comparer.compare(
        [p.context for p in todo],
        [p.question for p in todo],
        [p.response_a for p in todo],
        [p.response_b for p in todo],
    )
    with path.open("a", encoding="utf-8") as sink:
        for pair, result in zip(todo, found, strict=True):
            errors = [o["error"] for o in result["orders"] if (o["error"] or "").startswith("judge_error")]
            record = {"judge": identity, "pair_sha": _pair_sha(pair), **result, "judge_errors": errors}
            compared[(name, record["pair_sha"])] = record
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    bar.update(len(todo))
    return comparer.stats()


def _reward_model_scores(args: AgreementArguments, answers: dict, path: Path) -> dict[str, dict[str, float | None]]:
    """Each requested reward model's score of each answer (`reward_models.jsonl`, resumable; a score read with
    another `--reward_model_max_length` is scored again)."""
    from ..reward.reward_model import score_answers

    stored: dict[str, dict[str, float | None]] = {}
    for record in load_jsonl(path, keep=lambda r: isinstance(r.get("reward_model"), str)):
        if record.get("max_length") == args.reward_model_max_length:
            stored.setdefault(record["reward_model"], {})[record["answer_sha"]] = record["score"]
    with path.open("a", encoding="utf-8") as sink:
        for model in args.reward_model:
            have = stored.setdefault(model, {})
            todo = [k for k in answers if k not in have]
            if not todo:
                continue
            scores = score_answers(model, [answers[k] for k in todo], max_length=args.reward_model_max_length)
            for key, score in zip(todo, scores, strict=True):
                have[key] = score
                record = {"reward_model": model, "answer_sha": key, "score": score,
                          "max_length": args.reward_model_max_length}  # fmt: skip
                sink.write(json.dumps(record) + "\n")
            sink.flush()
    return {model: stored[model] for model in args.reward_model}


def _results(args, judges, pairs, judged, compared, model_scores) -> dict[str, Any]:
    """Per judge, the agreement of every method; per reward model, its agreement; and the configuration."""
    table: dict[str, dict[str, Any]] = {}
    for name, config in judges.items():
        row: dict[str, Any] = {}
        for method in methods_of(config):
            chosen, rejected = (
                [
                    _value(judged.get((name, answer_digest(p.context, p.question, text(p)))), method, config)
                    for p in pairs
                ]
                for text in (lambda p: p.chosen, lambda p: p.rejected)
            )
            row[method] = agreement_of(chosen, rejected, args)
        if args.pairwise:
            verdicts = [(compared.get((name, _pair_sha(p))) or {}).get("verdict") for p in pairs]
            chosen, rejected = _pairwise_values(pairs, verdicts)
            row["pairwise"] = agreement_of(chosen, rejected, args)
        table[name] = row
    models = {}
    for model, scores in model_scores.items():
        chosen = [scores.get(answer_digest(p.context, p.question, p.chosen)) for p in pairs]
        rejected = [scores.get(answer_digest(p.context, p.question, p.rejected)) for p in pairs]
        models[f"reward_model:{model}"] = agreement_of(chosen, rejected, args)
    return {
        "pairs": len(pairs),
        "judges": table,
        "reward_models": models,
        "config": {
            "input": args.input or "bundled agreement demo set",
            "layout": args.layout,
            "judges": {
                name: judge_identity(name, config)
                | {
                    "verdict_decoding": config.verdict_decoding,
                    "verdict_parsing": config.verdict_parsing,
                    "verdict_followup": config.verdict_followup,
                }
                for name, config in judges.items()
            },  # fmt: skip
            "pairwise": args.pairwise,
            "reward_models": list(args.reward_model),
            "bootstrap": {"resamples": args.resamples, "confidence": args.confidence, "seed": args.seed},
            "tie_margin": args.tie_margin,
        },
    }


def _pairwise_values(pairs: list[Pair], verdicts: list[str | None]) -> tuple[list, list]:
    """The direct comparison as scores (1 for the answer picked, 0 for the other, equal for a tie)."""
    chosen: list[float | None] = []
    rejected: list[float | None] = []
    for pair, verdict in zip(pairs, verdicts, strict=True):
        if verdict is None:
            chosen.append(None)
            rejected.append(None)
        elif verdict == TIE:
            chosen.append(0.0)
            rejected.append(0.0)
        else:
            picked = "a" if verdict == FIRST else "b"
            assert verdict in (FIRST, SECOND)
            chosen.append(1.0 if picked == pair.preferred else 0.0)
            rejected.append(0.0 if picked == pair.preferred else 1.0)
    return chosen, rejected
