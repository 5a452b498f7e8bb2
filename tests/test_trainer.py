"""LongContextDPOTrainer: online sampling, judging over real HTTP, best-vs-worst pairs and DPO steps on CPU."""

import math

import pytest
import torch
from datasets import Dataset
from known_answers import CONTEXT, QUESTION
from tiny_models import JudgedSteps, small_dpo_config, tiny_llama
from tiny_models import prompts_dataset as _dataset

from trl_longreward import LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
from trl_longreward.documents import TRUNCATION_MARKER, prepare_prompt_dataset
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge


def length_helpfulness(question: str, response: str) -> float:
    return float(len(response) % 11)  # samples of different lengths get different rewards


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def judge_server():
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        yield server


def _config(tmp_path, **overrides):
    return small_dpo_config(tmp_path / "out", **overrides)


def _reward(server, tmp_path, **overrides):
    return LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
        retriever="bm25",
        chunk_tokenizer="regex",
        cache_path=str(tmp_path / "judge_cache.sqlite"),
        **overrides,
    )


def _trainer(model_path, tmp_path, server, **config):
    dataset = config.pop("train_dataset", None) or _dataset()
    judged = JudgedSteps()
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=_config(tmp_path, **config),
        train_dataset=dataset,
        callbacks=[judged],
        reward_funcs=[_reward(server, tmp_path)],
    )
    trainer.judged_steps = judged  # the test's view of each step's rewards and pairs
    return trainer


def test_online_dpo_trains_every_parameter_and_logs_the_reward(model_path, tmp_path, judge_server):
    trainer = _trainer(model_path, tmp_path, judge_server)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for key in (
        "pairs/valid_pair_rate", "long_reward/chosen_mean", "long_reward/rejected_mean", "long_reward/gap_mean",
        "long_reward/helpfulness/mean", "long_reward/logicality/mean", "long_reward/completeness/mean",
        "long_reward/reward/mean", "long_reward/judge_calls", "time/generation_s", "time/judging_s", "time/training_s",
    ):  # fmt: skip
        assert key in logs[-1], key
    assert all(log["pairs/valid_pair_rate"] > 0 for log in logs)
    assert judge_server.num_chat_requests > 0
    # Chosen is the best-scored sample of its prompt, rejected the worst.
    k = trainer.args.num_generations
    latest = trainer.judged_steps.latest
    assert len(trainer.judged_steps.steps) == 3 and latest.judgements is not None
    for i, selection in enumerate(latest.selections):
        scored = [r for r in latest.rewards[i * k : (i + 1) * k] if r is not None]
        if selection.ok:
            assert selection.chosen_reward == max(scored) and selection.rejected_reward == min(scored)
            assert latest.rewards[i * k + selection.chosen] == max(scored)


def test_prompts_are_cut_in_the_middle_of_the_document_never_dropped(model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    long_context = "HEAD sentence opens the report. " + "Filler about nothing. " * 400 + "TAIL sentence closes it."
    dataset = Dataset.from_list(
        [{"context": long_context, "question": QUESTION}, {"context": CONTEXT, "question": QUESTION}]
    )
    prepared = prepare_prompt_dataset(dataset, tokenizer, max_prompt_length=128)
    assert len(prepared) == 2  # no row dropped
    cut = prepared[0]
    assert cut["truncated"] and not prepared[1]["truncated"]
    assert len(cut["prompt_ids"]) <= 128
    policy_text = cut["policy_prompt"]
    assert policy_text.startswith("HEAD sentence opens the report.") and TRUNCATION_MARKER in policy_text
    assert policy_text.endswith("TAIL sentence closes it.\n\n" + QUESTION)
    assert cut["prompt"] == long_context + "\n\n" + QUESTION  # the judge sees the whole document
    assert tokenizer.decode(cut["prompt_ids"]).rstrip().endswith("assistant")  # chat template, generation prompt


def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(model_path, tmp_path, judge_server):
    from peft import LoraConfig

    trainer = LongContextDPOTrainer(
        model=model_path,
        args=_config(tmp_path, max_steps=2),
        train_dataset=_dataset(),
        reward_funcs=[_reward(judge_server, tmp_path)],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n], v) for n, v in frozen.items())


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(tmp_path, judge_server):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    path = tiny_llama(tmp_path / "model64", hidden_size=64)
    trainer = LongContextDPOTrainer(
        model=path,
        args=_config(tmp_path, max_steps=2, model_init_kwargs={"device_map": "cpu"}),
        train_dataset=_dataset(),
        reward_funcs=[_reward(judge_server, tmp_path)],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    )
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert sum(log["pairs/online"] for log in trainer.state.log_history if "loss" in log) > 0
    params = dict(trainer.model.named_parameters())
    assert lora_b and all(not torch.equal(params[n], v) for n, v in lora_b.items())


@pytest.mark.parametrize(("ratio", "offline_per_online"), [(0.5, 1.0), (0.25, 1 / 3)])
def test_offline_pairs_are_mixed_at_the_configured_ratio(
    model_path, tmp_path, judge_server, ratio, offline_per_online
):
    offline = Dataset.from_list(
        [{"prompt": f"Short question {i}?", "chosen": " A good answer.", "rejected": " Bad."} for i in range(5)]
    )
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=_config(tmp_path, max_steps=2, per_device_train_batch_size=3, offline_ratio=ratio),
        train_dataset=_dataset(6),
        reward_funcs=[_reward(judge_server, tmp_path)],
        offline_dataset=offline,
    )
    trainer.train()
    for log in (log for log in trainer.state.log_history if "loss" in log):
        online, mixed = log["pairs/online"], log["pairs/offline"]
        assert online > 0
        assert mixed == max(1, round(online * offline_per_online))
        if online == 3:
            assert mixed / (online + mixed) == pytest.approx(ratio)


def test_samples_the_judge_fails_on_are_skipped_and_training_goes_on(model_path, tmp_path):
    def flaky_helpfulness(question, response):
        if len(response) % 3 == 0:
            raise RuntimeError("judge crashed on this one")  # the server answers 500 for these samples
        return length_helpfulness(question, response)

    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=flaky_helpfulness)) as server:
        trainer = _trainer(model_path, tmp_path, server, max_steps=2)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert sum(log["pairs/unscored_sample_rate"] for log in logs) > 0
    assert trainer.pair_stats["prompts"] == 4


def test_resume_reuses_every_judge_call_and_continues_the_same_way(model_path, tmp_path, judge_server):
    full = _trainer(model_path, tmp_path / "a", judge_server, max_steps=2, save_strategy="steps", save_steps=1)
    full.train()
    reference_logs = [log for log in full.state.log_history if "loss" in log]
    sent = judge_server.num_chat_requests
    # A second run in the same output dir (its judge cache included) resumes from step 1.
    resumed = _trainer(model_path, tmp_path / "a", judge_server, max_steps=2, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-1"))
    assert judge_server.num_chat_requests == sent  # step 2's samples were judged already: 0 new calls
    step2 = [log for log in resumed.state.log_history if "loss" in log][-1]
    for key in ("long_reward/chosen_mean", "long_reward/rejected_mean", "pairs/online", "long_reward/reward/mean"):
        assert step2[key] == pytest.approx(reference_logs[1][key]), key
    assert step2["long_reward/judge_calls"] == 0
    # the pair statistics (model card) continue from the checkpoint instead of restarting at 0
    assert resumed.pair_stats == full.pair_stats and resumed.pair_stats["prompts"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_generations": 1}, "at least 2 samples"),
        ({"use_vllm": True, "vllm_mode": "server"}, "needs vLLM: pip install"),
        ({"use_vllm": True}, "needs vLLM: pip install"),
        ({"vllm_mode": "remote"}, "use colocate or server"),
        ({"max_judge_outage_steps": -1}, "max_judge_outage_steps"),
        ({"num_iterations": 0}, "num_iterations must be >= 1"),
        ({"min_scored_samples": 9}, "min_scored_samples"),
        ({"offline_ratio": 1.0}, "offline_ratio"),
        ({"precompute_ref_log_probs": True}, "generated during training"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_a_missing_model_directory_is_named(tmp_path, judge_server):
    with pytest.raises(FileNotFoundError, match="model='.*no-such-model' does not exist"):
        _trainer(str(tmp_path / "no-such-model"), tmp_path, judge_server)


def test_bad_data_fails_with_the_column_names(model_path, tmp_path, judge_server):
    with pytest.raises(ValueError, match="'context' and 'question' columns"):
        _trainer(model_path, tmp_path, judge_server, train_dataset=Dataset.from_list([{"text": "x"}]))
    with pytest.raises(ValueError, match="offline_dataset lacks columns"):
        LongContextDPOTrainer(
            model=model_path,
            args=_config(tmp_path, offline_ratio=0.5),
            train_dataset=_dataset(),
            reward_funcs=[_reward(judge_server, tmp_path)],
            offline_dataset=Dataset.from_list([{"prompt": "p", "answer": "a"}]),
        )


def test_checkpoint_and_model_card_describe_the_method_and_hold_no_secret(model_path, tmp_path, monkeypatch):
    canary = "sk-canary-" + "7" * 24
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", canary)
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        reward = LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", server.base_url, api_key_env="JUDGE_KEY_FOR_TEST"),
            retriever="bm25",
            chunk_tokenizer="regex",
            cache_path=str(tmp_path / "out" / "judge_cache.sqlite"),
        )
        args = _config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
        trainer = LongContextDPOTrainer(model=model_path, args=args, train_dataset=_dataset(), reward_funcs=[reward])
        trainer.train()
        trainer.save_model()
        assert reward.judge._client.api_key == canary  # the key was really used, in memory
    card = (tmp_path / "out" / "README.md").read_text()
    assert "LongReward online DPO" in card and "scripted-judge" in card
    assert "helpfulness, logicality, faithfulness, completeness" in card and "online pairs from" in card
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "judge_cache.sqlite" for p in written) and any("checkpoint-2" in str(p) for p in written)
    for path in written:
        assert canary.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_gradient_accumulation(model_path, tmp_path, judge_server):
    trainer = _trainer(
        model_path, tmp_path, judge_server, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.pair_stats["prompts"] == 2  # two micro-batches of one prompt
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


class RecordingVLLMGeneration:
    """Stands in for `trl.generation.VLLMGeneration` in the main environment (which has no vLLM; the real engine runs
    in tests/test_vllm_inprocess.py): same `generate`/`sync_weights` contract, answers with token ids drawn from the
    prompt, and records what the trainer asked for. Server mode: the weights go through TRL's own `sync_weights`."""

    mode = "server"

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id
        self.calls: list[tuple[list[list[int]], int]] = []
        self.syncs = 0

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        self.calls.append((prompts, num_generations))
        completions = [p[-(3 + i % num_generations) :] + [self.eos_token_id, 7, 7] for i, p in enumerate(prompts)]
        return prompts, completions, None, None


def test_vllm_backend_contract(model_path, tmp_path, judge_server):
    trainer = _trainer(model_path, tmp_path, judge_server, max_steps=2)
    fake = RecordingVLLMGeneration(trainer.processing_tokenizer.eos_token_id)
    trainer.sampler.vllm_generation = fake
    trainer.train()
    assert fake.syncs == 2  # the policy's weights are pushed once per optimizer step
    for prompts, k in fake.calls:
        assert k == 4 and len(prompts) == 2 * 4
        assert all(prompts[i] == prompts[i - i % 4] for i in range(len(prompts)))  # each prompt k times in a row
    selection = trainer.judged_steps.latest.selections[0]
    assert selection.ok  # completions of different lengths got different rewards: a pair was formed
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["pairs/online"] > 0 for log in logs)


def test_duplicate_prompts_are_each_judged_not_taken_for_a_num_iterations_repeat(model_path, tmp_path):
    """Two identical prompts, one per micro-batch of one accumulation window, num_iterations=2: both micro-batches
    are sampled and judged at step 1 (two prompts judged, each trained on its own pairs), step 2 repeats them and
    judges nothing. A repeat is known by the step's position, not by the prompts' token ids."""
    judged: list[tuple[int, int]] = []

    def length_reward(prompts, completions, trainer_state, **kwargs):
        judged.append((trainer_state.global_step, len(prompts)))
        return [float(sum(map(ord, c)) % 97) for c in completions]  # distinct texts, distinct rewards

    dataset = Dataset.from_list([{"context": CONTEXT, "question": QUESTION}] * 2)
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=_config(
            tmp_path, max_steps=2, num_iterations=2, per_device_train_batch_size=1, gradient_accumulation_steps=2
        ),
        train_dataset=dataset,
        reward_funcs=[length_reward],
    )
    trainer.train()
    k = trainer.args.num_generations
    assert judged == [(0, k), (0, k)]  # both micro-batches of step 1, nothing at step 2
    assert trainer.pair_stats["prompts"] == 2
    logs = [entry for entry in trainer.state.log_history if "pairs/online" in entry]
    assert len(logs) == 2 and logs[0]["pairs/online"] == logs[1]["pairs/online"] == 2


def test_new_pairs_every_num_iterations_steps(model_path, tmp_path, judge_server, monkeypatch):
    from trl_longreward.trainer.generation import PolicySampler

    generated = []
    real = PolicySampler.sample

    def counting(self, model_wrapped, rows, *, global_step):
        generated.append([tuple(r["prompt_ids"]) for r in rows])
        return real(self, model_wrapped, rows, global_step=global_step)

    monkeypatch.setattr(PolicySampler, "sample", counting)
    trainer = _trainer(model_path, tmp_path, judge_server, max_steps=4, num_iterations=2, train_dataset=_dataset(6))
    seen = []
    real_step = type(trainer).training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        seen.append([tuple(r["prompt_ids"]) for r in inputs])
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(type(trainer), "training_step", recording_step)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(seen) == 4 and seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2]
    assert generated == [seen[0], seen[2]]  # generated and judged once per batch of prompts, trained on twice
    assert trainer.pair_stats["prompts"] == 4  # the repeated steps are not counted twice
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
