"""The reward's judge counters add up: compared with what the scripted judge server itself logged.

`judge_calls` counts logical calls, `judge_requests` every HTTP request (transport retries included), and every
failure and unparseable answer is counted once, by the call that sent it: identical calls in flight share one judge
call and count as `shared_calls`, not as cache hits and not as extra failures. Two batches judged at once by one
reward each count their own calls.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from known_answers import CONTEXT, QUESTION

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.testing.openai_server import NO_VERDICT_TEXT, ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge, detect_task, tagged

SHARED = "The council built a flood barrier in 1998."
# Three answers that share their first statement: its check is one judge call awaited by three.
RESPONSES = [
    f"{SHARED} The barrier cost four million pounds.",
    f"{SHARED} Farmers planted willows along the banks in 2003.",
    f"{SHARED} The town library opened in 1911.",
]
TRANSPORT_FAULTS = ("500", "503", "timeout", "disconnect")


def rows(responses: list[str]) -> dict[str, Any]:
    n = len(responses)
    return {"completions": responses, "context": [CONTEXT] * n, "question": [QUESTION] * n}


class SharedCheck:
    """The scripted judge, except for the check of the shared statement: `fail` raises (the server answers 500),
    `garbage` answers without a verdict. `sent` counts the requests for that check."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.script = ScriptedLongRewardJudge()
        self.sent = 0

    def __call__(self, messages: list[dict], body: dict) -> str:
        prompt = messages[-1]["content"]
        if detect_task(prompt) == "faithfulness_check" and tagged(prompt, "statement") == SHARED:
            self.sent += 1
            if self.mode == "fail":
                raise RuntimeError("this check always fails")
            return NO_VERDICT_TEXT
        return self.script(messages, body)


def judged(server: ScriptedOpenAIServer, responses: list[str], **options: Any) -> tuple[list, dict, dict]:
    """Score the responses (faithfulness only, unless `dimensions` is given); judgements, batch metrics, stats."""
    judge_options = {k: options.pop(k) for k in ("max_retries", "timeout") if k in options}
    options.setdefault("dimensions", ["faithfulness"])
    reward = LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url, max_concurrency=16, **judge_options),
        retriever="bm25",
        chunk_tokenizer="regex",
        **options,
    )
    try:
        judgements, metrics = reward.score_batch(**rows(responses))
        return judgements, metrics, reward.stats()
    finally:
        reward.close()


def settled_log(server: ScriptedOpenAIServer, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The server's request log once every request has its outcome (a stalled "timeout" answer logs it late)."""
    deadline = time.monotonic() + timeout
    while any(entry["outcome"] == "pending" for entry in server.request_log) and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(server.request_log)


def check_errors(judgements: list) -> int:
    """Statement checks whose trace records a judge error, over all responses."""
    return sum(
        1
        for judgement in judgements
        for check in judgement.trace["faithfulness"].get("checks", [])
        if (check.get("error") or "").startswith("judge_error")
    )


def test_a_failed_call_awaited_by_three_is_one_judge_error_and_two_shared_calls() -> None:
    responder = SharedCheck("fail")
    with ScriptedOpenAIServer(responder, latency_s=0.3) as server:
        judgements, metrics, stats = judged(server, RESPONSES, max_retries=0)
    assert responder.sent == 1  # one request for the three identical checks
    assert check_errors(judgements) == 3  # every response sees the failure...
    assert stats["judge_errors"] == 1 == Counter(e["outcome"] for e in server.request_log)["error"]  # ...counted once
    assert stats["shared_calls"] == 2 and stats["cache_hits"] == 0
    assert stats["judge_calls"] == stats["judge_requests"] == server.num_chat_requests
    assert metrics["long_reward/judge_errors"] == 1 and metrics["long_reward/shared_calls"] == 2


def test_an_unparseable_answer_awaited_by_three_is_one_parse_failure_per_try() -> None:
    responder = SharedCheck("garbage")
    with ScriptedOpenAIServer(responder, latency_s=0.3) as server:
        _, metrics, stats = judged(server, RESPONSES, max_retries=0, max_attempts=2)
    assert responder.sent == 2  # the cold try and one hot re-sample, each shared by the three checks
    assert stats["parse_failures"] == 2 == metrics["long_reward/parse_failures"]
    assert stats["shared_calls"] == 4 and stats["judge_errors"] == 0
    assert stats["judge_calls"] == stats["judge_requests"] == server.num_chat_requests


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("max_retries", "fault_rate"), [(0, 0.3), (2, 0.6)])
def test_counts_under_random_faults_match_the_servers_log(max_retries: int, fault_rate: float) -> None:
    """500s, 503s, timeouts, dropped connections and verdict-less answers at random (seeded), all four dimensions,
    answers that share calls: the package's counts equal the server's own."""
    with ScriptedOpenAIServer(
        ScriptedLongRewardJudge(),
        latency_s=0.1,
        fault_rate=fault_rate,  # with retries, faults often enough that some calls fail all their requests
        faults=[*TRANSPORT_FAULTS, "no_verdict"],
        seed=5,
        timeout_sleep_s=2.0,
    ) as server:
        _, metrics, stats = judged(
            server,
            [*RESPONSES, RESPONSES[0] + " The barrier cost four million pounds."],
            max_retries=max_retries,
            timeout=1.0,
            max_attempts=3,
            dimensions=["helpfulness", "logicality", "faithfulness", "completeness"],
        )
        log = settled_log(server)
    outcomes = Counter(entry["outcome"] for entry in log)
    assert set(outcomes) <= {"answered", "no_verdict", *TRANSPORT_FAULTS}, outcomes
    # Faults are drawn in arrival order, so which kinds a run meets varies; transport faults are met in every run
    # (the deterministic tests above pin a shared failure and a shared verdict-less answer exactly).
    assert sum(outcomes[kind] for kind in TRANSPORT_FAULTS) > 0
    # Every HTTP request, retries included.
    assert stats["judge_requests"] == len(log) == metrics["long_reward/judge_requests"]
    # A logical call's first request carries retry number 0; its retries 1..max_retries.
    assert stats["judge_calls"] == sum(1 for entry in log if entry["retry"] == 0)
    assert all(0 <= entry["retry"] <= max_retries for entry in log)
    # A call fails when its last allowed request met a transport fault; counted once, whoever awaited it.
    failed = sum(1 for entry in log if entry["retry"] == max_retries and entry["outcome"] in TRANSPORT_FAULTS)
    assert stats["judge_errors"] == failed == metrics["long_reward/judge_errors"]
    if max_retries == 0:  # every transport fault ends its call
        assert failed == sum(outcomes[kind] for kind in TRANSPORT_FAULTS) > 0
    assert stats["permanent_judge_errors"] == 0
    # Every verdict-less answer is one parse failure (and one re-sample).
    assert stats["parse_failures"] == outcomes["no_verdict"] == metrics["long_reward/parse_failures"]
    # Each logical call ended answered or failed.
    assert stats["judge_calls"] == outcomes["answered"] + outcomes["no_verdict"] + stats["judge_errors"]
    # Identical calls were awaited together, or answered from memory when one came after the other had finished.
    assert stats["shared_calls"] + stats["cache_hits"] > 0
    if max_retries == 0:
        assert stats["judge_calls"] == stats["judge_requests"]
    for key in ("judge_calls", "cache_hits", "shared_calls", "verdict_followups"):
        assert metrics[f"long_reward/{key}"] == stats[key]


# Two batches judged at once by one reward: each names itself in every sentence of its answers, so the server's log
# tells which batch each request came from (the judge prompts carry the response, or a statement taken from it).
BATCH_NAMES = ("Aquila", "Borealis")
CONCURRENT_FAULTS = ("500", "no_verdict")


def named_answers(name: str, n: int = 4) -> list[str]:
    return [
        f"The {name} council built a flood barrier in 1998 ({i}). The {name} barrier cost four million pounds."
        for i in range(n)
    ]


def batch_of(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    (name,) = [name for name in BATCH_NAMES if name in prompt]
    return name


@pytest.mark.timeout(300)
def test_two_batches_judged_at_once_in_two_threads_each_count_only_their_own_calls() -> None:
    """Two threads call `score_batch` on one reward at the same time (a background judging thread and an evaluation
    callback do): each batch's metrics count the requests that batch caused, exactly, and the two add up to the
    server's count. Faults (500s, answers without a verdict) land on both batches; each counts its own."""
    with ScriptedOpenAIServer(
        ScriptedLongRewardJudge(), latency_s=0.15, fault_rate=0.25, faults=CONCURRENT_FAULTS, seed=3
    ) as server:
        reward = LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", server.base_url, max_concurrency=16, max_retries=0),
            retriever="bm25",
            chunk_tokenizer="regex",
            dimensions=["helpfulness", "logicality", "faithfulness"],  # no per-prompt work shared by the batches
            max_attempts=2,
        )
        start = threading.Barrier(len(BATCH_NAMES))
        metrics: dict[str, dict[str, float]] = {}
        scoped: dict[str, dict[str, int]] = {}

        def judge_batch(name: str) -> None:
            start.wait()
            with reward.counting() as counts:  # the same counts, kept by the caller around its own calls
                metrics[name] = reward.score_batch(**rows(named_answers(name)))[1]
            scoped[name] = counts.totals()

        try:
            threads = [threading.Thread(target=judge_batch, args=(name,)) for name in BATCH_NAMES]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            stats = reward.stats()
        finally:
            reward.close()
        log = settled_log(server)
        bodies = list(server.requests)
    assert sorted(metrics) == sorted(BATCH_NAMES)
    by_batch = {name: [e for e, b in zip(log, bodies, strict=True) if batch_of(b) == name] for name in BATCH_NAMES}
    # The batches really ran at the same time: each one's requests began before the other's ended.
    first, second = ([e["arrived"] for e in by_batch[name]] for name in BATCH_NAMES)
    assert min(first) < max(second) and min(second) < max(first)
    outcomes = Counter(entry["outcome"] for entry in log)
    assert outcomes["500"] > 0 and outcomes["no_verdict"] > 0, outcomes
    for name in BATCH_NAMES:
        mine, own = by_batch[name], metrics[name]
        reported = {key: own[f"long_reward/{key}"] for key in ("judge_calls", "judge_requests")}
        assert reported == {"judge_calls": len(mine), "judge_requests": len(mine)}, name  # max_retries=0
        assert own["long_reward/judge_errors"] == sum(e["outcome"] == "500" for e in mine), name
        assert own["long_reward/parse_failures"] == sum(e["outcome"] == "no_verdict" for e in mine), name
        assert scoped[name] == {key[len("long_reward/") :]: int(v) for key, v in own.items() if key in _COUNTS}
    for key in ("judge_calls", "judge_requests", "judge_errors", "parse_failures", "shared_calls", "cache_hits"):
        assert sum(metrics[name][f"long_reward/{key}"] for name in BATCH_NAMES) == stats[key], key
    assert stats["judge_calls"] == stats["judge_requests"] == server.num_chat_requests == len(log)


_COUNTS = {
    f"long_reward/{key}"
    for key in (
        "judge_calls",
        "judge_requests",
        "cache_hits",
        "shared_calls",
        "parse_failures",
        "judge_errors",
        "permanent_judge_errors",
        "verdict_followups",
    )
}
