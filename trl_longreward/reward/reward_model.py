"""A sequence-classification reward model as an agreement baseline (`trl-longreward agreement --reward_model`).

The paper's short-context reward model agreed with people 0.583 on its pairs. Any transformers
`AutoModelForSequenceClassification` with one output serves: it reads the chat (user: document + "\\n\\n" + question,
assistant: the answer) through the tokenizer's chat template (plain text without one), unpadded and one answer at a
time, so its single logit is the score a user gets from `model(**tokenizer.apply_chat_template(chat,
return_dict=True, return_tensors="pt"))`. A chat longer than the budget has its document cut in the middle (head and tail kept),
never the question or the answer; an answer whose question and answer alone exceed the budget is not scored (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..documents import build_prompt_text, truncate_context_middle


def reward_model_input_ids(tokenizer: Any, context: str, question: str, answer: str, *, max_length: int) -> list[int]:
    """The token ids the reward model reads for one answer, at most `max_length` of them (`[]` when even a 2-token
    document leaves the question and the answer over budget)."""

    def encode(document: str) -> list[int]:
        prompt = build_prompt_text(document, question)
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        return list(tokenizer(f"{prompt}\n\n{answer}")["input_ids"])

    ids = encode(context)
    # Cut the document by the excess until the whole chat fits (token merges at the cut can shift a count by one).
    budget = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    while len(ids) > max_length:
        budget -= len(ids) - max_length
        if budget < 2:
            return []
        ids = encode(truncate_context_middle(context, budget, tokenizer)[0])
    return ids


def score_answers(model_name: str, rows: Sequence[tuple[str, str, str]], *, max_length: int) -> list[float | None]:
    """The reward model's score of each (context, question, answer); None for an answer over the budget."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..models import check_model_source

    check_model_source(model_name, option="--reward_model")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, dtype="auto")
    if model.config.num_labels != 1:
        raise ValueError(
            f"--reward_model {model_name!r} has {model.config.num_labels} outputs; a reward model has one "
            "(AutoModelForSequenceClassification with num_labels=1)."
        )
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    scores: list[float | None] = []
    with torch.inference_mode():
        for context, question, answer in rows:
            ids = reward_model_input_ids(tokenizer, context, question, answer, max_length=max_length)
            if not ids:
                scores.append(None)
                continue
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits
            scores.append(float(logits[0, 0]))
    return scores
