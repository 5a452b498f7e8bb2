"""In-process vLLM on the CPU build (the vLLM environment, see `tests/vllm_env.py`): `judge_backend="vllm"` built from
a `LongRewardConfig`, with the engine's arguments passed through `judge_engine_kwargs`."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_env import engine_dtype, run_vllm_script

from trl_longreward import DIMENSIONS
from trl_longreward.models import default_model_path

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DEMO_ROWS = Path(__file__).resolve().parent.parent / "trl_longreward" / "data" / "demo_score.jsonl"


def test_vllm_judge_from_the_config_scores_every_row(tmp_path: Path) -> None:
    dtype = engine_dtype()
    result = run_vllm_script(
        "vllm_judge.py", tmp_path, str(default_model_path()), str(DEMO_ROWS), str(tmp_path / "cache.sqlite"), dtype
    )
    # judge_engine_kwargs reached vllm.LLM: the engine runs with exactly those settings.
    assert result["backend"] == "VLLMJudge"
    assert result["engine"] == {"max_model_len": 4096, "enforce_eager": True, "dtype": f"torch.{dtype}", "seed": 0}
    assert result["context_window"] == 4096
    assert len(result["rewards"]) == 2
    assert all(r is not None and 0.0 <= r <= 10.0 for r in result["rewards"]), result["statuses"]
    assert all(set(status) == set(DIMENSIONS) for status in result["statuses"])
    assert result["counts"]["judge_calls"] > 0 and result["counts"]["judge_errors"] == 0, result["counts"]
    # A final assistant message is continued, not answered anew; a prompt over the window fails alone.
    assert "Paris" in result["continued"] and not result["continued"].lstrip().startswith("The capital")
    assert result["continued"] != result["fresh"]
    assert result["too_long_error"] is not None and "more than the judge's window" in result["too_long_error"]
    assert {"engine", "config", "chat_template"} <= set(result["identity_keys"])
    # verdict_decoding="structured" through vLLM's StructuredOutputsParams: strict parsing reads every verdict.
    assert result["structured_counts"]["parse_failures"] == 0, result["structured_counts"]
    assert result["structured_counts"]["judge_errors"] == 0
    assert all(r is not None for r in result["structured_rewards"])
    print(f"vLLM engine built in {result['built_s']:.0f} s, 2 rows judged in {result['scored_s']:.0f} s")


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_colocated_vllm_samples_from_the_trained_weights(variant: str, tmp_path: Path) -> None:
    """Three online DPO steps with vLLM sampling the policy (colocate) on the CPU build: the weights reach vLLM through
    its in-place reload after every optimizer step, and after training vLLM's greedy continuation is the trained
    policy's own greedy choice at every token (full fine-tuning, and LoRA with the adapters merged and
    `async_judging`: step t samples step t+1's prompts while step t's are judged)."""
    result = run_vllm_script("colocate_training.py", tmp_path, variant, str(tmp_path))
    assert result["is_peft"] == (variant == "lora")
    assert result["steps"] == 3 and result["rewards_per_step"] == [8, 8, 8]  # 2 prompts x k=4, every step
    # One sync per optimizer step before the first generation after it, plus the final one the script asks for.
    # Serial: generations at steps 0, 1, 2. Async (4 prompts, 2 per step: an epoch is 2 steps, and the first step of
    # an epoch is sampled and judged before it trains): step 0 samples steps 0 and 1, step 2 samples itself.
    if variant == "lora":
        assert result["syncs"] == ["reload"] * 3 and result["staleness"] == [0, 1, 0], result
    else:
        assert result["syncs"] == ["reload"] * 4 and result["staleness"] == [0, 0, 0], result
    assert result["weights_moved"] > 0
    # vLLM now samples from the trained weights: each of its greedy tokens is the policy's argmax...
    assert result["after_agreement"] == 1.0, result
    # ...and the greedy answer moved with them: the one from before training is not the policy's choice any more.
    assert result["after"] != result["before"]
    assert result["stale_agreement"] < 1.0
    print(f"{variant}: greedy agreement before training {result['before_agreement']:.2f}, after 1.00")


def test_server_mode_without_cuda_is_refused_with_the_reason(tmp_path: Path) -> None:
    result = run_vllm_script("server_mode_refused.py", tmp_path, str(tmp_path))
    assert result["cuda"] is False
    assert (
        result["refused"] is not None and "NCCL" in result["refused"] and "vllm_mode='colocate'" in result["refused"]
    )
