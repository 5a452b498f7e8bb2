"""Prefix-affine dispatch over judge replicas: the calls of one prompt and template (which share a long prompt
prefix) go to one replica while it is healthy and has room; least-loaded dispatch is the fallback. Then the replica
benchmark's logic against scripted servers, which have no `/metrics`: it reports the hit rate as unavailable."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from known_answers import CONTEXT

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.judges.endpoints import EndpointPool, current_affinity, dispatch_affinity
from trl_longreward.reward.runner import affinity_key, prompt_scope
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge, detect_task

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pool(**kwargs) -> EndpointPool:
    return EndpointPool(["http://a:1/v1", "http://b:1/v1"], limit=kwargs.pop("limit", 4), cooldown=60.0, **kwargs)


def _dispatch(pool: EndpointPool, keys: list[str | None], *, release: bool = True) -> list[int]:
    """The endpoint index each call (one per key, in order) is sent to."""

    async def go() -> list[int]:
        chosen = []
        for key in keys:
            dispatch = await pool.acquire(affinity=key)
            chosen.append(dispatch.endpoint.index)
            if release:
                pool.release(dispatch, healthy=True)
        return chosen

    return asyncio.run(go())


def test_calls_with_one_key_go_to_one_replica_and_keys_spread_by_load():
    pool = _pool()
    # the first call of each key takes the least-loaded replica, which becomes its home; later calls follow it
    held = _dispatch(pool, ["prompt-a", "prompt-b"], release=False)
    assert sorted(held) == [0, 1]
    assert _dispatch(pool, ["prompt-a"] * 3 + ["prompt-b"] * 3) == [held[0]] * 3 + [held[1]] * 3
    stats = pool.stats()
    assert sum(s["affine_calls"] for s in stats) == 6


def test_without_affinity_or_without_a_key_dispatch_is_least_loaded():
    for pool, keys in ((_pool(affinity=False), ["prompt-a"] * 4), (_pool(), [None] * 4)):
        # equal load: the least recently used replica, so the calls alternate
        assert _dispatch(pool, keys) == [0, 1, 0, 1]
        assert all(s["affine_calls"] == 0 for s in pool.stats())


def test_a_full_home_sends_the_call_to_the_least_loaded_other_and_stays_home():
    pool = _pool(limit=2)

    async def go() -> list[int]:
        first = await pool.acquire(affinity="doc")
        second = await pool.acquire(affinity="doc")
        third = await pool.acquire(affinity="doc")  # the home is full (limit 2): the other replica
        for dispatch in (first, second, third):
            pool.release(dispatch, healthy=True)
        fourth = await pool.acquire(affinity="doc")  # room again: back home
        return [d.endpoint.index for d in (first, second, third, fourth)]

    home, again, overflow, back = asyncio.run(go())
    assert home == again == back and overflow != home


def test_a_home_out_of_rotation_is_replaced_by_a_healthy_replica():
    pool = _pool()

    async def go() -> list[int]:
        first = await pool.acquire(affinity="doc")
        pool.release(first, healthy=False)  # the home failed for good: out of rotation
        moved = await pool.acquire(affinity="doc")
        pool.release(moved, healthy=True)
        stays = await pool.acquire(affinity="doc")
        pool.release(stays, healthy=True)
        return [first.endpoint.index, moved.endpoint.index, stays.endpoint.index]

    first, moved, stays = asyncio.run(go())
    assert moved != first and stays == moved


def test_the_runner_keys_calls_by_prompt_and_template_inside_a_prompt_scope():
    assert affinity_key("completeness_score") is None and current_affinity() is None
    with prompt_scope("a long document", "a question"):
        key = affinity_key("completeness_score")
        assert key is not None and key.startswith("completeness_score/")
        assert affinity_key("helpfulness") != key
        with prompt_scope("another document", "a question"):
            assert affinity_key("completeness_score") != key
        assert affinity_key("completeness_score") == key
    with dispatch_affinity("k"):
        assert current_affinity() == "k"
    assert current_affinity() is None


def _task_question(body: dict) -> tuple[str, str | None]:
    """(judge task, the question of the prompt) of a judge request (faithfulness checks carry no question)."""
    text = body["messages"][0]["content"]
    questions = re.findall(r"<question>\n?(.*?)\n?</question>", text, flags=re.DOTALL)
    return detect_task(text), questions[-1] if questions else None


def _score_over_two(servers, *, affinity: bool, num_prompts: int = 4, k: int = 4) -> LongRewardFunction:
    judge = OpenAIJudge("scripted-judge", [s.base_url for s in servers], max_retries=0, affinity=affinity)
    reward = LongRewardFunction(judge=judge, retriever="bm25", chunk_tokenizer="regex", show_progress=False)
    questions = [f"Who built the barrier in case {i}, and what did it cost?" for i in range(num_prompts)]
    responses = [
        f"The council built the barrier in case {i}. It cost {j + 2} million pounds." for i in range(num_prompts)
        for j in range(k)
    ]  # fmt: skip
    reward.score_batch(
        prompts=None,
        completions=responses,
        context=[CONTEXT + f" Case {i}." for i in range(num_prompts) for _ in range(k)],
        question=[q for q in questions for _ in range(k)],
    )
    return reward


def test_a_prompts_calls_of_one_template_meet_one_replica_over_http():
    """Two scripted replicas: with affinity, every completeness scoring (the k responses over the same notes), notes
    extraction and helpfulness call of one prompt went to one server; least-loaded spreads them. Same calls."""
    sent = {}
    for affinity in (True, False):
        with (
            ScriptedOpenAIServer(ScriptedLongRewardJudge()) as first,
            ScriptedOpenAIServer(ScriptedLongRewardJudge()) as second,
        ):
            reward = _score_over_two([first, second], affinity=affinity)
            reward.close()
            servers_of = defaultdict(set)
            for index, server in enumerate((first, second)):
                for body in server.requests:
                    task, question = _task_question(body)
                    if question is not None:
                        servers_of[(task, question)].add(index)
            sent[affinity] = (servers_of, first.num_chat_requests, second.num_chat_requests)
    affine, spread = sent[True][0], sent[False][0]
    assert affine.keys() == spread.keys()
    assert all(len(indices) == 1 for indices in affine.values())
    assert any(len(indices) == 2 for (task, _), indices in spread.items() if task == "completeness_score")
    assert sum(sent[True][1:]) == sum(sent[False][1:])  # the same calls either way
    assert all(count > 0 for count in sent[True][1:])  # both replicas used: prompts spread by load


def test_a_replica_that_is_down_does_not_stop_affine_calls():
    with (
        ScriptedOpenAIServer(ScriptedLongRewardJudge()) as first,
        ScriptedOpenAIServer(ScriptedLongRewardJudge()) as second,
    ):
        second.set_down(True)
        reward = _score_over_two([first, second], affinity=True, num_prompts=2)
        stats = reward.stats()
        reward.close()
    assert stats["judge_errors"] == 0 and stats["judge_calls"] > 0
    assert first.num_answered == stats["judge_calls"]


# ----- the replica benchmark, against servers without /metrics -----


def _benchmark_module():
    spec = importlib.util.spec_from_file_location(
        "prefix_affinity_benchmark", REPO_ROOT / "benchmarks" / "prefix_affinity.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_prometheus_counters_are_read_with_or_without_the_total_suffix():
    bench = _benchmark_module()
    text = (
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n"
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="judge"} 1200.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="judge"} 900.0\n'
        "vllm:gpu_prefix_cache_hits 5.0\n"
    )
    assert bench.parse_counter(text, bench.QUERY_COUNTERS) == 1200.0
    assert bench.parse_counter(text, bench.HIT_COUNTERS) == 900.0
    assert bench.parse_counter("vllm:gpu_prefix_cache_queries 10\n", bench.QUERY_COUNTERS) == 10.0
    assert bench.parse_counter("other_metric 1\n", bench.QUERY_COUNTERS) is None
    rate = bench.hit_rate({"queries": 200.0, "hits": 50.0}, {"queries": 1200.0, "hits": 900.0})
    assert rate == {"queries": 1000.0, "hits": 850.0, "hit_rate": 0.85}
    assert bench.server_root("http://h:1/v1/") == "http://h:1"


def test_the_replica_benchmark_reports_the_hit_rate_unavailable_without_metrics():
    bench = _benchmark_module()
    with (
        ScriptedOpenAIServer(ScriptedLongRewardJudge()) as first,
        ScriptedOpenAIServer(ScriptedLongRewardJudge()) as second,
    ):
        payload = bench.benchmark(
            [first.base_url, second.base_url], "scripted-judge", num_prompts=2, num_responses=2, concurrency=4
        )
    assert payload["config"]["same_calls_in_both_modes"] is False  # no /reset_prefix_cache: disjoint halves
    assert [row["mode"] for row in payload["results"]] == ["affine", "least_loaded"]
    for row in payload["results"]:
        overall = row["prefix_cache"]["overall"]
        assert overall["hit_rate"] is None and "/metrics" in overall["unavailable"]
        assert row["judge_calls"] > 0 and row["scored"] > 0
        for server in row["prefix_cache"]["per_server"].values():
            assert server["hit_rate"] is None and "unavailable" in server
    affine = payload["results"][0]["endpoints"]
    assert sum(e["affine_calls"] for e in affine) > 0


@pytest.mark.parametrize("affinity", [True, False])
def test_affinity_is_no_part_of_the_cache_identity(affinity):
    judge = OpenAIJudge("scripted-judge", ["http://a:1/v1", "http://b:1/v1"], affinity=affinity)
    assert "affinity" not in judge.cache_identity()
