"""Limits that only bite at scale, checked on one CPU: a judge call's worst-case wait against the job's collective
timeout (`ddp_timeout`), `pad_to_multiple_of` resolved exactly as TRL resolves it (CUDA and Neuron simulated), and one
judge server's concurrency budget shared by the ranks of a job."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import TrainingArguments
from trl import DPOConfig

from trl_longreward import LongContextDPOConfig, LongRewardConfig, OpenAIJudge
from trl_longreward.judges.base import ChatRequest, JudgeError
from trl_longreward.reward.scale_limits import (
    BACKOFF_CAP_S,
    judge_call_worst_case_s,
    largest_timeout_that_fits,
    per_rank_concurrency,
    retry_wait_cap_s,
)
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.trainer.config import JUDGE_WAIT_SHARE

REPO_ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:9/v1"
JUDGE = {"judge_base_url": URL, "judge_model": "judge"}


def config(tmp_path: Path, **overrides) -> LongContextDPOConfig:
    return LongContextDPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **overrides)


# ----- 1. one judge call's worst-case wait against ddp_timeout -----


def test_retry_wait_cap_is_the_installed_openai_clients():
    import openai._constants as constants

    expected = getattr(constants, "MAX_RETRY_AFTER_DELAY", 60.0)  # openai < 3 honoured Retry-After up to 60 s
    assert retry_wait_cap_s() == max(float(expected), BACKOFF_CAP_S)


@pytest.mark.parametrize(
    ("timeout", "retries", "endpoints"), [(300.0, 5, 1), (300.0, 0, 1), (60.0, 2, 3), (30.0, 5, 1)]
)
def test_worst_case_formula(timeout, retries, endpoints):
    wait = retry_wait_cap_s()
    expected = endpoints * ((1 + retries) * timeout + retries * wait)
    assert judge_call_worst_case_s(timeout, retries, endpoints) == pytest.approx(expected)
    reward = LongRewardConfig(
        judge_base_url=[f"http://127.0.0.1:{9000 + i}/v1" for i in range(endpoints)],
        judge_model="judge",
        judge_timeout=timeout,
        judge_max_retries=retries,
    )
    assert reward.judge_call_worst_case_s() == pytest.approx(expected)
    judge = OpenAIJudge("judge", reward.judge_base_urls, timeout=timeout, max_retries=retries)
    assert judge.worst_case_call_s() == pytest.approx(expected)
    # The judge's stuck-loop guard never fails a call that is still within the bound.
    assert judge._stall_timeout() > judge.worst_case_call_s()


def test_an_in_process_judge_has_no_http_wait():
    assert LongRewardConfig(judge_backend="transformers").judge_call_worst_case_s() is None


@pytest.mark.parametrize(("retries", "endpoints"), [(1, 1), (0, 2)])
def test_a_judge_that_never_answers_costs_what_the_formula_says(retries, endpoints):
    """Every endpoint hangs: the call sends 1 + retries requests to each (failing over once per endpoint), each given
    up after `timeout`; a hung server sends no Retry-After, so only the exponential backoff (<= 8 s) adds up."""
    timeout = 0.3
    servers = [ScriptedOpenAIServer(lambda m, b: "[[7]]", latency_s=30.0).start() for _ in range(endpoints)]
    try:
        judge = OpenAIJudge("scripted-judge", [s.base_url for s in servers], timeout=timeout, max_retries=retries)
        start = time.monotonic()
        (answer,) = judge.generate([ChatRequest.from_prompt("hello")])
        elapsed = time.monotonic() - start
        asyncio.run(judge.aclose())
        assert isinstance(answer, JudgeError)
        assert [s.num_chat_requests for s in servers] == [1 + retries] * endpoints
    finally:
        for server in servers:
            server.stop()
    assert endpoints * (1 + retries) * timeout <= elapsed
    assert elapsed <= judge_call_worst_case_s(timeout, retries, endpoints, retry_wait_s=BACKOFF_CAP_S) + 2.0
    assert judge_call_worst_case_s(timeout, retries, endpoints, retry_wait_s=BACKOFF_CAP_S) <= (
        judge.worst_case_call_s()
    )


def test_defaults_fit_a_distributed_job(tmp_path):
    args = config(tmp_path, long_reward=JUDGE)
    assert args.ddp_timeout == 3600  # transformers' 1800 would not hold the default judge's 2400 s
    assert LongRewardConfig(**JUDGE).judge_call_worst_case_s() <= JUDGE_WAIT_SHARE * args.ddp_timeout
    args.check_judge_wait_fits(8)


def test_a_judge_call_longer_than_ddp_timeout_is_refused_naming_both_options_and_the_fix(tmp_path):
    args = config(tmp_path, ddp_timeout=1800, long_reward=JUDGE)  # one process: nothing waits on a collective
    worst = LongRewardConfig(**JUDGE).judge_call_worst_case_s()
    need = math.ceil(worst / JUDGE_WAIT_SHARE)
    with pytest.raises(ValueError) as raised:
        args.check_judge_wait_fits(8)
    message = str(raised.value)
    assert message.startswith("long_reward: ")
    for part in ("ddp_timeout=1800", "judge_timeout=300", "judge_max_retries=5", f"{worst:.0f} s", f"{need} s"):
        assert part in message, part
    assert "watchdog" in message and "8 processes" in message
    # The fixes it names do fit: the ddp_timeout it asks for, or the judge_timeout it suggests.
    config(tmp_path, ddp_timeout=need, long_reward=JUDGE).check_judge_wait_fits(8)
    with pytest.raises(ValueError):
        config(tmp_path, ddp_timeout=need - 1, long_reward=JUDGE).check_judge_wait_fits(8)
    fits = largest_timeout_that_fits(JUDGE_WAIT_SHARE * 1800, 5)
    assert f"judge_timeout to {fits:g} s" in message
    config(tmp_path, ddp_timeout=1800, long_reward={**JUDGE, "judge_timeout": fits}).check_judge_wait_fits(8)
    with pytest.raises(ValueError):
        config(tmp_path, ddp_timeout=1800, long_reward={**JUDGE, "judge_timeout": fits + 1}).check_judge_wait_fits(8)


def test_the_check_runs_at_construction_in_a_distributed_job(tmp_path, monkeypatch):
    monkeypatch.setattr(LongContextDPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"long_reward: .*Raise ddp_timeout to at least 375 s"):
        config(tmp_path, ddp_timeout=120, long_reward={**JUDGE, "judge_max_retries": 0})
    config(tmp_path, ddp_timeout=120, long_reward={**JUDGE, "judge_max_retries": 0, "judge_timeout": 90})


def test_one_process_and_in_process_judges_are_not_checked(tmp_path):
    config(tmp_path, ddp_timeout=10, long_reward=JUDGE).check_judge_wait_fits(1)
    config(tmp_path, ddp_timeout=10, long_reward={"judge_backend": "transformers"}).check_judge_wait_fits(8)
    config(tmp_path, ddp_timeout=10).check_judge_wait_fits(8)  # no long_reward: the reward is not this config's


def test_replicas_multiply_the_wait(tmp_path):
    two = {**JUDGE, "judge_base_url": [URL, "http://127.0.0.1:10/v1"]}
    with pytest.raises(ValueError, match=r"on each of 2 replicas.*at least 6000 s"):
        config(tmp_path, long_reward=two).check_judge_wait_fits(8)


def test_judges_given_to_the_trainer_are_checked_too(tmp_path):
    judge = OpenAIJudge("judge", URL, timeout=600, max_retries=5)
    with pytest.raises(ValueError, match=r"the judge 'judge': .*timeout=600 s x \(1 \+ max_retries=5\)"):
        config(tmp_path).check_judge_wait_fits(8, judges=[judge, object()])
    config(tmp_path).check_judge_wait_fits(8, judges=[OpenAIJudge("judge", URL, timeout=60, max_retries=2)])


@pytest.mark.parametrize(
    "path", sorted((REPO_ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda path: path.name
)
def test_every_recipe_config_fits_on_8_ranks(tmp_path, path):
    values = yaml.safe_load(path.read_text())
    settings = {key: values[key] for key in ("ddp_timeout", "long_reward") if key in values}
    config(tmp_path, **settings).check_judge_wait_fits(8)


# ----- 2. pad_to_multiple_of: resolved exactly as TRL resolves it -----


@pytest.mark.parametrize("device", [None, "cuda", "neuron"])
@pytest.mark.parametrize("value", ["auto", None, 64, "64", "none"])
def test_pad_to_multiple_of_resolves_as_trls_dpo_config(tmp_path, monkeypatch, device, value):
    if device is not None:  # what TrainingArguments reports on that accelerator (TRL only reads `.type`)
        fake = torch.device(device) if device == "cuda" else SimpleNamespace(type=device)
        monkeypatch.setattr(TrainingArguments, "device", property(lambda self: fake))
        monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 1))  # no device set up, 1 process
    trls = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", pad_to_multiple_of=value)
    ours = config(tmp_path, pad_to_multiple_of=value)
    assert ours.pad_to_multiple_of == trls.pad_to_multiple_of
    if value == "auto":  # TRL pads by default only on Neuron: never on CUDA
        assert ours.pad_to_multiple_of == (128 if device == "neuron" else None)


# ----- 3. one judge server's concurrency budget, shared by the ranks -----


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("total", [1, 5, 7, 32, 256])
def test_per_rank_shares_add_up_to_the_budget(total, world_size):
    shares = [per_rank_concurrency(total, world_size, rank) for rank in range(world_size)]
    assert min(shares) >= 1 and max(shares) - min(shares) <= 1
    assert sum(shares) == max(total, world_size)


@pytest.mark.parametrize(
    ("total", "world_size", "rank"), [(0, 2, 0), (4, 0, 0), (4, 2, 2), (4, 2, -1), (4.0, 2, 0), (True, 2, 0)]
)
def test_per_rank_concurrency_refuses_bad_arguments(total, world_size, rank):
    with pytest.raises(ValueError):
        per_rank_concurrency(total, world_size, rank)


def test_for_rank_splits_only_the_http_judges_budget():
    reward = LongRewardConfig(**JUDGE, judge_max_concurrency=32)
    assert [reward.for_rank(8, rank).judge_max_concurrency for rank in range(8)] == [4] * 8
    assert reward.for_rank(1, 0) is reward
    assert reward.for_rank(8, 3).judge_base_urls == reward.judge_base_urls
    local = LongRewardConfig(judge_backend="transformers", judge_max_concurrency=32)
    assert local.for_rank(8, 3) is local  # each rank runs its own model: its batch size stays


def test_ranks_sharing_a_budget_never_exceed_it_on_the_server():
    """Four ranks (four judges, as four processes would hold) with their shares of a budget of 6 against a server
    that refuses (429) a 7th call in flight: every call is answered, none refused, the server never above 6."""
    budget, world_size, calls = 6, 4, 8
    with ScriptedOpenAIServer(lambda m, b: "[[7]]", latency_s=0.2, max_concurrency=budget) as server:
        judges = [
            OpenAIJudge(
                "scripted-judge",
                server.base_url,
                max_concurrency=per_rank_concurrency(budget, world_size, rank),
                max_retries=0,
            )
            for rank in range(world_size)
        ]
        answers: list[list] = [[] for _ in judges]

        def rank_judges(rank: int) -> None:
            requests = [ChatRequest.from_prompt(f"rank {rank} call {i}") for i in range(calls)]
            answers[rank] = judges[rank].generate(requests)

        threads = [threading.Thread(target=rank_judges, args=(rank,)) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for judge in judges:
            asyncio.run(judge.aclose())
        assert all(answer == "[[7]]" for per_rank in answers for answer in per_rank)
        assert sum(len(per_rank) for per_rank in answers) == world_size * calls
        assert server.num_rejected == 0 and server.max_in_flight <= budget
