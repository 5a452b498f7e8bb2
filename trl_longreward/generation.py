"""The one generation helper: sample k responses per prompt from a causal LM, leaving the model exactly as found.

Used by the trainer (k samples per prompt at the training temperature, from the policy mid-training), by
`trl-longreward build-pairs` (the same, from a model loaded from disk) and, through `generate_answers`, by
`trl-longreward evaluate` and `LongRewardCallback` (one answer per prompt, greedy by default).

Shared prefill: `generate(num_return_sequences=k)` copies each prompt k times BEFORE the prefill, so a long document
is prefilled k times. Here the prompt batch is prefilled once (all tokens but the last), its KV cache is repeated k
times (`Cache.batch_repeat_interleave`), and `generate` continues from it: the k samples share one prefill. The
tokens drawn are the same computation; with greedy decoding the outputs equal plain `generate`'s (tested).

`sample_responses_vllm` gives the same output from an in-process `vllm.LLM` (`load_vllm_policy`; vLLM is imported
lazily), fed the same prompt token ids. Its samples are seeded per prompt, not per batch: they do not depend on which
other prompts share the call, and they differ from the transformers path's (another random stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .models import check_model_source, left_pad, truncate_at_eos, unpack_cpu_4bit_weights
from .vllm_support import VLLM_INSTALL_HINT, check_vllm_version, cpu_engine_dtype, cpu_thread_settings


@torch.no_grad()
def sample_responses(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_completion_length: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    device: Any = None,
    shared_prefill: bool = True,
) -> list[list[dict[str, Any]]]:
    """`num_generations` responses per prompt (left-padded batches of `batch_size` prompts), each a dict with
    `completion_ids` (up to and including the first EOS) and the decoded `text`. Sampled unless `do_sample=False`
    (greedy). The model generates in eval mode with the KV cache on; afterwards every module's train/eval mode and
    `config.use_cache` are restored exactly as they were (PEFT adapters are not touched). `shared_prefill`: prefill
    each prompt once for its k samples (see the module doc)."""
    if not prompt_ids:
        return []
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = device if device is not None else next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids)
    settings: dict[str, Any] = {"max_new_tokens": max_completion_length, "pad_token_id": pad_id, "use_cache": True}
    if do_sample:
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:  # unset the checkpoint's sampling defaults, which greedy decoding would warn about
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    modes = [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    had_use_cache, use_cache = hasattr(config, "use_cache"), getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True  # trainers switch it off for gradient checkpointing; generation wants it
    out: list[list[dict[str, Any]]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [list(ids) for ids in prompt_ids[start : start + batch_size]]
            input_ids, attention_mask = left_pad(chunk, pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            k = num_generations
            cache = _prefill(model, input_ids, attention_mask) if shared_prefill and k > 1 else None
            if cache is not None:
                cache.batch_repeat_interleave(k)
                generated = model.generate(
                    input_ids=input_ids.repeat_interleave(k, dim=0),
                    attention_mask=attention_mask.repeat_interleave(k, dim=0),
                    past_key_values=cache,
                    **settings,
                )
            else:
                generated = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=k, **settings
                )
            new_tokens = generated[:, input_ids.shape[1] :].tolist()
            for i in range(len(chunk)):
                per_prompt = []
                for row in new_tokens[i * k : (i + 1) * k]:
                    ids = truncate_at_eos(row, eos_ids)
                    per_prompt.append({"completion_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)})
                out.append(per_prompt)
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


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_completion_length: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    device: Any = None,
) -> list[dict[str, Any]]:
    """One answer per prompt (`sample_responses` with k = 1; greedy unless `do_sample`), each
    `{"text", "completion_ids"}` with the text stripped of surrounding whitespace."""
    responses = sample_responses(
        model,
        tokenizer,
        prompt_ids,
        num_generations=1,
        max_completion_length=max_completion_length,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        device=device,
        shared_prefill=False,
    )
    return [{**per_prompt[0], "text": per_prompt[0]["text"].strip()} for per_prompt in responses]


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


# ----- vLLM -----


def require_vllm(option: str = "--use_vllm") -> None:
    """Fail with how to install vLLM when it cannot be imported (checked before any work starts)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"{option} needs vLLM, which is not installed: {VLLM_INSTALL_HINT}.")


def check_vllm_options(
    *,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    max_model_length: int | None,
    max_prompt_length: int,
    max_completion_length: int,
) -> None:
    """The `--vllm_*` options of a command run with `--use_vllm`, checked (vLLM importable included) before any
    work starts."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
    if tensor_parallel_size < 1:
        raise ValueError(f"--vllm_tensor_parallel_size must be >= 1, got {tensor_parallel_size}.")
    needed = max_prompt_length + max_completion_length
    if max_model_length is not None and max_model_length < needed:
        raise ValueError(
            f"--vllm_max_model_length {max_model_length} cannot hold a prompt of --max_prompt_length "
            f"{max_prompt_length} plus --max_completion_length {max_completion_length}: raise it to {needed}, or "
            "lower those."
        )
    require_vllm()


def load_vllm_policy(
    name: str,
    *,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    max_model_length: int | None = None,
    tensor_parallel_size: int = 1,
    enforce_eager: bool = False,
    enable_prefix_caching: bool = False,
    option: str = "--model",
) -> tuple[Any, Any]:
    """An in-process `vllm.LLM` of `name` and the transformers tokenizer that cuts and tokenizes the prompts (pad
    token = eos when it has none, as `load_causal_lm`'s), so vLLM gets the very token ids the transformers path
    would. `max_model_length` None: the model's own. Prefix caching is off by default: a prompt whose KV comes from
    the cache is computed differently from one prefilled afresh, so samples would depend on what ran before (a rerun
    or a shard would not draw the same ones). On a machine without CUDA, `dtype="auto"` is float32 on x86 CPUs without
    native bfloat16, and a small machine's cores all go to the engine's worker (`trl_longreward.vllm_support`)."""
    require_vllm()
    import vllm
    from transformers import AutoTokenizer

    check_vllm_version(vllm)
    check_model_source(name, option=option)
    tokenizer = AutoTokenizer.from_pretrained(str(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with cpu_thread_settings():
        llm = vllm.LLM(
            model=str(name),
            dtype=cpu_engine_dtype(dtype),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_length,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
        )
    return llm, tokenizer


def eos_token_ids(name: str, tokenizer: Any) -> list[int]:
    """The ids generation stops at: the checkpoint's generation config's eos ids (what `generate` stops at), else
    the tokenizer's eos."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(name)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]))


def sample_responses_vllm(
    llm: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_completion_length: int,
    seeds: Sequence[int],
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] | None = None,
) -> list[list[dict[str, Any]]]:
    """`sample_responses` with an in-process `vllm.LLM`: `num_generations` responses per prompt (one request with
    `n=num_generations`), each `{"completion_ids", "text"}` decoded by `tokenizer` as the transformers path does.
    Prompt i is seeded with `seeds[i]` (`SamplingParams(seed=...)`; vLLM draws its j-th sample with seed + j), so
    a rerun, a resumed run or another shard draws the same samples. Greedy unless `do_sample`. Generation stops at
    `eos_token_ids` (default: the tokenizer's eos)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if len(seeds) != len(prompt_ids):
        raise ValueError(
            f"sample_responses_vllm needs one seed per prompt: {len(seeds)} seeds, {len(prompt_ids)} prompts."
        )
    if not prompt_ids:
        return []
    stop = sorted(set(eos_token_ids or [tokenizer.eos_token_id]))
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {"temperature": 0.0}
    params = [
        SamplingParams(
            n=num_generations,
            seed=seed,
            max_tokens=max_completion_length,
            stop_token_ids=stop,
            detokenize=False,  # decoded below, exactly as the transformers path decodes
            **sampling,
        )
        for seed in seeds
    ]
    requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
    outputs = llm.generate(requests, sampling_params=params, use_tqdm=False)
    out = []
    for output in outputs:
        per_prompt = []
        for sample in sorted(output.outputs, key=lambda sample: sample.index):
            ids = truncate_at_eos(list(sample.token_ids), set(stop))
            per_prompt.append({"completion_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)})
        out.append(per_prompt)
    return out
