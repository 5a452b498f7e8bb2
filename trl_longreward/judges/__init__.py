"""Judge backends: a batch of chat requests in, texts out. Optional backends are imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import ChatRequest, Judge, JudgeError, JudgeUnavailableError
from .cache import JudgeCallCache
from .openai_judge import OpenAIJudge

if TYPE_CHECKING:
    from ..reward.config import LongRewardConfig

__all__ = [
    "ChatRequest",
    "Judge",
    "JudgeCallCache",
    "JudgeError",
    "JudgeUnavailableError",
    "OpenAIJudge",
    "build_judge",
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


def build_judge(config: LongRewardConfig) -> Judge:
    """The judge a `LongRewardConfig` describes."""
    if config.judge_backend == "openai":
        if not config.judge_base_urls or not config.judge_model:
            raise ValueError(
                "The OpenAI-compatible judge needs judge_base_url and judge_model (e.g. "
                "judge_base_url='http://127.0.0.1:8000/v1' for `vllm serve MODEL --port 8000`), or pick "
                "judge_backend='transformers' for an in-process judge, or pass judge=... directly."
            )
        return OpenAIJudge(
            config.judge_model,
            config.judge_base_urls,
            api_key_env=config.judge_api_key_env,
            max_concurrency=config.judge_max_concurrency,
            timeout=config.judge_timeout,
            max_retries=config.judge_max_retries,
            endpoint_cooldown=config.judge_endpoint_cooldown,
            context_window=config.judge_context_window,
        )
    if config.judge_backend == "transformers":
        from .transformers_judge import TransformersJudge

        return TransformersJudge(config.judge_model, max_batch_size=config.judge_max_concurrency)
    from .vllm_judge import VLLMJudge

    if not config.judge_model:
        raise ValueError("judge_backend='vllm' needs judge_model (a local path or Hub id).")
    return VLLMJudge(config.judge_model)
