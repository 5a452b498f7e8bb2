"""Turn what a TRL trainer passes a reward function into (context, question, response) triples.

TRL hands over `prompts` (strings, or lists of chat messages), `completions` (strings, or `[{"role": "assistant",
"content": ...}]`) and every other dataset column as a keyword argument. The document and the question come from the
`context` / `question` columns when the dataset has them; otherwise from the prompt, read as
`context + separator + question` (the paper's prompt format).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..documents import message_text, split_prompt


@dataclass(frozen=True)
class Sample:
    context: str
    question: str
    response: str


def _column(kwargs: dict[str, Any], name: str, size: int) -> list[Any] | None:
    values = kwargs.get(name)
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != size:
        raise ValueError(f"Column {name!r} must be a list with one value per completion ({size}).")
    return list(values)


def resolve_samples(
    prompts: Sequence[Any] | None,
    completions: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    context_column: str,
    question_column: str,
    separator: str,
    row_ids: Sequence[int] | None = None,
) -> list[Sample]:
    """Build one `Sample` per completion, with errors that name the column and the fix.

    `row_ids`: the number an error gives each row (e.g. its line in an input file); default its position."""
    size = len(completions)
    if prompts is not None and len(prompts) != size:
        raise ValueError(f"Got {len(prompts)} prompts for {size} completions: pass one prompt per completion.")
    contexts = _column(kwargs, context_column, size)
    questions = _column(kwargs, question_column, size)
    if contexts is None and prompts is None:
        raise ValueError(f"No prompts and no {context_column!r} column: the reward needs the document.")
    samples = []
    for i in range(size):
        row = i if row_ids is None else row_ids[i]
        response = message_text(completions[i], what="completions", index=row, role="assistant")
        question = None if questions is None else _as_text(questions[i], question_column, row)
        if contexts is not None:
            context = _as_text(contexts[i], context_column, row)
            if question is None:
                if prompts is None:
                    raise ValueError(f"No {question_column!r} column and no prompts: the reward needs the question.")
                question = message_text(prompts[i], what="prompts", index=row, role="user")
                # A prompt that embeds the document is split; a bare question is taken whole.
                if context.strip() and context.strip() in question:
                    question = question.split(context.strip(), 1)[1].strip() or question
        else:
            prompt = message_text(prompts[i], what="prompts", index=row, role="user")
            context, question = split_prompt(prompt, question=question, separator=separator, index=row)
        if not context.strip():
            raise ValueError(
                f"Row {row}: the context is empty. LongReward judges answers about a document; give the document in "
                f"the {context_column!r} column or in the prompt."
            )
        if not question.strip():
            raise ValueError(
                f"Row {row}: the question is empty (column {question_column!r} or the end of the prompt)."
            )
        samples.append(Sample(context=context, question=question.strip(), response=response))
    return samples


def _as_text(value: Any, column: str, index: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Column {column!r}, row {index}: expected a string, got {type(value).__name__}.")
    return value
