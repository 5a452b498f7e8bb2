"""Sequence parallelism (`sp_size`, Ulysses) against one process running TRL's own two-row DPO.

Real gloo ranks (`torchrun`) train `LongContextDPOTrainer` with `tests/distributed/uneven_pairs.py` (fixed responses,
a length reward, some prompts tied so that ranks and micro-steps hold uneven numbers of pairs, one SP group
without any pair in a micro-step); the reference is one process with `prompt_once=False` (TRL's two rows, no
packing, no split attention, no SP) whose one micro-batch per step holds the prompts of every rank's window. After
each optimizer step (SGD with momentum: the update is proportional to the gradient, so any wrong gradient or loss
weight shows) every parameter, and the logged loss, gradient norm and TRL's DPO metrics, must match to float32
rounding. Plans: SP=2 on 2 ranks with gradient accumulation (Llama, full fine-tuning), SP=2 x DP=2 on 4 ranks (a
hybrid Qwen2, full fine-tuning; Llama with LoRA). Llama has full attention and 1 key/value head (repeated before the
all-to-all); the Qwen2 has a 16-token sliding-window layer and a full one, 2 key/value heads (split by the
all-to-all). SP under ZeRO-3 and FSDP2: tests/test_engines.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ddp_uneven import DPO_METRICS, SCRIPT, uneven_pairs
from test_distributed import flags, free_port, run_torchrun

TIMEOUT_S = 400
BATCH_SIZE = 2

#: (ranks, sp_size, accumulation, family, lora, loss types): (ties per step, pairs per rank per micro-step)
PLANS: dict[tuple[int, int, int, str, bool, str], tuple[dict[int, Any], list[list[int]]]] = {
    # step 0: (2, 0) then (1, 2) pairs; step 1: none in the first micro-step, then (1, 0)
    (2, 2, 2, "llama", False, "sigmoid,sft"): (
        {0: [2, 3, 4], 1: [0, 1, 2, 3, 5, 6, 7]},
        [[2, 0], [1, 2], [0, 0], [1, 0]],
    ),
    # step 0: group 1 (ranks 2, 3) has no pair; step 1: uneven everywhere
    (4, 2, 1, "qwen2-hybrid", False, "sigmoid,sft"): (
        {0: [4, 5, 6, 7], 1: [0, 3, 5]},
        [[2, 2, 0, 0], [1, 1, 1, 2]],
    ),
    (4, 2, 1, "llama", True, "sigmoid"): ({0: [1, 2, 3], 1: [7]}, [[1, 0, 2, 2], [2, 2, 2, 1]]),
}
LOSS_WEIGHTS = {"sigmoid": "1.0", "sigmoid,sft": "1.0,0.1"}
MAX_STEPS = 2


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan",
    list(PLANS),
    ids=lambda p: f"{p[0]}ranks-sp{p[1]}-ga{p[2]}-{p[3]}-{'lora' if p[4] else 'full'}",
)
def test_sequence_parallel_step_is_the_one_process_two_row_step(tmp_path: Path, plan) -> None:
    num_ranks, sp_size, accumulation, family, lora, losses = plan
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
        "--sp_size": sp_size,
        "--family": family,
    }
    extra = ["--lora"] if lora else []
    code, output, _seconds = run_torchrun([*flags(launcher), str(SCRIPT), *flags(options), *extra], TIMEOUT_S)
    log = f"torchrun output (last 8000 chars):\n{output[-8000:]}"
    assert code is not None, f"torchrun did not finish within {TIMEOUT_S} s (deadlock?)\n{log}"
    assert code == 0, f"torchrun exited with {code}\n{log}"
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(num_ranks)]

    reference = uneven_pairs().run(
        tmp_path / "reference",
        ties=ties,
        num_prompts=num_prompts,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=num_prompts,
        gradient_accumulation_steps=1,
        loss_type=losses.split(","),
        loss_weights=[float(w) for w in LOSS_WEIGHTS[losses].split(",")],
        family=family,
        lora=lora,
        prompt_once=False,  # TRL's own two-row forward: no packing, no split attention, no SP
    )

    # Every rank sampled and judged its own prompts (each prompt once), with the planned uneven pairs.
    for rank, record in enumerate(ranks):
        assert record["world_size"] == num_ranks and record["global_step"] == MAX_STEPS
        for i, micro in enumerate(record["micro_steps"]):
            m = i % accumulation
            assert micro["indices"] == [BATCH_SIZE * (num_ranks * m + rank) + j for j in range(BATCH_SIZE)], micro
        assert [micro["pairs"] for micro in record["micro_steps"]] == [p[rank] for p in expected_pairs]
    window_pairs = [sum(map(sum, expected_pairs[s * accumulation : (s + 1) * accumulation])) for s in range(MAX_STEPS)]
    assert [m["pairs"] for m in reference["micro_steps"]] == window_pairs
    assert reference["initial_params_sha256"] == ranks[0]["initial_params_sha256"]

    # The ranks stayed identical, and each step is the reference's step.
    for step in range(MAX_STEPS):
        assert len({record["steps"][step]["params_sha256"] for record in ranks}) == 1
    initial = _params(tmp_path / "reference" / "rank0" / "params-step0.pt")
    for step in range(1, MAX_STEPS + 1):
        ours = _params(tmp_path / "ranks" / "rank0" / f"params-step{step}.pt")
        theirs = _params(tmp_path / "reference" / "rank0" / f"params-step{step}.pt")
        assert ours.keys() == theirs.keys() and (not lora or all("lora" in n for n in theirs))
        moved = max((theirs[n] - initial[n]).abs().max().item() for n in theirs)
        diff = max((ours[n] - theirs[n]).abs().max().item() for n in theirs)
        assert moved > 1e-3, f"step {step}: training did not move the parameters ({moved})"
        excess = max(((ours[n] - theirs[n]).abs() - 1e-5 * (theirs[n].abs() + moved)).max().item() for n in theirs)
        assert excess <= 0, f"step {step}: max |SP ranks - 1 process| = {diff:.3g} (largest change {moved:.3g})"

    # The same loss, gradient norm and DPO metrics (each pair counted once, not once per rank of its group).
    ours_logs = [entry for entry in ranks[0]["log_history"] if "loss" in entry]
    reference_logs = [entry for entry in reference["log_history"] if "loss" in entry]
    assert len(ours_logs) == len(reference_logs) == MAX_STEPS
    for step, (entry, expected) in enumerate(zip(ours_logs, reference_logs, strict=True)):
        for key in (*DPO_METRICS, "pairs/online"):
            assert entry[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (step, key, entry, expected)
