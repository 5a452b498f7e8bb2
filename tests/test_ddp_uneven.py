"""Ranks with different numbers of pairs: the step is the one-process step on the union of their pairs.

- `PairShares`' weights, `PairMetricsAccelerator`'s gathers and `StepGate` on their own;
- one process: a step without any pair leaves the parameters and AdamW's state (moments, step count; weight decay on)
  as they are, and logs no DPO metric;
- two gloo ranks (`torchrun`), against one process whose micro-batches hold the prompts of both ranks: a step where
  one rank has no pair, a step where the ranks hold 1 and 2 pairs (and, with gradient accumulation, a micro-step
  without any pair on any rank) give the same parameters and the same logged DPO metrics; a step without any pair
  leaves the parameters and the optimizer state as they are on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_distributed import flags, free_port, run_torchrun

from trl_longreward.trainer.ddp import (
    PairMetricsAccelerator,
    PairShares,
    StepGate,
    drop_metrics_since,
    metrics_snapshot,
    union_loss_weights,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "distributed" / "uneven_pairs.py"
TIMEOUT_S = 300
#: the DPO metrics TRL logs, and the trainer's loss and gradient norm
DPO_METRICS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "num_tokens",
)


def uneven_pairs() -> ModuleType:
    """`tests/distributed/uneven_pairs.py`, imported from its path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("uneven_pairs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get("uneven_pairs") or importlib.util.module_from_spec(spec)
    if "uneven_pairs" not in sys.modules:
        sys.modules["uneven_pairs"] = module
        spec.loader.exec_module(module)
    return module


# ----- the pieces -----


def test_pair_weights_make_the_ddp_average_the_union_mean() -> None:
    ranks = [PairShares(pairs=(3, 1, 0), chosen_tokens=(12, 2, 0), rank=r) for r in range(3)]
    assert [s.pair_weight for s in ranks] == [9 / 4, 3 / 4, 0.0]
    assert [s.token_weight for s in ranks] == [36 / 14, 6 / 14, 0.0]
    assert sum(s.pair_weight for s in ranks) / 3 == pytest.approx(1.0)  # DDP's average of the weights
    assert ranks[2].rows == (3, 1, 1)  # the pairless rank trains one stand-in pair

    # TRL's loss is sum(weight * term): the pair-mean term gets the pair weight, the token-mean "sft" term the token
    # weight (through the scale of the whole loss and its own loss weight)
    scale, weights = union_loss_weights(["sigmoid", "sft"], [1.0, 0.1], ranks[0])
    assert scale == 9 / 4 and weights[0] == 1.0 and scale * weights[1] == pytest.approx(0.1 * 36 / 14)
    assert union_loss_weights(["sigmoid", "sft"], [1.0, 0.1], ranks[2]) == (0.0, [1.0, 0.1])
    nobody = PairShares(pairs=(0, 0), chosen_tokens=(0, 0), rank=0)
    assert (nobody.total, nobody.pair_weight, nobody.token_weight) == (0, 0.0, 0.0)


class TwoRankGather:
    """Stands in for rank `rank` of a two-process accelerator: `gather` puts this rank's tensor and the other rank's
    (`other_rows` for tensors with rows, `other_scalar` for scalars) together in rank order; `sent` keeps what this
    rank sent."""

    def __init__(self, rank: int, other_rows: list[float], other_scalar: float) -> None:
        self.process_index = rank
        self.device = torch.device("cpu")
        self.other_rows, self.other_scalar = torch.tensor(other_rows), torch.tensor([other_scalar])
        self.sent: list[torch.Tensor] = []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent.append(tensor)
        parts = [tensor, self.other_rows] if tensor.dim() else [tensor[None], self.other_scalar]
        return torch.cat(parts if self.process_index == 0 else parts[::-1])


def test_metric_gathers_keep_the_real_pairs_of_each_rank() -> None:
    # rank 0 holds 3 pairs, rank 1 none: it trains one stand-in pair (value 99), padded to 3 rows, which must not count
    shares = {r: PairShares(pairs=(3, 0), chosen_tokens=(9, 0), rank=r) for r in range(2)}
    view = PairMetricsAccelerator(TwoRankGather(0, [99.0, 0.0, 0.0], other_scalar=7.0), shares[0])
    assert view.gather(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]
    assert view.gather_for_metrics(torch.tensor(5.0)).tolist() == [5.0]  # rank 1's sum is left out
    assert view.device == torch.device("cpu")  # everything else is the accelerator's own
    inner = TwoRankGather(1, [1.0, 2.0, 3.0], other_scalar=5.0)
    view = PairMetricsAccelerator(inner, shares[1])
    assert view.gather(torch.tensor([99.0])).tolist() == [1.0, 2.0, 3.0]
    assert inner.sent[-1].tolist() == [99.0, 0.0, 0.0]  # padded to the largest rank's rows, so the shapes agree
    with pytest.raises(ValueError, match="rows"):
        view.gather(torch.tensor([1.0, 2.0]))

    # uneven ranks that both have pairs: rank 0 holds 1 pair, rank 1 holds 3
    inner = TwoRankGather(0, [4.0, 5.0, 6.0], other_scalar=2.0)
    view = PairMetricsAccelerator(inner, PairShares(pairs=(1, 3), chosen_tokens=(2, 8), rank=0))
    assert view.gather(torch.tensor([1.0])).tolist() == [1.0, 4.0, 5.0, 6.0]
    assert inner.sent[-1].tolist() == [1.0, 0.0, 0.0]
    assert view.gather(torch.tensor(1.0)).tolist() == [1.0, 2.0]


def test_metrics_of_a_pairless_micro_step_are_dropped() -> None:
    metrics: dict[str, list] = {"rewards/chosen": [0.5], "num_tokens": [10]}
    before = metrics_snapshot(metrics)
    metrics["rewards/chosen"].append(float("nan"))
    metrics["num_tokens"] = [10]  # TRL replaces this one: a running total, kept
    metrics["entropy"] = [0.0]
    drop_metrics_since(metrics, before)
    assert metrics == {"rewards/chosen": [0.5], "num_tokens": [10]}


def _adamw_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v.clone() for state in optimizer.state.values() for v in state.values()]


def test_step_gate_leaves_adamw_as_it_is_for_a_window_without_pairs() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.5)
    gate = StepGate(optimizer)
    param.grad = torch.ones(3)
    gate.add(2, sync=True)
    optimizer.step()  # a real step: moments and step count exist now
    before, state = param.detach().clone(), _adamw_state(optimizer)
    for pairs, sync in ((0, False), (0, True)):  # two micro-steps, no pair in either
        gate.add(pairs, sync=sync)
    param.grad = torch.zeros(3)
    optimizer.step()
    assert torch.equal(param.detach(), before) and gate.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(_adamw_state(optimizer), state, strict=True))
    gate.add(0, sync=False)
    gate.add(1, sync=True)  # a window with a pair in one micro-step: the step is taken
    param.grad = torch.zeros(3)
    optimizer.step()
    assert not torch.equal(param.detach(), before)  # weight decay and momentum moved it
    gate.remove()


# ----- one process -----


def test_one_process_step_without_pairs_keeps_weights_and_adamw_state(tmp_path: Path) -> None:
    """AdamW with weight decay: step 0 trains on pairs, step 1 has none (every prompt tied): the parameters, the
    moments and the step counts after step 1 are those after step 0, and step 1 logs no DPO metric."""
    module = uneven_pairs()
    record = module.run(
        tmp_path,
        ties={0: [1], 1: "all"},
        max_steps=2,
        per_device_train_batch_size=4,
        optim="adamw_torch",
        optim_args=None,
        learning_rate=1e-2,
        weight_decay=0.1,
    )
    after_pairs, after_none = record["steps"]
    assert [m["pairs"] for m in record["micro_steps"]] == [3, 0]
    assert after_pairs["params_sha256"] != record["initial_params_sha256"]
    assert after_pairs["optimizer_entries"] > 0  # AdamW's exp_avg, exp_avg_sq and step of every parameter
    assert after_none["params_sha256"] == after_pairs["params_sha256"]
    assert after_none["optimizer_sha256"] == after_pairs["optimizer_sha256"]
    logs = [entry for entry in record["log_history"] if "loss" in entry]
    assert "rewards/margins" in logs[0] and logs[0]["pairs/online"] == 3
    assert not any(key.startswith(("rewards/chosen", "rewards/margins", "logps/")) for key in logs[1])
    assert logs[1]["pairs/online"] == 0 and logs[1]["loss"] == 0.0 and logs[1]["grad_norm"] == 0.0


# ----- several ranks against one process -----

# {(ranks, gradient accumulation steps, losses): (ties per step, expected pairs per micro-step and rank)}; losses:
# plain DPO, or the paper's sigmoid + 0.1 x "sft" (a mean over chosen tokens, weighted by tokens). With batch
# size 2 on R ranks, micro-step m gives rank r the prompts 2 (R m + r) and 2 (R m + r) + 1. The reference is one
# process without accumulation whose one micro-batch per step holds the prompts of the whole window.
PLANS: dict[tuple[int, int, str], tuple[dict[int, Any], list[list[int]]]] = {
    # step 0: rank 1 has no pair; step 1: 1 pair on rank 0, 2 on rank 1; step 2: no pair anywhere
    (2, 1, "sigmoid"): ({0: [2, 3], 1: [1], 2: "all"}, [[2, 0], [1, 2], [0, 0]]),
    # step 0: (2, 0) then (1, 2) pairs; step 1: a micro-step without any pair, then (1, 0); step 2: no pair anywhere
    (2, 2, "sigmoid,sft"): (
        {0: [2, 3, 4], 1: [0, 1, 2, 3, 5, 6, 7], 2: "all"},
        [[2, 0], [1, 2], [0, 0], [1, 0], [0, 0], [0, 0]],
    ),
    # three ranks: step 0: (2, 0, 1) then (0, 1, 2) pairs;
    # step 1: a micro-step without any pair, then (2, 1, 1); step 2: no pair anywhere
    (3, 2, "sigmoid,sft"): (
        {0: [2, 3, 4, 6, 7, 8], 1: [0, 1, 2, 3, 4, 5, 9, 10], 2: "all"},
        [[2, 0, 1], [0, 1, 2], [0, 0, 0], [2, 1, 1], [0, 0, 0], [0, 0, 0]],
    ),
}
LOSS_WEIGHTS = {"sigmoid": "1.0", "sigmoid,sft": "1.0,0.1"}
MAX_STEPS = 3
BATCH_SIZE = 2


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("plan", sorted(PLANS), ids=lambda p: f"{p[0]}ranks-ga{p[1]}-{p[2].replace(',', '+')}")
def test_uneven_ranks_and_micro_steps_take_the_one_process_step_on_the_union(
    tmp_path: Path, plan: tuple[int, int, str]
) -> None:
    """Parameters after each step, the loss, the gradient norm and TRL's DPO metrics: R gloo ranks with gradient
    accumulation, pairs uneven per micro-step and per rank, equal one process with one micro-step per step that holds
    the union of the window's pairs (within float32 rounding)."""
    num_ranks, accumulation, losses = plan
    ties, expected_pairs = PLANS[plan]
    num_prompts = num_ranks * BATCH_SIZE * accumulation
    launcher = {"--nproc_per_node": num_ranks, "--master_addr": "127.0.0.1", "--master_port": free_port()}
    options = {
        "--output_dir": tmp_path / "ranks",
        "--ties": json.dumps(ties),
        "--num_prompts": num_prompts,
        "--max_steps": MAX_STEPS,
        "--per_device_train_batch_size": BATCH_SIZE,
        "--gradient_accumulation_steps": accumulation,
        "--loss_type": losses,
        "--loss_weights": LOSS_WEIGHTS[losses],
    }
    code, output, _seconds = run_torchrun([*flags(launcher), str(SCRIPT), *flags(options)], TIMEOUT_S)
    log = f"torchrun output (last 8000 chars):\n{output[-8000:]}"
    assert code is not None, f"torchrun did not finish within {TIMEOUT_S} s (deadlock?)\n{log}"
    assert code == 0, f"torchrun exited with {code}\n{log}"
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(num_ranks)]

    # the reference: one process without accumulation, whose one micro-batch per step holds the prompts of the
    # whole window of both ranks (the union of the window's pairs, split in no way)
    reference = uneven_pairs().run(
        tmp_path / "reference",
        ties=ties,
        num_prompts=num_prompts,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=num_prompts,
        gradient_accumulation_steps=1,
        loss_type=losses.split(","),
        loss_weights=[float(w) for w in LOSS_WEIGHTS[losses].split(",")],
    )

    # The ranks drew the planned prompts and had the planned (uneven) pairs.
    for rank, record in enumerate(ranks):
        assert record["world_size"] == num_ranks and record["global_step"] == MAX_STEPS
        for i, micro in enumerate(record["micro_steps"]):
            m = i % accumulation
            assert micro["indices"] == [BATCH_SIZE * (num_ranks * m + rank) + j for j in range(BATCH_SIZE)], micro
        assert [micro["pairs"] for micro in record["micro_steps"]] == [p[rank] for p in expected_pairs]
    window_pairs = [sum(map(sum, expected_pairs[s * accumulation : (s + 1) * accumulation])) for s in range(MAX_STEPS)]
    assert [m["pairs"] for m in reference["micro_steps"]] == window_pairs
    assert reference["world_size"] == 1 and reference["initial_params_sha256"] == ranks[0]["initial_params_sha256"]

    # DDP kept the ranks identical, and every step with pairs is the reference's step, to float tolerance.
    for step in range(MAX_STEPS):
        assert len({record["steps"][step]["params_sha256"] for record in ranks}) == 1
    initial = _params(tmp_path / "reference" / "rank0" / "params-step0.pt")
    for step in (1, 2):
        ours = _params(tmp_path / "ranks" / "rank0" / f"params-step{step}.pt")
        theirs = _params(tmp_path / "reference" / "rank0" / f"params-step{step}.pt")
        moved = max((theirs[n] - initial[n]).abs().max().item() for n in theirs)
        diff = max((ours[n] - theirs[n]).abs().max().item() for n in theirs)
        assert moved > 1e-3, f"step {step}: training did not move the parameters ({moved})"
        # 1e-6 relative to each value (float32 rounding), with a tiny absolute floor for values near 0
        excess = max(((ours[n] - theirs[n]).abs() - 1e-6 * (theirs[n].abs() + moved)).max().item() for n in theirs)
        assert excess <= 0, f"step {step}: max |ranks - 1 process| = {diff:.3g} (largest change {moved:.3g})"

    # The same DPO metrics: the pairless rank's stand-in pair is in none of them.
    ours_logs = [entry for entry in ranks[0]["log_history"] if "loss" in entry]
    reference_logs = [entry for entry in reference["log_history"] if "loss" in entry]
    assert len(ours_logs) == len(reference_logs) == MAX_STEPS
    for step, (entry, expected) in enumerate(zip(ours_logs[:2], reference_logs[:2], strict=True)):
        for key in (*DPO_METRICS, "pairs/online"):
            assert entry[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (step, key, entry, expected)

    # The step without any pair: nothing moved, on any rank, and no DPO metric is logged for it.
    for record in (*ranks, reference):
        assert record["steps"][2]["params_sha256"] == record["steps"][1]["params_sha256"]
        assert record["steps"][2]["optimizer_sha256"] == record["steps"][1]["optimizer_sha256"]
        assert record["steps"][1]["optimizer_entries"] > 0  # SGD's momentum buffers, which a step would decay
    last = ours_logs[2]
    assert last["pairs/online"] == 0 and last["loss"] == 0.0 and last["grad_norm"] == 0.0
    assert not any(key.startswith(("rewards/chosen", "rewards/margins", "logps/")) for key in last), last
