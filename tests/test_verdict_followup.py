"""`verdict_followup`: a judge answer without a verdict is continued after the verdict cue, over the real protocol.

The scripted judge plays a weak judge (`verdict_only_when_continued`): its new answers never end with a verdict, but
continued after "Score: [[" it writes "8]]". It is served over HTTP and reached through the real openai client, so the
continuation request (`continue_final_message`) is checked as a server receives it.
"""

from __future__ import annotations

import pytest
from known_answers import GOOD
from known_answers import rows as _rows

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.reward.runner import VERDICT_CUES
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

KNOWN_GOOD_SCORES = {"helpfulness": 8.0, "logicality": 9.0, "faithfulness": 10.0, "completeness": 10.0}


@pytest.fixture
def weak_server():
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(verdict_only_when_continued=True)) as running:
        yield running


def _reward(server: ScriptedOpenAIServer, **overrides) -> LongRewardFunction:
    judge = OpenAIJudge("scripted-judge", server.base_url, max_retries=overrides.pop("max_retries", 2))
    return LongRewardFunction(judge=judge, retriever="bm25", chunk_tokenizer="regex", **overrides)


def test_followup_recovers_every_verdict_of_a_weak_judge(weak_server) -> None:
    reward = _reward(weak_server, verdict_followup=True, max_attempts=1)
    try:
        (judgement,) = reward.score(**_rows(GOOD))
        stats = reward.stats()
    finally:
        reward.close()
    assert judgement.scores == KNOWN_GOOD_SCORES
    # 7 calls (helpfulness, logicality, break, 2 checks, 1 extraction, completeness), each followed up once
    assert len(weak_server.requests) == 14
    assert stats["verdict_followups"] == 7 and stats["parse_failures"] == 0
    continued = [body for body in weak_server.requests if body["messages"][-1]["role"] == "assistant"]
    assert len(continued) == 7
    for body in continued:
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["temperature"] == 0.0
        assert body["messages"][0]["role"] == "user"
        assert body["messages"][-1]["content"].startswith("Let me think about this carefully.")
    score_followups = [b for b in continued if b["messages"][-1]["content"].endswith("Score: [[")]
    assert len(score_followups) == 3 and {b["max_tokens"] for b in score_followups} == {6}
    # list-shaped answers (statements, notes) get the call's own budget after "Output:"
    outputs = [b for b in continued if b["messages"][-1]["content"].endswith("Output:\n")]
    assert sorted(b["max_tokens"] for b in outputs) == sorted(
        [reward.config.break_max_tokens, reward.config.extract_max_tokens]
    )
    # the trace shows the raw answer and the continued one
    outputs_trace = judgement.trace["helpfulness"]["call"]["judge_outputs"]
    assert outputs_trace[0] == "Let me think about this carefully. The answer has some merit."
    assert outputs_trace[1].endswith("Score: [[8]]")


def test_without_followup_the_weak_judge_gives_no_reward(weak_server) -> None:
    reward = _reward(weak_server, max_attempts=1, verdict_parsing="lenient")
    try:
        (judgement,) = reward.score(**_rows(GOOD))
    finally:
        reward.close()
    assert judgement.reward is None
    assert set(judgement.status.values()) == {"failed"}
    assert all(body["messages"][-1]["role"] == "user" for body in weak_server.requests)


def test_followups_are_cached_and_never_paid_twice(weak_server, tmp_path) -> None:
    cache = str(tmp_path / "judge_cache.sqlite")
    first = _reward(weak_server, verdict_followup=True, max_attempts=1, cache_path=cache)
    try:
        expected = first.score(**_rows(GOOD))[0].scores
        sent = len(weak_server.requests)
        assert first.score(**_rows(GOOD))[0].scores == expected
        assert len(weak_server.requests) == sent
    finally:
        first.close()
    second = _reward(weak_server, verdict_followup=True, max_attempts=1, cache_path=cache)
    try:
        assert second.score(**_rows(GOOD))[0].scores == expected == KNOWN_GOOD_SCORES
    finally:
        second.close()
    assert len(weak_server.requests) == sent  # a new run reads the follow-ups from the disk cache too


def test_a_failing_followup_is_not_the_calls_failure() -> None:
    """The server rejects continuations (500): the call goes on to its re-sample, which parses."""
    script = ScriptedLongRewardJudge(garbage_below_temperature=0.5)

    def responder(messages, body):
        if messages[-1]["role"] == "assistant":
            raise RuntimeError("this server cannot continue a message")
        return script(messages, body)

    with ScriptedOpenAIServer(responder) as server:
        reward = _reward(server, verdict_followup=True, max_attempts=2, max_retries=0)
        try:
            (judgement,) = reward.score(**_rows(GOOD))
            stats = reward.stats()
        finally:
            reward.close()
    assert judgement.scores == KNOWN_GOOD_SCORES  # from the hot re-samples
    assert stats["verdict_followups"] == 7 and stats["judge_errors"] == 7 and stats["parse_failures"] == 7
    assert judgement.status == dict.fromkeys(KNOWN_GOOD_SCORES, "ok")


def test_every_template_has_a_cue() -> None:
    from trl_longreward.reward.templates import TEMPLATE_NAMES

    assert set(TEMPLATE_NAMES) | {"reference_rating"} == set(VERDICT_CUES)
