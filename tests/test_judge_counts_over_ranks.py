"""The judge counts `LongContextDPOTrainer` logs are the judge's own, over all ranks (`torchrun`, 2 gloo ranks).

One scripted judge server on loopback answers both ranks of `tests/distributed/judge_counts.py` through the real
`openai` client, and fails a share of the requests with a 500 (seeded), so that some calls are retried and some fail
for good. The trainer's default reward judges each step's accumulation window (2 micro-steps per rank), serially and
with `async_judging`. What every rank logs for an optimizer step is that step's numbers over all ranks, so over the
run the logged counts add up to what the server received from both ranks, and both ranks log the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_distributed import flags, free_port, run_torchrun

from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "distributed" / "judge_counts.py"
NUM_RANKS = 2
MAX_STEPS = 3  # as in judge_counts.py
MAX_RETRIES = 1  # judge_max_retries in judge_counts.py
SETTINGS = ("serial", "async")
TIMEOUT_S = 300
LOGGED = ("judge_calls", "judge_requests", "cache_hits", "shared_calls", "parse_failures", "judge_errors")


def digest_score(question: str, response: str) -> float:
    """A deterministic, response-dependent helpfulness (0-10), so the samples of a prompt rarely tie."""
    return int(hashlib.sha256(response.encode("utf-8")).hexdigest(), 16) % 101 / 10


def step_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The training-step entries of a `log_history` (logging_steps=1: one per optimizer step)."""
    return [entry for entry in record["log_history"] if "pairs/online" in entry]


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_logged_judge_counts_equal_the_servers_over_both_ranks(tmp_path: Path) -> None:
    from trl_longreward.models import default_model_path

    default_model_path()  # the tokenizer converted once here, before the ranks would wait on the same lock
    script = ScriptedLongRewardJudge(helpfulness=digest_score)
    with ScriptedOpenAIServer(script, fault_rate=0.3, faults=["500"], seed=11) as server:
        launcher = {"--nproc_per_node": NUM_RANKS, "--master_addr": "127.0.0.1", "--master_port": free_port()}
        options = {"--judge_url": server.base_url, "--output_dir": tmp_path, "--settings": ",".join(SETTINGS)}
        code, output, _ = run_torchrun([*flags(launcher), str(SCRIPT), *flags(options)], TIMEOUT_S)
        log = list(server.request_log)  # every rank has closed its reward: no request is still on its way
    tail = f"torchrun output (last 8000 chars):\n{output[-8000:]}"
    assert code is not None, f"torchrun did not finish within {TIMEOUT_S} s\n{tail}"
    assert code == 0, f"torchrun exited with {code}\n{tail}"
    records = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(NUM_RANKS)]
    assert all(entry["outcome"] in ("answered", "500") for entry in log), Counter(e["outcome"] for e in log)

    for setting in SETTINGS:
        runs = [record["settings"][setting] for record in records]
        mine = [e for e in log if e["client"].startswith(f"{setting}-rank-")]
        outcomes = Counter(entry["outcome"] for entry in mine)
        assert {run["global_step"] for run in runs} == {MAX_STEPS}, setting
        assert {run["reward_is_default"] for run in runs} == {"LongRewardFunction"}
        entries = [step_entries(run) for run in runs]
        assert [[e["step"] for e in rank_entries] for rank_entries in entries] == [list(range(1, MAX_STEPS + 1))] * 2

        # (b) every rank logs the same, merged numbers for every step: all of them but the rank's own times
        for ours, theirs in zip(*entries, strict=True):
            assert ours.keys() == theirs.keys(), (setting, ours.keys() ^ theirs.keys())
            differ = {k: (ours[k], theirs[k]) for k in ours if not k.startswith("time/") and ours[k] != theirs[k]}
            assert not differ, (setting, ours["step"], differ)
            assert all(f"long_reward/{k}" in ours for k in LOGGED), (setting, sorted(ours))
        logged = {k: sum(e[f"long_reward/{k}"] for e in entries[0]) for k in LOGGED}

        # each rank's reward counted exactly the requests the server got from that rank
        for rank, run in enumerate(runs):
            own = [e for e in mine if e["client"] == f"{setting}-rank-{rank}"]
            assert run["stats"]["judge_requests"] == len(own) > 0, (setting, rank, run["stats"], len(own))

        # (a) the logged requests, summed over the steps, are the requests the server received from both ranks
        assert logged["judge_requests"] == len(mine) == sum(run["stats"]["judge_requests"] for run in runs), (
            setting,
            logged,
            len(mine),
            [run["stats"] for run in runs],
        )
        # (c) a logical call's first request has retry number 0; it failed for good when its retry met a 500 too
        first_tries = sum(1 for e in mine if e["retry"] == 0)
        failed = sum(1 for e in mine if e["retry"] == MAX_RETRIES and e["outcome"] == "500")
        assert all(0 <= e["retry"] <= MAX_RETRIES for e in mine)
        assert outcomes["500"] > 0 and logged["judge_requests"] > logged["judge_calls"], (setting, outcomes, logged)
        assert failed > 0, (setting, outcomes)  # at 30% faults, some of the ~130 requests' calls fail twice
        assert logged["judge_calls"] == first_tries, (setting, logged, first_tries)
        assert logged["judge_errors"] == failed, (setting, logged, failed)
        assert logged["parse_failures"] == 0, (setting, logged)
        assert logged["judge_calls"] == outcomes["answered"] + logged["judge_errors"], (setting, logged, outcomes)
        for key in LOGGED:
            assert logged[key] == sum(run["stats"][key] for run in runs), (setting, key, logged, runs)

        # (d) the logged pairs of a step are the pairs both ranks selected in that step's window
        for index, step in enumerate(range(1, MAX_STEPS + 1)):
            local = [run["local_pairs"].get(str(step), 0) for run in runs]
            assert [run["micro_steps"][str(step)] for run in runs] == [2, 2], (setting, step)
            assert entries[0][index]["pairs/online"] == sum(local), (setting, step, local, entries[0][index])
        assert sum(sum(run["local_pairs"].values()) for run in runs) > 0, setting
