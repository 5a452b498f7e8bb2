"""`trl-longreward evaluate`: answers from several models, LongReward scores, win rates, reference ratings, resume.

The judge is the scripted judge behind a real OpenAI-compatible HTTP server. One test starts from answers whose scores
are worked out by hand (tests/known_answers.py), so the table, the win rates and the reference ratings are checked
exactly; another generates with two differently seeded tiny Llamas on the bundled held-out split.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from known_answers import CONTEXT, EVASIVE, GOOD, PARTLY_WRONG, QUESTION
from tiny_models import tiny_llama

from trl_longreward.commands import main
from trl_longreward.commands.evaluate import ANSWERS_FILE, JUDGED_FILE, RESULTS_FILE, EvaluateArguments, prompt_digest
from trl_longreward.summaries import win_rate
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

# LongReward of the known answers (tests/known_answers.py); EVASIVE has no factual statement: (2 + 9 + 0) / 3.
REWARD = {GOOD: 9.25, PARTLY_WRONG: 8.0, EVASIVE: 11 / 3}
# The scripted rating against the reference GOOD: 1 + 9 x the share of GOOD's six 5+-letter words in the answer.
RATING = {GOOD: 10.0, PARTLY_WRONG: 7.0, EVASIVE: 1.0}
ANSWERS = {"model-a": [GOOD, PARTLY_WRONG, EVASIVE], "model-b": [PARTLY_WRONG, PARTLY_WRONG, GOOD]}


@pytest.fixture
def script() -> ScriptedLongRewardJudge:
    return ScriptedLongRewardJudge()


@pytest.fixture
def server(script: ScriptedLongRewardJudge) -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(script) as running:
        yield running


def evaluate(
    server: ScriptedOpenAIServer, capsys: pytest.CaptureFixture, *args: Any
) -> tuple[str, str, dict[str, int]]:
    """Run `trl-longreward evaluate` in this process; its stdout, its stderr and the "this run" counts it printed."""
    judge = ["--judge_base_url", server.base_url, "--judge_model", "scripted-judge"]
    assert main(["evaluate", *map(str, args), *judge, "--retriever", "bm25", "--chunk_tokenizer", "regex"]) == 0
    out, err = capsys.readouterr()
    match = re.search(r"this run: (\d+) new answers, (\d+) answers judged, (\d+) judge calls, (\d+) cache hits", out)
    assert match, out
    keys = ("new_answers", "new_judgements", "judge_calls", "cache_hits")
    return out, err, dict(zip(keys, map(int, match.groups()), strict=True))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_known_answers(tmp_path: Path) -> tuple[Path, Path]:
    """The bundled-style input file and an output directory whose answers.jsonl already holds ANSWERS."""
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        "".join(json.dumps({"context": CONTEXT, "question": QUESTION, "answer": GOOD}) + "\n" for _ in range(3))
    )
    out = tmp_path / "eval"
    out.mkdir()
    settings = EvaluateArguments(model=["x"], output_dir=str(out)).generation_settings()
    with (out / ANSWERS_FILE).open("w") as sink:
        for model, texts in ANSWERS.items():
            for index, text in enumerate(texts):
                record = {"model": model, "index": index, "answer": text, "generation": settings}
                sink.write(json.dumps({**record, "prompt_sha256": prompt_digest(CONTEXT, QUESTION)}) + "\n")
    return rows, out


def test_known_answers_give_the_exact_table_win_rates_and_reference_ratings(
    tmp_path: Path, server: ScriptedOpenAIServer, script: ScriptedLongRewardJudge, capsys: pytest.CaptureFixture
) -> None:
    # Answers already in answers.jsonl are not generated again: these "models" are not even loadable.
    rows, out = _write_known_answers(tmp_path)

    stdout, _, run = evaluate(
        server,
        capsys,
        "--model",
        "model-a",
        "model-b",
        "--input",
        rows,
        "--output_dir",
        out,
        "--reference_column",
        "answer",
    )

    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["columns"] == [
        "helpfulness",
        "logicality",
        "faithfulness",
        "completeness",
        "reward",
        "reference_score",
    ]
    for model, texts in ANSWERS.items():
        row = results["table"][model]
        assert row["reward"] == pytest.approx(sum(REWARD[t] for t in texts) / 3)
        assert row["reference_score"] == pytest.approx(sum(RATING[t] for t in texts) / 3)
        assert row["logicality"] == 9.0 and row["scored"] == row["prompts"] == 3
    assert results["table"]["model-a"]["helpfulness"] == pytest.approx(6.0)  # 8, 8 and 2 for the evasive answer
    assert results["table"]["model-a"]["faithfulness"] == pytest.approx(7.5)  # the evasive answer has none
    # model-b against model-a, prompt by prompt: 8 < 9.25, 8 = 8, 9.25 > 3.67 (and the same order for the ratings).
    expected = {"wins": 1, "ties": 1, "losses": 1, "unscored": 0, "compared": 3, "win_rate": pytest.approx(1 / 3)}
    assert results["win_rates"] == {"model-b": expected} and results["win_rate_on"] == "reward"
    assert results["reference_win_rates"] == {"model-b": expected}
    assert results["config"]["models"] == ["model-a", "model-b"] and results["config"]["reference_column"] == "answer"
    assert re.search(
        r"model-b\s+8\.00\s+9\.00\s+6\.67\s+10\.00\s+8\.42\s+8\.00\s+3/3\s+1/1/1 \(win rate 33%\)", stdout
    )

    judged = {(r["model"], r["index"]): r for r in read_jsonl(out / JUDGED_FILE)}
    assert len(judged) == 6
    assert judged[("model-a", 1)]["trace"]["faithfulness"]["statements"][1] == "The barrier was paid for by the king."
    assert judged[("model-a", 2)]["status"]["faithfulness"] == "not_applicable"
    assert judged[("model-b", 1)]["reference"]["score"] == 7.0
    assert "Rating: [[7]]" in judged[("model-b", 1)]["reference"]["judge_outputs"][0]
    assert run["new_answers"] == 0 and run["new_judgements"] == 6
    assert run["judge_calls"] == server.num_chat_requests > 0
    assert script.calls["reference_rating"] == 3  # one call per distinct answer; the repeats came from the cache

    sent = server.num_chat_requests
    _, _, rerun = evaluate(
        server,
        capsys,
        "--model",
        "model-a",
        "model-b",
        "--input",
        rows,
        "--output_dir",
        out,
        "--reference_column",
        "answer",
    )
    assert server.num_chat_requests == sent and rerun == dict.fromkeys(rerun, 0)
    assert json.loads((out / RESULTS_FILE).read_text())["table"] == results["table"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("tiny")
    return [tiny_llama(root / "seed0", seed=0), tiny_llama(root / "seed1", seed=1)]


def test_two_models_answer_the_bundled_split_and_a_rerun_makes_no_judge_call(
    tmp_path: Path, two_models: list[str], capsys: pytest.CaptureFixture
) -> None:
    from trl_longreward.data import load_long_qa

    script = ScriptedLongRewardJudge(helpfulness=lambda question, response: float(len(response) % 11))
    out = tmp_path / "eval"
    flags = [
        "--model",
        *two_models,
        "--output_dir",
        out,
        "--limit",
        2,
        "--max_completion_length",
        10,
        "--max_prompt_length",
        192,
    ]
    with ScriptedOpenAIServer(script) as server:
        stdout, progress, run = evaluate(server, capsys, *flags)
        sent = server.num_chat_requests
        assert run["new_answers"] == run["new_judgements"] == 4 and run["judge_calls"] == sent > 0

        answers = read_jsonl(out / ANSWERS_FILE)
        assert [(a["model"], a["index"]) for a in answers] == [(m, i) for m in two_models for i in (0, 1)]
        assert all(a["truncated"] and a["completion_tokens"] <= 10 for a in answers)  # documents cut for the models
        questions = load_long_qa("eval")["question"][:2]
        assert [a["question"] for a in answers] == questions * 2
        assert [a["answer"] for a in answers[:2]] != [a["answer"] for a in answers[2:]]  # two different models

        # The table and the win rate agree with the per-answer traces.
        judged = {(r["model"], r["index"]): r for r in read_jsonl(out / JUDGED_FILE)}
        results = json.loads((out / RESULTS_FILE).read_text())
        for model in two_models:
            rewards = [judged[(model, i)]["reward"] for i in (0, 1)]
            assert results["table"][model]["reward"] == pytest.approx(sum(rewards) / 2)
            assert results["table"][model]["helpfulness"] == pytest.approx(
                sum(len(judged[(model, i)]["answer"]) % 11 for i in (0, 1)) / 2
            )
        base, other = ([judged[(m, i)]["reward"] for i in (0, 1)] for m in two_models)
        assert results["win_rates"][two_models[1]] == win_rate(other, base)
        assert f"win/tie/loss vs {two_models[0]}" in stdout
        assert f"generate {two_models[1]}: 100%" in progress and "judge: 100%" in progress

        _, _, rerun = evaluate(server, capsys, *flags)  # finished: nothing generated, nothing judged
        assert rerun == dict.fromkeys(rerun, 0) and server.num_chat_requests == sent

        (out / JUDGED_FILE).unlink()  # judged lines lost: judged again, every call from the cache
        _, _, rejudged = evaluate(server, capsys, *flags)
        assert server.num_chat_requests == sent
        assert rejudged["new_answers"] == 0 and rejudged["new_judgements"] == 4 and rejudged["judge_calls"] == 0
        assert rejudged["cache_hits"] > 0
        assert json.loads((out / RESULTS_FILE).read_text())["table"] == results["table"]

        with pytest.raises(ValueError, match="Use a new --output_dir"):  # other generation settings: refused
            evaluate(server, capsys, *flags[:-1], 256)


def test_win_rate_counts_ties_and_unscored_prompts_apart() -> None:
    counts = win_rate([5.0, 7.0, None, 6.0, 9.0], [5.0, 6.0, 3.0, 8.0, 8.5])
    assert counts == {"wins": 2, "ties": 1, "losses": 1, "unscored": 1, "compared": 4, "win_rate": 0.5}
    assert win_rate([5.0, 7.0, 9.0], [5.0, 6.0, 8.5], tie_margin=1.0)["ties"] == 3
    assert win_rate([None], [1.0])["win_rate"] is None


def test_bad_arguments_fail_before_any_model_or_judge_is_used(tmp_path: Path, server: ScriptedOpenAIServer) -> None:
    with pytest.raises(ValueError, match="leaves nothing to score"):
        EvaluateArguments(model=["m"], output_dir=str(tmp_path), long_reward=False)
    with pytest.raises(ValueError, match="lists a model twice"):
        EvaluateArguments(model=["m", "m"], output_dir=str(tmp_path))
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"context": CONTEXT, "question": QUESTION}) + "\n")
    with pytest.raises(ValueError, match="'reference' is not a column"):
        main(
            [
                "evaluate",
                "--model",
                "m",
                "--input",
                str(rows),
                "--output_dir",
                str(tmp_path / "o"),
                "--reference-column",
                "reference",
                "--judge_base_url",
                server.base_url,
                "--judge_model",
                "j",
            ]
        )
    assert server.num_chat_requests == 0


def test_failed_judge_calls_are_judged_again_by_the_rerun_and_a_dead_judge_stops_before_writing(
    tmp_path: Path, script: ScriptedLongRewardJudge, capsys: pytest.CaptureFixture
) -> None:
    rows, out = _write_known_answers(tmp_path)
    args = ["--model", "model-a", "model-b", "--input", rows, "--output_dir", out, "--max_missing_dimensions", "1"]

    with ScriptedOpenAIServer(script) as dead:
        dead.set_down(True)
        with pytest.raises(RuntimeError, match="answered none of the"):
            evaluate(dead, capsys, *args, "--judge_max_retries", "0")
    assert not (out / JUDGED_FILE).exists() or not (out / JUDGED_FILE).read_text().strip()

    def no_logicality(messages, body):
        if "logical quality" in messages[-1]["content"]:
            raise RuntimeError("logicality replica down")
        return script(messages, body)

    with ScriptedOpenAIServer(no_logicality) as flaky:
        evaluate(flaky, capsys, *args, "--judge_max_retries", "0")
    judged = read_jsonl(out / JUDGED_FILE)
    assert len(judged) == 6 and all(r["judge_errors"] == ["logicality"] for r in judged)

    with ScriptedOpenAIServer(script) as healthy:
        _, _, run = evaluate(healthy, capsys, *args)
    # all six answers judged again; only the logicality calls of the 3 distinct answers reach the judge
    assert run["new_judgements"] == 6 and run["judge_calls"] == 3
    latest = {(r["model"], r["index"]): r for r in read_jsonl(out / JUDGED_FILE)}
    assert all(r["judge_errors"] == [] for r in latest.values())
    assert latest[("model-a", 0)]["reward"] == pytest.approx(REWARD[GOOD])
