"""Documents and questions: the one place that reads them out of rows and prompts, and fits them for the policy.

The paper's prompt is `context + "\\n\\n" + question` (docs/method.md section 3). A row gives the document and the
question in its `context` / `question` columns, or in a `prompt` written in that format (a string or chat messages).
A long prompt is truncated in the MIDDLE of the document for the policy: the head and the tail survive, the question
is never cut (TRL's DPOTrainer would drop such rows or cut the completion instead). The judge always reads the full
document.
"""

from __future__ import annotations

from collections.abc import Sequence
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


# ----- reading the document and the question -----


def message_text(value: Any, *, what: str, index: int, role: str | None = None) -> str:
    """Text of a plain string or of a chat (list of messages): the last message (of `role`, when given)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        value = [value]
    if isinstance(value, Sequence) and value and all(isinstance(m, dict) and "content" in m for m in value):
        messages = [m for m in value if role is None or m.get("role") == role] or list(value)
        content = messages[-1]["content"]
        if isinstance(content, list):  # multimodal-style content parts: keep the text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise TypeError(f"{what}[{index}]: message content must be a string, got {type(content).__name__}.")
        return content
    raise TypeError(
        f"{what}[{index}] must be a string or a list of chat messages ({{'role': ..., 'content': ...}}), "
        f"got {type(value).__name__}: {str(value)[:80]!r}."
    )


def split_prompt(
    prompt: str, *, question: str | None, separator: str, index: int, what: str = "prompts"
) -> tuple[str, str]:
    """Split a prompt's text into (context, question). With a known question, the context is what precedes it."""
    if question is not None:
        stripped = prompt.rstrip()
        if stripped.endswith(question.strip()):
            return stripped[: len(stripped) - len(question.strip())].rstrip(), question
        if separator in prompt:
            return prompt.rsplit(separator, 1)[0], question
        return prompt, question
    if separator not in prompt:
        raise ValueError(
            f"{what}[{index}]: cannot find the document in the prompt: it has no {separator!r} between document and "
            "question. Give the data 'context' and 'question' columns (or set context_column/question_column), or "
            f"write prompts as context + {separator!r} + question."
        )
    context, question = prompt.rsplit(separator, 1)
    return context, question


def check_prompt_columns(
    columns: Sequence[str], *, context_column: str, question_column: str, separator: str, what: str = "--input"
) -> None:
    """Rows need the context and question columns, or a `prompt` column; say which are missing and what to set."""
    present = set(columns)
    if {context_column, question_column} <= present or "prompt" in present:
        return
    if what.startswith("--"):
        fix = "--context_column / --question_column"
    elif what == "train_dataset":
        fix = "long_reward={'context_column': ..., 'question_column': ...}"
    else:
        fix = "the reward's context_column / question_column"
    raise ValueError(
        f"{what} needs {context_column!r} and {question_column!r} columns, or a 'prompt' column written as "
        f"context + {separator!r} + question (a string or chat messages); it has {sorted(present)}. Rename the "
        f"columns or set {fix}."
    )


def row_document(
    row: dict[str, Any], *, context_column: str, question_column: str, separator: str, index: int
) -> tuple[str, str]:
    """The full document and the question of a data row, as the judge reads them."""
    if context_column in row and question_column in row:
        return row[context_column], row[question_column]
    text = message_text(row["prompt"], what="prompt", index=index, role="user")
    context, question = split_prompt(text, question=None, separator=separator, index=index, what="prompt")
    return context, question.strip()


# ----- the policy's prompt -----

_SLACK_TOKENS = 8  # the truncation marker and tokens that merge across the cut


def _user_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise ValueError("A conversational prompt needs a user message with text content.")
    return users[-1]["content"]


def _replace_user_text(prompt: Any, text: str) -> Any:
    if isinstance(prompt, str):
        return text
    last_user = max(i for i, m in enumerate(prompt) if m.get("role") == "user")
    return [({**m, "content": text} if i == last_user else m) for i, m in enumerate(prompt)]


def _template_overhead(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> int:
    if getattr(tokenizer, "chat_template", None) is None:
        return 0
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
    )
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def tokenize_prompt(tokenizer: Any, prompt: Any, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of the policy prompt: the chat template with a generation prompt when the tokenizer has one
    (`chat_template_kwargs`, e.g. `{"enable_thinking": False}`, passed to it)."""
    if getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if not isinstance(prompt, str):
        raise ValueError("A conversational prompt needs a tokenizer with a chat template.")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def prepare_prompt_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    context_column: str = "context",
    question_column: str = "question",
    separator: str = "\n\n",
    what: str = "train_dataset",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Add `prompt` (what the reward sees: the FULL document), `policy_prompt` (what the policy sees, the document
    cut in the middle to fit), `prompt_ids` and `truncated` to a `datasets.Dataset`. No row is dropped."""
    columns = set(dataset.column_names)
    has_columns = {context_column, question_column} <= columns
    check_prompt_columns(
        dataset.column_names,
        context_column=context_column,
        question_column=question_column,
        separator=separator,
        what=what,
    )
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty.")
    overhead = _template_overhead(tokenizer, chat_template_kwargs) + _SLACK_TOKENS

    def process(row: dict[str, Any], index: int) -> dict[str, Any]:
        if has_columns:
            context, question = row[context_column], row[question_column]
            for name, value in ((context_column, context), (question_column, question)):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(
                        f"{what}: column {name!r}, row {index} must hold a non-empty string; got {value!r:.80}."
                    )
            prompt = row["prompt"] if "prompt" in row else context + separator + question
            user_text = _user_text(prompt)
            if context in user_text:  # the prompt embeds the document: cut it there
                prefix, suffix = user_text.split(context, 1)
                fitted, cut = fit_prompt(
                    context,
                    suffix,
                    tokenizer=tokenizer,
                    max_prompt_tokens=max_prompt_length,
                    separator="",
                    overhead_tokens=overhead + len(tokenizer(prefix)["input_ids"]),
                )
                policy_prompt = _replace_user_text(prompt, prefix + fitted)
            else:
                fitted, cut = fit_prompt(
                    context,
                    question,
                    tokenizer=tokenizer,
                    max_prompt_tokens=max_prompt_length,
                    separator=separator,
                    overhead_tokens=overhead,
                )
                policy_prompt = _replace_user_text(prompt, fitted) if "prompt" in row else fitted
        else:
            prompt = row["prompt"]
            context, question = split_prompt(
                _user_text(prompt), question=None, separator=separator, index=index, what=what
            )
            fitted, cut = fit_prompt(
                context,
                question,
                tokenizer=tokenizer,
                max_prompt_tokens=max_prompt_length,
                separator=separator,
                overhead_tokens=overhead,
            )
            policy_prompt = _replace_user_text(prompt, fitted)
        return {
            "prompt": prompt,
            "policy_prompt": policy_prompt,
            "prompt_ids": tokenize_prompt(tokenizer, policy_prompt, chat_template_kwargs),
            "truncated": cut,
        }

    return dataset.map(process, with_indices=True, desc="Fitting and tokenizing prompts")


def prompt_groups(
    rows: Any,
    todo: list[int],
    batch_size: int,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    context_column: str,
    question_column: str,
    separator: str,
) -> tuple[list[list[int]], Any, dict[int, int]]:
    """The fixed generation groups [g*B, (g+1)*B) that hold a row still to do, their prompts tokenized, and each
    row index's position among them: `(groups, prepared, position)`, so row i's prompt is `prepared[position[i]]`.

    Groups never depend on what is done already, so a group's seed draws the same samples in a resumed run.
    """
    starts = sorted({i // batch_size * batch_size for i in todo})
    groups = [list(range(start, min(start + batch_size, len(rows)))) for start in starts]
    needed = [i for group in groups for i in group]
    prepared = prepare_prompt_dataset(
        rows.select(needed),
        tokenizer,
        max_prompt_length=max_prompt_length,
        context_column=context_column,
        question_column=question_column,
        separator=separator,
        what="--input",
    )
    return groups, prepared, {index: pos for pos, index in enumerate(needed)}
