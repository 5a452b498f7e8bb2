"""A judge that runs a chat model in-process with transformers (the embedded SmolLM2 by default)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trl_longreward.judges.base import ChatRequest, JudgeError
from trl_longreward.judges.local import BatchingJudge, BatchResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["TransformersJudge"]


class TransformersJudge(BatchingJudge):
    """Answer judge requests with `model.generate`, in micro-batches, on CPU or GPU.

    Args:
        model: a checkpoint directory or hub id, a loaded `PreTrainedModel`, or `None` for the embedded default
            (SmolLM2-135M-Instruct, see `trl_longreward.models.default_model_path`).
        tokenizer: a tokenizer or its path; default: loaded from the model's path. It is used as is (never mutated),
            so the caller may share it with the reward's chunker.
        max_batch_size: the most requests in one `generate` call.
        device: where to run; default: the loaded model's device, or CUDA if available for a model loaded here.
        dtype: weights dtype for a model loaded here; default float32 on CPU, the checkpoint's dtype on GPU.
        max_input_tokens: the longest prompt accepted, in tokens; default: the model's context window minus the
            request's `max_tokens`. Longer prompts fail with a `JudgeError` for that request only.
        seed: seeds sampling (temperature > 0) per batch, without touching the caller's global RNG stream.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel | None = None,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        *,
        max_batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_input_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_longreward.models import DEFAULT_MODEL_NAME, check_model_source, default_model_path

        model_id: str | None = None
        if model is None:
            model, model_id = default_model_path(), DEFAULT_MODEL_NAME
        if isinstance(model, str | Path):
            check_model_source(model, option="judge_model")
            target = torch.device(device) if device is not None else _auto_device()
            if dtype is None:
                dtype = torch.float32 if target.type == "cpu" else "auto"  # type: ignore[assignment]
            if tokenizer is None:
                tokenizer = str(model)
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).to(target)
        elif device is not None:
            model = model.to(device)
        if tokenizer is None:
            tokenizer = model.name_or_path
        if isinstance(tokenizer, str | Path):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"The tokenizer of {model.name_or_path!r} has no chat template; a chat model is needed.")

        self.model: PreTrainedModel = model.eval()
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self.model_id = model_id or model.name_or_path or type(model).__name__
        self.max_input_tokens = max_input_tokens
        self.seed = seed
        self._batches = 0
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos_ids: set[int] = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        # Pad with eos when the tokenizer has no pad token; pad positions are masked, so the id does not matter.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token.")
        self._pad_id: int = pad
        self._window: int | None = getattr(self.model.config, "max_position_embeddings", None)
        # Encode control tokens inside judged texts as plain text, so a document cannot close the prompt's turn.
        params = inspect.signature(tokenizer.apply_chat_template).parameters
        sanitize = "sanitize_control_tokens" in params
        self._template_kwargs: dict[str, Any] = {"sanitize_control_tokens": True} if sanitize else {}

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "device": str(self.model.device), "dtype": str(self.model.dtype)}

    def _input_limit(self, request: ChatRequest) -> int | None:
        if self.max_input_tokens is not None:
            return self.max_input_tokens
        return None if self._window is None else self._window - request.max_tokens

    def _generate_batch(self, requests: list[ChatRequest]) -> BatchResult:
        """Tokenize with the chat template, drop over-long prompts, left-pad the rest and generate once."""
        encoded = self.tokenizer.apply_chat_template(
            [list(request.messages) for request in requests],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self._template_kwargs,
        )["input_ids"]
        results: BatchResult = [""] * len(requests)
        runnable: list[int] = []
        for index, (request, ids) in enumerate(zip(requests, encoded, strict=True)):
            limit = self._input_limit(request)
            if limit is not None and len(ids) > limit:
                results[index] = JudgeError(
                    f"The judge prompt has {len(ids)} tokens, more than the judge's window allows ({limit} input "
                    f"tokens for {self.model_id} with max_tokens={request.max_tokens}); chunk the context smaller."
                )
            else:
                runnable.append(index)
        if runnable:
            texts = self._generate([encoded[i] for i in runnable], requests[runnable[0]])
            for index, text in zip(runnable, texts, strict=True):
                results[index] = text
        return results

    def _generate(self, prompts: list[list[int]], sampling: ChatRequest) -> list[str]:
        """One `generate` call over left-padded prompts that share `sampling`'s parameters."""
        width = max(len(ids) for ids in prompts)
        # Left padding keeps every prompt's last token at the same position, where generation continues.
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1

        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = sampling.max_tokens
        config.pad_token_id = self._pad_id
        if sampling.temperature > 0:
            config.do_sample, config.temperature, config.top_p = True, sampling.temperature, sampling.top_p
            config.top_k = None  # the request's top_p is the only truncation asked for
        else:
            config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None

        device = self.model.device
        self._batches += 1
        with torch.inference_mode(), self._rng_scope(config.do_sample, device):
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
        new_tokens = output[:, width:].cpu()
        self.stats.add(completion_tokens=sum(self._count_generated(row) for row in new_tokens.tolist()))
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    @contextlib.contextmanager
    def _rng_scope(self, sampling: bool, device: torch.device) -> Iterator[None]:
        """Seed sampling reproducibly inside a forked RNG state, so the caller's own random stream is untouched."""
        if not sampling:
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + self._batches)
            yield

    def _count_generated(self, row: list[int]) -> int:
        """Tokens actually generated: up to and including the first eos (the rest is padding)."""
        for position, token in enumerate(row):
            if token in self._eos_ids:
                return position + 1
        return len(row)


def _auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
