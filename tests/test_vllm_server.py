"""LongReward against a real vLLM OpenAI-compatible server: the CPU build of vLLM (the vLLM environment, see
`tests/vllm_env.py`) serving the bundled SmolLM2-135M-Instruct on loopback, eager mode, greedy judge calls.

SmolLM2-135M is a weak judge: these tests check the pipeline over real HTTP against vLLM's own server (every row
rewarded, counters, the cache making a rerun free as the server's own request counter shows, the verdict follow-up
continuing an assistant message, the `score` command; a DPO step judged by a server is `tests/test_vllm_demo.py`),
not the quality of its verdicts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from vllm_env import vllm_python

from trl_longreward import DIMENSIONS, LongRewardFunction
from trl_longreward.judges.base import ChatRequest, VerdictConstraint
from trl_longreward.judges.openai_judge import OpenAIJudge
from trl_longreward.judges.vllm_server import VLLMServer
from trl_longreward.models import default_model_path
from trl_longreward.records import read_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVED_NAME = "smollm2-judge"
DEMO_ROWS = Path(__file__).resolve().parent.parent / "trl_longreward" / "data" / "demo_score.jsonl"
# The CPU demo's judge budgets (recipes/dpo_longreward.py), greedy: eager vLLM answers the same calls the same way.
JUDGE_SETTINGS: dict[str, Any] = {
    "max_attempts": 1,
    "first_temperature": 0.0,
    "verdict_followup": True,
    "verdict_parsing": "lenient",
    "score_max_tokens": 32,
    "break_max_tokens": 64,
    "check_max_tokens": 32,
    "extract_max_tokens": 64,
    "max_statements": 1,
    "completeness_chunk_tokens": 1024,
    "max_missing_dimensions": 3,
    "retriever": "bm25",
}


def _requests_served(server: VLLMServer) -> float:
    """Requests the server finished, by its own Prometheus counter (every finish reason)."""
    return sum(v for k, v in server.metrics().items() if k.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[VLLMServer]:
    server = VLLMServer.start(default_model_path(), python=vllm_python(), served_model_name=SERVED_NAME, timeout=400)
    try:
        yield server
    finally:
        server.stop()
        assert server.process.poll() is not None  # the server process is gone


@pytest.fixture(scope="module")
def demo_rows() -> list[dict[str, Any]]:
    """The first 2 rows of `demo_score.jsonl`: every dimension's pipeline runs for each, sized by judge calls (about 9
    per row), not by the machine's speed."""
    return list(read_jsonl(DEMO_ROWS))[:2]


def _reward(server: VLLMServer, cache_path: Path) -> LongRewardFunction:
    return LongRewardFunction(
        judge_base_url=server.base_url, judge_model=SERVED_NAME, cache_path=str(cache_path), **JUDGE_SETTINGS
    )


def _score(reward: LongRewardFunction, rows: list[dict[str, Any]]):
    return reward.score(
        completions=[row["response"] for row in rows],
        context=[row["context"] for row in rows],
        question=[row["question"] for row in rows],
    )


def test_server_continues_a_final_assistant_message(vllm_server: VLLMServer) -> None:
    """The verdict follow-up continues the judge's own unfinished answer: the server must extend the assistant turn
    (no new turn, no chat-template header), exactly what `ChatRequest.continues_final_message` asks for."""
    judge = OpenAIJudge(SERVED_NAME, vllm_server.base_url, max_retries=0)
    prefix = "The capital of France is"
    request = ChatRequest(
        messages=(
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": prefix},
        ),
        max_tokens=8,
        temperature=0.0,
    )
    assert request.continues_final_message
    fresh = ChatRequest(messages=request.messages[:1], max_tokens=8, temperature=0.0)
    continued, new_turn = _ask(judge, [request, fresh])
    assert "Paris" in continued, continued
    assert not continued.lstrip().startswith(prefix)  # a continuation, not a fresh answer repeating the cue
    assert continued != new_turn


def _ask(judge: OpenAIJudge, requests: list[ChatRequest]) -> list[str]:
    async def ask() -> list[str]:
        try:
            answers = await judge.agenerate(requests)
        finally:
            await judge.aclose()
        assert all(isinstance(answer, str) for answer in answers), answers
        return answers

    return asyncio.run(ask())


def test_long_reward_rewards_every_row_and_the_cache_makes_a_rerun_free(
    vllm_server: VLLMServer, demo_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    cache_path = tmp_path / "judge_cache.sqlite"
    served_before = _requests_served(vllm_server)
    reward = _reward(vllm_server, cache_path)
    try:
        judgements = _score(reward, demo_rows)
        counts = reward.call_counts()
    finally:
        reward.close()
    served_first = _requests_served(vllm_server) - served_before
    assert len(judgements) == len(demo_rows) == 2
    rewards = [j.reward for j in judgements]
    assert all(r is not None and 0.0 <= r <= 10.0 for r in rewards), [j.status for j in judgements]
    for judgement in judgements:
        assert set(judgement.scores) == set(DIMENSIONS)
    assert counts["judge_calls"] > 0 and counts["judge_errors"] == 0, counts
    # Every call reached vLLM: the server finished at least one request per call sent (follow-ups are calls too).
    assert served_first >= counts["judge_calls"], (served_first, counts)
    print(f"vLLM server: {counts['judge_calls']} calls, {counts['verdict_followups']} follow-ups, rewards {rewards}")

    served_before = _requests_served(vllm_server)
    rerun = _reward(vllm_server, cache_path)
    try:
        again = _score(rerun, demo_rows)
        rerun_counts = rerun.call_counts()
    finally:
        rerun.close()
    assert rerun_counts["judge_calls"] == 0 and rerun_counts["cache_hits"] > 0, rerun_counts
    assert _requests_served(vllm_server) == served_before  # the server saw nothing
    assert [j.reward for j in again] == rewards


def test_score_command_against_the_server(vllm_server: VLLMServer, tmp_path: Path) -> None:
    from trl_longreward.commands import main

    output = tmp_path / "scores.jsonl"
    served_before = _requests_served(vllm_server)
    flags = [f"--{name}={value}" for name, value in JUDGE_SETTINGS.items()]
    code = main(
        [
            "score",
            "--input",
            str(DEMO_ROWS),
            "--output",
            str(output),
            "--limit",
            "2",
            "--judge_base_url",
            vllm_server.base_url,
            "--judge_model",
            SERVED_NAME,
            *flags,
        ]
    )
    assert code in (0, None)
    rows = list(read_jsonl(output))
    assert len(rows) == 2
    assert all(row["reward"] is not None for row in rows), rows
    assert _requests_served(vllm_server) > served_before


def test_structured_verdicts_through_the_server(
    vllm_server: VLLMServer, demo_rows: list[dict[str, Any]], tmp_path: Path
):
    """`verdict_decoding="structured"` against vLLM's own grammar engine (`structured_outputs` with a regex): a
    constrained answer ends in a valid verdict, and with the paper's strict parsing (no lenient reading) every verdict
    of every row parses; answers cut off by their token budget are completed by the follow-up, itself constrained to
    the verdict."""
    # The grammar forbids the end of the answer before the verdict: an answer that stops ends in one; only the token
    # budget can cut an answer short (finish_reason "length"), which the follow-up then completes.
    constraint = VerdictConstraint(choices=tuple(str(n) for n in range(11)), cue="Rating: ")
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key="EMPTY", max_retries=0, timeout=300)
    finished = []
    try:
        for question in ("What is 2 + 2?", "Which city is the capital of France?", "Name a primary colour."):
            completion = client.chat.completions.create(
                model=SERVED_NAME,
                messages=[
                    {"role": "user", "content": f"Answer, then rate your answer from 0 to 10 as [[N]]. {question}"}
                ],
                max_tokens=64,
                temperature=0.0,
                extra_body={"structured_outputs": {"regex": constraint.regex()}},
            )
            choice = completion.choices[0]
            free = client.chat.completions.create(
                model=SERVED_NAME,
                messages=[
                    {"role": "user", "content": f"Answer, then rate your answer from 0 to 10 as [[N]]. {question}"}
                ],
                max_tokens=64,
                temperature=0.0,
            ).choices[0]
            finished.append((choice.finish_reason, choice.message.content, free.finish_reason, free.message.content))
    finally:
        client.close()
    verdict_at_end = re.compile(r"\[\[(10|[0-9])\]\]$")
    for reason, text, _, _ in finished:
        assert reason in ("stop", "length"), finished
        if reason == "stop":
            assert verdict_at_end.search(text), text
    # Free decoding lets this judge end its answer without any verdict; the grammar never does.
    assert any(
        free_reason == "stop" and not verdict_at_end.search(free_text) for _, _, free_reason, free_text in finished
    )
    print("structured vs free:", [(r, t[-20:], fr, ft[-20:]) for r, t, fr, ft in finished])

    settings = {**JUDGE_SETTINGS, "verdict_parsing": "strict", "verdict_decoding": "structured"}
    reward = LongRewardFunction(
        judge_base_url=vllm_server.base_url,
        judge_model=SERVED_NAME,
        cache_path=str(tmp_path / "cache.sqlite"),
        **settings,
    )
    try:
        judgements = _score(reward, demo_rows)
        counts = reward.call_counts()
    finally:
        reward.close()
    assert counts["judge_errors"] == 0, counts
    assert counts["parse_failures"] == 0, counts
    assert all(j.reward is not None for j in judgements), [j.status for j in judgements]
    print(f"structured, strict parsing: {counts['judge_calls']} calls, {counts['verdict_followups']} follow-ups")
