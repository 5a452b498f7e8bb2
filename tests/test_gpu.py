"""On a CUDA GPU: online LongReward DPO end to end in bf16 (prompt-once rows padded for the GPU kernels, shared
prefill), judged over real HTTP, and `pad_to_multiple_of` resolved on CUDA as TRL resolves it. Skipped without a GPU
(CI has none); run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch
from datasets import Dataset
from known_answers import CONTEXT, QUESTION
from tiny_models import tiny_llama
from trl import DPOConfig

from trl_longreward import LongContextDPOConfig, LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_online_dpo_on_gpu_bf16_prompt_once(tmp_path):
    model_path = tiny_llama(tmp_path / "model", hidden_size=128)
    judge = ScriptedLongRewardJudge(helpfulness=lambda question, response: float(len(response) % 11))
    with ScriptedOpenAIServer(judge) as server:
        reward = LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
            retriever="bm25",
            chunk_tokenizer="regex",
            cache_path=str(tmp_path / "cache.sqlite"),
        )
        args = LongContextDPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=2,
            max_steps=3,
            num_generations=4,
            max_completion_length=24,
            max_prompt_length=512,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            bf16=True,
            learning_rate=1e-2,
            # TRL's "auto" does not pad on CUDA (tested below): ask for 64 to run the padded packed rows on the GPU
            pad_to_multiple_of=64,
            model_init_kwargs={"attn_implementation": "sdpa", "dtype": torch.bfloat16},
        )
        assert args.pad_to_multiple_of == 64
        rows = [{"context": CONTEXT + f" Record {i}.", "question": QUESTION} for i in range(6)]
        trainer = LongContextDPOTrainer(
            model=model_path, args=args, train_dataset=Dataset.from_list(rows), reward_funcs=[reward]
        )
        shapes = []
        forward = trainer.model.forward

        def spy(*a, **kwargs):  # runs after the packing hook: sees what the model really computes
            if kwargs.get("fused_lm_head"):
                shapes.append((tuple(kwargs["input_ids"].shape), kwargs["attention_mask"].dim()))
            return forward(*a, **kwargs)

        trainer.model.forward = spy
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        trainer.model.forward = forward
    assert next(trainer.model.parameters()).is_cuda
    assert not trainer._prompt_once_warned  # every step ran packed
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all(log["pairs/online"] > 0 for log in logs)
    # one packed row per pair, a 4-D branch mask, lengths padded to the multiple of 64 asked for
    assert shapes and all(dims == 4 and length % 64 == 0 for (_, length), dims in shapes)


@pytest.mark.parametrize("value", ["auto", None, 64, "64", "none"])
def test_pad_to_multiple_of_resolves_on_cuda_as_trl_does(tmp_path, value):
    ours = LongContextDPOConfig(output_dir=str(tmp_path / "ours"), pad_to_multiple_of=value, report_to="none")
    trls = DPOConfig(output_dir=str(tmp_path / "trl"), pad_to_multiple_of=value, report_to="none")
    assert ours.device.type == trls.device.type == "cuda"
    assert ours.pad_to_multiple_of == trls.pad_to_multiple_of
    if value in ("auto", None, "none"):
        assert ours.pad_to_multiple_of is None  # TRL pads only on Neuron: the packed rows are not padded on CUDA
