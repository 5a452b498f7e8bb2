"""Several judge replicas behind one `OpenAIJudge`: least-loaded dispatch, per-endpoint limits, cool-downs, failover.

Every test talks to real `ScriptedOpenAIServer`s on loopback through the real `openai` client.
"""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trl_longreward import LongRewardConfig, OpenAIJudge
from trl_longreward.judges.base import ChatRequest, JudgeError, request_meter
from trl_longreward.judges.endpoints import EndpointPool, parse_base_urls
from trl_longreward.reward.judge_factory import build_judge
from trl_longreward.testing import ScriptedOpenAIServer

REPO_ROOT = Path(__file__).resolve().parents[1]


def verdict(messages: list[dict], body: dict) -> str:
    return f"[[7]] {messages[-1]['content']}"


def requests(n: int) -> list[ChatRequest]:
    return [ChatRequest.from_prompt(f"call {i}") for i in range(n)]


def run_batch(judge: OpenAIJudge, n: int) -> list[str | JudgeError]:
    """One batch on a fresh event loop; the clients are closed on that loop afterwards."""

    async def main() -> list[str | JudgeError]:
        try:
            return await judge.agenerate(requests(n))
        finally:
            await judge.aclose()

    return asyncio.run(main())


def by_url(judge: OpenAIJudge) -> dict[str, dict]:
    return {stats["base_url"]: stats for stats in judge.endpoint_stats()}


@pytest.fixture
def servers() -> Iterator[list[ScriptedOpenAIServer]]:
    running = [ScriptedOpenAIServer(verdict, latency_s=0.05).start() for _ in range(3)]
    yield running
    for server in running:
        server.stop()


def test_calls_spread_over_every_endpoint(servers):
    judge = OpenAIJudge("scripted-judge", [s.base_url for s in servers], max_concurrency=4, max_retries=0)
    results = run_batch(judge, 36)
    assert results == [f"[[7]] call {i}" for i in range(36)]
    received = [s.num_chat_requests for s in servers]
    assert sum(received) == 36 and min(received) >= 6
    stats = judge.endpoint_stats()
    assert [e["calls"] for e in stats] == received
    assert all(e["in_rotation"] and e["failures"] == 0 and e["in_flight"] == 0 for e in stats)


def test_least_loaded_endpoint_gets_the_calls_a_slow_one_cannot_take():
    with (
        ScriptedOpenAIServer(verdict, latency_s=0.01) as fast,
        ScriptedOpenAIServer(verdict, latency_s=0.4) as slow,
    ):
        judge = OpenAIJudge("scripted-judge", [slow.base_url, fast.base_url], max_concurrency=4, max_retries=0)
        results = run_batch(judge, 60)
    assert all(isinstance(r, str) for r in results)
    # The slow replica keeps its slots busy for 0.4 s, so new calls keep finding the fast one less loaded.
    assert fast.num_chat_requests >= 3 * slow.num_chat_requests


def test_per_endpoint_in_flight_limit_is_never_exceeded(servers):
    judge = OpenAIJudge("scripted-judge", [s.base_url for s in servers[:2]], max_concurrency=3, max_retries=0)
    results = run_batch(judge, 40)
    assert all(isinstance(r, str) for r in results)
    # The servers count what they really had in flight: the cap holds per endpoint, and both were kept full.
    assert [s.max_in_flight for s in servers[:2]] == [3, 3]
    assert [e["max_in_flight"] for e in judge.endpoint_stats()] == [3, 3]


def test_single_endpoint_keeps_the_old_form_and_limit(servers):
    judge = OpenAIJudge("scripted-judge", servers[0].base_url, max_concurrency=2, max_retries=0)
    assert judge.base_url == servers[0].base_url and judge.base_urls == [servers[0].base_url]
    assert all(isinstance(r, str) for r in run_batch(judge, 10))
    assert servers[0].max_in_flight == 2
    assert judge.describe() == {"backend": "openai-compatible", "model": "scripted-judge", "base_url": judge.base_url}


def test_endpoint_down_mid_run_is_taken_out_and_its_calls_succeed_elsewhere(servers):
    healthy, failing = servers[0], servers[1]
    judge = OpenAIJudge(
        "scripted-judge", [failing.base_url, healthy.base_url], max_concurrency=4, max_retries=0, endpoint_cooldown=60
    )
    outage = threading.Timer(0.12, failing.set_down, args=(True,))
    outage.start()
    results = run_batch(judge, 80)  # ~0.5 s of work on two endpoints: the outage starts in the middle
    outage.join()
    assert results == [f"[[7]] call {i}" for i in range(80)]
    stats = by_url(judge)[failing.base_url]
    assert stats["times_taken_out"] == 1 and not stats["in_rotation"] and 1 <= stats["failures"] <= 4
    assert by_url(judge)[healthy.base_url]["in_rotation"]
    # Out of rotation (and the cool-down far away): nothing more is sent to it.
    before = failing.num_chat_requests
    assert all(isinstance(r, str) for r in run_batch(judge, 20))
    assert failing.num_chat_requests == before


def test_endpoint_comes_back_into_rotation_after_the_cooldown(servers):
    first, second = servers[0], servers[1]
    judge = OpenAIJudge(
        "scripted-judge", [first.base_url, second.base_url], max_concurrency=4, max_retries=0, endpoint_cooldown=0.3
    )
    first.set_down(True)
    assert all(isinstance(r, str) for r in run_batch(judge, 12))
    assert not by_url(judge)[first.base_url]["in_rotation"]
    first.set_down(False)
    time.sleep(0.35)
    first.reset_counters()
    assert all(isinstance(r, str) for r in run_batch(judge, 24))
    stats = by_url(judge)[first.base_url]
    assert stats["in_rotation"] and stats["times_taken_out"] == 1 and stats["seconds_out_of_rotation"] >= 0.3
    assert first.num_chat_requests >= 6  # one probe, then its share of the batch


def test_unreachable_endpoint_is_taken_out(servers):
    dead = ScriptedOpenAIServer(verdict).start()
    dead_url = dead.base_url
    dead.stop()  # connection refused from now on
    judge = OpenAIJudge("scripted-judge", [dead_url, servers[0].base_url], max_concurrency=4, max_retries=0)
    assert all(isinstance(r, str) for r in run_batch(judge, 16))
    stats = by_url(judge)[dead_url]
    assert not stats["in_rotation"] and stats["failures"] >= 1


def test_all_endpoints_down_fails_with_judge_error_in_bounded_time(servers):
    for server in servers[:2]:
        server.set_down(True)
    judge = OpenAIJudge(
        "scripted-judge", [s.base_url for s in servers[:2]], max_concurrency=4, max_retries=1, endpoint_cooldown=0.2
    )
    start = time.monotonic()
    results = run_batch(judge, 12)
    assert time.monotonic() - start < 15
    assert all(isinstance(r, JudgeError) for r in results)
    assert "503" in str(results[0])
    # Each call tried each endpoint at most once (plus the client's one retry): the time is bounded.
    assert sum(s.num_chat_requests for s in servers[:2]) <= 12 * 2 * 2
    assert judge.stats.failures == 12
    # When the replicas come back, the next call finds them again at once.
    for server in servers[:2]:
        server.set_down(False)
    assert run_batch(judge, 2) == ["[[7]] call 0", "[[7]] call 1"]


def test_a_replica_answering_500_is_taken_out_and_the_call_moves_on():
    def broken(messages: list[dict], body: dict) -> str:
        raise RuntimeError("model crashed")

    with ScriptedOpenAIServer(broken) as first, ScriptedOpenAIServer(verdict) as second:
        judge = OpenAIJudge("scripted-judge", [first.base_url, second.base_url], max_retries=0)
        assert run_batch(judge, 1) == ["[[7]] call 0"]  # tried first (same load, used least recently), then second
        assert first.num_chat_requests == 1 and not by_url(judge)[first.base_url]["in_rotation"]


def test_config_accepts_a_list_or_comma_separated_urls():
    urls = ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]
    assert LongRewardConfig(judge_base_url=urls).judge_base_urls == urls
    assert (
        LongRewardConfig(judge_base_url=" http://10.0.0.1:8000/v1 ,http://10.0.0.2:8000/v1,").judge_base_urls == urls
    )
    assert LongRewardConfig(judge_base_url=urls[0]).judge_base_urls == urls[:1]
    assert LongRewardConfig().judge_base_urls == []
    config = LongRewardConfig(
        judge_base_url=",".join(urls), judge_model="m", judge_max_concurrency=5, judge_endpoint_cooldown=7
    )
    judge = build_judge(config)
    assert isinstance(judge, OpenAIJudge) and judge.base_urls == urls
    assert judge.max_concurrency == 5 and judge.endpoint_cooldown == 7
    assert [e["base_url"] for e in judge.endpoint_stats()] == urls


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:8000/v1", "http:// or https://"),
        ("http://10.0.0.1:8000/v1,ftp://10.0.0.2/v1", "'ftp://10.0.0.2/v1'.*http:// or https://"),
        ("http://:8000/v1", "no host"),
        ("http://10.0.0.1:80x0/v1", "(?i)port"),
        (["http://10.0.0.1:8000/v1", "http://10.0.0.1:8000/v1"], "more than once"),
        (["http://10.0.0.1:8000/v1", 8000], "list of URLs"),
    ],
)
def test_bad_judge_url_fails_at_construction_with_the_entry_named(value, message):
    with pytest.raises(ValueError, match=message):
        LongRewardConfig(judge_base_url=value)


def test_cli_reads_comma_separated_replicas():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(LongRewardConfig).parse_args_into_dataclasses(
        ["--judge_base_url", "http://a:1/v1,http://b:2/v1", "--judge_endpoint_cooldown", "5"]
    )
    assert config.judge_base_urls == ["http://a:1/v1", "http://b:2/v1"] and config.judge_endpoint_cooldown == 5


def test_stats_and_describe_hold_no_key_and_no_url_credentials(monkeypatch, servers):
    canary = "sk-canary-" + "3" * 20
    monkeypatch.setenv("REPLICA_KEY_FOR_TEST", canary)
    secret_url = servers[1].base_url.replace("http://", "http://user:hunter2@")
    judge = OpenAIJudge("scripted-judge", [servers[0].base_url, secret_url], api_key_env="REPLICA_KEY_FOR_TEST")
    assert all(isinstance(r, str) for r in run_batch(judge, 4))
    shown = repr(judge.describe()) + repr(judge.endpoint_stats()) + repr(vars(judge))
    assert canary not in shown and "hunter2" not in repr(judge.describe()) + repr(judge.endpoint_stats())
    assert canary.encode() not in pickle.dumps(judge)
    copy = pickle.loads(pickle.dumps(judge))
    assert [e["calls"] for e in copy.endpoint_stats()] == [e["calls"] for e in judge.endpoint_stats()]


def test_after_the_cooldown_one_probe_at_a_time():
    clock = [0.0]

    async def main() -> None:
        pool = EndpointPool(["http://a/v1", "http://b/v1"], limit=4, cooldown=10, clock=lambda: clock[0])
        first = await pool.acquire()
        pool.release(first, healthy=False)  # a is out
        assert [e.in_rotation for e in pool.endpoints] == [False, True]
        taken = [await pool.acquire() for _ in range(4)]
        assert {d.endpoint.url for d in taken} == {"http://b/v1"}
        clock[0] = 11.0  # cool-down over: a takes one probe, and only one
        probe = await pool.acquire()
        assert probe.endpoint.url == "http://a/v1" and probe.probe
        waiting = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        assert not waiting.done()
        pool.release(probe, healthy=True)  # back in rotation: the waiting call gets a's free slot
        assert (await waiting).endpoint.url == "http://a/v1"
        assert pool.stats()[0]["in_rotation"] and pool.stats()[0]["seconds_out_of_rotation"] == pytest.approx(11.0)

    asyncio.run(main())


def test_parse_base_urls_forms():
    assert parse_base_urls(None) == [] and parse_base_urls("") == []
    assert parse_base_urls(["http://a/v1,http://b/v1", "http://c/v1"]) == ["http://a/v1", "http://b/v1", "http://c/v1"]


def test_benchmark_quick_run_writes_finite_ratios(tmp_path):
    out = tmp_path / "judge_throughput.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "judge_throughput.py"), "--quick", "--prompts", "2"]
    command += ["--latency", "0.02", "--servers", "1", "2", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [run["servers"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert math.isfinite(run["wall_over_ideal"]) and run["wall_over_ideal"] > 0
        assert run["cache_hits"] == 0 and run["calls_received"] == result["reference_calls"]["total"]
    assert math.isfinite(result["runs"][1]["scaling_efficiency"])
    assert "wall/ideal" in done.stdout


# Faults that fail an attempt: an error status, a dropped connection, a body cut short, a body that is not JSON.
ATTEMPT_FAULTS = ("500", "503", "429", "disconnect", "truncated", "malformed")


def test_endpoint_stats_count_every_request_sent_and_every_failed_one():
    """Per endpoint, `attempts` is every HTTP request sent to it (the client's own retries included) and `failures`
    every attempt that failed: they equal what each server received and the faults it injected, and the attempts
    add up to the judge's `http_requests` and to the requests metered for the calls (`judge_requests`)."""
    running = [
        ScriptedOpenAIServer(verdict, latency_s=0.02, fault_rate=0.3, faults=ATTEMPT_FAULTS, seed=seed).start()
        for seed in (9, 27)  # seeds whose first 22 draws hold every kind of fault
    ]
    judge = OpenAIJudge(
        "scripted-judge", [s.base_url for s in running], max_concurrency=4, max_retries=2, endpoint_cooldown=0.05
    )

    async def main() -> tuple[list[str | JudgeError], int]:
        try:
            with request_meter() as sent:
                results = await judge.agenerate(requests(40))
            return results, sent[0]
        finally:
            await judge.aclose()

    try:
        results, metered = asyncio.run(main())
    finally:
        for server in running:
            server.stop()
    assert sum(isinstance(r, str) for r in results) >= 30
    stats = judge.endpoint_stats()
    faults = [sum(s.num_faults.values()) for s in running]
    assert min(faults) > 0 and all(set(s.num_faults) <= set(ATTEMPT_FAULTS) for s in running)
    assert [(e["attempts"], e["failures"]) for e in stats] == [
        (s.num_chat_requests, n) for s, n in zip(running, faults, strict=True)
    ]
    assert sum(e["attempts"] for e in stats) == judge.stats.http_requests == metered
    assert sum(e["attempts"] for e in stats) > sum(e["calls"] for e in stats)  # the client's retries are in
