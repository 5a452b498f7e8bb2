"""Tiny Llama models built from a config, with the real SmolLM2 tokenizer, for fast training tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from trl_longreward.models import default_model_path


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


# The 4-head model the build-pairs, GRPO and two-rank training tests use (their expectations were set on it).
FOUR_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
