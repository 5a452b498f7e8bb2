"""One judge, one loop: a judge shared by several rewards (each on its own loop thread) and by `generate()` calls
from other threads runs every call on its own loop, keeps its limits across all of them, and never leaves a caller
waiting forever.

HTTP tests talk to `ScriptedOpenAIServer`s on loopback through the real `openai` client; each server counts the
requests it had in flight at once, and answers 429 above its own limit (set to the judge's), so a limit the judge
exceeds shows up as a rejection.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from known_answers import CONTEXT, EVASIVE, GOOD, PARTLY_WRONG, QUESTION

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.judges.base import ChatRequest, JudgeError
from trl_longreward.judges.batching import BatchingJudge, BatchResult
from trl_longreward.judges.endpoints import EndpointPool
from trl_longreward.judges.loops import JudgeLoop
from trl_longreward.reward.function import _LoopThread
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

LIMIT = 2  # calls in flight per endpoint, in the judge and in the servers' rate limiters
RESPONSES = [GOOD, PARTLY_WRONG, EVASIVE, "The council built a flood barrier in 1998."]
EXPECTED = {GOOD: 9.25, PARTLY_WRONG: 8.0}  # worked out by hand in known_answers


HELPFULNESS = ChatRequest.from_prompt(
    f"Rate how helpful the response is.\n<question>\n{QUESTION}\n</question>\n<response>\n{GOOD}\n</response>"
)
HELPFULNESS_ANSWER = "Analysis: scripted helpfulness judgement.\nScore: [[8]]"


def rows(context: str = CONTEXT) -> dict[str, list[str]]:
    return {
        "prompts": [f"{context}\n\n{QUESTION}"] * len(RESPONSES),
        "completions": list(RESPONSES),
        "context": [context] * len(RESPONSES),
        "question": [QUESTION] * len(RESPONSES),
    }


def run_in_threads(*calls: Callable[[], Any], timeout: float = 60.0) -> list[Any]:
    """Start every call at the same moment in its own thread; their results (or the exception each raised)."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def worker(i: int, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as err:  # reported to the test thread
            results[i] = err

    threads = [threading.Thread(target=worker, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a caller was still waiting on the judge"
    return results


@pytest.fixture
def servers() -> Iterator[list[ScriptedOpenAIServer]]:
    running = [
        ScriptedOpenAIServer(ScriptedLongRewardJudge(), latency_s=0.05, max_concurrency=LIMIT).start()
        for _ in range(2)
    ]
    yield running
    for server in running:
        server.stop()


def shared_judge(servers: list[ScriptedOpenAIServer], **kwargs: Any) -> OpenAIJudge:
    return OpenAIJudge("scripted-judge", [s.base_url for s in servers], max_concurrency=LIMIT, **kwargs)


def reward_with(judge: Any) -> LongRewardFunction:
    return LongRewardFunction(judge=judge, retriever="bm25", chunk_tokenizer="regex")


def check_rewards(rewards: Any) -> None:
    assert isinstance(rewards, list), rewards
    assert all(isinstance(value, float) for value in rewards), rewards
    for response, value in zip(RESPONSES, rewards, strict=True):
        if response in EXPECTED:
            assert value == pytest.approx(EXPECTED[response])


# ----- OpenAIJudge shared across loops -----


def test_two_rewards_sharing_a_judge_score_at_once_within_the_endpoint_limit(servers):
    judge = shared_judge(servers, max_retries=0)
    first, second = reward_with(judge), reward_with(judge)
    try:
        results = run_in_threads(lambda: first(**rows()), lambda: second(**rows()))
    finally:
        first.close()
        second.close()
    for result in results:
        check_rewards(result)
    # Both rewards' calls went through one pool: each endpoint had at most LIMIT in flight, and was kept full.
    assert [s.max_in_flight for s in servers] == [LIMIT, LIMIT]
    assert [s.num_rejected for s in servers] == [0, 0]
    assert [e["max_in_flight"] for e in judge.endpoint_stats()] == [LIMIT, LIMIT]
    # Every call the two rewards sent reached a server exactly once (no rejection, no retry).
    sent = first.stats()["judge_calls"] + second.stats()["judge_calls"]
    assert sum(s.num_chat_requests for s in servers) == sent > 0
    assert judge.stats.failures == 0


def test_generate_from_the_main_thread_while_a_reward_scores(servers):
    judge = shared_judge(servers, max_retries=0)
    reward = reward_with(judge)
    scoring = threading.Thread(target=lambda: results.append(reward(**rows())), daemon=True)
    results: list[Any] = []
    try:
        scoring.start()
        deadline = time.monotonic() + 30
        while sum(s.num_chat_requests for s in servers) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        answers = judge.generate([HELPFULNESS] * 3)  # asyncio.run on this thread: another event loop
        still_scoring = scoring.is_alive()
        scoring.join(60)
    finally:
        reward.close()
    assert not scoring.is_alive()
    assert still_scoring  # the calls overlapped
    assert answers == [HELPFULNESS_ANSWER] * 3
    check_rewards(results[0])
    assert [s.num_rejected for s in servers] == [0, 0]
    assert max(s.max_in_flight for s in servers) <= LIMIT


def test_a_judge_closed_by_one_caller_fails_the_others_calls_at_once():
    with ScriptedOpenAIServer(lambda messages, body: "[[7]]", latency_s=3.0) as server:
        judge = OpenAIJudge("scripted-judge", server.base_url, max_retries=0)
        requests = [ChatRequest.from_prompt(f"call {i}") for i in range(3)]

        def close_soon() -> None:
            while server.num_chat_requests < 3:
                time.sleep(0.005)
            asyncio.run(judge.aclose())

        answers, _ = run_in_threads(lambda: judge.generate(requests), close_soon)
    # The server would have answered "[[7]]" after 3 s: errors mean the waiting calls failed when it was closed.
    assert all(isinstance(answer, JudgeError) for answer in answers), answers
    # The judge is usable again afterwards: a new loop, new clients.
    with ScriptedOpenAIServer(lambda messages, body: "[[7]]") as server:
        judge.base_url = server.base_url
        assert judge.generate(requests[:1]) == ["[[7]]"]
        asyncio.run(judge.aclose())


def test_a_call_that_never_gets_an_answer_times_out_by_the_client_budget():
    with ScriptedOpenAIServer(lambda messages, body: "[[7]]", latency_s=30.0) as server:
        judge = OpenAIJudge("scripted-judge", server.base_url, timeout=0.3, max_retries=1)
        (answer,) = judge.generate([ChatRequest.from_prompt("hello")])
        asyncio.run(judge.aclose())
    # The server would have answered after 30 s: the error is the client's own timeout budget running out.
    assert isinstance(answer, JudgeError) and "failed after 1 retries" in str(answer)
    # The guard's bound is the same budget: endpoints x (1 + retries) x (timeout + backoff).
    assert judge._stall_timeout() == pytest.approx(1 * 2 * (0.3 + 60.0) + 10.0)


def test_a_stuck_judge_loop_fails_waiting_calls_with_a_clear_error(monkeypatch):
    with ScriptedOpenAIServer(lambda messages, body: "[[7]]") as server:
        judge = OpenAIJudge("scripted-judge", server.base_url, max_retries=0)
        assert judge.generate([ChatRequest.from_prompt("warm")]) == ["[[7]]"]
        monkeypatch.setattr(judge, "_stall_timeout", lambda: 0.3)

        async def block() -> None:
            time.sleep(1.5)  # a blocking call on the judge's loop: nothing on it can make progress

        blocked = judge._home.submit(block())
        (answer,) = judge.generate([ChatRequest.from_prompt("hello")])
        blocked.result(10)
        assert judge.generate([ChatRequest.from_prompt("again")]) == ["[[7]]"]  # the loop is free again
        asyncio.run(judge.aclose())
    assert isinstance(answer, JudgeError) and "no answer within 0.3 s" in str(answer) and "stuck" in str(answer)
    assert judge.stats.failures == 1


def test_a_used_judge_pickles_without_its_loop(servers):
    judge = shared_judge(servers[:1], max_retries=0)
    assert judge.generate([HELPFULNESS]) == [HELPFULNESS_ANSWER]
    copy = pickle.loads(pickle.dumps(judge))
    assert copy._home is not judge._home and copy._home.loop is None
    assert copy.generate([HELPFULNESS]) == [HELPFULNESS_ANSWER]
    for one in (judge, copy):
        asyncio.run(one.aclose())


# ----- the endpoint pool and the loop -----


def test_endpoint_pool_refuses_a_second_loop_while_the_first_has_calls_in_flight():
    pool = EndpointPool(["http://a/v1"], limit=1, cooldown=1.0)
    held = threading.Event()
    release = threading.Event()

    async def hold_a_slot() -> None:
        dispatch = await pool.acquire()
        held.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        pool.release(dispatch, healthy=True)

    thread = threading.Thread(target=lambda: asyncio.run(hold_a_slot()), daemon=True)
    thread.start()
    assert held.wait(10)
    with pytest.raises(RuntimeError, match="one event loop"):
        asyncio.run(pool.acquire())
    release.set()
    thread.join(10)

    async def later() -> bool:  # the first loop is gone and nothing is in flight: a new loop may use the pool
        pool.release(await pool.acquire(), healthy=True)
        return True

    assert asyncio.run(later())


def test_judge_loop_stall_timeout_cancels_the_call():
    loop = JudgeLoop(name="test-loop")
    cancelled = threading.Event()

    async def never() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.set()

    async def main() -> None:
        with pytest.raises(JudgeError, match="probe: no answer within 0.2 s"):
            await loop.call(never(), stall_timeout=0.2, what="probe")

    asyncio.run(main())
    assert cancelled.wait(5)
    assert loop.run_sync(asyncio.sleep(0, result="still works")) == "still works"
    loop.stop()
    assert loop.loop is None


def test_stopping_a_loop_thread_fails_callers_instead_of_leaving_them_waiting():
    loop = _LoopThread()
    results = run_in_threads(lambda: loop.run(asyncio.sleep(30)), lambda: (time.sleep(0.3), loop.stop()), timeout=10)
    assert isinstance(results[0], RuntimeError) and "stopped" in str(results[0])

    async def blocking_call_from_the_loop_itself() -> None:
        loop.run(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="own thread"):
        loop.run(blocking_call_from_the_loop_itself())
    loop.stop()


# ----- an in-process batching judge shared across loops -----


class ScriptedBatchJudge(BatchingJudge):
    """Answers like the scripted HTTP judge, one micro-batch at a time, and records how many batches overlapped."""

    model_id = "scripted-batch"

    def __init__(self, *, delay: float = 0.02, gate: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = ScriptedLongRewardJudge()
        self.delay, self.gate = delay, gate
        self.batches: list[list[ChatRequest]] = []
        self.running = self.max_running = 0
        self.lock = threading.Lock()

    def _generate_batch(self, requests: list[ChatRequest]) -> BatchResult:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.batches.append(list(requests))
        try:
            if self.gate is not None:
                self.gate.wait(30)
            time.sleep(self.delay)
            return [self.script(list(r.messages), {}) for r in requests]
        finally:
            with self.lock:
                self.running -= 1


def test_batching_judge_shared_by_two_rewards_and_generate_runs_one_batch_at_a_time():
    judge = ScriptedBatchJudge(max_batch_size=8, batch_wait_s=0.05)
    first, second = reward_with(judge), reward_with(judge)
    other = CONTEXT.replace("1911", "1912")  # a second document: its prompts tell the two rewards' calls apart
    try:
        results = run_in_threads(
            lambda: first(**rows()), lambda: second(**rows(other)), lambda: judge.generate([HELPFULNESS] * 2)
        )
    finally:
        first.close()
        second.close()
    check_rewards(results[0])
    check_rewards(results[1])
    assert results[2] == [HELPFULNESS_ANSWER] * 2
    assert judge.max_running == 1  # one model call at a time, whichever loop the requests came from
    assert sum(len(batch) for batch in judge.batches) == judge.stats.requests
    assert judge.stats.failures == 0

    def documents(batch: list[ChatRequest]) -> set[str]:
        texts = " ".join(m["content"] for r in batch for m in r.messages)
        return {name for name, year in (("first", "1911"), ("second", "1912")) if year in texts}

    assert any(documents(batch) == {"first", "second"} for batch in judge.batches)  # one queue for both rewards


def test_batching_judge_stall_timeout_fails_a_request_whose_batch_never_returns():
    gate = threading.Event()
    judge = ScriptedBatchJudge(gate=gate, stall_timeout_s=0.3, batch_wait_s=0.0)
    request = HELPFULNESS
    (answer,) = judge.generate([request])
    gate.set()
    assert isinstance(answer, JudgeError) and "ScriptedBatchJudge call: no answer within 0.3 s" in str(answer)
    assert judge.generate([request]) == [HELPFULNESS_ANSWER]  # the model thread came back: the judge works again
    asyncio.run(judge.aclose())
    with pytest.raises(ValueError, match="stall_timeout_s"):
        ScriptedBatchJudge(stall_timeout_s=0)
