"""`LongRewardFunction` as the reward of TRL's experimental peers of GRPO: `OnlineDPOTrainer` and the async GRPO
trainer. Neither passes `log_metric`, `log_extra` (OnlineDPO passes `trainer_state`, async GRPO nothing but the
rows), so the reward takes every trainer keyword as optional.

OnlineDPO trains here for two steps on a tiny Llama, judged by the scripted judge over HTTP.

The async GRPO trainer (`trl.experimental.async_grpo.AsyncGRPOTrainer`) cannot train on a CPU: its training forward
runs attention `tree_fa3`, the FlashAttention-3 varlen kernel loaded through the `kernels` package from the Hub
(CUDA only); its `__init__` reads `torch.cuda.get_device_name()` for MFU metrics, which raises on a CPU-only torch;
and its default rollout worker needs vLLM and aiohttp. The reward is called in that worker's child process by
`_AsyncRolloutLoop._score_group`, which these tests run as it is: each group's reward in a thread
(`asyncio.to_thread`, several groups at once), or awaited when async; and the worker pickles the reward into that
child, so both faces must pickle.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from known_answers import CONTEXT, EVASIVE, GOOD, PARTLY_WRONG, QUESTION, rows
from tiny_models import FOUR_HEADS, tiny_llama

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

EXPECTED = {GOOD: 9.25, PARTLY_WRONG: 8.0, EVASIVE: (2 + 9 + 0) / 3}  # worked out in known_answers


class RecordingReward(LongRewardFunction):
    """Records the keyword arguments of every call and what it returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[set[str], list[float | None]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        rewards = super().__call__(*args, **kwargs)
        self.calls.append((set(kwargs), rewards))
        return rewards


def digest_score(question: str, response: str) -> float:
    """A response-dependent 0-10 helpfulness, so two completions of one prompt get different rewards."""
    return int(hashlib.sha256(response.encode("utf-8")).hexdigest(), 16) % 101 / 10


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as running:
        yield running


def make_reward(server: ScriptedOpenAIServer, cls: type[LongRewardFunction] = RecordingReward) -> Any:
    judge = OpenAIJudge("scripted-judge", server.base_url, max_retries=0)
    return cls(judge=judge, retriever="bm25", chunk_tokenizer="regex")


def conversational(text: str, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


# ----- keyword handling -----


def test_trainer_keyword_arguments_are_all_optional(server):
    reward = make_reward(server, LongRewardFunction)
    logged: dict[str, float] = {}
    try:
        plain = reward(**rows(GOOD, EVASIVE))  # no trainer keyword at all (async GRPO)
        with_state = reward(**rows(GOOD, EVASIVE), completion_ids=[[1], [2]], trainer_state=object())  # OnlineDPO
        grpo = reward(**rows(GOOD, EVASIVE), log_metric=logged.__setitem__, log_extra=lambda column, values: None)
        not_callable = reward(**rows(GOOD, EVASIVE), log_metric=None, log_extra=None)
        messages = rows(GOOD, EVASIVE)
        messages["prompts"] = [conversational(p, "user") for p in messages["prompts"]]
        messages["completions"] = [conversational(c, "assistant") for c in messages["completions"]]
        as_messages = reward(**messages)
        async_face = asyncio.run(reward.as_async()(**rows(GOOD, EVASIVE), trainer_state=None))
    finally:
        reward.close()
    expected = [EXPECTED[GOOD], EXPECTED[EVASIVE]]
    for result in (plain, with_state, grpo, not_callable, as_messages, async_face):
        assert result == pytest.approx(expected)
    assert logged["long_reward/reward/mean"] == pytest.approx(sum(expected) / 2)
    assert logged["long_reward/helpfulness/missing_rate"] == 0.0


# ----- OnlineDPO -----


@pytest.mark.slow
def test_online_dpo_trains_with_long_reward(tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    model_dir = tiny_llama(tmp_path / "tiny-llama", pad_with_eos=True, **FOUR_HEADS)
    dataset = Dataset.from_list(
        [
            {
                "prompt": conversational(f"{CONTEXT} Record {i}.\n\n{QUESTION}", "user"),
                "context": f"{CONTEXT} Record {i}.",
                "question": QUESTION,
            }
            for i in range(4)
        ]
    )
    args = OnlineDPOConfig(
        output_dir=str(tmp_path / "online-dpo"),
        per_device_train_batch_size=2,
        max_new_tokens=16,
        max_length=512,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    script = ScriptedLongRewardJudge(helpfulness=digest_score)
    with ScriptedOpenAIServer(script) as server:
        reward = make_reward(server)
        trainer = OnlineDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )
        assert trainer.reward_func_names == ["long_reward"]
        initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        try:
            trainer.train()
            # The same call path with plain-text prompts and completions (a dataset without a chat template).
            texts = rows(GOOD, PARTLY_WRONG)
            totals = trainer._calculate_rewards_from_functions(
                prompts=texts["prompts"],
                completions=texts["completions"],
                completion_ids_list=[[1], [2]],
                context=texts["context"],
                question=texts["question"],
            )
        finally:
            reward.close()

    # One call per step, 2 prompts x 2 completions each, with the dataset columns and the trainer state only.
    assert len(reward.calls) == 3
    for keys, rewards in reward.calls[:2]:
        assert keys == {"prompts", "completions", "completion_ids", "context", "question", "trainer_state"}
        assert len(rewards) == 4 and all(isinstance(value, float) and 0 <= value <= 10 for value in rewards)
    # The trainer summed what the reward returned for the text rows (the scripted helpfulness is a digest here).
    keys, text_rewards = reward.calls[2]
    assert keys == {"prompts", "completions", "completion_ids", "context", "question", "trainer_state"}
    assert all(isinstance(value, float) for value in text_rewards)
    assert totals.tolist() == pytest.approx(text_rewards)
    assert server.num_chat_requests == reward.stats()["judge_calls"] > 0
    assert script.calls["helpfulness"] >= 8

    logs = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert 0 <= entry["objective/scores"] <= 10 and math.isfinite(entry["loss"])
    unchanged = [name for name, param in trainer.model.named_parameters() if torch.equal(initial[name], param)]
    assert not unchanged, f"parameters that did not change: {unchanged}"


# ----- async GRPO -----


def rollout_scorer(reward_funcs: list[Any]) -> Any:
    """TRL's async GRPO rollout loop (what runs in the worker's child process), built here for its scoring."""
    from accelerate.state import PartialState
    from transformers import AutoTokenizer
    from trl import chat_template_utils
    from trl.experimental.async_grpo.async_rollout_worker import _AsyncRolloutLoop

    from trl_longreward.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    tokenizer.response_template = chat_template_utils.qwen3_template  # tool-call parsing only; unused here
    PartialState()  # as the worker's child does first: the loop logs through accelerate
    return _AsyncRolloutLoop(
        model_name="tiny",
        dataset=[],
        reward_funcs=reward_funcs,
        processing_class=tokenizer,
        eos_token_ids=[tokenizer.eos_token_id],
        rollout_buffer=None,
        model_version_value=None,
        heartbeat_value=None,
        failed_event=None,
        exception_info_queue=None,
        metrics_queue=None,
        num_generations=3,
    )


def rollout_group(context: str, group_id: int) -> Any:
    """One prompt's group as the rollout loop builds it: 3 generations, the row's other columns repeated."""
    from trl.experimental.async_grpo.async_rollout_worker import RolloutGroup, TrainingSequence

    responses = [GOOD, PARTLY_WRONG, EVASIVE]
    prompt = conversational(f"{context}\n\n{QUESTION}", "user")
    return RolloutGroup(
        prompts=[prompt] * 3,
        reward_kwargs={"context": [context] * 3, "question": [QUESTION] * 3},
        completions=[conversational(text, "assistant") for text in responses],
        completions_ids=[[5, 6, 7]] * 3,
        completions_sequences=[
            [
                TrainingSequence(
                    input_ids=[1, 2, 5, 6, 7],
                    completion_mask=[0, 0, 1, 1, 1],
                    old_log_probs=[0.0] * 5,
                    rollout_id=(group_id, i),
                )
            ]
            for i in range(3)
        ],
        tool_call_counts=[0] * 3,
        tool_failure_counts=[0] * 3,
        model_version=0,
        group_id=group_id,
        env_rewards=[],
        rollout_rewards=[],
    )


def score_groups(scorer: Any, contexts: list[str]) -> list[list[Any]]:
    async def main() -> list[list[Any]]:  # the worker's score loop: several groups at once
        return await asyncio.gather(*(scorer._score_group(rollout_group(c, i)) for i, c in enumerate(contexts)))

    return asyncio.run(main())


def check_samples(groups: list[list[Any]]) -> None:
    for samples in groups:
        rewards = [s.metrics["rewards/long_reward"] for s in samples]
        assert rewards == pytest.approx([EXPECTED[GOOD], EXPECTED[PARTLY_WRONG], EXPECTED[EVASIVE]])
        advantages = [s.advantage for s in samples]
        assert all(math.isfinite(a) for a in advantages) and advantages[0] > 0 > advantages[2]


@pytest.fixture
def recording_server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), latency_s=0.02) as running:
        yield running


def test_async_grpo_scores_groups_with_the_reward_from_several_threads(recording_server):
    reward = make_reward(recording_server)
    scorer = rollout_scorer([reward])
    assert scorer.reward_func_names == ["long_reward"]
    loops_before = sum(t.name == "long-reward-loop" for t in threading.enumerate())
    contexts = [CONTEXT] + [f"{CONTEXT} Record {i}." for i in range(1, 4)]
    try:
        groups = score_groups(scorer, contexts)
        loops_after = sum(t.name == "long-reward-loop" for t in threading.enumerate())
    finally:
        reward.close()
    check_samples(groups)
    # Called once per group, from 4 threads at once, with the rows only; the first calls raced to start one loop.
    assert len(reward.calls) == 4
    for keys, _ in reward.calls:
        assert keys == {"prompts", "completions", "completion_ids", "context", "question"}
    assert loops_after - loops_before == 1
    assert recording_server.max_in_flight > 1  # the groups were judged concurrently
    assert recording_server.num_chat_requests == reward.stats()["judge_calls"] > 0


def test_async_grpo_awaits_the_async_face(recording_server):
    reward = make_reward(recording_server, LongRewardFunction)
    scorer = rollout_scorer([reward.as_async()])
    assert scorer.reward_func_names == ["long_reward"]
    try:
        check_samples(score_groups(scorer, [CONTEXT, f"{CONTEXT} Record 1."]))
    finally:
        reward.close()


def test_the_reward_pickles_for_the_async_grpo_rollout_child(recording_server):
    """The async GRPO worker pickles `reward_funcs` into its spawned child (at train start): both faces must
    survive the round trip and score there."""
    reward = make_reward(recording_server, LongRewardFunction)
    copy, async_copy = pickle.loads(pickle.dumps([reward, reward.as_async()]))
    reward.close()
    try:
        assert copy(**rows(GOOD)) == [EXPECTED[GOOD]]
        assert asyncio.run(async_copy(**rows(GOOD))) == [EXPECTED[GOOD]]
    finally:
        copy.close()
        async_copy.reward.close()
