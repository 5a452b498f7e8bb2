"""`build-pairs --use_vllm` / `evaluate --use_vllm`: the policy sampled by an in-process `vllm.LLM`.

Without vLLM (the main environment) the option fails at once, saying how to install it. The `vllm`-marked test runs
tests/vllm_scripts/build_pairs_vllm.py in the vLLM environment: the bundled SmolLM2 as the policy on the CPU build of
vLLM, judged by the scripted judge over HTTP, one engine for every run of the script.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from vllm_env import engine_dtype, run_vllm_script

from trl_longreward.commands import main
from trl_longreward.commands.build_pairs import BuildPairsArguments
from trl_longreward.commands.evaluate import EvaluateArguments

NO_VLLM = importlib.util.find_spec("vllm") is None


@pytest.mark.skipif(not NO_VLLM, reason="checks the error raised where vLLM is not installed")
def test_use_vllm_without_vllm_fails_at_once_saying_how_to_install_it(tmp_path: Path, capsys) -> None:
    with pytest.raises(
        ImportError, match=r'--use_vllm needs vLLM, which is not installed: pip install "trl-longreward'
    ):
        BuildPairsArguments(model="m", input="i", output_dir=str(tmp_path), use_vllm=True)
    with pytest.raises(ImportError, match="vLLM environment of requirements-vllm-cpu.txt"):
        EvaluateArguments(model=["m"], output_dir=str(tmp_path), use_vllm=True)
    # On the command line too, before any input, model or judge is touched.
    with pytest.raises(ImportError, match="--use_vllm needs vLLM"):
        main(["build-pairs", "--model", "m", "--input", str(tmp_path / "none.jsonl"), "--output_dir",
              str(tmp_path / "out"), "--use_vllm", "true"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_vllm_options_are_checked_before_vllm_is_needed(tmp_path: Path) -> None:
    base = dict(model="m", input="i", output_dir=str(tmp_path), use_vllm=True, max_completion_length=512)
    with pytest.raises(ValueError, match=r"--vllm_max_model_length 4096 cannot hold .* raise it to 8704"):
        BuildPairsArguments(**base, vllm_max_model_length=4096)
    with pytest.raises(ValueError, match=r"--vllm_gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        EvaluateArguments(model=["m"], output_dir=str(tmp_path), use_vllm=True, vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="--vllm_tensor_parallel_size must be >= 1, got 0"):
        BuildPairsArguments(**base, vllm_tensor_parallel_size=0)
    # Without --use_vllm the vllm_* options are not looked at.
    BuildPairsArguments(model="m", input="i", output_dir=str(tmp_path), vllm_max_model_length=16)


@pytest.mark.vllm
@pytest.mark.slow
def test_build_pairs_with_vllm_samples_k_seeded_responses_and_writes_pairs(tmp_path: Path) -> None:
    dtype = engine_dtype()
    result = run_vllm_script("build_pairs_vllm.py", tmp_path, str(tmp_path / "work"), dtype)
    k, summaries, responses = result["k"], result["summaries"], result["responses"]
    assert result["engine"] == {"max_model_len": 4096, "enforce_eager": True, "dtype": f"torch.{dtype}"}

    # k distinct samples for each of the 2 prompts, each within the completion budget.
    assert len(responses["first"]) == 2
    for samples in responses["first"]:
        assert len(samples) == k and len(set(samples)) == k and all(samples)
    assert (
        max(result["completion_tokens"]) <= result["max_completion_length"] + 1
    )  # re-tokenizing the decoded text may add a token
    # Each prompt its own seed, num_generations apart (vLLM's j-th sample: seed + j).
    assert result["seeds"] == [3, 3 + k]
    # The documents (~4.7k tokens) are cut in the middle to max_prompt_length, as on the transformers path.
    assert result["truncated"] == [True, True] and result["marker_in_prompts"] == [True, True]
    assert all(n <= result["max_prompt_length"] for n in result["prompt_tokens"])

    # Rebuilt from scratch with the same seed: the same samples; another seed: other samples.
    assert responses["rebuilt"] == responses["first"]
    assert responses["seed4"] != responses["first"]
    assert summaries["rebuilt"]["judge_calls"] == summaries["first"]["judge_calls"] > 0
    # Resumed after a crash-cut line: that prompt is sampled again, identically, every judge answer from the cache.
    assert summaries["resumed"]["new_prompts"] == 1 and summaries["resumed"]["judge_calls"] == 0
    assert result["resumed_judge_requests"] == 0 and summaries["resumed"]["cache_hits"] > 0
    # Two shards (one prompt each) merged: the single run's samples and pairs.
    assert [s["prompts"] for s in summaries["shards"]] == [1, 1]
    assert responses["merged"] == responses["first"]
    assert result["merged_pairs"] == result["pairs"]

    # Pairs written: best vs worst of each prompt's k scored samples.
    first = summaries["first"]
    assert first["prompts"] == first["new_prompts"] == 2 and first["pairs"] == len(result["pairs"]) >= 1
    for pair in result["pairs"]:
        rewards = next(r for r, s in zip(result["rewards"], responses["first"], strict=True)
                       if pair["chosen"][0]["content"] in s)  # fmt: skip
        assert pair["chosen_reward"] == max(rewards) and pair["rejected_reward"] == min(rewards)
        assert pair["chosen"][0]["role"] == "assistant" and len(pair["context"]) > len(pair["prompt"][0]["content"])

    # evaluate --use_vllm on the same engine: one greedy answer per prompt, scored.
    evaluation = result["eval"]
    assert len(evaluation["answers"]) == 2 and all(evaluation["answers"])
    assert evaluation["generation"]["use_vllm"] is True and evaluation["generation"]["do_sample"] is False
    (row,) = evaluation["table"].values()
    assert row["prompts"] == 2 and row["scored"] == 2
