"""Sample k responses per prompt from the current policy with `generate` (TRL's unwrap handles DeepSpeed/FSDP).

Shared prefill: `generate(num_return_sequences=k)` copies each prompt k times BEFORE the prefill, so a long document
is prefilled k times. Here the prompt batch is prefilled once (all tokens but the last), its KV cache is repeated k
times (`Cache.batch_repeat_interleave`), and `generate` continues from it: the k samples share one prefill. The
tokens drawn are the same computation; with greedy decoding the outputs equal plain `generate`'s (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from trl.models.utils import unwrap_model_for_generation

from ..models import left_pad, truncate_at_eos, unpack_cpu_4bit_weights


@torch.no_grad()
def sample_responses(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int | None = None,
    device: Any = None,
    shared_prefill: bool = True,
    do_sample: bool = True,
) -> list[list[dict[str, Any]]]:
    """`num_samples` sampled responses per prompt (left-padded batches of `batch_size` prompts), each a dict with
    `completion_ids` (up to and including the first EOS) and the decoded `text`. The model is put in eval mode for
    the duration and restored. `shared_prefill`: prefill each prompt once for its k samples (see the module doc)."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = device if device is not None else next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids)
    out: list[list[dict[str, Any]]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            input_ids, attention_mask = left_pad(chunk, pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            settings = dict(
                do_sample=do_sample,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                use_cache=True,
            )
            if do_sample:
                settings.update(temperature=temperature, top_p=top_p, top_k=0)
            cache = _prefill(model, input_ids, attention_mask) if shared_prefill and num_samples > 1 else None
            if cache is not None:
                cache.batch_repeat_interleave(num_samples)
                generated = model.generate(
                    input_ids=input_ids.repeat_interleave(num_samples, dim=0),
                    attention_mask=attention_mask.repeat_interleave(num_samples, dim=0),
                    past_key_values=cache,
                    **settings,
                )
            else:
                generated = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=num_samples, **settings
                )
            new_tokens = generated[:, input_ids.shape[1] :].tolist()
            for i in range(len(chunk)):
                per_prompt = []
                for row in new_tokens[i * num_samples : (i + 1) * num_samples]:
                    ids = truncate_at_eos(row, eos_ids)
                    per_prompt.append({"completion_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)})
                out.append(per_prompt)
    finally:
        if was_training:
            model.train()
            unpack_cpu_4bit_weights(model)
    return out


def _prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The KV cache of all prompt tokens but the last (generate needs one uncached token), or None if the model's
    cache cannot be repeated per sample (then the caller falls back to `num_return_sequences`)."""
    if input_ids.shape[1] < 2 or getattr(model.config, "is_encoder_decoder", False):
        return None
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    outputs = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(outputs, "past_key_values", None)
    return cache if cache is not None and hasattr(cache, "batch_repeat_interleave") else None


def generate_samples(trainer: Any, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The trainer's policy samples `num_samples` responses for each row (unwrapped from DDP/DeepSpeed/FSDP), or
    vLLM does (`trainer.vllm_generation`) with the policy's current weights."""
    args = trainer.args
    if getattr(trainer, "vllm_generation", None) is not None:
        return vllm_samples(trainer, rows)
    with unwrap_model_for_generation(
        trainer.model_wrapped, trainer.accelerator, gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
    ) as model:
        return sample_responses(
            model,
            trainer._tokenizer,
            [r["prompt_ids"] for r in rows],
            num_samples=args.num_samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.generation_batch_size,
            device=trainer.accelerator.device,
            shared_prefill=args.shared_prefill,
        )


def vllm_samples(trainer: Any, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`num_samples` responses per row from TRL's `VLLMGeneration` (colocate or server mode).

    The policy's weights are pushed to vLLM once per optimizer step (before the first generation after it). Prompts
    are passed repeated `num_samples` times consecutively, as `VLLMGeneration.generate` expects.
    """
    k = trainer.args.num_samples
    step = trainer.state.global_step
    if trainer._vllm_synced_step != step:
        trainer.vllm_generation.sync_weights()
        trainer._vllm_synced_step = step
    prompts = [row["prompt_ids"] for row in rows for _ in range(k)]
    _, completion_ids, _, _ = trainer.vllm_generation.generate(prompts=prompts, images=None, num_generations=k)
    if len(completion_ids) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(completion_ids)} completions for {len(prompts)} requested.")
    tokenizer = trainer._tokenizer
    eos = trainer.model.generation_config.eos_token_id if trainer.model.generation_config else None
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    out = []
    for i in range(len(rows)):
        per_prompt = []
        for ids in completion_ids[i * k : (i + 1) * k]:
            ids = truncate_at_eos(list(ids), eos_ids)
            per_prompt.append({"completion_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)})
        out.append(per_prompt)
    return out
