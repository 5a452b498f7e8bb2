"""A judge that runs a chat model in-process with vLLM (CUDA: the `vllm` extra; x86 CPU: the CPU build, see
`trl_longreward/vllm_support.py`)."""

from __future__ import annotations

from typing import Any

from trl_longreward.judges.base import ChatRequest, JudgeError
from trl_longreward.judges.batching import BatchingJudge, BatchResult
from trl_longreward.vllm_support import VLLM_INSTALL_HINT, check_vllm_version, cpu_engine_dtype, cpu_thread_settings

__all__ = ["VLLM_INSTALL_HINT", "VLLMJudge"]


class VLLMJudge(BatchingJudge):
    """Answer judge requests with an in-process `vllm.LLM`, whose scheduler batches large micro-batches well.

    vLLM is imported only here, so this module imports fine without it.

    Args:
        model: a model path or hub id for `vllm.LLM`.
        max_batch_size: the most requests handed to one `LLM.chat` call.
        **llm_kwargs: passed to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_model_len`, `dtype`, `seed`). On a
            machine without CUDA, a missing or "auto" `dtype` is float32 on x86 CPUs without native bfloat16, and a
            small machine's cores all go to the engine's worker (`trl_longreward.vllm_support`).

    Raises:
        ImportError: vLLM is not installed (the message names the extra to install).
    """

    def __init__(
        self,
        model: str,
        *,
        max_batch_size: int = 256,
        chat_template_kwargs: dict[str, Any] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})  # e.g. {"enable_thinking": False}
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"VLLMJudge needs vLLM. Install it with: {VLLM_INSTALL_HINT}") from exc
        check_vllm_version(vllm)
        self._sampling_params_cls = vllm.SamplingParams
        dtype = cpu_engine_dtype(llm_kwargs.get("dtype"))
        if dtype is not None:
            llm_kwargs["dtype"] = dtype
        with cpu_thread_settings():
            self.llm = vllm.LLM(model=model, **llm_kwargs)
        self.model_id = model
        self._max_model_len = _max_model_len(self.llm)

    @property
    def context_window(self) -> int | None:
        return self._max_model_len

    def _generate_batch(self, requests: list[ChatRequest]) -> BatchResult:
        """`LLM.chat` (one call per kind of request); prompts too long for the model fail alone, not the batch."""
        results: BatchResult = [""] * len(requests)
        runnable = []
        for index, request in enumerate(requests):
            error = self._check_length(request)
            if error is None:
                runnable.append(index)
            else:
                results[index] = error
        if not runnable:
            return results
        # One `chat` call per kind of request: new turns, and continuations of a final assistant message.
        for continuation in (False, True):
            batch = [i for i in runnable if requests[i].continues_final_message == continuation]
            if not batch:
                continue
            params = [self._sampling_params(requests[i]) for i in batch]
            outputs = self.llm.chat(
                [list(requests[i].messages) for i in batch],
                params,
                use_tqdm=False,
                add_generation_prompt=not continuation,
                continue_final_message=continuation,
                chat_template_kwargs=self.chat_template_kwargs or None,
            )
            for index, output in zip(batch, outputs, strict=True):
                completion = output.outputs[0]
                self.stats.add(completion_tokens=len(completion.token_ids))
                results[index] = completion.text.strip()
        return results

    def _sampling_params(self, request: ChatRequest) -> Any:
        """The request's `SamplingParams`; a constrained verdict (`ChatRequest.verdict`) becomes vLLM's structured
        outputs, `StructuredOutputsParams(regex=...)` (vLLM >= 0.12; imported only when a request needs it)."""
        sampling: dict[str, Any] = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
        }
        if request.verdict is not None:
            from vllm.sampling_params import StructuredOutputsParams

            sampling["structured_outputs"] = StructuredOutputsParams(regex=request.verdict.regex())
        return self._sampling_params_cls(**sampling)

    def _group_key(self, request: ChatRequest) -> tuple:
        return ()  # every request carries its own SamplingParams: any mix shares one batch

    def cache_identity(self) -> dict[str, Any]:
        """The engine's model settings that can change an answer (model, revision, tokenizer, dtype, seed,
        quantization, generation-config source and overrides), a digest of the model's config and the chat
        template. Memory, parallelism and context-length settings are left out. Computed once."""
        identity = self.__dict__.get("_cache_identity")
        if identity is None:
            identity = self.__dict__["_cache_identity"] = _engine_identity(self.llm)
        extra = {"template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {}
        return {**super().cache_identity(), **identity, **extra}

    def _check_length(self, request: ChatRequest) -> JudgeError | None:
        """vLLM rejects a whole `chat` call if one prompt is too long, so check each prompt first."""
        if self._max_model_len is None:
            return None
        tokenizer = self.llm.get_tokenizer()
        continuation = request.continues_final_message
        ids = tokenizer.apply_chat_template(
            list(request.messages),
            add_generation_prompt=not continuation,
            continue_final_message=continuation,
            tokenize=True,
            **self.chat_template_kwargs,
        )
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        limit = self._max_model_len - request.max_tokens
        if len(ids) <= limit:
            return None
        return JudgeError(
            f"The judge prompt has {len(ids)} tokens, more than the judge's window allows ({limit} input tokens for "
            f"{self.model_id} with max_tokens={request.max_tokens}); chunk the context smaller."
        )


def _max_model_len(llm: Any) -> int | None:
    """The engine's context length, if this vLLM version exposes it where we look."""
    for owner in (getattr(llm, "llm_engine", None), llm):
        config = getattr(owner, "model_config", None)
        value = getattr(config, "max_model_len", None)
        if isinstance(value, int):
            return value
    return None


_ENGINE_FIELDS = (
    "model",
    "tokenizer",
    "revision",
    "code_revision",
    "tokenizer_revision",
    "tokenizer_mode",
    "dtype",
    "seed",
    "quantization",
    "generation_config",
    "override_generation_config",
    "hf_overrides",
    "logits_processor_pattern",
)


def _engine_identity(llm: Any) -> dict[str, Any]:
    """What identifies a `vllm.LLM`'s answers (see `VLLMJudge.cache_identity`), read where this vLLM keeps it."""
    from trl_longreward.judges.base import identity_digest

    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    settings = {name: str(getattr(config, name)) for name in _ENGINE_FIELDS if hasattr(config, name)}
    to_dict = getattr(getattr(config, "hf_config", None), "to_dict", None)
    model_config = None
    if callable(to_dict):
        model_config = {k: v for k, v in to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    template = None
    try:
        template = getattr(llm.get_tokenizer(), "chat_template", None)
    except Exception:  # a vLLM without a tokenizer handle: the template is then not part of the identity
        pass
    return {
        "engine": settings,
        "config": None if model_config is None else identity_digest(model_config),
        "chat_template": identity_digest(template),
    }
