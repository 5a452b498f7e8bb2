"""Online DPO with the policy sampled by in-process vLLM (`use_vllm=True, vllm_mode="colocate"`) on the CPU build,
full fine-tuning, or LoRA with `async_judging` (run by tests/test_vllm_inprocess.py with the vLLM environment's
Python).

After training, vLLM's greedy continuation of a fixed prompt is checked against the trained policy itself: a
transformers forward pass over prompt + continuation must pick every continuation token as its argmax (that is what
greedy means), so vLLM samples from exactly the policy's current weights. Prints one JSON object on its last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: tiny_models, known_answers

NUM_TOKENS = 16


def _vllm_greedy(llm, prompt_ids: list[int]) -> list[int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0]
    return list(output.outputs[0].token_ids)


def _argmax_agreement(model, prompt_ids: list[int], continuation: list[int]) -> float:
    """Share of continuation tokens that are the policy's own argmax given everything before them."""
    import torch

    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    return sum(p == c for p, c in zip(predicted, continuation, strict=True)) / len(continuation)


def main(variant: str, out_dir: str) -> dict:
    import torch
    from tiny_models import JudgedSteps, prompts_dataset, small_dpo_config, tiny_llama

    import trl_longreward.trainer.generation as generation
    from trl_longreward import LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer
    from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

    out = Path(out_dir)
    # head_dim 64: a size the CPU attention kernels take.
    model_path = tiny_llama(out / "policy", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    syncs: list[str] = []
    original_sync = generation.sync_vllm_weights

    def recording_sync(vllm_generation):
        syncs.append(original_sync(vllm_generation))
        return syncs[-1]

    generation.sync_vllm_weights = recording_sync
    peft_config = None
    if variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=lambda q, r: float(len(r) % 11))) as server:
        reward = LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
            retriever="bm25",
            chunk_tokenizer="regex",
            cache_path=str(out / "judge_cache.sqlite"),
        )
        judged = JudgedSteps()
        trainer = LongContextDPOTrainer(
            model=model_path,
            args=small_dpo_config(
                out / "run",
                max_steps=3,
                use_vllm=True,
                vllm_mode="colocate",
                vllm_max_model_length=1024,
                learning_rate=5e-2 if variant == "full" else 2e-1,
                temperature=1.0,
                async_judging=variant == "lora",
            ),
            train_dataset=prompts_dataset(),
            callbacks=[judged],
            reward_funcs=[reward],
            peft_config=peft_config,
        )
        vllm_generation = trainer.sampler.vllm_generation
        llm = vllm_generation.llm
        prompt_ids = trainer.train_dataset[0]["prompt_ids"]
        before = _vllm_greedy(llm, prompt_ids)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        before_agreement = _argmax_agreement(policy, prompt_ids, before)
        initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        result = trainer.train()
        moved = max((p.detach() - initial[n]).abs().max().item() for n, p in policy.named_parameters() if n in initial)
        how = generation.sync_vllm_weights(vllm_generation)  # the weights after the last optimizer step
        after = _vllm_greedy(llm, prompt_ids)
        policy.eval()
        after_agreement = _argmax_agreement(policy, prompt_ids, after)
        stale_agreement = _argmax_agreement(policy, prompt_ids, before)
        reward.close()
    return {
        "variant": variant,
        "syncs": syncs,
        "final_sync": how,
        "loss": result.training_loss,
        "steps": len(judged.steps),
        "rewards_per_step": [len(s.rewards) for s in judged.steps],
        "weights_moved": moved,
        "before": before,
        "after": after,
        "before_agreement": before_agreement,
        "after_agreement": after_agreement,
        "stale_agreement": stale_agreement,
        "is_peft": hasattr(policy, "peft_config"),
        "staleness": [e["pairs/staleness"] for e in trainer.state.log_history if "pairs/staleness" in e],
        "dtype": str(next(policy.parameters()).dtype),
        "torch": torch.__version__,
    }


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
