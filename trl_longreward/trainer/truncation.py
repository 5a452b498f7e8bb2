"""Fit a long prompt into a token budget by cutting the MIDDLE of the document.

The paper's evaluation prompt is `context + "\\n\\n" + question`, truncated in the middle of the context: the head and
the tail of the document survive, the question is never cut (TRL's own DPOTrainer would drop such rows or cut the
completion instead; see TRL_NOTES in the docs).
"""

from __future__ import annotations

from typing import Any

TRUNCATION_MARKER = "\n...\n"


def truncate_context_middle(context: str, max_tokens: int, tokenizer: Any) -> tuple[str, bool]:
    """`context` cut to at most `max_tokens` tokens (plus the marker) by removing its middle; (text, was_cut).

    Cuts at token offsets of the original text, so the kept head and tail are exact substrings of the document.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 to keep a head and a tail of the document, got {max_tokens}.")
    encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [(s, e) for s, e in encoded["offset_mapping"] if e > s]
    if len(offsets) <= max_tokens:
        return context, False
    head = max_tokens // 2
    tail = max_tokens - head
    head_end = offsets[head - 1][1]
    tail_start = offsets[len(offsets) - tail][0]
    return context[:head_end] + TRUNCATION_MARKER + context[tail_start:], True


def build_prompt_text(context: str, question: str, separator: str = "\n\n") -> str:
    return context + separator + question


def fit_prompt(
    context: str,
    question: str,
    *,
    tokenizer: Any,
    max_prompt_tokens: int,
    separator: str = "\n\n",
    overhead_tokens: int = 0,
) -> tuple[str, bool]:
    """The user prompt `context + separator + question`, with the context cut in the middle to fit the budget.

    `overhead_tokens` reserves room for what the chat template adds around the message.
    """
    fixed = len(tokenizer(separator + question, add_special_tokens=False)["input_ids"]) + overhead_tokens
    budget = max_prompt_tokens - fixed
    if budget < 2:
        raise ValueError(
            f"max_prompt_length={max_prompt_tokens} leaves no room for the document: the question and the chat "
            f"template alone take {fixed} tokens. Raise max_prompt_length."
        )
    kept, cut = truncate_context_middle(context, budget, tokenizer)
    return build_prompt_text(kept, question, separator), cut
