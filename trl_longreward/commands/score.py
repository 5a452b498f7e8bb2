"""`trl-longreward score`: judge (context, question, response) rows with LongReward.

    trl-longreward score --input data.jsonl --output scores.jsonl \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct

Reads rows from a JSONL/JSON/Parquet/CSV file or a `datasets` directory, judges them and appends one JSON line per
row to `--output` (reward, per-dimension scores and statuses, and the judge traces). Resumable: rows already in the
output are skipped, and every judge call already paid for is answered from the judge-call cache (default:
`<output>.judge_cache.sqlite`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..documents import message_text
from ..records import (
    check_judge_answered,
    judge_error_dimensions,
    load_rows,
    permanent_error_dimensions,
    read_jsonl,
    resume_jsonl,
)
from ..reward import LongRewardConfig, LongRewardFunction
from ..reward.inputs import resolve_samples


@dataclass
class ScoreArguments:
    input: str = field(metadata={"help": "JSONL/JSON/Parquet file or a datasets directory (save_to_disk)."})
    output: str = field(metadata={"help": "JSONL file the judgements are appended to (resumable)."})
    response_column: str = field(default="response", metadata={"help": "Column holding the response to judge."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column with context + separator + question, used without context."}
    )
    batch_size: int = field(default=16, metadata={"help": "Rows judged together (all their calls in flight)."})
    traces: bool = field(default=True, metadata={"help": "Write the judge traces next to the scores."})
    limit: int | None = field(default=None, metadata={"help": "Judge only the first N rows."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1 (rows judged together), got {self.batch_size}.")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0 (rows to judge), got {self.limit}.")


def check_score_rows(rows: Any, indices: list[int], args: ScoreArguments, config: LongRewardConfig) -> None:
    """Every row to judge needs a response, a document and a question: check them all before the first judge call,
    so a bad row fails the run at once, named by its row number in --input (counted from 0)."""
    columns = set(rows.column_names)
    for start in range(0, len(indices), 256):  # in slices: never every document in memory at once
        chunk = indices[start : start + 256]
        batch = rows.select(chunk)
        try:
            responses = batch[args.response_column]
            for index, response in zip(chunk, responses, strict=True):
                message_text(response, what=args.response_column, index=index, role="assistant")
            resolve_samples(
                batch[args.prompt_column] if args.prompt_column in columns else None,
                responses,
                {c: batch[c] for c in (config.context_column, config.question_column) if c in columns},
                context_column=config.context_column,
                question_column=config.question_column,
                separator=config.prompt_separator,
                row_ids=chunk,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"--input {args.input}: {err} Fix or drop that row and rerun (rows are counted from 0; rows already "
                f"in --output are kept)."
            ) from err


def run_score(args: ScoreArguments, config: LongRewardConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    rows = load_rows(args.input)
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    columns = set(rows.column_names)
    if args.response_column not in columns:
        raise ValueError(
            f"--input has no {args.response_column!r} column (columns: {sorted(columns)}); "
            "set --response_column to the column holding the answers."
        )
    has_context = config.context_column in columns
    if not has_context and args.prompt_column not in columns:
        raise ValueError(
            f"--input needs a {config.context_column!r} column (and {config.question_column!r}), or a "
            f"{args.prompt_column!r} column written as context + separator + question (columns: {sorted(columns)})."
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if config.cache_path is None:  # a copy: the caller's config is left as it was
        config = dataclasses.replace(config, cache_path=str(output) + ".judge_cache.sqlite")
    done = resume_jsonl(output)
    todo = [i for i in range(len(rows)) if i not in done]
    check_score_rows(rows, todo, args, config)
    reward = LongRewardFunction(config)
    try:
        with output.open("a", encoding="utf-8") as sink, tqdm(total=len(rows), initial=len(done), desc="score") as bar:
            for start in range(0, len(todo), args.batch_size):
                indices = todo[start : start + args.batch_size]
                batch = rows.select(indices)
                kwargs = {c: batch[c] for c in (config.context_column, config.question_column) if c in columns}
                prompts = batch[args.prompt_column] if args.prompt_column in columns else None
                with reward.counting() as cost:
                    judgements = reward.score(prompts=prompts, completions=batch[args.response_column], **kwargs)
                check_judge_answered(
                    judgements, cost.totals(), rows=f"rows {indices[0]}-{indices[-1]} of --input", output=output
                )
                for index, judgement in zip(indices, judgements, strict=True):
                    record = {"index": index, **judgement.to_dict()}
                    record["judge_errors"] = judge_error_dimensions(judgement.trace)  # judged again on resume
                    # refused by the judge for good (e.g. over its context window): kept, the refusal is cached
                    record["permanent_judge_errors"] = permanent_error_dimensions(judgement.trace)
                    if not args.traces:
                        record.pop("trace")
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(len(indices))
                bar.set_postfix(reward.call_counts())
    finally:
        reward.close()
    summary = summarize(output, config.dimensions)
    summary["judge"] = reward.stats()
    return summary


def summarize(output: Path, dimensions: Sequence[str]) -> dict[str, Any]:
    records = list(read_jsonl(output))
    summary: dict[str, Any] = {"rows": len(records)}
    failed = sum(1 for r in records if r.get("judge_errors"))
    if failed:
        summary["rows_with_judge_errors"] = failed
        print(
            f"{failed} rows have dimensions whose judge call failed (see judge_errors in {output}); rerun the same "
            "command to judge them again: the calls that were answered come from the cache.",
            file=sys.stderr,
        )
    refused = sum(1 for r in records if r.get("permanent_judge_errors"))
    if refused:
        summary["rows_with_permanent_judge_errors"] = refused
        print(
            f"{refused} rows have dimensions the judge refused to judge (see permanent_judge_errors in {output}, e.g. "
            "a prompt over its context window); a rerun does not send those calls again: shorten the input or use a "
            "judge with a larger window (its judge_fingerprint or its reported context window keys the refusals).",
            file=sys.stderr,
        )
    for name in [*dimensions, "reward"]:
        values = [r["reward"] if name == "reward" else r["scores"].get(name) for r in records]
        present = [v for v in values if v is not None]
        summary[name] = {
            "mean": sum(present) / len(present) if present else None,
            "scored": len(present),
            "missing": len(values) - len(present),
        }
    return summary
