"""`trl-longreward build-pairs`: prompts -> k samples from a tiny policy -> scripted judge over HTTP -> DPO pairs.

The policy is a 2-layer Llama with SmolLM2's tokenizer (chat template, offline). The judge's helpfulness depends on
the response's length, so the k samples of a prompt get different rewards and best-vs-worst pairs exist.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from known_answers import CONTEXT, QUESTION
from tiny_models import FOUR_HEADS, tiny_llama

from trl_longreward.commands import main
from trl_longreward.documents import TRUNCATION_MARKER
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

K = 4
FILLER = " ".join(f"Note {n}: the weather in the valley was mild that year." for n in range(60))
ROWS = [
    {"context": CONTEXT, "question": QUESTION},
    {
        "context": CONTEXT + " The stone bridge over the Alder was rebuilt in 1975.",
        "question": "When was the stone bridge rebuilt?",
    },
    # Longer than --max_prompt_length: the policy sees the document cut in the middle, the judge the whole of it.
    {"context": CONTEXT + " " + FILLER + " The museum opened in 1960.", "question": "When did the library open?"},
]
PAIR_COLUMNS = {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "context", "question"}


def build_tiny_model(output_dir: Path, *, chat_template: bool = True) -> Path:
    """A 2-layer Llama from a config with SmolLM2's tokenizer, saved with the tokenizer to `output_dir`."""
    return Path(tiny_llama(output_dir, chat_template=chat_template, **FOUR_HEADS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def judge_server() -> Iterator[ScriptedOpenAIServer]:
    script = ScriptedLongRewardJudge(helpfulness=lambda question, response: float(len(response) % 11))
    with ScriptedOpenAIServer(script) as server:
        yield server


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _arguments(
    model: Path, input_path: Path, output_dir: Path, server: ScriptedOpenAIServer, *extra: str
) -> list[str]:
    return [
        "--model", str(model), "--input", str(input_path), "--output_dir", str(output_dir),
        "--num_generations", str(K), "--max_completion_length", "12", "--max_prompt_length", "160", "--batch_size", "2",
        "--seed", "3", "--judge_base_url", server.base_url, "--judge_model", "scripted-judge",
        "--retriever", "bm25", "--chunk_tokenizer", "regex", *extra,
    ]  # fmt: skip


def _records(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def _pairs(output_dir: Path) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    return load_from_disk(str(output_dir / "pairs")).to_list()


@pytest.fixture(scope="module")
def built(model_dir: Path, judge_server: ScriptedOpenAIServer, tmp_path_factory: pytest.TempPathFactory):
    """One real `python -m trl_longreward.commands build-pairs` run over the three prompts."""
    work = tmp_path_factory.mktemp("build-pairs")
    input_path = _write_jsonl(work / "prompts.jsonl", ROWS)
    output_dir = work / "out"
    before = judge_server.num_chat_requests
    command = [sys.executable, "-m", "trl_longreward.commands", "build-pairs",
               *_arguments(model_dir, input_path, output_dir, judge_server)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"input": input_path, "output_dir": output_dir, "result": result,
            "judge_calls": judge_server.num_chat_requests - before}  # fmt: skip


def test_build_pairs_writes_samples_and_best_vs_worst_pairs(built: dict[str, Any]) -> None:
    output_dir = built["output_dir"]
    summary = json.loads(built["result"].stdout)
    assert "build-pairs: 100%" in built["result"].stderr  # the progress bar over prompts
    assert summary["prompts"] == summary["new_prompts"] == 3
    assert summary["pairs"] + sum(summary["skipped"].values()) == 3 and summary["pairs"] >= 2
    assert summary["judge_calls"] == built["judge_calls"] > 0 and summary["truncated_prompts"] == 1
    assert (output_dir / "judge_cache.sqlite").exists()

    records = _records(output_dir)
    assert [r["index"] for r in records] == [0, 1, 2]
    for record in records:
        assert len(record["responses"]) == len(record["rewards"]) == len(record["scores"]) == K
        assert set(record["scores"][0]) == {"helpfulness", "logicality", "faithfulness", "completeness"}
        assert len(set(record["responses"])) > 1  # sampled, not greedy
    assert [r["truncated"] for r in records] == [False, False, True]

    pairs = _pairs(output_dir)
    assert set(_load_columns(output_dir)) == PAIR_COLUMNS
    by_question = {r["question"]: r for r in records}
    assert len(pairs) == summary["pairs"]
    for pair in pairs:
        record = by_question[pair["question"]]
        scored = [r for r in record["rewards"] if r is not None]
        assert pair["chosen_reward"] >= pair["rejected_reward"]
        assert pair["chosen_reward"] == max(scored) and pair["rejected_reward"] == min(scored)
        # SmolLM2's tokenizer has a chat template: the prompt is the chat the samples were generated from.
        assert pair["prompt"] == record["prompt"] and pair["prompt"][0]["role"] == "user"
        selection = record["selection"]
        assert pair["chosen"] == [{"role": "assistant", "content": record["responses"][selection["chosen"]]}]
        assert pair["rejected"] == [{"role": "assistant", "content": record["responses"][selection["rejected"]]}]
        row = next(r for r in ROWS if r["question"] == pair["question"])
        assert pair["context"] == row["context"]  # the FULL document, also for the truncated prompt
    long_prompt = records[2]["prompt"][0]["content"]
    assert TRUNCATION_MARKER in long_prompt and "The museum opened in 1960." in long_prompt
    assert len(long_prompt) < len(ROWS[2]["context"])
    jsonl = [json.loads(line) for line in (output_dir / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert jsonl == pairs


def _load_columns(output_dir: Path) -> list[str]:
    from datasets import load_from_disk

    return load_from_disk(str(output_dir / "pairs")).column_names


def _run(built: dict[str, Any], model_dir: Path, server: ScriptedOpenAIServer, capsys) -> dict[str, Any]:
    assert main(["build-pairs", *_arguments(model_dir, built["input"], built["output_dir"], server)]) == 0
    return json.loads(capsys.readouterr().out)


def test_rerun_makes_no_judge_calls_and_keeps_the_pairs(built, model_dir, judge_server, capsys) -> None:
    pairs = _pairs(built["output_dir"])
    before = judge_server.num_chat_requests
    summary = _run(built, model_dir, judge_server, capsys)
    assert judge_server.num_chat_requests == before
    assert summary["new_prompts"] == 0 and summary["judge_calls"] == 0 and summary["prompts"] == 3
    assert _pairs(built["output_dir"]) == pairs


def test_resume_after_a_crash_redoes_the_last_prompt_from_seed_and_cache(built, model_dir, judge_server, capsys):
    samples = built["output_dir"] / "samples.jsonl"
    lines = samples.read_text(encoding="utf-8").splitlines(keepends=True)
    pairs = _pairs(built["output_dir"])
    samples.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")  # a cut line
    before = judge_server.num_chat_requests
    summary = _run(built, model_dir, judge_server, capsys)
    assert summary["new_prompts"] == 1 and summary["cache_hits"] > 0
    assert judge_server.num_chat_requests == before  # same samples from the seed: every judge answer is cached
    assert samples.read_text(encoding="utf-8").splitlines(keepends=True) == lines
    assert _pairs(built["output_dir"]) == pairs

    # Prompt 1 missing from a finished group (0, 1): the group is generated again from its seed, only 1 is appended.
    samples.write_text(lines[0] + lines[2], encoding="utf-8")
    summary = _run(built, model_dir, judge_server, capsys)
    assert summary["new_prompts"] == 1 and judge_server.num_chat_requests == before
    assert samples.read_text(encoding="utf-8").splitlines(keepends=True) == [lines[0], lines[2], lines[1]]
    assert _pairs(built["output_dir"]) == pairs  # in prompt order again


def test_resuming_onto_samples_of_another_input_is_refused(built, model_dir, judge_server, tmp_path) -> None:
    other = _write_jsonl(tmp_path / "other.jsonl", [{**row, "question": row["question"] + "?"} for row in ROWS])
    with pytest.raises(ValueError, match="built from another input"):
        main(["build-pairs", *_arguments(model_dir, other, built["output_dir"], judge_server)])


def test_rows_without_context_question_or_prompt_are_a_clear_error(tmp_path, model_dir, judge_server) -> None:
    input_path = _write_jsonl(tmp_path / "rows.jsonl", [{"document": CONTEXT, "query": QUESTION}])
    with pytest.raises(ValueError, match=r"needs 'context' and 'question' columns, or a 'prompt' column") as err:
        main(["build-pairs", *_arguments(model_dir, input_path, tmp_path / "out", judge_server)])
    assert "['document', 'query']" in str(err.value) and "--context_column" in str(err.value)


def test_prompt_rows_and_a_policy_without_chat_template_give_string_pairs(tmp_path, judge_server, capsys) -> None:
    plain_model = build_tiny_model(tmp_path / "plain-llama", chat_template=False)
    input_path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": CONTEXT + "\n\n" + QUESTION}])
    arguments = _arguments(plain_model, input_path, tmp_path / "out", judge_server, "--tie_policy", "first_last")
    assert main(["build-pairs", *arguments]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 1 and summary["pairs"] == 1
    (pair,) = _pairs(tmp_path / "out")
    assert pair["prompt"] == CONTEXT + "\n\n" + QUESTION
    assert isinstance(pair["chosen"], str) and isinstance(pair["rejected"], str)
    assert pair["context"] == CONTEXT and pair["question"] == QUESTION


def test_usage_lists_both_commands(capsys) -> None:
    assert main([]) == 2
    usage = capsys.readouterr().out
    assert "dpo" in usage and "score" in usage and "build-pairs" in usage
    assert main(["nope"]) == 2
    assert "available: dpo, score, build-pairs" in capsys.readouterr().err


@pytest.mark.slow
def test_trl_dpo_trainer_trains_on_the_pairs(built, model_dir, tmp_path) -> None:
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = load_from_disk(str(built["output_dir"] / "pairs"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to="none",
        bf16=False,
        save_strategy="no",
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
