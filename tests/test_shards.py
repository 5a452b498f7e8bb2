"""`--shard_index I --num_shards N` and `trl-longreward merge-shards`: N shards of `build-pairs` or `evaluate`, merged,
give exactly what one machine writes; shards that do not fit together are refused before anything is written.

The policies are tiny 2-layer Llamas with SmolLM2's tokenizer; the judge is the scripted judge over real HTTP, whose
helpfulness depends on the response's length (so the k samples of a prompt get different rewards).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from known_answers import CONTEXT, QUESTION
from tiny_models import FOUR_HEADS, tiny_llama

from trl_longreward.commands import main
from trl_longreward.commands.build_pairs import BuildPairsArguments
from trl_longreward.commands.evaluate import EvaluateArguments
from trl_longreward.shards import SHARD_MANIFEST, check_shard_options, shard_prompts
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

K = 3
FACTS = ["The mill burned in 1921.", "The ferry stopped in 1950.", "A school opened in 1962.", "The dam rose in 1977."]
QUESTIONS = [
    "When did the mill burn?",
    "When did the ferry stop?",
    "When did the school open?",
    "When was the dam built?",
]
ROWS = [{"context": CONTEXT, "question": QUESTION}] + [
    {"context": f"{CONTEXT} {fact}", "question": question} for fact, question in zip(FACTS, QUESTIONS, strict=True)
]
# batch_size 2: groups [0, 1], [2, 3], [4]; with 2 shards, shard 0 builds prompts 0, 1, 4 and shard 1 prompts 2, 3.
SHARD_PROMPTS = [[0, 1, 4], [2, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tiny_llama(tmp_path_factory.mktemp("tiny-llama"), **FOUR_HEADS))


@pytest.fixture(scope="module")
def judge_server() -> Iterator[ScriptedOpenAIServer]:
    script = ScriptedLongRewardJudge(helpfulness=lambda question, response: float(len(response) % 11))
    with ScriptedOpenAIServer(script) as server:
        yield server


@pytest.fixture(scope="module")
def input_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def _judge_flags(server: ScriptedOpenAIServer) -> list[str]:
    return ["--judge_base_url", server.base_url, "--judge_model", "scripted-judge", "--retriever", "bm25",
            "--chunk_tokenizer", "regex"]  # fmt: skip


def _main(*arguments: Any) -> str:
    """Run `trl-longreward ...` in this process; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(a) for a in arguments]) == 0
    return printed.getvalue()


def _build(model: Path, input_path: Path, out: Path, server: ScriptedOpenAIServer, *extra: Any) -> dict:
    """`trl-longreward build-pairs`; its JSON summary."""
    return json.loads(
        _main(
            "build-pairs",
            "--model",
            model,
            "--input",
            input_path,
            "--output_dir",
            out,
            "--num_generations",
            K,
            "--max_completion_length",
            10,
            "--max_prompt_length",
            160,
            "--batch_size",
            2,
            "--seed",
            7,
            *_judge_flags(server),
            *extra,
        )  # fmt: skip
    )


def _merge(out: Path, *shards: Path, extra: tuple[str, ...] = ()) -> str:
    return _main("merge-shards", "--shards", *shards, "--output_dir", out, *extra)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _pairs(out: Path) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    return load_from_disk(str(out / "pairs")).to_list()


# ----- which prompts a shard owns -----


@pytest.mark.parametrize(("num_prompts", "batch_size", "num_shards"), [(5, 2, 2), (10, 3, 4), (7, 1, 3), (2, 4, 3)])
def test_shards_own_disjoint_whole_groups_that_cover_every_prompt(num_prompts, batch_size, num_shards) -> None:
    owned = [shard_prompts(num_prompts, batch_size, i, num_shards) for i in range(num_shards)]
    assert sorted(i for shard in owned for i in shard) == list(range(num_prompts))  # disjoint and complete
    for index, shard in enumerate(owned):
        groups = {i // batch_size for i in shard}
        assert all(group % num_shards == index for group in groups)  # round robin over the groups
        whole = [i for g in sorted(groups) for i in range(g * batch_size, min((g + 1) * batch_size, num_prompts))]
        assert shard == whole  # a group is never split: its seed draws the same samples as on one machine
    assert shard_prompts(num_prompts, batch_size, 0, 1) == list(range(num_prompts))


def test_bad_shard_options_name_the_option_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--shard_index must be in \[0, --num_shards - 1\] = \[0, 1\], got 2"):
        check_shard_options(2, 2)
    with pytest.raises(ValueError, match="--shard_index .* got -1"):
        BuildPairsArguments(model="m", input="i", output_dir=str(tmp_path), shard_index=-1, num_shards=2)
    with pytest.raises(ValueError, match="--num_shards must be >= 1, got 0"):
        EvaluateArguments(model=["m"], output_dir=str(tmp_path), num_shards=0)
    with pytest.raises(ValueError, match="push after merge-shards"):
        BuildPairsArguments(
            model="m", input="i", output_dir=str(tmp_path), num_shards=2, push_to_hub=True, hub_dataset_id="u/d"
        )


# ----- build-pairs: two shards + merge == one machine -----


@pytest.fixture(scope="module")
def runs(model_dir, judge_server, input_path, tmp_path_factory) -> dict[str, Any]:
    """One unsharded build and the two shards of the same build, each with its own output directory and judge cache."""
    work = tmp_path_factory.mktemp("runs")
    single = _build(model_dir, input_path, work / "single", judge_server)
    shards = []
    for index in range(2):
        before = judge_server.num_chat_requests
        summary = _build(model_dir, input_path, work / f"shard{index}", judge_server,
                         "--shard_index", index, "--num_shards", 2)  # fmt: skip
        shards.append({"dir": work / f"shard{index}", "summary": summary,
                       "sent": judge_server.num_chat_requests - before})  # fmt: skip
    return {"work": work, "single": single, "single_dir": work / "single", "shards": shards}


def test_each_shard_builds_only_its_groups_with_its_own_cache_and_manifest(runs) -> None:
    for index, shard in enumerate(runs["shards"]):
        records = _lines(shard["dir"] / "samples.jsonl")
        assert [r["index"] for r in records] == SHARD_PROMPTS[index]
        assert shard["summary"]["prompts"] == shard["summary"]["new_prompts"] == len(SHARD_PROMPTS[index])
        assert shard["summary"]["judge_calls"] == shard["sent"] > 0
        assert (shard["dir"] / "judge_cache.sqlite").exists()
        manifest = json.loads((shard["dir"] / SHARD_MANIFEST).read_text())
        assert manifest["command"] == "build-pairs" and (manifest["shard_index"], manifest["num_shards"]) == (index, 2)
        assert manifest["num_prompts"] == len(ROWS) and manifest["settings"]["seed"] == 7
    # The shards did the single run's work between them, no more: no prompt was judged twice.
    assert sum(shard["summary"]["judge_calls"] for shard in runs["shards"]) == runs["single"]["judge_calls"]
    assert not (runs["single_dir"] / SHARD_MANIFEST).exists()  # an unsharded run writes what it always wrote


def test_merged_shards_equal_the_single_machine_run(runs) -> None:
    merged = runs["work"] / "merged"
    shard_dirs = [shard["dir"] for shard in runs["shards"]]
    summary = json.loads(_merge(merged, *reversed(shard_dirs)))  # any order
    single, single_dir = runs["single"], runs["single_dir"]
    for key in ("prompts", "pairs", "skipped", "truncated_prompts"):
        assert summary[key] == single[key], key
    assert summary["shards"] == 2 and single["pairs"] >= 3
    # Same samples (same seeds: same responses, rewards, selections), same rows in the same order.
    assert _lines(merged / "samples.jsonl") == _lines(single_dir / "samples.jsonl")
    assert _pairs(merged) == _pairs(single_dir)
    assert (merged / "pairs.jsonl").read_text() == (single_dir / "pairs.jsonl").read_text()


def test_merged_directory_resumes_as_a_finished_single_run(runs, model_dir, judge_server, input_path) -> None:
    merged = runs["work"] / "merged-again"
    _merge(merged, *(shard["dir"] for shard in runs["shards"]))
    before = judge_server.num_chat_requests
    summary = _build(model_dir, input_path, merged, judge_server)
    assert summary["new_prompts"] == 0 and summary["judge_calls"] == 0 and judge_server.num_chat_requests == before
    assert _pairs(merged) == _pairs(runs["single_dir"])


def test_a_shard_resumes_from_its_seed_and_its_own_cache(runs, model_dir, judge_server, input_path) -> None:
    shard = runs["work"] / "shard0-resumed"
    shutil.copytree(runs["shards"][0]["dir"], shard)
    samples = shard / "samples.jsonl"
    lines = samples.read_text(encoding="utf-8").splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")  # a crash-cut line
    before = judge_server.num_chat_requests
    summary = _build(model_dir, input_path, shard, judge_server, "--shard_index", 0, "--num_shards", 2)
    assert summary["new_prompts"] == 1 and summary["cache_hits"] > 0 and summary["judge_calls"] == 0
    assert judge_server.num_chat_requests == before  # same samples from the group's seed: every answer cached
    assert samples.read_text(encoding="utf-8").splitlines(keepends=True) == lines


def test_an_output_directory_of_another_shard_is_refused(runs, model_dir, judge_server, input_path) -> None:
    shard = runs["work"] / "shard0-as-1"
    shutil.copytree(runs["shards"][0]["dir"], shard)
    with pytest.raises(ValueError, match="holds prompt 0, which shard 1 of 2 does not build"):
        _build(model_dir, input_path, shard, judge_server, "--shard_index", 1, "--num_shards", 2)
    # A shard directory whose samples fit but whose manifest is another run's (here: another seed).
    (shard / "samples.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"holds build-pairs shard 0 of 2, .*settings\.seed: 7 vs 8"):
        _build(model_dir, input_path, shard, judge_server,
               "--shard_index", 0, "--num_shards", 2, "--seed", 8)  # fmt: skip


def test_merge_refuses_shards_that_do_not_fit_together(runs, model_dir, judge_server, input_path, tmp_path) -> None:
    first, second = (shard["dir"] for shard in runs["shards"])
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"shard\(s\) 1 of 2 missing"):
        _merge(out, first)
    with pytest.raises(ValueError, match="shard 0 of 2 is given twice"):
        _merge(out, first, first, second)
    with pytest.raises(ValueError, match="holds no shard.json: it is not the output of a run with --shard_index"):
        _merge(out, first, runs["single_dir"])
    with pytest.raises(ValueError, match="is one of the --shards"):
        _merge(first, first, second)

    # Shard 1 run with another seed: its samples are not the single run's, the merge says which setting differs.
    other_seed = tmp_path / "shard1-seed8"
    _build(model_dir, input_path, other_seed, judge_server,
           "--shard_index", 1, "--num_shards", 2, "--seed", 8)  # fmt: skip
    with pytest.raises(ValueError, match=r"are not shards of one run: settings\.seed: 7 vs 8"):
        _merge(out, first, other_seed)
    # Shards of a split into 3 do not fit shards of a split into 2.
    third = tmp_path / "shard2-of-3"
    _build(model_dir, input_path, third, judge_server, "--shard_index", 2, "--num_shards", 3)
    with pytest.raises(ValueError, match="num_shards: 2 vs 3"):
        _merge(out, first, second, third)

    # An unfinished shard (a prompt lost, as after a crash) is named, with what to do.
    unfinished = tmp_path / "shard1-unfinished"
    shutil.copytree(second, unfinished)
    samples = unfinished / "samples.jsonl"
    samples.write_text(samples.read_text().splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=r"shard 1 of 2 .* is not finished: 1 of its 2 prompts .* prompt 3\)\. Rerun"):
        _merge(out, first, unfinished)
    # Another input than the shards were built from.
    other_input = tmp_path / "other.jsonl"
    other_input.write_text("".join(json.dumps({**row, "question": row["question"] + "?"}) + "\n" for row in ROWS))
    with pytest.raises(ValueError, match="is not the input the shards were built from"):
        _merge(out, first, second, extra=("--input", str(other_input)))
    assert not out.exists()  # nothing was written by a refused merge


# ----- evaluate: two shards + merge == one machine -----


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("tiny-eval")
    return [tiny_llama(root / "seed0", seed=0), tiny_llama(root / "seed1", seed=1)]


def _evaluate(server: ScriptedOpenAIServer, *args: Any) -> str:
    return _main("evaluate", *args, *_judge_flags(server))


def test_evaluate_shards_merge_into_the_single_machine_evaluation(two_models, judge_server, tmp_path) -> None:
    # Sampled answers (seeded per group) over 5 bundled prompts in groups of 2: shard 0 answers 0, 1, 4; shard 1 2, 3.
    flags = ["--model", *two_models, "--limit", 5, "--batch_size", 2, "--max_completion_length", 8,
             "--max_prompt_length", 192, "--do_sample", "true", "--seed", 5]  # fmt: skip
    single = tmp_path / "single"
    single_out = _evaluate(judge_server, *flags, "--output_dir", single)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for index, shard in enumerate(shards):
        _evaluate(judge_server, *flags, "--output_dir", shard, "--shard_index", index, "--num_shards", 2)
        answers = _lines(shard / "answers.jsonl")
        assert sorted({a["index"] for a in answers}) == SHARD_PROMPTS[index]
        shard_results = json.loads((shard / "results.json").read_text())
        assert shard_results["config"]["prompts"] == len(SHARD_PROMPTS[index])
        assert shard_results["config"]["shard"] == {"shard_index": index, "num_shards": 2}

    merged = tmp_path / "merged"
    printed = _merge(merged, *shards)
    assert json.loads((merged / "results.json").read_text()) == json.loads((single / "results.json").read_text())
    assert _lines(merged / "answers.jsonl") == _lines(single / "answers.jsonl")  # same sampled answers, same order
    assert _lines(merged / "judged.jsonl") == _lines(single / "judged.jsonl")
    table = printed.split("results:")[0].strip()
    assert table and table in single_out  # the printed table is the single run's
    assert len({a["answer"] for a in _lines(single / "answers.jsonl")}) > 1

    # A shard missing an answer is not finished; a build-pairs shard is not an evaluate shard.
    answers = shards[1] / "answers.jsonl"
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=r"shard 1 of 2 .* is not finished: .* no judged answer to prompt 3"):
        _merge(tmp_path / "merged-2", *shards)
