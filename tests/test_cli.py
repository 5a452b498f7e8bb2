"""`trl-longreward score`: a file of (context, question, response) rows in, judgements out, resumable."""

import json
import subprocess
import sys

import pytest
from known_answers import CONTEXT, EVASIVE, GOOD, PARTLY_WRONG, QUESTION


def _score(tmp_path, server, *extra):
    command = [
        sys.executable, "-m", "trl_longreward.commands", "score",
        "--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "scores.jsonl"),
        "--judge_base_url", server.base_url, "--judge_model", "scripted-judge",
        "--retriever", "bm25", "--chunk_tokenizer", "regex", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _write_rows(tmp_path, responses):
    rows = [{"context": CONTEXT, "question": QUESTION, "response": r} for r in responses]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_score_writes_scores_and_traces_and_resumes(tmp_path, server):
    _write_rows(tmp_path, [GOOD, PARTLY_WRONG, EVASIVE])
    first = _score(tmp_path, server, "--limit", "2")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert records[0]["reward"] == pytest.approx(9.25)
    assert records[1]["scores"]["faithfulness"] == 5.0
    assert records[1]["trace"]["faithfulness"]["statements"][1] == "The barrier was paid for by the king."
    assert "score: 100%" in first.stderr  # the progress bar
    sent = server.num_chat_requests

    second = _score(tmp_path, server)  # resume: only row 2 is new
    assert second.returncode == 0, second.stderr
    records = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert server.num_chat_requests - sent == 4  # the evasive row: helpfulness, logicality, break, completeness
    summary = json.loads(second.stdout)
    assert summary["rows"] == 3 and summary["faithfulness"]["scored"] == 2
    assert (tmp_path / "scores.jsonl.judge_cache.sqlite").exists()


def test_crash_cut_line_is_rescored_from_the_cache(tmp_path, server):
    _write_rows(tmp_path, [GOOD])
    assert _score(tmp_path, server).returncode == 0
    sent = server.num_chat_requests
    out = tmp_path / "scores.jsonl"
    out.write_text(out.read_text()[:40])  # a line cut short by a crash
    assert _score(tmp_path, server).returncode == 0
    assert server.num_chat_requests == sent  # every judge call of that row came from the cache
    assert json.loads(out.read_text().splitlines()[-1])["reward"] == pytest.approx(9.25)


def test_missing_response_column_is_a_clear_error(tmp_path, server):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"context": "d", "question": "q", "answer": "a"}) + "\n")
    result = _score(tmp_path, server)
    assert result.returncode != 0
    assert "no 'response' column" in result.stderr and "--response_column" in result.stderr


def test_rows_whose_judge_calls_failed_are_judged_again_on_resume_paying_only_for_those_calls(tmp_path, script):
    """A judge that fails every logicality call (500) mid-run: the rows are written with `judge_errors`; the rerun
    against a healthy judge judges them again, and only the failed calls reach the judge (the rest: cache)."""
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer

    def flaky(messages, body):
        if "logical quality" in messages[-1]["content"]:
            raise RuntimeError("logicality replica down")
        return script(messages, body)

    _write_rows(tmp_path, [GOOD, EVASIVE])
    with ScriptedOpenAIServer(flaky) as bad:
        first = _score(tmp_path, bad, "--judge_max_retries", "0", "--max_missing_dimensions", "1")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["judge_errors"] for r in records] == [["logicality"], ["logicality"]]
    assert [r["scores"]["logicality"] for r in records] == [None, None]
    assert "rerun the same command" in first.stderr and json.loads(first.stdout)["rows_with_judge_errors"] == 2

    with ScriptedOpenAIServer(script) as healthy:
        second = _score(tmp_path, healthy, "--max_missing_dimensions", "1")
        assert second.returncode == 0, second.stderr
        assert healthy.num_chat_requests == 2  # one logicality call per row; every other call came from the cache
    records = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1]  # one line per row: the failed lines were replaced
    assert all(r["judge_errors"] == [] for r in records)
    assert records[0]["reward"] == pytest.approx(9.25)  # GOOD's known scores, logicality 9 included
    assert "rows_with_judge_errors" not in json.loads(second.stdout)


def test_resume_keeps_only_lines_judged_for_good(tmp_path):
    """The resume rule shared by `score` and `build-pairs`: a judged line stays, a line with judge errors and a line
    cut short by a crash are dropped (rewritten atomically) so that their rows are judged again."""
    from trl_longreward.records import resume_jsonl

    out = tmp_path / "samples.jsonl"
    lines = [
        json.dumps({"index": 0, "rewards": [7.0, 3.0], "judge_errors": []}),
        json.dumps({"index": 1, "rewards": [None, 3.0], "judge_errors": ["completeness"]}),
        json.dumps({"index": 2, "rewards": [5.0]}),  # written before judge_errors existed: final
        '{"index": 3, "rewa',
    ]
    out.write_text("\n".join(lines) + "\n")
    assert resume_jsonl(out) == {0, 2}
    assert out.read_text().splitlines() == [lines[0], lines[2]]
    assert resume_jsonl(out) == {0, 2}  # idempotent
