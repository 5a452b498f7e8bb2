"""Answering fixed prompts with a model under evaluation, leaving the model exactly as it was found.

Used by `trl-longreward evaluate` (models loaded from disk) and by `LongRewardCallback` (the policy in the middle of
training). Unlike the trainer's sampling (`trainer/generation.py`: k samples per prompt at the training temperature),
evaluation answers each prompt once, greedily by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    device: Any = None,
) -> list[dict[str, Any]]:
    """One answer per prompt (left-padded batches of `batch_size`), each `{"text", "completion_ids"}`.

    Greedy unless `do_sample`. The model generates in eval mode with the KV cache on; afterwards every module's
    train/eval mode and `config.use_cache` are restored exactly as they were (a training model goes back to training;
    PEFT adapters are not touched).
    """
    import torch

    from .models import left_pad, truncate_at_eos, unpack_cpu_4bit_weights

    if not prompt_ids:
        return []
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = device if device is not None else next(model.parameters()).device
    if do_sample:
        sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    modes = [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    had_use_cache, use_cache = hasattr(config, "use_cache"), getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True  # trainers switch it off for gradient checkpointing; generation wants it
    out: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompt_ids), batch_size):
                chunk = [list(ids) for ids in prompt_ids[start : start + batch_size]]
                input_ids, attention_mask = left_pad(chunk, pad_id)
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    use_cache=True,
                    **sampling,
                )
                for row in generated[:, input_ids.shape[1] :].tolist():
                    ids = truncate_at_eos(row, eos_ids)
                    out.append(
                        {"completion_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True).strip()}
                    )
    finally:
        for module, training in modes:
            module.training = training
        if had_use_cache:
            config.use_cache = use_cache
        elif config is not None:
            del config.use_cache
        if any(training for _, training in modes):
            unpack_cpu_4bit_weights(model)
    return out


def load_model(name: str, *, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """A causal LM (eval mode, on its device) and its tokenizer (pad token = eos when it has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer
