"""A TRL user's first hour: the README's examples run as written, `trl-longreward dpo`, `--config` for every command,
a named model without data refused, chat-template options for the policy and the judge.

The README's examples run against the scripted judge served over real HTTP and a tiny config-built model: the test
replaces only the endpoints (the judge's URL and model name, the policy's Hub id), and gives TRL's own `GRPOConfig`
`use_cpu=True` (TRL defaults to bf16, which transformers refuses on a machine without a bf16 GPU; our
`LongContextDPOConfig` falls back to float32 there by itself); nothing else of the examples' text.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from known_answers import CONTEXT, GOOD, QUESTION
from tiny_models import tiny_llama

from trl_longreward.commands import main, parse_with_config

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
JUDGE_URL = "http://127.0.0.1:8000/v1"
JUDGE_NAME = "Qwen/Qwen2.5-72B-Instruct"
POLICY_NAME = "Qwen/Qwen2.5-0.5B-Instruct"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _for_this_machine(text: str, *, server_url: str, model_path: str) -> str:
    """The example with its endpoints pointed at the scripted judge and the tiny model (nothing else changes)."""
    text = text.replace(JUDGE_URL, server_url).replace(JUDGE_NAME, "scripted-judge").replace(POLICY_NAME, model_path)
    return text.replace("GRPOConfig(output_dir=", "GRPOConfig(use_cpu=True, output_dir=")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow
def test_readme_python_examples_run_as_written_in_order(tmp_path, server, tiny_model, monkeypatch):
    """Every ```python block of the README, in order, in one namespace (as a reader pastes them into one session):
    the quickstart trains a step, the GRPO example builds its trainer, the callback attaches."""
    blocks = _blocks(README.read_text(), "python")
    assert len(blocks) >= 3, "the README lost its Python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        assert "..." not in block.replace('"..."', ""), f"a README example is not runnable:\n{block}"
        exec(
            compile(_for_this_machine(block, server_url=server.base_url, model_path=tiny_model), "README", "exec"),
            namespace,
        )
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"long_reward/reward/mean", "long_reward/helpfulness/mean", "rewards/chosen"} <= logged
    assert not any(key.startswith("rewards/") and key.endswith("_mean") for key in logged)  # TRL's names stay TRL's
    assert server.num_chat_requests > 0, "the judge was asked over HTTP"
    assert namespace["grpo"].reward_funcs[0] is namespace["reward"]
    assert namespace["callback"] in trainer.callback_handler.callbacks


@pytest.mark.slow
def test_readme_dpo_command_runs_as_written(tmp_path, server, tiny_model, monkeypatch, capsys):
    """The quickstart's `trl-longreward dpo` line, through the command table, on a prompts.jsonl in TRL's standard
    format (a `prompt` string)."""
    (line,) = [b for b in _blocks(README.read_text(), "bash") if "trl-longreward dpo --model_name_or_path" in b]
    argv = _shell_words(_for_this_machine(line, server_url=server.base_url, model_path=tiny_model))
    assert argv[:2] == ["trl-longreward", "dpo"]
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text(json.dumps({"prompt": CONTEXT + "\n\n" + QUESTION}) + "\n")
    out = tmp_path / "run"
    assert main([*argv[1:], "--output_dir", str(out), "--num_generations", "2", "--max_completion_length", "8"]) == 0
    assert (out / "model.safetensors").exists() and (out / "report.html").exists()
    card = (out / "README.md").read_text()
    assert "scripted-judge" in card and "prompts.jsonl" in card and str(tmp_path) not in card


def _shell_words(block: str) -> list[str]:
    import shlex

    return shlex.split(block.replace("\\\n", " "))


def test_a_named_model_without_data_refuses_to_start_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit, match="dataset_name is not.*--dataset_name bundled"):
        main(
            [
                "dpo",
                "--model_name_or_path",
                str(tmp_path / "no-model"),
                "--output_dir",
                str(tmp_path),
                "--use_cpu",
                "true",
            ]
        )


@pytest.mark.parametrize("config", ["llama31_8b_qlora_1gpu.yaml", "llama31_8b_zero3_8gpu.yaml"])
def test_the_8b_configs_refuse_to_train_on_the_demo_set(config, capsys):
    from trl_longreward.commands import dpo

    argv = ["--config", str(REPO_ROOT / "recipes" / "configs" / config), "--use_cpu", "true"]
    script_args, _, model_args = dpo.parse_arguments(argv)
    with pytest.raises(SystemExit, match="dataset_name is not"):
        dpo.check_data(script_args, model_args)


def test_judge_server_vllm_without_vllm_says_how_and_auto_falls_back(tmp_path, monkeypatch, capsys):
    from trl_longreward.commands import dpo

    monkeypatch.chdir(tmp_path)  # no ./.venv-vllm here
    monkeypatch.delenv("TRL_LONGREWARD_VLLM_PYTHON", raising=False)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    script_args, training_args, _ = dpo.parse_arguments(["--judge_server", "vllm", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no vLLM found.*judge_server_python"):
        dpo.launch_judge_server(script_args, training_args)
    script_args.judge_server = "auto"
    assert dpo.launch_judge_server(script_args, training_args) is None
    assert "the judge runs as configured (transformers)" in capsys.readouterr().out
    assert training_args.long_reward["judge_backend"] == "transformers"  # untouched
    with pytest.raises(SystemExit, match="no such interpreter"):
        dpo.find_vllm_python(str(tmp_path / "missing" / "python"))


def test_the_recipe_file_is_the_command(tmp_path):
    import subprocess

    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "dpo_longreward.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--judge_server" in done.stdout and "--config FILE.yaml" in " ".join(done.stdout.split())


# ----- --config for every command -----


def test_score_reads_a_config_file_and_flags_win(tmp_path, server, capsys):
    rows = [{"context": CONTEXT, "question": QUESTION, "response": GOOD}] * 3
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "score.yaml"
    config.write_text(
        f"input: {tmp_path / 'rows.jsonl'}\noutput: {tmp_path / 'scores.jsonl'}\njudge_base_url: {server.base_url}\n"
        "judge_model: scripted-judge\nretriever: bm25\nchunk_tokenizer: regex\nlimit: 3\n"
        f"env:\n  TRL_LONGREWARD_TEST_ENV: from-config\n"
    )
    assert main(["score", "--config", str(config), "--limit", "1"]) == 0  # the flag wins over the file's 3
    scores = (tmp_path / "scores.jsonl").read_text().splitlines()
    assert len(scores) == 1 and json.loads(scores[0])["reward"] == pytest.approx(9.25)
    import os

    assert os.environ.pop("TRL_LONGREWARD_TEST_ENV") == "from-config"


def test_a_config_file_with_an_unknown_key_names_it(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("input: rows.jsonl\noutput: out.jsonl\njudge_modle: typo\n")
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['judge_modle'\].*trl-longreward score --help"):
        main(["score", "--config", str(config)])
    config.write_text("- a list\n")
    with pytest.raises(SystemExit, match="must hold a YAML mapping"):
        main(["score", "--config", str(config)])


def test_agreement_takes_several_judges_from_the_config_file(tmp_path, monkeypatch):
    import trl_longreward.commands.agreement as agreement

    seen = {}

    def fake_run(args, judges):
        seen.update(judges)
        return {"run": {}, "judges": {}}

    monkeypatch.setattr(agreement, "run_agreement", fake_run)
    monkeypatch.setattr("trl_longreward.reward.agreement_table.format_results", lambda results: "")
    config = tmp_path / "agreement.yaml"
    config.write_text(
        f"output_dir: {tmp_path}\njudge_model: [judge-a, judge-b]\n"
        "judge_base_url: [http://127.0.0.1:1/v1, http://127.0.0.1:2/v1]\n"
    )
    assert main(["agreement", "--config", str(config)]) == 0
    assert sorted(config.judge_model for config in seen.values()) == ["judge-a", "judge-b"]
    seen.clear()
    assert (
        main(["agreement", "--config", str(config), "--judge_model", "judge-c", "--judge_base_url", "http://h/v1"])
        == 0
    )
    assert [config.judge_model for config in seen.values()] == ["judge-c"]  # flags win


def test_parse_with_config_returns_the_taken_keys(tmp_path):
    from trl import TrlParser

    from trl_longreward.shards import MergeShardsArguments

    config = tmp_path / "merge.yaml"
    config.write_text(f"shards: [{tmp_path}/a, {tmp_path}/b]\noutput_dir: {tmp_path}/merged\nextra: 1\n")
    parser = TrlParser(MergeShardsArguments, prog="merge")
    (args,), taken = parse_with_config(parser, ["--config", str(config)], take=("extra",))
    assert args.shards == [f"{tmp_path}/a", f"{tmp_path}/b"] and taken == {"extra": 1}


# ----- chat-template options -----

THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)


def test_policy_chat_template_kwargs_reach_the_prompt_tokens(tiny_model):
    from transformers import AutoTokenizer

    from trl_longreward.documents import tokenize_prompt
    from trl_longreward.trainer import LongContextDPOConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = THINKING_TEMPLATE
    plain = tokenizer.decode(tokenize_prompt(tokenizer, "Q?"))
    off = tokenizer.decode(tokenize_prompt(tokenizer, "Q?", {"enable_thinking": False}))
    assert off == plain + "<think></think>"
    args = LongContextDPOConfig(output_dir="x", use_cpu=True, chat_template_kwargs='{"enable_thinking": false}')
    assert args.chat_template_kwargs == {"enable_thinking": False}  # a JSON string, as on the command line
    with pytest.raises(ValueError, match="chat_template_kwargs must be a mapping"):
        LongContextDPOConfig(output_dir="x", use_cpu=True, chat_template_kwargs="[1]")


def test_judge_chat_template_kwargs_go_out_in_every_http_request(server):
    from trl_longreward import LongRewardFunction

    reward = LongRewardFunction(
        judge_base_url=server.base_url,
        judge_model="scripted-judge",
        retriever="bm25",
        chunk_tokenizer="regex",
        judge_extra_body={"seed": 0, "chat_template_kwargs": {"add_date": True}},
        judge_chat_template_kwargs='{"enable_thinking": false}',
    )
    try:
        assert reward(prompts=[CONTEXT + "\n\n" + QUESTION], completions=[GOOD])[0] == pytest.approx(9.25)
    finally:
        reward.close()
    bodies = [body for body in server.requests if "messages" in body]
    assert bodies and all(
        body["chat_template_kwargs"] == {"add_date": True, "enable_thinking": False} and body["seed"] == 0
        for body in bodies
    )


def test_in_process_judge_applies_its_chat_template_kwargs(tiny_model):
    from trl_longreward.judges.base import ChatRequest
    from trl_longreward.judges.transformers_judge import TransformersJudge

    plain = TransformersJudge(tiny_model)
    thinking_off = TransformersJudge(tiny_model, chat_template_kwargs={"enable_thinking": False})
    for judge in (plain, thinking_off):
        judge.tokenizer.chat_template = THINKING_TEMPLATE
    request = ChatRequest(messages=({"role": "user", "content": "Rate it."},), max_tokens=4)
    assert plain.tokenizer.decode(thinking_off._encode(request)).endswith("<|assistant|><think></think>")
    assert not plain.tokenizer.decode(plain._encode(request)).endswith("<think></think>")
    assert thinking_off.cache_identity()["template_kwargs"]["enable_thinking"] is False


def test_judge_calls_wait_for_a_starting_server(server):
    """`OpenAIJudge.wait_until_ready` (what `--judge_server` sets): called before any request leaves; a copy for
    another process leaves it behind."""
    import pickle
    import time

    from trl_longreward import LongRewardFunction

    reward = LongRewardFunction(
        judge_base_url=server.base_url, judge_model="scripted-judge", retriever="bm25", chunk_tokenizer="regex"
    )
    waited: list[int] = []

    def wait() -> None:
        time.sleep(0.2)
        waited.append(server.num_chat_requests)  # what had reached the server when the wait ended

    reward.judge.wait_until_ready = wait
    try:
        assert reward(prompts=[CONTEXT + "\n\n" + QUESTION], completions=[GOOD])[0] == pytest.approx(9.25)
    finally:
        reward.close()
    assert waited and waited[0] == 0 and server.num_chat_requests > 0
    assert pickle.loads(pickle.dumps(reward.judge)).wait_until_ready is None


def test_the_demo_config_serves_the_embedded_judge(monkeypatch, capsys):
    """`--config recipes/configs/cpu_demo.yaml` leaves judge_model to the embedded default, as the in-process judge
    does: `judge_server: auto` serves that model (under its public name), it does not fall back."""
    from types import SimpleNamespace

    from trl_longreward.commands import dpo
    from trl_longreward.judges.vllm_server import VLLMServer
    from trl_longreward.models import default_model_path

    launched = {}

    def launch(model, **kwargs):
        launched.update(kwargs, model=model)
        return SimpleNamespace(base_url="http://127.0.0.1:9/v1", model_name=kwargs["served_model_name"])

    monkeypatch.setattr(dpo, "find_vllm_python", lambda explicit=None: sys.executable)
    monkeypatch.setattr(VLLMServer, "launch", launch)
    script_args, training_args, _ = dpo.parse_arguments(["--config", str(REPO_ROOT / "recipes/configs/cpu_demo.yaml")])
    assert script_args.judge_server == "auto" and "judge_model" not in training_args.long_reward
    assert dpo.launch_judge_server(script_args, training_args) is not None
    assert launched["model"] == str(default_model_path()) and launched["served_model_name"] == "smollm2-135m-instruct"
    judge = training_args.long_reward
    assert (judge["judge_backend"], judge["judge_base_url"], judge["judge_model"]) == (
        "openai",
        "http://127.0.0.1:9/v1",
        "smollm2-135m-instruct",
    )
