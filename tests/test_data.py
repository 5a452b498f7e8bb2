"""The bundled long-context QA set: loading, split hygiene, document lengths, and input validation."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import datasets
import pytest

from trl_longreward.data import (
    LONGQA_COLUMNS,
    LONGQA_FIELDS,
    LONGQA_SPLITS,
    load_long_qa,
    long_qa_path,
    validate_long_qa,
)
from trl_longreward.reward.retrieval import TokenChunker

EXPECTED_ROWS = {"train": 24, "eval": 8}
MIN_TOKENS, MAX_TOKENS = 2500, 6000
_CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def splits() -> dict[str, datasets.Dataset]:
    return {split: load_long_qa(split) for split in LONGQA_SPLITS}


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    """The default judge's tokenizer (SmolLM2), the one the length bounds are stated in."""
    from transformers import AutoTokenizer

    from trl_longreward.models import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


def _documents(dataset: datasets.Dataset) -> dict[str, list[dict[str, Any]]]:
    by_context: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in dataset:
        by_context[row["context"]].append(row)
    return by_context


@pytest.mark.parametrize("split", LONGQA_SPLITS)
def test_splits_load_with_expected_columns_and_counts(splits: dict[str, datasets.Dataset], split: str) -> None:
    dataset = splits[split]
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == list(LONGQA_FIELDS)
    assert set(LONGQA_COLUMNS) <= set(dataset.column_names)
    assert len(dataset) == EXPECTED_ROWS[split]
    assert len(set(dataset["id"])) == len(dataset)
    validate_long_qa(dataset)


def test_default_split_is_train(splits: dict[str, datasets.Dataset]) -> None:
    assert load_long_qa()["id"] == splits["train"]["id"]


@pytest.mark.parametrize("split", ["test", "validation", "", "TRAIN"])
def test_unknown_split_names_the_valid_ones(split: str) -> None:
    with pytest.raises(ValueError, match=r"valid splits: train, eval"):
        load_long_qa(split)


def test_no_document_appears_in_both_splits(splits: dict[str, datasets.Dataset]) -> None:
    train, evaluation = splits["train"], splits["eval"]
    assert not set(train["context"]) & set(evaluation["context"])
    assert not set(train["source"]) & set(evaluation["source"])


@pytest.mark.parametrize("split", LONGQA_SPLITS)
def test_each_document_has_four_or_five_questions_and_one_source(
    splits: dict[str, datasets.Dataset], split: str
) -> None:
    for rows in _documents(splits[split]).values():
        assert 4 <= len(rows) <= 5
        assert len({row["source"] for row in rows}) == 1
        assert len({row["language"] for row in rows}) == 1
        assert len({row["question"] for row in rows}) == len(rows)


@pytest.mark.parametrize("split", LONGQA_SPLITS)
def test_every_context_is_2500_to_6000_smollm2_tokens(
    splits: dict[str, datasets.Dataset], smollm2_tokenizer: Any, split: str
) -> None:
    for context in _documents(splits[split]):
        n_tokens = len(smollm2_tokenizer(context, add_special_tokens=False)["input_ids"])
        assert MIN_TOKENS <= n_tokens <= MAX_TOKENS, (context[:60], n_tokens)


@pytest.mark.parametrize("split", LONGQA_SPLITS)
def test_every_field_is_a_non_empty_string(splits: dict[str, datasets.Dataset], split: str) -> None:
    for row in splits[split]:
        for field in LONGQA_FIELDS:
            assert isinstance(row[field], str) and row[field].strip(), (row["id"], field)
        assert row["language"] in {"en", "zh"}


@pytest.mark.parametrize("split", LONGQA_SPLITS)
def test_contexts_carry_no_distributor_boilerplate(splits: dict[str, datasets.Dataset], split: str) -> None:
    for context in _documents(splits[split]):
        assert "gutenberg" not in context.lower()
        assert "license" not in context.lower()


def test_chinese_items_are_in_chinese(splits: dict[str, datasets.Dataset]) -> None:
    chinese = [row for split in LONGQA_SPLITS for row in splits[split] if row["language"] == "zh"]
    assert 4 <= len(chinese) <= 6
    for row in chinese:
        for field in ("context", "question", "answer"):
            assert _CJK.search(row[field]), (row["id"], field)


@pytest.mark.parametrize("chunk_tokens", [16, 128, 500])
@pytest.mark.parametrize("tokenizer_kind", ["regex", "smollm2"])
def test_token_chunker_tiles_the_chinese_documents_exactly(
    splits: dict[str, datasets.Dataset], request: pytest.FixtureRequest, tokenizer_kind: str, chunk_tokens: int
) -> None:
    tokenizer = request.getfixturevalue("smollm2_tokenizer") if tokenizer_kind == "smollm2" else None
    chunker = TokenChunker(tokenizer)
    contexts = {row["context"] for split in LONGQA_SPLITS for row in splits[split] if row["language"] == "zh"}
    assert contexts
    for context in contexts:
        chunks = chunker.split(context, chunk_tokens)
        assert "".join(chunks) == context
        assert all(chunks)
        assert len(chunks) == math.ceil(chunker.count_tokens(context) / chunk_tokens)


def test_bundled_data_stays_small() -> None:
    assert sum(long_qa_path(split).stat().st_size for split in LONGQA_SPLITS) < 1_500_000


def _dataset(**columns: list[Any]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(columns)


def test_validation_names_missing_and_present_columns() -> None:
    data = _dataset(document=["a long text"], prompt=["a question?"])
    with pytest.raises(ValueError) as excinfo:
        validate_long_qa(data)
    message = str(excinfo.value)
    assert "missing column(s) 'context', 'question'" in message
    assert "columns present: 'document', 'prompt'" in message


def test_validation_names_only_the_missing_column() -> None:
    data = _dataset(context=["a long text"], query=["a question?"])
    with pytest.raises(ValueError, match=r"missing column\(s\) 'question'; columns present: 'context', 'query'"):
        validate_long_qa(data)


def test_validation_accepts_custom_column_names() -> None:
    validate_long_qa(
        _dataset(document=["a long text"], prompt=["a question?"]), context_column="document", question_column="prompt"
    )


class _ColumnStore:
    """A minimal data set of plain lists, for mixed-type columns that Arrow refuses to build."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, column: str) -> list[Any]:
        return self._columns[column]


@pytest.mark.parametrize(
    ("columns", "row", "column", "what"),
    [
        ({"context": ["text", ""], "question": ["q", "q"]}, 1, "context", "an empty string"),
        ({"context": ["text", "text"], "question": ["q", " \n\t"]}, 1, "question", "a whitespace-only string"),
        ({"context": [None, "text"], "question": ["q", "q"]}, 0, "context", "a value of type NoneType"),
        ({"context": [1, 2], "question": ["q", "q"]}, 0, "context", "a value of type int"),
    ],
)
def test_validation_names_row_and_column_of_bad_values(
    columns: dict[str, list[Any]], row: int, column: str, what: str
) -> None:
    with pytest.raises(ValueError) as excinfo:
        validate_long_qa(_dataset(**columns))
    message = str(excinfo.value)
    assert f"row {row}, column '{column}'" in message
    assert what in message


def test_validation_catches_a_non_string_among_strings() -> None:
    data = _ColumnStore({"context": ["text", "text", "text"], "question": ["q", "q", 3.5]})
    with pytest.raises(
        ValueError, match=r"row 2, column 'question' must be a non-empty string, got a value of type float"
    ):
        validate_long_qa(data)  # type: ignore[arg-type]
