"""Prompt-once without an L x L mask: split attention equals the dense branch mask (itself checked against
transformers' two-row masks in test_prompt_once_matrix.py), never builds a mask that grows with L x L, and a
marker that reaches another attention function fails loudly. The family matrix runs split attention in its sdpa
cells against TRL's two rows; the `dense` option is checked here."""

from __future__ import annotations

import pytest
import torch
from test_prompt_once import _assert_equivalent, _trainer
from tiny_models import tiny_llama

from trl_longreward.trainer.prompt_once import (
    CHUNKED,
    FULL,
    SLIDING,
    AttentionPattern,
    PackedPairs,
    _SplitSpec,
    pack_pairs,
    split_attention,
)


def _batch(specs: list[tuple[int, int, int]], pad_to: int = 1, seed: int = 0):
    """A two-row preference batch (chosen rows first, right-padded) for pairs of (prompt, chosen, rejected) lengths."""
    g = torch.Generator().manual_seed(seed)
    rows, completions = [], []
    for prompt, chosen, rejected in specs:
        ids = torch.randint(5, 100, (prompt,), generator=g).tolist()
        rows.append((ids + torch.randint(5, 100, (chosen,), generator=g).tolist(), prompt))
        completions.append((ids + torch.randint(5, 100, (rejected,), generator=g).tolist(), prompt))
    ordered = rows + completions
    width = max(len(ids) for ids, _ in ordered)
    input_ids = torch.zeros((len(ordered), width), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for i, (ids, prompt) in enumerate(ordered):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        completion[i, prompt : len(ids)] = 1
    return input_ids, attention, completion


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def _dense_reference(packed: PackedPairs, pattern, query, key, value, groups):
    """SDPA of the whole packed row under the dense boolean mask, as transformers' sdpa function runs it."""
    from transformers.integrations.sdpa_attention import repeat_kv

    mask = packed.mask_for("sdpa", torch.float32, pattern)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "pattern",
    [
        AttentionPattern(),
        AttentionPattern(SLIDING, 1),
        AttentionPattern(SLIDING, 5),
        AttentionPattern(SLIDING, 64),  # wider than every prompt: the window never bites
        AttentionPattern(CHUNKED, 4),
        AttentionPattern(CHUNKED, 7),
    ],
    ids=lambda p: f"{p.kind}-{p.size}",
)
@pytest.mark.parametrize("groups", [1, 2])
def test_split_attention_equals_the_dense_mask(pattern: AttentionPattern, groups: int):
    """Outputs and q/k/v gradients, with pairs of uneven prompts and branches, a one-token prompt, and padding."""
    specs = [(23, 4, 9), (1, 3, 2), (11, 12, 1), (17, 1, 1)]
    packed = pack_pairs(*_batch(specs), pad_to_multiple_of=8)
    dense = pack_pairs(*_batch(specs), pad_to_multiple_of=8, attention="dense")
    assert packed.length % 8 == 0 and packed.length > max(p + c + r for p, c, r in specs) - 1
    heads, dim = 4, 8
    g = torch.Generator().manual_seed(1)
    shape = (len(specs), heads, packed.length, dim)
    kv_shape = (len(specs), heads // groups, packed.length, dim)
    tensors = [torch.randn(s, generator=g, requires_grad=True) for s in (shape, kv_shape, kv_shape)]
    weights = torch.randn((len(specs), packed.length, heads, dim), generator=g)

    out, _ = split_attention(_Module(groups), *tensors, _SplitSpec(packed, pattern))
    grads = torch.autograd.grad((out * weights).sum(), tensors)
    ref = _dense_reference(dense, pattern, *tensors, groups)
    ref_grads = torch.autograd.grad((ref * weights).sum(), tensors)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert packed.split_calls == 1


@pytest.mark.parametrize("pattern", [AttentionPattern(), AttentionPattern(SLIDING, 32)], ids=[FULL, SLIDING])
def test_no_mask_grows_with_the_square_of_the_length(pattern: AttentionPattern, monkeypatch):
    """The largest mask SDPA gets is (branch) x (prompt + branch) for a full layer and (window) x (2 windows) in a
    sliding body: a 2k-token prompt with 8-token answers never sees a mask near 2k x 2k."""
    prompt, answer = 2048, 8
    packed = pack_pairs(*_batch([(prompt, answer, answer)]))
    seen: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        seen.append(0 if attn_mask is None else attn_mask.numel())
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    q = torch.randn(1, 2, packed.length, 8)
    split_attention(_Module(1), q, q, q, _SplitSpec(packed, pattern))
    bound = (answer + 1) * (prompt + answer) if pattern.kind == FULL else 32 * 63
    assert max(seen) <= bound < packed.length**2 // 50, (max(seen), bound)
    assert seen[0] == 0  # the body's first block runs causal, maskless: SDPA's fused kernels


def test_dense_option_equals_two_rows(tmp_path):
    trainer = _trainer(tiny_llama(tmp_path / "m", hidden_size=64, seed=3), tmp_path, prompt_once_attention="dense")
    assert trainer.args.prompt_once_attention == "dense"
    _assert_equivalent(trainer)
    with pytest.raises(ValueError, match="prompt_once_attention must be 'auto' or 'dense'"):
        _trainer(tmp_path / "m", tmp_path, prompt_once_attention="flash")


def test_a_marker_that_misses_the_split_function_fails_loudly(tmp_path, monkeypatch):
    """A model whose layers do not go through transformers' registered sdpa function (a local override) would attend
    the all-masked marker: the forward raises instead of training on it."""
    from transformers.modeling_utils import AttentionInterface

    trainer = _trainer(tiny_llama(tmp_path / "m", hidden_size=64, seed=3), tmp_path)
    _assert_equivalent(trainer)  # installs the dispatcher; split attention equals two rows
    dispatcher = AttentionInterface._global_mapping["sdpa"]
    from trl_longreward.trainer import prompt_once

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", prompt_once._ORIGINAL_SDPA[0])
    with pytest.raises(RuntimeError, match="attention layers ran the split attention"):
        _assert_equivalent(trainer)
    assert AttentionInterface._global_mapping["sdpa"] is not dispatcher


def test_sequence_parallelism_refuses_what_it_cannot_run(tmp_path):
    """At construction, with every reason: heads that do not split over the ranks, an attention without the split
    path, a dense mask; and a run that is not distributed."""
    path = tiny_llama(tmp_path / "m", hidden_size=64, seed=3)  # 2 attention heads
    with pytest.raises(ValueError) as refused:
        _trainer(path, tmp_path, attn="eager", sp_size=4, prompt_once_attention="dense")
    message = str(refused.value)
    assert "sp_size=4" in message and "num_attention_heads=2 is not divisible by sp_size=4" in message
    assert "this model has 'eager'" in message and "prompt_once_attention='auto'" in message
    with pytest.raises(ValueError, match="needs a distributed launch"):
        _trainer(path, tmp_path, sp_size=2)
    from trl_longreward import LongContextDPOConfig

    with pytest.raises(ValueError, match="sp_size must be a positive integer"):
        LongContextDPOConfig(output_dir=str(tmp_path), sp_size=0, use_cpu=True)
