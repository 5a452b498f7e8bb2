"""Prompt-once DPO forward: each pair's long prompt goes through the model once, not twice.

TRL's `DPOTrainer` runs a pair as two rows, `[prompt, chosen]` and `[prompt, rejected]`, so a long document is
processed twice by the policy and twice by the reference. Here a pair becomes ONE row:

    [prompt[:-1], prompt[-1], chosen..., prompt[-1], rejected...]
     shared body  '--- chosen branch ---'  '--- rejected branch ---'

The last prompt token starts both branches (it is repeated once, at the same position id), so every completion token
is predicted from a position that holds exactly the hidden state it has in TRL's two-row layout: the first rejected
token is predicted by the branch's own copy of the last prompt token. Branch tokens attend to the shared body and to
their own branch (causally), never to the other branch; position ids restart at `len(prompt) - 1` in each branch.
The mask is a 4-D boolean mask for SDPA, an additive float mask for eager attention, or a `BlockMask` (built from
segment ids, O(L) memory) for flex attention: attention backends transformers already has, no new kernel.

The packing is applied by a forward pre-hook that rewrites the batch TRL gives the model, and a forward hook that
scatters the fused LM head's per-token outputs (log-probs, entropy, ...) back to TRL's two-row shape: TRL's loss and
metrics code runs unchanged on numbers equal to its own (tested to a tight tolerance, gradients included).

A row costs `P + C + R + 1` tokens instead of `2P + C + R`; the attention mask of SDPA and eager is `L x L` per row
(use flex attention for very long rows).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: attention implementations that take a custom mask; flash-attention kernels take only causal/varlen masks.
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")
_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
_BODY, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, -1


@dataclass
class PackedPairs:
    """A preference batch of `2B` rows packed into `B` rows, and the map back to the two-row layout."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    segments: torch.Tensor  # [B, L]: 0 shared body, 1 chosen branch, 2 rejected branch, -1 padding
    source_row: torch.Tensor  # [2B, T - 1]: packed row holding each shifted two-row position
    source_col: torch.Tensor  # [2B, T - 1]: packed shifted position (clamped where invalid)
    valid: torch.Tensor  # [2B, T - 1]: whether the two-row position has a packed counterpart

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def pack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Two-row labels ([2B, T], -100 outside completions) in the packed layout ([B, L])."""
        packed = torch.full_like(self.input_ids, -100)
        shifted = labels[:, 1:]
        rows = self.source_row[self.valid]
        cols = self.source_col[self.valid] + 1  # shifted position j predicts the token at j + 1
        packed[rows, cols] = shifted[self.valid]
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """A packed per-token output ([B, L - 1], shifted) in the two-row layout ([2B, T - 1]), zero elsewhere."""
        gathered = packed[self.source_row, self.source_col]
        return torch.where(self.valid, gathered, torch.zeros((), dtype=packed.dtype, device=packed.device))

    def mask_for(self, attn_implementation: str, dtype: torch.dtype) -> Any:
        """The attention mask for the given attention implementation."""
        if attn_implementation == "flex_attention":
            return self._block_mask()
        allowed = self._allowed()
        if attn_implementation == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    def _allowed(self) -> torch.Tensor:
        """[B, 1, L, L] boolean: query q may attend key k."""
        seg = self.segments
        length = seg.shape[1]
        idx = torch.arange(length, device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        q_seg, k_seg = seg[:, :, None], seg[:, None, :]
        allowed = causal & (k_seg != _PAD) & (q_seg != _PAD) & ((k_seg == _BODY) | (k_seg == q_seg))
        # padding queries see themselves only: a fully masked row would give NaNs in SDPA
        allowed |= (q_seg == _PAD) & (idx[None, :, None] == idx[None, None, :])
        return allowed[:, None]

    def _block_mask(self) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        seg = self.segments

        def mask_mod(b, h, q_idx, kv_idx):
            q_seg, k_seg = seg[b, q_idx], seg[b, kv_idx]
            same = (k_seg == _BODY) | (k_seg == q_seg)
            return (q_idx >= kv_idx) & (k_seg != _PAD) & (q_seg != _PAD) & same | (q_idx == kv_idx)

        batch, length = seg.shape
        return create_block_mask(mask_mod, batch, None, length, length, device=seg.device)


def pack_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> PackedPairs | None:
    """Pack a `DataCollatorForPreference` batch (chosen rows first, right-padded) into one row per pair.

    `pad_to_multiple_of` pads the packed rows (e.g. 64 on GPUs, where masked attention kernels run much faster on
    aligned lengths).

    Returns None when the batch does not have that structure (a pair whose rows do not share the exact same prompt,
    an empty prompt, or left padding): the caller then runs TRL's two-row forward.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] % 2:
        return None
    num_pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(dim=1).tolist()
    has_completion = completion_mask.any(dim=1).tolist()
    first = completion_mask.int().argmax(dim=1).tolist()
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    maps: list[tuple[int, int, int, int]] = []  # (prompt length, chosen length, rejected length)
    for i in range(num_pairs):
        c_row, r_row = i, num_pairs + i
        c_len, r_len = int(lengths[c_row]), int(lengths[r_row])
        if not (has_completion[c_row] and has_completion[r_row]):
            return None
        p = int(first[c_row])
        if p < 1 or int(first[r_row]) != p:
            return None
        if not bool(attention_mask[c_row, :c_len].all()) or not bool(attention_mask[r_row, :r_len].all()):
            return None  # not right-padded
        if not torch.equal(input_ids[c_row, :p], input_ids[r_row, :p]):
            return None
        chosen, rejected = c_len - p, r_len - p
        ids = torch.cat([input_ids[c_row, : p + chosen], input_ids[r_row, p - 1 : p + rejected]])
        positions = torch.cat([torch.arange(p + chosen), torch.arange(p - 1, p + rejected)])
        segments = torch.cat(
            [
                torch.full((p - 1,), _BODY),
                torch.full((chosen + 1,), _CHOSEN),
                torch.full((rejected + 1,), _REJECTED),
            ]
        )
        rows.append((ids, positions, segments))
        maps.append((p, chosen, rejected, c_len))

    length = max(ids.shape[0] for ids, _, _ in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    device = input_ids.device
    packed_ids = torch.full((num_pairs, length), pad_token_id, dtype=input_ids.dtype)
    packed_pos = torch.zeros((num_pairs, length), dtype=torch.long)
    packed_seg = torch.full((num_pairs, length), _PAD, dtype=torch.long)
    for i, (ids, positions, segments) in enumerate(rows):
        packed_ids[i, : ids.shape[0]] = ids
        packed_pos[i, : ids.shape[0]] = positions
        packed_seg[i, : ids.shape[0]] = segments

    width = input_ids.shape[1] - 1
    source_row = torch.zeros((2 * num_pairs, width), dtype=torch.long)
    source_col = torch.zeros((2 * num_pairs, width), dtype=torch.long)
    valid = torch.zeros((2 * num_pairs, width), dtype=torch.bool)
    cols = torch.arange(width)
    for i, (p, chosen, rejected, _) in enumerate(maps):
        # chosen row: token t < p + chosen sits at packed t, so shifted position j maps to j
        source_row[i] = i
        source_col[i] = cols.clamp(max=length - 2)
        valid[i] = cols < p + chosen - 1
        # rejected row: token t >= p sits at packed t + chosen + 1; only completion tokens are mapped
        source_row[num_pairs + i] = i
        source_col[num_pairs + i] = (cols + chosen + 1).clamp(max=length - 2)
        valid[num_pairs + i] = (cols >= p - 1) & (cols < p + rejected - 1)
    return PackedPairs(
        input_ids=packed_ids.to(device),
        position_ids=packed_pos.to(device),
        segments=packed_seg.to(device),
        source_row=source_row.to(device),
        source_col=source_col.to(device),
        valid=valid.to(device),
    )


def attention_implementation(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def unsupported_reason(model: Any, inputs: dict[str, Any], trainer: Any) -> str | None:
    """Why prompt-once cannot run for this model/batch (None when it can)."""
    attn = attention_implementation(model)
    if attn not in SUPPORTED_ATTENTION:
        return f"attention implementation {attn!r} takes no custom mask (use one of {', '.join(SUPPORTED_ATTENTION)})"
    if getattr(trainer, "aux_loss_enabled", False):
        return "the MoE load-balancing loss needs a 2-D attention mask"
    extra = set(inputs) - {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    if extra:
        return f"the batch has extra model inputs {sorted(extra)} (vision or custom inputs)"
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "prompt-learning PEFT adds virtual tokens"
    return None


@contextlib.contextmanager
def prompt_once_forward(modules: list[torch.nn.Module], packed: PackedPairs, dtype: torch.dtype) -> Iterator[None]:
    """While active, fused-head forwards of `modules` with the two-row batch run packed, and answer in two rows.

    Calls without `fused_lm_head=True` (e.g. generation) pass through untouched.
    """
    active: list[bool] = []

    def pre_hook(module, args, kwargs):
        if args or not kwargs.get("fused_lm_head") or kwargs.get("labels") is None:
            active.append(False)
            return args, kwargs
        if kwargs["input_ids"].shape[0] != 2 * packed.input_ids.shape[0]:
            active.append(False)
            return args, kwargs
        attn = attention_implementation(module)
        kwargs = dict(kwargs)
        kwargs["labels"] = packed.pack_labels(kwargs["labels"])
        kwargs["input_ids"] = packed.input_ids
        kwargs["position_ids"] = packed.position_ids
        kwargs["attention_mask"] = packed.mask_for(attn, dtype)
        active.append(True)
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        if not active.pop():
            return output
        for name in _PER_TOKEN_FIELDS:
            value = getattr(output, name, None)
            if value is not None:
                output[name] = packed.unpack(value)
        return output

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
