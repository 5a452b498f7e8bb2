"""Small data sets shipped with the package (see README.md in this folder for sources and licences)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

__all__ = [
    "LONGQA_COLUMNS",
    "LONGQA_FIELDS",
    "LONGQA_SPLITS",
    "agreement_demo_path",
    "demo_score_path",
    "load_long_qa",
    "long_qa_path",
    "validate_long_qa",
]

LONGQA_COLUMNS = ("context", "question")
"""The columns a long-context QA data set needs: the document and the question asked about it."""

LONGQA_FIELDS = ("id", "context", "question", "answer", "source", "language")
"""Every field of the bundled long-context QA rows, in file order."""

LONGQA_SPLITS = ("train", "eval")


def agreement_demo_path() -> Path:
    """JSONL of labelled answer pairs (`context`, `question`, `response_a`, `response_b`, `preferred`) for
    `trl-longreward agreement`: short invented documents, a faithful complete answer against an incomplete, an
    evasive or an invented one."""
    return Path(str(resources.files("trl_longreward.data").joinpath("agreement_demo.jsonl")))


def demo_score_path() -> Path:
    """JSONL of (context, question, response) rows for trying `trl-longreward score`."""
    return Path(str(resources.files("trl_longreward.data").joinpath("demo_score.jsonl")))


def long_qa_path(split: str = "train") -> Path:
    """Path of the bundled long-context QA JSONL file for `split` ("train" or "eval")."""
    if split not in LONGQA_SPLITS:
        raise ValueError(f"Unknown long-context QA split {split!r}; valid splits: {', '.join(LONGQA_SPLITS)}.")
    return Path(str(resources.files("trl_longreward.data").joinpath(f"longqa_{split}.jsonl")))


def load_long_qa(split: str = "train") -> datasets.Dataset:
    """The bundled long-context QA set as a `datasets.Dataset`.

    Rows have the fields in `LONGQA_FIELDS`: `context` is a public-domain document excerpt of 2,500-6,000 tokens,
    `question` asks about it, `answer` is a short reference answer, `source` names the work and where the text came
    from, and `language` is "en" or "zh". The "train" and "eval" splits share no document.
    """
    path = long_qa_path(split)
    import datasets

    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    columns = {field: [row[field] for row in rows] for field in LONGQA_FIELDS}
    return datasets.Dataset.from_dict(columns)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if not value else "a whitespace-only string"
    return f"a value of type {type(value).__name__} ({value!r:.40})"


def validate_long_qa(
    dataset: datasets.Dataset,
    *,
    context_column: str = "context",
    question_column: str = "question",
) -> None:
    """Check that `dataset` has non-empty string contexts and questions, raising ValueError if not.

    The error names the missing column(s) and the columns present, or the first row index and column whose value is
    empty, whitespace-only or not a string. Works on any data set with `column_names` whose columns can be read with
    `dataset[column]` (a `datasets.Dataset`, for one).
    """
    present = list(getattr(dataset, "column_names", None) or [])
    wanted = [context_column, question_column]
    missing = [column for column in wanted if column not in present]
    if missing:
        raise ValueError(
            f"Long-context QA data is missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"columns present: {', '.join(repr(c) for c in present) or '(none)'}. "
            "Rename your columns or pass context_column=/question_column= to name them."
        )
    for column in dict.fromkeys(wanted):
        for index, value in enumerate(dataset[column]):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"Long-context QA data: row {index}, column {column!r} must be a non-empty string, "
                    f"got {_describe(value)}."
                )
