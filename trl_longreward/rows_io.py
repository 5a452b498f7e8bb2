"""Reading row files, resuming append-only JSONL outputs, and refusing to record batches the judge never answered
(shared by the command-line tools)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load_rows(path: str) -> Any:
    """A `datasets.Dataset` from a file or a `save_to_disk` directory, with a clear error for anything else."""
    import datasets

    source = Path(path)
    if source.is_dir():
        return datasets.load_from_disk(str(source))
    if not source.is_file():
        raise FileNotFoundError(f"--input {path!r} does not exist.")
    suffix = source.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
    if builder is None:
        raise ValueError(f"--input {path!r}: use a .jsonl, .json, .parquet or .csv file, or a datasets directory.")
    if builder != "parquet" and _is_blank(source):
        # datasets would fail with a bare StopIteration on a file without a single row.
        raise ValueError(f"--input {path!r} is empty: it holds no rows.")
    return datasets.load_dataset(builder, data_files=str(source), split="train")


def _is_blank(path: Path) -> bool:
    """Whether a text file holds nothing but whitespace (read until the first other byte)."""
    with path.open("rb") as handle:
        while block := handle.read(1 << 16):
            if block.strip():
                return False
    return True


def resume_jsonl(output: Path) -> set[int]:
    """Indices already judged for good. Dropped (the file rewritten atomically) and judged again: a line cut short by
    a crash, and a line recording a judge error (`judge_errors`: dimensions whose judge call failed, e.g. the server
    went down mid-run). Their judge calls that were answered come from the cache, so only the failed ones are paid
    for again. An unparseable verdict is an answer, not an error: it stays (a rerun would read the same cached text)."""
    done: set[int] = set()
    if not output.exists():
        return done
    kept: list[str] = []
    dropped = False
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            index = int(record["index"])
        except (ValueError, KeyError, TypeError):
            dropped = True
            continue
        if isinstance(record, dict) and record.get("judge_errors"):
            dropped = True
            continue
        done.add(index)
        kept.append(line)
    if dropped:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, output)
    return done


def judge_error_dimensions(trace: dict[str, Any]) -> list[str]:
    """The dimensions of a judgement trace whose judge call failed (not: answered without a parseable verdict)."""
    return [name for name, part in trace.items() if _first_judge_error(part) is not None]


def _first_judge_error(value: Any) -> str | None:
    """The first `judge_error: ...` text in a (nested) judgement trace."""
    if isinstance(value, str):
        return value.removeprefix("judge_error: ") if value.startswith("judge_error: ") else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _first_judge_error(item)
        if found is not None:
            return found
    return None


def check_judge_answered(reward: Any, before: dict[str, int], *, rows: str, output: Path) -> None:
    """Refuse to record a batch of which the judge answered no call at all (server down, wrong URL, not an
    OpenAI-compatible API): its rows would be written as unscored, and a rerun would skip them. `before` is
    `reward.runner.counters.totals()` taken before the batch; raises `RuntimeError` with the judge's first error."""
    after = reward.runner.counters.totals()
    sent = after["judge_calls"] - before["judge_calls"]
    failed = after["judge_errors"] - before["judge_errors"]
    if sent == 0 or failed < sent:
        return
    error = _first_judge_error([j.trace for j in reward.last_judgements]) or "(no error text)"
    raise RuntimeError(
        f"The judge answered none of the {sent} judge calls for {rows}, so nothing was written for them. First "
        f"error: {error} Fix the judge (is its server running? is --judge_base_url right?) and rerun the same "
        f"command: what {output} already holds is kept and not judged again."
    )


def prompt_groups(
    rows: Any, todo: list[int], batch_size: int, tokenizer: Any, config: Any, max_prompt_length: int | None
) -> tuple[list[list[int]], Any, dict[int, int]]:
    """The fixed generation groups [g*B, (g+1)*B) that hold a row still to do, their prompts tokenized, and each
    row index's position among them: `(groups, prepared, position)`, so row i's prompt is `prepared[position[i]]`.

    Groups never depend on what is done already, so a group's seed draws the same samples in a resumed run.
    `config` is the `LongRewardConfig` that names the context/question columns and the prompt separator.
    """
    from .trainer.prompts import prepare_prompt_dataset

    starts = sorted({i // batch_size * batch_size for i in todo})
    groups = [list(range(start, min(start + batch_size, len(rows)))) for start in starts]
    needed = [i for group in groups for i in group]
    prepared = prepare_prompt_dataset(
        rows.select(needed),
        tokenizer,
        max_prompt_length=max_prompt_length,
        context_column=config.context_column,
        question_column=config.question_column,
        separator=config.prompt_separator,
    )
    return groups, prepared, {index: pos for pos, index in enumerate(needed)}
