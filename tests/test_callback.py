"""`LongRewardCallback`: periodic LongReward evaluation of the policy during real training runs on CPU.

The policy is a tiny Llama built from a config (SmolLM2's tokenizer and chat template); the judge is the scripted
judge behind a real OpenAI-compatible HTTP server, so the logged means can be checked against the judge's rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from known_answers import CONTEXT, QUESTION
from tiny_models import prompts_dataset as train_prompts
from tiny_models import small_dpo_config, tiny_llama
from transformers import TrainerCallback

from trl_longreward import (
    LongContextDPOConfig,
    LongContextDPOTrainer,
    LongRewardCallback,
    LongRewardFunction,
    OpenAIJudge,
)
from trl_longreward.callback import COMPLETIONS_FILE, completions_table
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

EVAL_QUESTIONS = [QUESTION, "When did the town library open?", "What did farmers plant along the banks?"]
KEYS = ("helpfulness", "logicality", "completeness", "reward", "missing_rate", "completion_tokens", "judge_calls")


def length_helpfulness(question: str, response: str) -> float:
    return float(len(response) % 11)  # samples of different lengths get different rewards: pairs exist


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def judge_server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        yield server


@pytest.fixture
def make_reward(judge_server: ScriptedOpenAIServer) -> Iterator[Any]:
    built: list[LongRewardFunction] = []

    def factory() -> LongRewardFunction:
        judge = OpenAIJudge("scripted-judge", judge_server.base_url, max_retries=0)
        built.append(LongRewardFunction(judge=judge, retriever="bm25", chunk_tokenizer="regex"))
        return built[-1]

    yield factory
    for reward in built:
        reward.close()


def eval_prompts() -> Dataset:
    return Dataset.from_list([{"context": CONTEXT, "question": q} for q in EVAL_QUESTIONS])


def dpo_config(tmp_path: Path, **overrides: Any) -> LongContextDPOConfig:
    return small_dpo_config(tmp_path / "out", **{"num_generations": 2, "max_completion_length": 12, **overrides})


def eval_entries(trainer: Any) -> list[dict[str, Any]]:
    return [entry for entry in trainer.state.log_history if "eval_long_reward/reward" in entry]


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What an evaluation must leave as it found: modes, KV-cache flag, gradient checkpointing, adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return {
        "training": [m.training for m in model.modules()],
        "use_cache": model.config.use_cache,
        "gradient_checkpointing": model.is_gradient_checkpointing,
        "adapters_enabled": [not m.disable_adapters for m in tuners],
        "active_adapters": [tuple(m.active_adapters) for m in tuners],
    }


class StateProbe(TrainerCallback):
    """Records `model_state` at the end of every step (placed before and after the evaluating callback)."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.states.append(model_state(model))


def test_fires_every_eval_steps_and_at_train_end_and_logs_beside_the_training_metrics(
    model_path: str, tmp_path: Path, judge_server: ScriptedOpenAIServer, make_reward: Any
) -> None:
    reward = make_reward()
    trainer = LongContextDPOTrainer(
        model=model_path, args=dpo_config(tmp_path), train_dataset=train_prompts(), reward_funcs=[reward]
    )
    callback = LongRewardCallback(eval_prompts(), eval_steps=2, max_completion_length=12)  # reward: the trainer's
    trainer.add_callback(callback.attach(trainer))
    trainer.train()

    assert [h["step"] for h in callback.history] == [2, 3]  # step 2, then the end of training (step 3)
    entries = eval_entries(trainer)
    assert [e["step"] for e in entries] == [2, 3]
    for entry, history in zip(entries, callback.history, strict=True):
        for key in KEYS:
            assert f"eval_long_reward/{key}" in entry, key
        assert entry["eval_long_reward/logicality"] == 9.0  # the scripted rule
        assert "loss" not in entry and "pairs/valid_pair_rate" not in entry  # its own entry
        assert history["metrics"]["eval_long_reward/reward"] == entry["eval_long_reward/reward"]
    assert entries[0]["eval_long_reward/judge_calls"] > 0
    # The logged helpfulness is the judge's rule applied to the logged answers (the latest evaluation's).
    answers = [r["completion"] for r in callback.last_records]
    assert len(answers) == 3 and all(r["step"] == 3 for r in callback.last_records)
    expected = sum(length_helpfulness("", a) for a in answers) / 3
    assert entries[-1]["eval_long_reward/helpfulness"] == pytest.approx(expected)
    assert [r["question"] for r in callback.last_records] == EVAL_QUESTIONS

    # The training run's own logs are intact: one per step, with the DPO and pair metrics.
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3]
    assert all("pairs/valid_pair_rate" in e and "rewards/margins" in e for e in train_logs)

    lines = [json.loads(line) for line in (tmp_path / "out" / COMPLETIONS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 2, 2, 3, 3, 3]
    assert all(set(line["trace"]) == {"helpfulness", "logicality", "faithfulness", "completeness"} for line in lines)

    table = completions_table(callback.last_records, ["helpfulness", "logicality"], step=3)
    assert list(table) == ["step", "question", "completion", "reward", "helpfulness", "logicality", "reasons"]
    assert table["completion"] == answers and table["step"] == [3, 3, 3]
    assert all("[helpfulness] verdict: Analysis: scripted helpfulness" in reasons for reasons in table["reasons"])


def test_lora_gradient_checkpointing_and_modes_are_as_before_each_evaluation(
    model_path: str, tmp_path: Path, make_reward: Any
) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_longreward.documents import tokenize_prompt
    from trl_longreward.generation import generate_answers

    before, after = StateProbe(), StateProbe()
    callback = LongRewardCallback(eval_prompts(), reward=make_reward(), eval_steps=1, eval_on_start=True)
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=dpo_config(tmp_path, max_steps=2, gradient_checkpointing=True),
        train_dataset=train_prompts(),
        reward_funcs=[make_reward()],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        callbacks=[before, callback, after],
    )
    callback.attach(trainer)
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()

    assert [h["step"] for h in callback.history] == [0, 1, 2]
    assert len(after.states) == 2 and after.states == before.states  # each step's evaluation changed nothing
    for state in after.states:
        assert all(state["training"]) and state["gradient_checkpointing"]
        assert state["adapters_enabled"] and all(state["adapters_enabled"])
        assert set(state["active_adapters"]) == {("default",)}
    params = dict(trainer.model.named_parameters())
    assert lora_b and all(not torch.equal(params[n], v) for n, v in lora_b.items())  # the adapter kept training

    # Before training (lora_B = 0) the callback's greedy answers are the base model's plain greedy answers.
    first = [json.loads(line) for line in (tmp_path / "out" / COMPLETIONS_FILE).read_text().splitlines()][:3]
    assert [r["step"] for r in first] == [0, 0, 0]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    prompt_ids = [tokenize_prompt(tokenizer, CONTEXT + "\n\n" + q) for q in EVAL_QUESTIONS]
    plain = generate_answers(base, tokenizer, prompt_ids, max_completion_length=12)
    assert [r["completion"] for r in first] == [a["text"] for a in plain]


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_the_same_callback_runs_with_trl_dpo_and_sft_trainers(
    kind: str, model_path: str, tmp_path: Path, make_reward: Any
) -> None:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    common: dict[str, Any] = dict(
        output_dir=str(tmp_path / kind),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        learning_rate=1e-3,
    )
    if kind == "dpo":
        data = Dataset.from_list(
            [{"prompt": f"Question {i}?", "chosen": " A full answer.", "rejected": " No."} for i in range(4)]
        )
        trainer: Any = DPOTrainer(model=model_path, args=DPOConfig(**common), train_dataset=data)
    else:
        data = Dataset.from_list([{"text": f"The barrier was built in 1998. Note {i}."} for i in range(4)])
        trainer = SFTTrainer(model=model_path, args=SFTConfig(max_length=64, **common), train_dataset=data)
    with pytest.raises(ValueError, match="has no LongRewardFunction"):  # these trainers have no reward of their own
        LongRewardCallback(eval_prompts(), trainer=trainer).evaluate()

    callback = LongRewardCallback(eval_prompts(), reward=make_reward(), eval_steps=1, max_completion_length=8)
    trainer.add_callback(callback.attach(trainer))
    trainer.train()

    assert [h["step"] for h in callback.history] == [1, 2]
    entries = eval_entries(trainer)
    assert [e["step"] for e in entries] == [1, 2]
    assert all(f"eval_long_reward/{key}" in e for e in entries for key in KEYS)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2]
    assert trainer.model.training


def test_from_long_qa_evaluates_the_bundled_held_out_split(
    model_path: str, tmp_path: Path, judge_server: ScriptedOpenAIServer, make_reward: Any
) -> None:
    from trl import SFTConfig, SFTTrainer

    from trl_longreward.data import load_long_qa

    trainer = SFTTrainer(
        model=model_path,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to="none", max_length=64),
        train_dataset=Dataset.from_list([{"text": "A short training text."}]),
    )
    callback = LongRewardCallback.from_long_qa(
        trainer, reward=make_reward(), num_prompts=2, max_prompt_length=192, max_completion_length=8
    )
    metrics = callback.evaluate()  # also works outside training

    held_out = load_long_qa("eval")
    assert [r["question"] for r in callback.last_records] == held_out["question"][:2]
    assert all(r["truncated"] for r in callback.last_records)  # the policy saw the documents cut to 192 tokens
    # ... but the judge read every document to its end.
    seen = [" ".join(body["messages"][-1]["content"].split()) for body in judge_server.requests]
    for context in held_out["context"][:2]:
        tail = " ".join(context.split()[-8:])
        assert any(tail in text for text in seen), tail
    assert trainer.state.log_history[-1]["eval_long_reward/reward"] == metrics["eval_long_reward/reward"]
    assert trainer.state.log_history[-1]["step"] == 0

    with pytest.raises(ValueError, match="eval_dataset needs 'context' and 'question' columns"):
        LongRewardCallback(Dataset.from_list([{"text": "x"}]), reward=make_reward(), trainer=trainer).evaluate()


def test_grpo_trainer_lends_its_long_reward_to_the_callback(model_path: str, tmp_path: Path, make_reward: Any) -> None:
    from trl import GRPOConfig, GRPOTrainer

    reward = make_reward()
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": CONTEXT + "\n\n" + q}], "context": CONTEXT, "question": q}
            for q in EVAL_QUESTIONS
        ]
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    trainer = GRPOTrainer(model=model_path, reward_funcs=[reward], args=args, train_dataset=data)
    callback = LongRewardCallback(eval_prompts(), eval_steps=1)
    trainer.add_callback(callback.attach(trainer))
    sent = reward.stats()["judge_calls"]
    trainer.train()

    assert [h["step"] for h in callback.history] == [1]
    assert callback.reward is reward  # the trainer's own reward function judged the evaluation
    assert callback.history[0]["metrics"]["eval_long_reward/judge_calls"] > 0
    assert reward.stats()["judge_calls"] > sent
    assert [e["step"] for e in eval_entries(trainer)] == [1]
    assert [e["step"] for e in trainer.state.log_history if "rewards/long_reward/mean" in e] == [1]


@pytest.mark.slow
def test_two_ranks_split_the_prompts_and_only_the_main_process_logs(tmp_path: Path) -> None:
    """`torchrun` with 2 gloo ranks: 3 prompts split 2 + 1, results gathered on both ranks, logged by rank 0 only."""
    from test_distributed import flags, free_port, run_torchrun

    from trl_longreward.models import default_model_path

    default_model_path()  # converted once here, before two ranks would wait on the same lock
    script = Path(__file__).resolve().parent / "distributed" / "callback_two_ranks.py"
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        launcher = {"--nproc_per_node": 2, "--master_addr": "127.0.0.1", "--master_port": free_port()}
        options = {"--judge_url": server.base_url, "--output_dir": tmp_path}
        code, output, _ = run_torchrun([*flags(launcher), str(script), *flags(options)], 300)
        requests = list(server.requests)
    assert code == 0, output[-6000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    assert all(r["num_processes"] == 2 for r in records)
    assert records[0]["history"] == records[1]["history"]  # every rank holds the gathered results
    assert [h["step"] for h in records[0]["history"]] == [1, 2]
    assert records[0]["questions"] == records[1]["questions"] == EVAL_QUESTIONS  # gathered in prompt order
    assert [e["step"] for e in records[0]["eval_entries"]] == [1, 2] and records[1]["eval_entries"] == []
    assert records[0]["train_steps"] == [1, 2]
    lines = (tmp_path / "trainer" / COMPLETIONS_FILE).read_text().splitlines()
    assert len(lines) == 2 * len(EVAL_QUESTIONS)  # written once, by the main process

    # Each rank judged its own share of the prompts: the first two on rank 0, the last on rank 1.
    asked: dict[str, set[str]] = {"eval-rank-0": set(), "eval-rank-1": set()}
    for body in requests:
        content = body["messages"][-1]["content"]
        if body.get("user") in asked and "how helpful the response is" in content:
            asked[body["user"]].add(content.rsplit("<question>", 1)[1].split("</question>")[0].strip())
    assert asked == {"eval-rank-0": set(EVAL_QUESTIONS[:2]), "eval-rank-1": {EVAL_QUESTIONS[2]}}
