"""Permanent judge errors stay permanent, and a rejected API key stops the run at once.

A 400 (a prompt over the judge's context window) is not retried, is recorded once with the server's message, is
cached as a failure so a rerun of `score` does not send it again, and is told apart from transient failures in the
output rows. 401/403 raise `JudgeAuthError` naming `judge_api_key_env`, never the key. Judges are scripted servers on
loopback reached through the real `openai` client.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from known_answers import CONTEXT, GOOD, QUESTION
from known_answers import rows as known_rows

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.commands import main
from trl_longreward.judges.base import JudgeAuthError, JudgeFatalError
from trl_longreward.records import check_judge_answered, permanent_error_dimensions, resume_jsonl
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

LONG = GOOD + " " + "filler " * 3000  # its prompts are far over the window; GOOD's fit
DIMENSIONS = ("helpfulness", "logicality", "faithfulness", "completeness")
KEY_ENV = "PERMANENT_ERRORS_JUDGE_KEY"


def fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def window_for_good() -> int:
    """A context window (whitespace words) that every judge call of GOOD fits into, with a small margin."""
    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as probe:
        reward = scripted_reward(probe.base_url)
        try:
            reward.score(**known_rows(GOOD))
        finally:
            reward.close()
        bodies = list(probe.requests)
    return max(sum(len(m["content"].split()) for m in b["messages"]) + b["max_tokens"] for b in bodies) + 50


def scripted_reward(url: str, **options: Any) -> LongRewardFunction:
    judge_options = {k: options.pop(k) for k in ("max_retries", "fingerprint", "api_key_env") if k in options}
    judge_options.setdefault("max_retries", 3)
    return LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", url, **judge_options), retriever="bm25", chunk_tokenizer="regex", **options
    )


@pytest.fixture(scope="module")
def window() -> int:
    return window_for_good()


def test_a_400_is_recorded_once_not_retried_and_cached_until_the_window_grows(window: int, tmp_path: Path) -> None:
    cache = str(tmp_path / "judge_cache.sqlite")
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), max_context_tokens=window) as server:
        reward = scripted_reward(server.base_url, cache_path=cache)
        try:
            good, long = reward.score(**known_rows(GOOD, LONG))
            stats = reward.stats()
        finally:
            reward.close()
        refused = [
            body
            for body, entry in zip(server.requests, server.request_log, strict=True)
            if entry["outcome"] == "too_long"
        ]
        log = list(server.request_log)
    assert good.reward is not None and long.reward is None
    assert long.status == dict.fromkeys(DIMENSIONS, "failed")
    error = long.trace["helpfulness"]["call"]["error"]
    assert error.startswith("permanent_judge_error: ") and server.base_url in error
    assert "maximum context length" in error and "400" in error  # the server's own message
    assert permanent_error_dimensions(long.trace) == list(DIMENSIONS)
    # helpfulness, logicality, the statement breakdown and the completeness score: refused once each, no retry
    assert len(refused) == 4 and all(n == 1 for n in Counter(map(fingerprint, refused)).values())
    assert all(entry["retry"] == 0 for entry in log if entry["outcome"] == "too_long")
    assert stats["judge_errors"] == stats["permanent_judge_errors"] == 4
    assert stats["judge_requests"] == len(log) == stats["judge_calls"]

    # A rerun reads the answers and the refusals from the cache: not one request.
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), max_context_tokens=window) as again:
        reward = scripted_reward(again.base_url, cache_path=cache)
        try:
            _, long_again = reward.score(**known_rows(GOOD, LONG))
            rerun = reward.stats()
        finally:
            reward.close()
        assert again.num_chat_requests == 0
    assert rerun["judge_calls"] == 0 and rerun["judge_errors"] == 0
    assert rerun["cache_hits"] == stats["judge_calls"] + stats["cache_hits"] + stats["shared_calls"]
    assert long_again.trace["helpfulness"]["call"]["error"] == error

    # A judge with a larger window (it reports max_model_len) is asked the refused calls again, and only those.
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), max_context_tokens=100 * window) as wider:
        reward = scripted_reward(wider.base_url, cache_path=cache)
        try:
            _, long_wide = reward.score(**known_rows(GOOD, LONG))
        finally:
            reward.close()
        assert wider.num_chat_requests == 4
    assert long_wide.reward is not None


def test_score_keeps_refused_rows_on_resume_and_tells_them_from_failed_ones(
    window: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"context": CONTEXT, "question": QUESTION, "response": r}) + "\n" for r in (LONG, GOOD))
    )
    output = tmp_path / "scores.jsonl"
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), max_context_tokens=window) as server:
        command = ["score", "--input", str(rows), "--output", str(output), "--batch_size", "1"]
        flags = ["--judge_base_url", server.base_url, "--judge_model", "scripted-judge", "--retriever", "bm25"]
        flags += ["--chunk_tokenizer", "regex", "--dimensions", "helpfulness", "logicality"]
        # The first batch is LONG alone: every call refused. That is an answer, not a dead judge: it is written.
        assert main([*command, *flags]) == 0
        summary = json.loads(capsys.readouterr().out)
        records = [json.loads(line) for line in output.read_text().splitlines()]
        assert [r["permanent_judge_errors"] for r in records] == [["helpfulness", "logicality"], []]
        assert [r["judge_errors"] for r in records] == [[], []]
        assert summary["rows_with_permanent_judge_errors"] == 1 and "rows_with_judge_errors" not in summary
        assert summary["judge"]["permanent_judge_errors"] == 2
        sent = server.num_chat_requests
        written = output.read_text()
        assert main([*command, *flags]) == 0  # nothing left to judge, nothing sent again
        assert server.num_chat_requests == sent and output.read_text() == written


def test_resume_judges_transient_failures_again_but_not_permanent_ones(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    lines = [
        {"index": 0, "judge_errors": [], "permanent_judge_errors": ["completeness"]},
        {"index": 1, "judge_errors": ["logicality"], "permanent_judge_errors": []},
        {"index": 2, "judge_errors": []},
    ]
    output.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert resume_jsonl(output) == {0, 2}
    # A batch whose every sent call was refused is recorded; one whose every call failed transiently is not.
    check_judge_answered(
        [], {"judge_calls": 3, "judge_errors": 3, "permanent_judge_errors": 3}, rows="r", output=output
    )
    with pytest.raises(RuntimeError, match="answered none"):
        check_judge_answered(
            [], {"judge_calls": 3, "judge_errors": 3, "permanent_judge_errors": 0}, rows="r", output=output
        )


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_stops_the_run_before_any_judge_call(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = f"sk-wrong-{status}-canary"
    monkeypatch.setenv(KEY_ENV, canary)
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), api_key="sk-right", auth_status=status) as server:
        reward = scripted_reward(server.base_url, api_key_env=KEY_ENV)
        try:
            with pytest.raises(JudgeAuthError) as stopped:
                reward.score(**known_rows(GOOD))
            with pytest.raises(JudgeAuthError):  # and so does the next batch
                reward.score(**known_rows(GOOD))
        finally:
            reward.close()
        assert server.num_chat_requests == 0 and server.num_model_requests == 1
    message = str(stopped.value)
    assert KEY_ENV in message and "judge_api_key_env" in message and str(status) in message
    assert canary not in message


def test_a_key_rejected_on_a_judge_call_stops_at_once_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `judge_fingerprint` the server is not asked what it serves: the first judge calls meet the 401. They
    are not retried, and no further call is sent."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), api_key="sk-right", latency_s=0.05) as server:
        reward = scripted_reward(server.base_url, api_key_env=KEY_ENV, fingerprint="judge", max_retries=5)
        try:
            with pytest.raises(JudgeAuthError) as stopped:
                reward.score(**known_rows(GOOD, "The barrier cost four million pounds."))
            time.sleep(0.5)  # the calls already under way when the first 401 came back reach the server
            first = server.num_chat_requests
            with pytest.raises(JudgeAuthError):
                reward.score(**known_rows(GOOD))
        finally:
            reward.close()
        log = list(server.request_log)
    # Only the first calls of the batch (two responses: helpfulness, logicality, breakdown each, one extraction),
    # all sent before the first 401 came back; then nothing more, not even for the next batch.
    assert 1 <= first <= 7 and server.num_chat_requests == first
    assert all(entry["outcome"] == "unauthorized" and entry["retry"] == 0 for entry in log)
    assert f"{KEY_ENV} (judge_api_key_env) is not set" in str(stopped.value)
    assert isinstance(stopped.value, JudgeFatalError) and not isinstance(stopped.value, Exception)


def test_the_cli_stops_with_the_key_variable_named_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-cli-canary")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"context": CONTEXT, "question": QUESTION, "response": GOOD}) + "\n")
    output = tmp_path / "scores.jsonl"
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), api_key="sk-right") as server:
        code = main(
            ["score", "--input", str(rows), "--output", str(output), "--judge_base_url", server.base_url,
             "--judge_model", "scripted-judge", "--judge_api_key_env", KEY_ENV, "--retriever", "bm25",
             "--chunk_tokenizer", "regex"]
        )  # fmt: skip
        assert server.num_chat_requests == 0
    err = capsys.readouterr().err
    assert code == 1 and KEY_ENV in err and "judge_api_key_env" in err and "sk-cli-canary" not in err
    assert not output.exists() or output.read_text() == ""
