"""What the trainer takes from its config and keeps across a resume: the prompt separator of `long_reward`, the
buffered pairs of `num_iterations`, and a bad `long_reward` failing before any model loads."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from known_answers import CONTEXT, QUESTION
from tiny_models import prompts_dataset, small_dpo_config, tiny_llama

from trl_longreward import LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge
from trl_longreward.trainer.generation import PolicySampler
from trl_longreward.trainer.trainer import PAIR_BUFFER_FILE


def length_helpfulness(question: str, response: str) -> float:
    return float(len(response) % 11)  # samples of different lengths get different rewards: pairs exist


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def judge_server():
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        yield server


def _reward(server, cache_path) -> LongRewardFunction:
    return LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
        retriever="bm25",
        chunk_tokenizer="regex",
        cache_path=str(cache_path),
    )


def test_the_prompt_separator_of_long_reward_splits_the_trainers_prompts(model_path, tmp_path):
    separator = "\n###\n"
    dataset = Dataset.from_list([{"prompt": CONTEXT + separator + QUESTION}])
    args = small_dpo_config(
        tmp_path / "out", max_prompt_length=64, long_reward={"prompt_separator": separator}, max_steps=1
    )
    trainer = LongContextDPOTrainer(
        model=model_path, args=args, train_dataset=dataset, reward_funcs=[lambda completions, **kw: [0.0] * 4]
    )
    row = trainer.train_dataset[0]
    assert row["prompt"] == CONTEXT + separator + QUESTION  # the judge's prompt: the full document
    assert row["truncated"] and row["policy_prompt"].endswith(separator + QUESTION)  # cut in the document only


def test_a_bad_long_reward_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError, match="long_reward: .*judge_backnd"):
        small_dpo_config(tmp_path / "out", long_reward={"judge_backnd": "openai"})
    with pytest.raises(ValueError, match="long_reward: max_attempts must be >= 1"):
        small_dpo_config(tmp_path / "out", long_reward={"max_attempts": 0})


def test_a_resume_between_two_repeats_trains_on_the_buffered_pairs(model_path, tmp_path, judge_server, monkeypatch):
    """num_iterations=2: step 1 generates and judges, the checkpoint after it holds its pairs; a run resumed there
    trains step 2 (the same prompts again) on those pairs: no generation, no judge call, the same batch."""
    out = tmp_path / "out"
    first = LongContextDPOTrainer(
        model=model_path,
        args=small_dpo_config(out, max_steps=1, num_iterations=2, save_strategy="steps", save_steps=1),
        train_dataset=prompts_dataset(4),
        reward_funcs=[_reward(judge_server, tmp_path / "cache.sqlite")],
    )
    first.train()
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / PAIR_BUFFER_FILE.format(rank=0)).is_file()
    asked = judge_server.num_chat_requests
    assert asked > 0

    sampled = []
    real = PolicySampler.sample

    def counting(self, model_wrapped, rows, *, global_step):
        sampled.append(global_step)
        return real(self, model_wrapped, rows, global_step=global_step)

    monkeypatch.setattr(PolicySampler, "sample", counting)
    resumed = LongContextDPOTrainer(
        model=model_path,
        args=small_dpo_config(out, max_steps=2, num_iterations=2, save_strategy="no"),
        train_dataset=prompts_dataset(4),
        reward_funcs=[_reward(judge_server, tmp_path / "fresh-cache.sqlite")],  # a fresh cache: nothing to reuse
    )
    before = {n: p.detach().clone() for n, p in resumed.model.named_parameters()}
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sampled == [] and judge_server.num_chat_requests == asked  # step 2 trained on step 1's pairs
    logs = [log for log in resumed.state.log_history if "loss" in log]
    assert logs[-1]["step"] == 2 and logs[-1]["pairs/online"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in resumed.model.named_parameters())


def test_the_reward_the_trainer_built_is_closed_after_training_and_rebuilt_for_the_next(model_path, tmp_path):
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        long_reward = {
            "judge_base_url": server.base_url,
            "judge_model": "scripted-judge",
            "retriever": "bm25",
            "chunk_tokenizer": "regex",
            "max_attempts": 1,
        }
        args = small_dpo_config(tmp_path / "out", max_steps=1, long_reward=long_reward)
        trainer = LongContextDPOTrainer(model=model_path, args=args, train_dataset=prompts_dataset(2))
        first = trainer.reward_funcs[0]
        trainer.train()
        assert first.closed and first.stats()["judge_calls"] > 0  # closed, its counters still readable
        trainer.args.max_steps = 2
        trainer.train()  # training again gets a fresh reward, closed in its turn
        assert trainer.reward_funcs[0] is not first and trainer.reward_funcs[0].closed
        given = _reward(server, tmp_path / "given.sqlite")
        LongContextDPOTrainer(
            model=model_path, args=args, train_dataset=prompts_dataset(2), reward_funcs=[given]
        ).train()
        assert not given.closed  # a reward passed in belongs to the caller
        given.close()
