"""Data-parallel ranks that hold different numbers of preference pairs in a micro-step.

Prompts without a valid pair are skipped, so ranks hold different numbers of pairs, and a rank may hold none (it then
trains a stand-in pair whose loss counts 0, so that it still takes part in DDP's gradient all-reduce). Three things
make such a step the step a single process would take on the union of the ranks' pairs:

- `PairShares` / `gather_window_shares`: one tiny all-gather, per optimizer step, of every rank's pair and
  chosen-token counts in each micro-step of the accumulation window. The window is the unit: a micro-step's loss (a
  mean over its own pairs) is weighted by `world_size * pairs_micro_step_rank / pairs_window` (`union_loss_weights`),
  and the trainer's loss is not divided by the accumulation steps again (`loss_is_scaled_for_ga`); TRL's "sft" term
  is a mean over the micro-batch's chosen completion tokens, so it is weighted by chosen-token counts instead. DDP
  averages gradients over the ranks and accumulation sums them over the micro-steps, so the optimizer step takes the
  gradient of the loss over the union of the window's pairs, as one process with one micro-step would, whatever the
  split across ranks and micro-steps. (Losses that couple the pairs of a batch, "aot" and
  "aot_unpaired", which sort them, cannot be split across ranks exactly; they get the pair weight.)
- `PairMetricsAccelerator`: TRL's DPO loss gathers its per-pair metrics (rewards, margins, accuracies, log-probs)
  with `accelerator.gather`, which needs the same first dimension on every rank, and its per-rank sums (entropy,
  logits, token counts) with `accelerator.gather_for_metrics`. Seen through this view, a per-pair tensor is padded to
  the largest rank's rows, gathered once and cut back to each rank's real pairs, and a per-rank sum is kept from the
  ranks with pairs only: the stand-in pair enters no metric.
- `StepGate`: a step whose accumulation window has no pair on any rank leaves the weights and the optimizer state as
  they are (no moment update, no weight decay). The optimizer still runs its step, but a pre-step hook clears the
  gradients first, and torch's optimizers leave a parameter without a gradient untouched.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: TRL loss types that average over the micro-batch's chosen completion tokens rather than over its pairs.
TOKEN_MEAN_LOSSES = frozenset({"sft"})


@dataclass(frozen=True)
class PairShares:
    """Every rank's number of pairs and of chosen completion tokens in one micro-step, this process's rank, and the
    pairs and chosen tokens of the whole accumulation window over all ranks (None: the window is this micro-step)."""

    pairs: tuple[int, ...]
    chosen_tokens: tuple[int, ...]
    rank: int
    window_pairs: int | None = None
    window_tokens: int | None = None
    rejected_tokens: tuple[int, ...] = ()
    #: ranks per sequence-parallel group: its ranks train the same pairs, so each group counts once (its first rank)
    sp_size: int = 1

    @property
    def world_size(self) -> int:
        return len(self.pairs)

    @property
    def leaders(self) -> tuple[int, ...]:
        """The ranks whose counts add up: every rank, or the first rank of each sequence-parallel group."""
        return tuple(range(0, len(self.pairs), self.sp_size))

    @property
    def total(self) -> int:
        """The number of pairs of the micro-step, over all ranks (each sequence-parallel group once)."""
        return sum(self.pairs[r] for r in self.leaders)

    @property
    def total_chosen_tokens(self) -> int:
        return sum(self.chosen_tokens[r] for r in self.leaders)

    @property
    def total_rejected_tokens(self) -> int:
        return sum(self.rejected_tokens[r] for r in self.leaders) if self.rejected_tokens else 0

    @property
    def local(self) -> int:
        return self.pairs[self.rank]

    @property
    def rows(self) -> tuple[int, ...]:
        """Each rank's pairs in its batch: its real pairs, or the one stand-in pair of a rank without any."""
        return tuple(max(n, 1) for n in self.pairs)

    @property
    def pair_weight(self) -> float:
        """This rank's weight for a mean over its pairs: `world_size * pairs_rank / pairs_window` (0 without pairs)."""
        total = self.total if self.window_pairs is None else self.window_pairs
        return self.world_size * self.local / total if total else 0.0

    @property
    def token_weight(self) -> float:
        """This rank's weight for a mean over its chosen completion tokens, likewise."""
        total = self.total_chosen_tokens if self.window_tokens is None else self.window_tokens
        return self.world_size * self.chosen_tokens[self.rank] / total if total else 0.0


def chosen_completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The chosen completion tokens TRL's "sft" loss averages over: the batch is [chosen rows; rejected rows], and the
    loss reads the completion mask shifted by one."""
    mask = batch["completion_mask"]
    return int(mask[: mask.shape[0] // 2, 1:].sum())


def rejected_completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The rejected completion tokens TRL's token-level metrics of rejected rows average over, likewise."""
    mask = batch["completion_mask"]
    return int(mask[mask.shape[0] // 2 :, 1:].sum())


#: TRL's DPO metrics that are means over completion tokens (over all ranks), and which tokens; "num_tokens" is a
#: running total. Every other DPO metric is a mean over pairs.
TOKEN_METRICS = {
    "entropy": ("chosen", "rejected"),
    "logits/chosen": ("chosen",),
    "mean_token_accuracy": ("chosen",),
    "logits/rejected": ("rejected",),
}
RUNNING_TOTALS = frozenset({"num_tokens"})


def merge_micro_step_metrics(micro_steps: Sequence[tuple[PairShares, dict[str, list]]]) -> dict[str, float]:
    """One value per DPO metric for a window, from each micro-step's shares and the values its loss logged: a mean
    over pairs weighted by the micro-steps' pairs (over all ranks), a mean over tokens by their tokens, a running
    total its last value. So the window's numbers are those of one batch holding all its pairs."""
    merged: dict[str, list[float]] = {}
    latest: dict[str, float] = {}
    for shares, added in micro_steps:
        for key, values in added.items():
            if key in RUNNING_TOTALS:
                latest[key] = values[-1]
                continue
            kinds = TOKEN_METRICS.get(key)
            if kinds is None:
                weight = float(shares.total)
            else:
                weight = float(
                    ("chosen" in kinds) * shares.total_chosen_tokens
                    + ("rejected" in kinds) * shares.total_rejected_tokens
                )
            entry = merged.setdefault(key, [0.0, 0.0])
            entry[0] += weight * sum(values) / len(values)
            entry[1] += weight
    out = {key: total / weight for key, (total, weight) in merged.items() if weight}
    out.update(latest)
    return out


def gather_window_shares(accelerator: Any, counts: Sequence[tuple[int, ...]], sp_size: int = 1) -> list[PairShares]:
    """Every micro-step's `PairShares` in an accumulation window, from this rank's (pairs, chosen tokens[, rejected
    tokens]) per micro-step, by one all-gather: every rank must call this once per window, with as many micro-steps.
    With `sp_size` > 1 the ranks of a group give the counts of the group's (shared) batch, counted once."""
    counts = [(*c, 0)[:3] if len(c) == 2 else tuple(c) for c in counts]
    local = torch.tensor([[n for c in counts for n in c]], dtype=torch.int64, device=accelerator.device)
    gathered = accelerator.gather(local).reshape(-1, len(counts), 3).tolist()  # [rank][micro-step][counts]
    leaders = gathered[::sp_size]
    window_pairs = sum(micro[0] for rank in leaders for micro in rank)
    window_tokens = sum(micro[1] for rank in leaders for micro in rank)
    return [
        PairShares(
            pairs=tuple(rank[m][0] for rank in gathered),
            chosen_tokens=tuple(rank[m][1] for rank in gathered),
            rank=accelerator.process_index,
            window_pairs=window_pairs,
            window_tokens=window_tokens,
            rejected_tokens=tuple(rank[m][2] for rank in gathered),
            sp_size=sp_size,
        )
        for m in range(len(counts))
    ]


def union_loss_weights(
    loss_types: Sequence[str], loss_weights: Sequence[float], shares: PairShares
) -> tuple[float, list[float]]:
    """(scale of this rank's loss, TRL `loss_weights` to compute it with).

    The loss is scaled by the pair weight (an auxiliary loss added to it as well); a token-mean term's weight is
    multiplied by token_weight / pair_weight, so that the term ends up weighted by the token weight."""
    scale = shares.pair_weight
    if scale == 0:
        return 0.0, list(loss_weights)
    ratio = shares.token_weight / scale
    weights = [w * ratio if t in TOKEN_MEAN_LOSSES else w for t, w in zip(loss_types, loss_weights, strict=True)]
    return scale, weights


class PairMetricsAccelerator:
    """An accelerator, as TRL's DPO loss sees it for one micro-step: its gathers keep the ranks' real pairs only.

    `gather` / `gather_for_metrics` of a tensor with a first dimension (one entry per pair of the batch): padded to the
    largest rank's rows, gathered once, and each rank's part cut to its real pairs; of a scalar (one per rank): the
    values of the ranks with pairs. Anything else, and every other attribute, is the accelerator's own."""

    def __init__(self, accelerator: Any, shares: PairShares) -> None:
        self._accelerator = accelerator
        self._shares = shares

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)

    def gather(self, tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return self._accelerator.gather(tensor)
        shares = self._shares
        if tensor.dim() == 0:
            values = self._accelerator.gather(tensor).reshape(-1)  # one process gives the scalar back as it is
            keep = [r for r in shares.leaders if shares.pairs[r] > 0]
            return values[torch.tensor(keep, dtype=torch.long, device=values.device)]
        rows = shares.rows
        if tensor.shape[0] != rows[shares.rank]:
            raise ValueError(
                f"A per-pair metric tensor has {tensor.shape[0]} rows; this rank's batch has {rows[shares.rank]} pairs."
            )
        longest = max(rows)
        if tensor.shape[0] < longest:
            padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, padding])
        pieces = self._accelerator.gather(tensor).split(longest)
        return torch.cat([pieces[r][: shares.pairs[r]] for r in shares.leaders])

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        if use_gather_object or not isinstance(input_data, torch.Tensor):
            return self._accelerator.gather_for_metrics(input_data, use_gather_object=use_gather_object)
        return self.gather(input_data)


def drop_metrics_since(metrics: dict[str, list], snapshot: dict[str, tuple[list, int]]) -> None:
    """Remove the metric values appended after `snapshot` (`{key: (list, length)}`), e.g. by a micro-step that has
    no pair on any rank and so has no DPO metric to report."""
    for key in list(metrics):
        if key not in snapshot:
            del metrics[key]
        elif metrics[key] is snapshot[key][0]:
            del metrics[key][snapshot[key][1] :]


def metrics_added_since(metrics: dict[str, list], snapshot: dict[str, tuple[list, int]]) -> dict[str, list]:
    """The metric values appended after `snapshot`, per key (keys without new values left out)."""
    added = {}
    for key, values in metrics.items():
        new = values[snapshot[key][1] :] if key in snapshot and snapshot[key][0] is values else list(values)
        if new:
            added[key] = new
    return added


def metrics_snapshot(metrics: dict[str, list]) -> dict[str, tuple[list, int]]:
    return {key: (values, len(values)) for key, values in metrics.items()}


class StepGate:
    """Skips the optimizer step of an accumulation window that had no pair on any rank.

    `add(pairs, sync=...)` counts each micro-step's pairs (over all ranks; the same on every rank); at the window's
    last micro-step (`sync`), the step is marked to skip when the window had none. A pre-step hook of the torch
    optimizer then clears the parameters' gradients before it updates: torch's optimizers leave a parameter without a
    gradient as it is (no moment, no weight decay, no step count). The learning-rate scheduler still advances.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.window_pairs = 0
        self.skip_next = False
        self.skipped = 0
        self._handle = optimizer.register_step_pre_hook(self._pre_step)

    def add(self, pairs: int, *, sync: bool) -> None:
        self.window_pairs += pairs
        if sync:
            self.skip_next = self.window_pairs == 0
            self.window_pairs = 0

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.skip_next:
            return
        self.skip_next = False
        self.skipped += 1
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def remove(self) -> None:
        self._handle.remove()


_GATES: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepGate] = weakref.WeakKeyDictionary()
_UNGATED: set[str] = set()


def step_gate(optimizer: Any) -> StepGate | None:
    """The `StepGate` of `optimizer` (an accelerate-wrapped or plain torch optimizer), made on first use; None when
    there is no torch optimizer to gate (no optimizer yet, or one that runs its own step, e.g. DeepSpeed's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        name = type(inner).__name__
        if optimizer is not None and name not in _UNGATED:
            _UNGATED.add(name)
            logger.warning("%s is not a torch optimizer: a step without any pair is not skipped.", name)
        return None
    gate = _GATES.get(inner)
    if gate is None:
        gate = _GATES[inner] = StepGate(inner)
    return gate
