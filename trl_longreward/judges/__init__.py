"""Judge backends: a batch of chat requests in, texts out. Optional backends are imported lazily."""

from __future__ import annotations

from typing import Any

from .base import ChatRequest, Judge, JudgeError
from .cache import JudgeCallCache
from .openai_judge import OpenAIJudge

__all__ = [
    "ChatRequest",
    "Judge",
    "JudgeCallCache",
    "JudgeError",
    "OpenAIJudge",
]


def __getattr__(name: str) -> Any:
    # In-process backends pull in torch/transformers or vLLM: import them only when asked for.
    if name == "TransformersJudge":
        from .transformers_judge import TransformersJudge

        return TransformersJudge
    if name == "VLLMJudge":
        from .vllm_judge import VLLMJudge

        return VLLMJudge
    raise AttributeError(name)
