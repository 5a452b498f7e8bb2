"""Reading row files and resuming append-only JSONL outputs (shared by the command-line tools)."""

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
    return datasets.load_dataset(builder, data_files=str(source), split="train")


def resume_jsonl(output: Path) -> set[int]:
    """Indices already judged. A line cut short by a crash is dropped (rewritten atomically) and judged again; its
    judge calls come from the cache."""
    done: set[int] = set()
    if not output.exists():
        return done
    kept: list[str] = []
    damaged = False
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            done.add(int(json.loads(line)["index"]))
            kept.append(line)
        except (ValueError, KeyError, TypeError):
            damaged = True
    if damaged:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, output)
    return done
