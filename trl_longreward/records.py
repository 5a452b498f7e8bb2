"""Row files in, append-only JSONL out: loading tables, the one resumable-JSONL reader, and refusing to record
batches the judge never answered (shared by the commands, the recipe and the callback)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(path: str, *, split: str = "train", option: str = "--input") -> Any:
    """A `datasets.Dataset` from a file or a `save_to_disk` directory (a `DatasetDict` gives `split`), with a clear
    error naming `option` for anything else."""
    import datasets

    source = Path(path)
    if source.is_dir():
        loaded = datasets.load_from_disk(str(source))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if not source.is_file():
        raise FileNotFoundError(f"{option} {path!r} does not exist.")
    builder = _BUILDERS.get(source.suffix.lower())
    if builder is None:
        raise ValueError(f"{option} {path!r}: use a .jsonl, .json, .parquet or .csv file, or a datasets directory.")
    if builder != "parquet" and _is_blank(source):
        # datasets would fail with a bare StopIteration on a file without a single row.
        raise ValueError(f"{option} {path!r} is empty: it holds no rows.")
    return datasets.load_dataset(builder, data_files=str(source), split="train")


def load_table(name: str, config: str | None = None, split: str = "train", *, option: str = "dataset_name") -> Any:
    """`load_rows` for a local file or directory; otherwise a Hub dataset id (`config`, `split`)."""
    path = Path(name)
    if path.exists() or path.suffix.lower() in _BUILDERS:
        return load_rows(name, split=split, option=option)
    import datasets

    return datasets.load_dataset(name, name=config, split=split)


def _is_blank(path: Path) -> bool:
    """Whether a text file holds nothing but whitespace (read until the first other byte)."""
    with path.open("rb") as handle:
        while block := handle.read(1 << 16):
            if block.strip():
                return False
    return True


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file one at a time (they may hold long documents: never all in memory). A line cut
    short by a crash is skipped; `load_jsonl` also drops it from the file."""
    for _, record in _lines(path):
        if record is not None:
            yield record


def _lines(path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            yield line, record if isinstance(record, dict) else None


def load_jsonl(path: Path, *, keep: Callable[[dict[str, Any]], bool] = lambda record: True) -> list[dict[str, Any]]:
    """The one resumable-JSONL reader: the records of an append-only output that are done for good.

    Dropped, and the file rewritten atomically without them, so their work is redone: a line cut short by a crash,
    and a record `keep` refuses (e.g. one whose judge call failed)."""
    kept_lines: list[str] = []
    records: list[dict[str, Any]] = []
    dropped = False
    for line, record in _lines(path):
        if record is None or not keep(record):
            dropped = True
            continue
        kept_lines.append(line)
        records.append(record)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept_lines), encoding="utf-8")
        os.replace(tmp, path)
    return records


def _has_index(record: dict[str, Any]) -> bool:
    try:
        int(record["index"])
    except (KeyError, TypeError, ValueError):
        return False
    return True


def resume_jsonl(output: Path) -> set[int]:
    """Indices of an `index`-keyed output already judged for good (`load_jsonl`). A line recording a judge error
    (`judge_errors`: dimensions whose judge call failed, e.g. the server went down mid-run) is judged again: its judge
    calls that were answered come from the cache, so only the failed ones are paid for again. An unparseable verdict
    is an answer, not an error: it stays (a rerun would read the same cached text). So does a line whose only errors
    are permanent (`permanent_judge_errors`: the judge refused the call, e.g. a prompt over its context window): the
    refusal is cached, and judging it again would only read it back."""
    records = load_jsonl(output, keep=lambda record: _has_index(record) and not record.get("judge_errors"))
    return {int(record["index"]) for record in records}


def judge_error_dimensions(trace: dict[str, Any]) -> list[str]:
    """The dimensions of a judgement trace whose judge call failed and may succeed on a rerun (not: answered without
    a parseable verdict; not: refused for good, see `permanent_error_dimensions`). A rerun judges them again."""
    return [name for name, part in trace.items() if _first_judge_error(part) is not None]


def permanent_error_dimensions(trace: dict[str, Any]) -> list[str]:
    """The dimensions of a judgement trace with a judge call the judge refused for good (HTTP 400: e.g. a prompt
    over its context window). The refusal is cached; a rerun does not judge them again."""
    return [name for name, part in trace.items() if _first_judge_error(part, _PERMANENT) is not None]


_TRANSIENT = "judge_error: "
_PERMANENT = "permanent_judge_error: "


def _first_judge_error(value: Any, prefix: str = _TRANSIENT) -> str | None:
    """The first `judge_error: ...` (or other `prefix`) text in a (nested) judgement trace."""
    if isinstance(value, str):
        return value.removeprefix(prefix) if value.startswith(prefix) else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _first_judge_error(item, prefix)
        if found is not None:
            return found
    return None


def check_judge_answered(judgements: Sequence[Any], counts: dict[str, int], *, rows: str, output: Path) -> None:
    """Refuse to record a batch of which the judge answered no call at all (server down, wrong URL, not an
    OpenAI-compatible API): its rows would be written as unscored, and a rerun would skip them. `counts` are the
    batch's own call counts (`with reward.counting() as cost: ...`, then `cost.totals()`); raises `RuntimeError` with
    the judge's first error. A call the judge refused (a permanent error) was answered: the judge works, the request
    was bad."""
    sent = counts["judge_calls"]
    failed = counts["judge_errors"] - counts.get("permanent_judge_errors", 0)
    if sent == 0 or failed < sent:
        return
    error = _first_judge_error([j.trace for j in judgements]) or "(no error text)"
    raise RuntimeError(
        f"The judge answered none of the {sent} judge calls for {rows}, so nothing was written for them. First "
        f"error: {error} Fix the judge (is its server running? is --judge_base_url right?) and rerun the same "
        f"command: what {output} already holds is kept and not judged again."
    )
