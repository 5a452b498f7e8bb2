"""Tiny models built from a config (a Llama, or any causal LM family), with the real SmolLM2 tokenizer, and the small
CPU training setup that the trainer, callback and reliability tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from known_answers import CONTEXT, QUESTION
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from trl_longreward.models import default_model_path
from trl_longreward.trainer import LongContextDPOConfig


def tiny_llama(
    path: Path,
    *,
    hidden_size: int = 32,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 2048,
    pad_with_eos: bool = False,
    chat_template: bool = True,
    seed: int = 0,
) -> str:
    """Save a randomly initialised 2-layer Llama and the SmolLM2 tokenizer (with its chat template) to `path`.

    `pad_with_eos` gives the tokenizer and the config eos as the pad token; `chat_template=False` saves the tokenizer
    without a chat template (a plain base model). The same arguments and seed give the same weights on every call, so
    several processes building their own copy start from identical models.
    """
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    if pad_with_eos and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_with_eos else None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


#: The vocabulary of `tiny_causal_lm` models: token ids below it, and the SmolLM2 pad/eos/bos ids (0-2), are valid.
TINY_VOCAB = 256


def tiny_causal_lm(path: Path, model_type: str, *, seed: int = 0, **config_kwargs: Any) -> str:
    """Save a randomly initialised tiny causal LM of any transformers family (`model_type`, e.g. "mistral") and the
    SmolLM2 tokenizer to `path`.

    Defaults: hidden 32, 2 layers, 2 heads (1 key/value head) of 16, a `TINY_VOCAB`-token vocabulary (the tokenizer
    is larger; use ids below `TINY_VOCAB`), untied embeddings; `config_kwargs` override them and set family options
    (sliding window, layer types, experts, ...). The same arguments and seed give the same weights on every call.
    """
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    values: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(config_kwargs)
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# The 4-head model the build-pairs, GRPO and two-rank training tests use (their expectations were set on it).
FOUR_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def prompts_dataset(n: int = 4) -> Dataset:
    """n prompts over the known document (each with its own record number, so no two prompts are the same)."""
    return Dataset.from_list([{"context": CONTEXT + f" Record {i}.", "question": QUESTION} for i in range(n)])


def small_dpo_config(output_dir: Path | str, **overrides: Any) -> LongContextDPOConfig:
    """A small CPU training config (2 prompts x 4 samples per step, 16 new tokens, 3 steps) with `overrides`."""
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=3,
        num_generations=4,
        max_completion_length=16,
        max_prompt_length=256,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        learning_rate=1e-2,
        seed=0,
    )
    values.update(overrides)
    return LongContextDPOConfig(**values)


class JudgedSteps(TrainerCallback):
    """Records `LongContextDPOTrainer`'s `on_step_judged` events: each micro-step's rewards and pair selections."""

    def __init__(self) -> None:
        self.steps: list = []

    def on_step_judged(self, args, state, control, *, judged, **kwargs) -> None:
        self.steps.append(judged)

    @property
    def latest(self):
        return self.steps[-1]
