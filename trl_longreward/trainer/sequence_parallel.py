"""Sequence parallelism (Ulysses) for prompt-once DPO: the ranks of an SP group train the same pairs, each holding
one slice of every packed row.

`sp_size` = S consecutive ranks form a group; the groups are the data-parallel replicas (DP = world / S).

- **Pairs** (`exchange_within_group`): every rank samples and judges its own prompts as without SP (each prompt is
  generated and judged once, by one rank), then the ranks of a group exchange their micro-batches of pairs and
  train them one after the other, all together: a rank's micro-step runs one forward and backward per rank of its
  group (no gradient reduction until the last), each on 1/S of the rows. A rank thus holds, at any time, the
  activations of `per_device_train_batch_size` rows of length L / S.
- **Forward** (`prompt_once.prompt_once_forward`): the packed row [B, L] (L padded to a multiple of S) is cut into
  S slices along the sequence; each rank runs the model on its slice with its position ids and the labels shifted
  over the whole row (TRL's fused head scores pre-shifted `shift_labels`). In every attention layer, an all-to-all
  turns the sequence slices of q/k/v into head slices over the whole row (`seq_to_heads`), the split attention runs
  with the global segment layout, and a second all-to-all turns the result back (`heads_to_seq`). The per-token
  log-probs of the slices are gathered into the whole row (`gather_sequence`), whose backward keeps this rank's
  slice: every rank of the group computes the same loss, and its backward reaches each slice's graph exactly once.
- **Gradients**: a rank's parameter gradient is its slice's part of the group's gradient. DDP (or ZeRO / FSDP)
  averages over all world ranks, so the group's pairs weigh `world x group pairs / window pairs` in each of its
  ranks' losses (`PairShares` with `sp_size`, the pair counts of one rank per group), which makes the average the
  one-process gradient over the union of all groups' pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallelGroup:
    """This rank's SP group: its size, this rank's index in it, and the process group."""

    size: int
    rank: int
    group: Any
    ranks: tuple[int, ...]


def build_groups(sp_size: int) -> SequenceParallelGroup | None:
    """Create the SP process groups (every rank must call this, in the same order); None when `sp_size` is 1."""
    if sp_size <= 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"sp_size={sp_size} needs a distributed launch (accelerate launch / torchrun).")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size:
        raise ValueError(f"sp_size={sp_size} does not divide the world size {world}.")
    mine = None
    for first in range(0, world, sp_size):
        ranks = tuple(range(first, first + sp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine = SequenceParallelGroup(sp_size, rank - first, group, ranks)
    return mine


def head_divisibility_reason(config: Any, sp_size: int) -> str | None:
    """Why Ulysses cannot split this model's attention heads over `sp_size` ranks (None when it can)."""
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        return "the model config has no num_attention_heads"
    if heads % sp_size:
        return f"num_attention_heads={heads} is not divisible by sp_size={sp_size}"
    return None


def exchange_within_group(sp: SequenceParallelGroup, item: Any) -> list[Any]:
    """Every group rank's `item`, in group-rank order (the same list on each of them)."""
    gathered: list[Any] = [None] * sp.size
    dist.all_gather_object(gathered, item, group=sp.group)
    return gathered


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """all_to_all over dim 0 (chunk i goes to group rank i; the result's chunk i came from group rank i)."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """One all-to-all layout change (`forward_fn`); its backward is the inverse change (`backward_fn`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallelGroup, forward_fn, backward_fn) -> torch.Tensor:
        ctx.sp, ctx.backward_fn = sp, backward_fn
        return forward_fn(x, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.backward_fn(grad, ctx.sp), None, None, None


def _seq_to_heads(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    b, h, local, d = x.shape
    s = sp.size
    chunks = x.reshape(b, s, h // s, local, d).transpose(0, 1)  # [S (head chunk), B, H/S, L/S, D]
    received = _all_to_all(chunks, sp.group)  # [S (sequence slice), B, H/S, L/S, D]
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // s, s * local, d)


def _heads_to_seq(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    b, h_local, length, d = x.shape
    s = sp.size
    chunks = x.reshape(b, h_local, s, length // s, d).permute(2, 0, 1, 3, 4)  # [S (sequence slice), B, H/S, L/S, D]
    received = _all_to_all(chunks, sp.group)  # [S (head chunk), B, H/S, L/S, D]
    return received.transpose(0, 1).reshape(b, s * h_local, length // s, d)


def seq_to_heads(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    """[B, H, L/S, D] (this rank's sequence slice, every head) -> [B, H/S, L, D] (its heads, the whole sequence)."""
    return _Exchange.apply(x, sp, _seq_to_heads, _heads_to_seq)


def heads_to_seq(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    """The inverse of `seq_to_heads`."""
    return _Exchange.apply(x, sp, _heads_to_seq, _seq_to_heads)


class _GatherSequence(torch.autograd.Function):
    """[B, L/S] slices -> [B, L]; the backward keeps this rank's slice of the gradient (every rank of the group
    computes the same function of the gathered tensor, so each slice's gradient is taken once, by its owner)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
        ctx.sp, ctx.local = sp, x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(sp.size)]
        dist.all_gather(parts, x, group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = ctx.sp.rank * ctx.local
        return grad[:, start : start + ctx.local].contiguous(), None


def gather_sequence(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    if x.dtype == torch.bool:  # label masks: no gradient
        return _GatherSequence.apply(x.to(torch.uint8), sp).bool()
    if not x.requires_grad:
        with torch.no_grad():
            return _GatherSequence.apply(x, sp)
    return _GatherSequence.apply(x, sp)


def local_slice(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    """This rank's slice of a [B, L] tensor (L a multiple of the group size)."""
    local = x.shape[1] // sp.size
    return x[:, sp.rank * local : (sp.rank + 1) * local]
