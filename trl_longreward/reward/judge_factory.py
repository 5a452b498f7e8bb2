"""The judge a `LongRewardConfig` describes (the judges themselves know nothing of the reward's config)."""

from __future__ import annotations

from ..judges.base import Judge
from ..judges.openai_judge import OpenAIJudge
from .config import LongRewardConfig


def build_judge(config: LongRewardConfig) -> Judge:
    """The judge a `LongRewardConfig` describes."""
    if config.judge_backend == "openai":
        if not config.judge_base_urls or not config.judge_model:
            raise ValueError(
                "The OpenAI-compatible judge needs judge_base_url and judge_model (e.g. "
                "judge_base_url='http://127.0.0.1:8000/v1' for `vllm serve MODEL --port 8000`), or pick "
                "judge_backend='transformers' for an in-process judge, or pass judge=... directly."
            )
        extra_body = config.judge_extra_body
        if config.judge_chat_template_kwargs:
            extra_body = dict(extra_body or {})
            extra_body["chat_template_kwargs"] = {
                **(extra_body.get("chat_template_kwargs") or {}),
                **config.judge_chat_template_kwargs,
            }
        return OpenAIJudge(
            config.judge_model,
            config.judge_base_urls,
            api_key_env=config.judge_api_key_env,
            max_concurrency=config.judge_max_concurrency,
            timeout=config.judge_timeout,
            max_retries=config.judge_max_retries,
            endpoint_cooldown=config.judge_endpoint_cooldown,
            context_window=config.judge_context_window,
            extra_body=extra_body,
            fingerprint=config.judge_fingerprint,
        )
    judge: Judge
    if config.judge_backend == "transformers":
        from ..judges.transformers_judge import TransformersJudge

        judge = TransformersJudge(
            config.judge_model,
            max_batch_size=config.judge_max_concurrency,
            chat_template_kwargs=config.judge_chat_template_kwargs,
        )
    else:
        from ..judges.vllm_judge import VLLMJudge

        if not config.judge_model:
            raise ValueError("judge_backend='vllm' needs judge_model (a local path or Hub id).")
        judge = VLLMJudge(
            config.judge_model,
            chat_template_kwargs=config.judge_chat_template_kwargs,
            **(config.judge_engine_kwargs or {}),
        )
    judge.fingerprint = config.judge_fingerprint  # part of the in-process judge's cache identity
    return judge
