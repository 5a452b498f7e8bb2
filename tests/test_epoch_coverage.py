"""Every prompt exactly once per epoch over all ranks: 2 and 3 gloo ranks (`torchrun`), gradient accumulation 1 and 2,
num_iterations 1 and 2, serial and async judging, and across a resume (`tests/distributed/epoch_coverage.py`).

The reference is the dataset itself: its 12 distinct questions, each judged by exactly one rank exactly once. The
ranks must agree on one data order: the sampler is seeded from `args.seed` (or `args.data_seed`) on every rank, while
the tokens each rank samples use a per-rank seed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_distributed import flags, free_port, run_torchrun

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "distributed" / "epoch_coverage.py"
NUM_PROMPTS = 12
EXPECTED = {f"What is record {i} about?" for i in range(NUM_PROMPTS)}


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_every_prompt_is_judged_exactly_once_per_epoch_over_all_ranks(tmp_path: Path, num_ranks: int) -> None:
    from trl_longreward.models import default_model_path

    default_model_path()  # the tokenizer converted once here, before the ranks would wait on the same lock
    launcher = {"--nproc_per_node": num_ranks, "--master_addr": "127.0.0.1", "--master_port": free_port()}
    code, output, _ = run_torchrun([*flags(launcher), str(SCRIPT), "--output_dir", str(tmp_path)], timeout_s=600)
    assert code == 0, f"torchrun exited with {code}:\n{output[-8000:]}"
    records = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(num_ranks)]
    settings = records[0]["settings"]
    assert len(settings) == 10
    for name in settings:
        judged = Counter(q for record in records for q in record["settings"][name]["questions"])
        per_rank = [len(record["settings"][name]["questions"]) for record in records]
        assert set(judged) == EXPECTED and set(judged.values()) == {1}, (name, per_rank, judged)
        assert per_rank == [NUM_PROMPTS // num_ranks] * num_ranks, (name, per_rank)
        accumulation = int(name.split("-")[0][2:])
        iterations = int(name.split("-")[1][2:])
        steps = {record["settings"][name]["global_step"] for record in records}
        assert steps == {NUM_PROMPTS * iterations // (num_ranks * accumulation)}, (name, steps)

    # Offline pairs (offline_ratio=0.5, accumulation 2): the ranks trained disjoint rows, all of them the ones drawn
    # (the cursor, the same on every rank), and each step's offline pairs are half of its pairs over all ranks.
    offline = [record["offline"] for record in records]
    trained = [p for entry in offline for p in entry["offline_prompts"]]
    assert len(trained) == len(set(trained)), Counter(trained).most_common(3)
    cursor = {entry["cursor"] for entry in offline}
    assert cursor == {len(trained)}, (cursor, len(trained))
    assert trained and set(trained) == {f"Offline question {i}?" for i in range(len(trained))}
    logged_online, logged_offline = offline[0]["logged_online"], offline[0]["logged_offline"]
    assert all(entry["logged_offline"] == logged_offline for entry in offline)  # every rank logs the step's numbers
    assert sum(logged_offline) == len(trained)
    for online, drawn in zip(logged_online, logged_offline, strict=True):
        assert drawn == (online if online else 2 * num_ranks), (logged_online, logged_offline)
