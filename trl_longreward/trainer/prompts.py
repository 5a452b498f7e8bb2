"""Prompt datasets for online DPO: validate, fit each prompt into the token budget, tokenize for the policy."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from .truncation import fit_prompt

_SLACK_TOKENS = 8  # the truncation marker and tokens that merge across the cut


class PromptCollator:
    """Batches stay lists of rows: the trainer generates from them and builds the tensors itself."""

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(rows)


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


def _template_overhead(tokenizer: Any) -> int:
    if getattr(tokenizer, "chat_template", None) is None:
        return 0
    ids = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def tokenize_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of the policy prompt: the chat template with a generation prompt when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if not isinstance(prompt, str):
        raise ValueError("A conversational prompt needs a tokenizer with a chat template.")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def prepare_prompt_dataset(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    context_column: str = "context",
    question_column: str = "question",
    separator: str = "\n\n",
) -> Dataset:
    """Add `prompt` (what the reward sees: the FULL document), `policy_prompt` (what the policy sees, the document
    cut in the middle to fit), `prompt_ids` and `truncated`. No row is dropped."""
    columns = set(dataset.column_names)
    has_columns = {context_column, question_column} <= columns
    if not has_columns and "prompt" not in columns:
        raise ValueError(
            f"train_dataset needs {context_column!r} and {question_column!r} columns, or a 'prompt' column written as "
            f"context + {separator!r} + question; it has {sorted(columns)}. Rename your columns or set "
            "long_reward={'context_column': ..., 'question_column': ...}."
        )
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty.")
    overhead = _template_overhead(tokenizer) + _SLACK_TOKENS

    def process(row: dict[str, Any]) -> dict[str, Any]:
        if has_columns:
            context, question = row[context_column], row[question_column]
            for name, value in ((context_column, context), (question_column, question)):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"Column {name!r} must hold non-empty strings; got {value!r:.80}.")
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
            user_text = _user_text(prompt)
            if separator not in user_text:
                raise ValueError(
                    f"A prompt has no {separator!r} between document and question, and there are no "
                    f"{context_column!r}/{question_column!r} columns: add them, or write prompts as context + "
                    f"{separator!r} + question."
                )
            context, question = user_text.rsplit(separator, 1)
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
            "prompt_ids": tokenize_prompt(tokenizer, policy_prompt),
            "truncated": cut,
        }

    return dataset.map(process, desc="Fitting and tokenizing prompts")
