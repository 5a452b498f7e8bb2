"""Shared-prefill sampling: the k samples of a prompt share one prefill and equal plain `generate`'s."""

import pytest
import torch
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_longreward.generation import sample_responses


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, seed=5)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _prompts(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (40, 17, 29)]  # left padding differs


def _run(model, tokenizer, prompts, **kwargs):
    return sample_responses(
        model, tokenizer, prompts, num_generations=3, temperature=1.0, top_p=1.0, max_completion_length=12, **kwargs
    )


def test_greedy_samples_equal_plain_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(model.config.vocab_size)
    # greedy generate refuses num_return_sequences > 1: repeat each prompt 3 times instead (what it does inside)
    repeated = [p for p in prompts for _ in range(3)]
    plain = sample_responses(
        model,
        tokenizer,
        repeated,
        num_generations=1,
        temperature=1.0,
        top_p=1.0,
        max_completion_length=12,
        shared_prefill=False,
        do_sample=False,
    )
    shared = _run(model, tokenizer, prompts, shared_prefill=True, do_sample=False)
    plain_ids = [s[0]["completion_ids"] for s in plain]
    assert [s["completion_ids"] for p in shared for s in p] == plain_ids
    assert all(len(s["completion_ids"]) > 0 for p in shared for s in p)


def test_shared_prefill_runs_the_prompt_once(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(model.config.vocab_size)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        samples = _run(model, tokenizer, prompts, shared_prefill=True)
    finally:
        handle.remove()
    width = max(map(len, prompts))
    assert seen[0] == (3, width - 1)  # one prefill of the 3 prompts, not 9
    assert all(shape[1] == 1 for shape in seen[1:])  # then one token per step for the 9 sequences
    assert seen[1][0] == 9 and len(samples) == 3 and all(len(p) == 3 for p in samples)


def test_training_mode_is_restored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    _run(model, tokenizer, _prompts(model.config.vocab_size)[:1])
    assert model.training
