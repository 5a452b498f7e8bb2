"""`build-pairs --use_vllm` (and `evaluate --use_vllm`) on the CPU build of vLLM, with the bundled SmolLM2 as the policy
and the scripted judge over HTTP, on 2 bundled prompts (run by tests/test_offline_vllm.py with the vLLM environment's
Python). One engine is built and shared by every run: a first build, a rebuild from scratch with the same seed, a
resume after a crash-cut line, two shards and their merge, a build with another seed, and a greedy evaluation.
Prints one JSON object on its last line.

    python tests/vllm_scripts/build_pairs_vllm.py WORK_DIR DTYPE

Sized by tokens, not by a machine's speed: 2 prompts cut to 256 tokens, k = 3 samples of 16 tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

K = 3
MAX_PROMPT_LENGTH = 256
MAX_COMPLETION_LENGTH = 16
MAX_MODEL_LENGTH = 4096


def main(work: str, dtype: str) -> dict:
    from trl_longreward.commands.build_pairs import BuildPairsArguments, build_pairs, merge_pair_shards
    from trl_longreward.commands.evaluate import EvaluateArguments, evaluate_models
    from trl_longreward.data import load_long_qa
    from trl_longreward.documents import TRUNCATION_MARKER, tokenize_prompt
    from trl_longreward.generation import load_vllm_policy
    from trl_longreward.models import default_model_path
    from trl_longreward.records import read_jsonl
    from trl_longreward.reward import LongRewardConfig
    from trl_longreward.shards import MergeShardsArguments
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer
    from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

    root = Path(work)
    model = str(default_model_path())
    prompts = root / "prompts.jsonl"
    load_long_qa("train").select(range(2)).select_columns(["context", "question"]).to_json(str(prompts))

    start = time.perf_counter()
    llm, tokenizer = load_vllm_policy(model, dtype=dtype, max_model_length=MAX_MODEL_LENGTH, enforce_eager=True)
    built_s = time.perf_counter() - start
    engine = llm.llm_engine.model_config

    def arguments(name: str, **overrides) -> BuildPairsArguments:
        settings = dict(
            model=model,
            input=str(prompts),
            output_dir=str(root / name),
            num_generations=K,
            max_completion_length=MAX_COMPLETION_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            batch_size=1,
            seed=3,
            tie_policy="first_last",
            dtype=dtype,
            use_vllm=True,
            vllm_max_model_length=MAX_MODEL_LENGTH,
            vllm_enforce_eager=True,
        )
        return BuildPairsArguments(**{**settings, **overrides})

    def samples(name: str) -> list[dict]:
        return list(read_jsonl(root / name / "samples.jsonl"))

    def responses(name: str) -> list[list[str]]:
        return [record["responses"] for record in sorted(samples(name), key=lambda r: r["index"])]

    script = ScriptedLongRewardJudge(helpfulness=lambda question, response: float(len(response) % 11))
    with ScriptedOpenAIServer(script) as server:

        def config() -> LongRewardConfig:
            return LongRewardConfig(
                judge_base_url=server.base_url, judge_model="scripted-judge", retriever="bm25", chunk_tokenizer="regex"
            )

        start = time.perf_counter()
        first = build_pairs(arguments("first"), config(), llm=llm)
        first_s = time.perf_counter() - start
        rebuilt = build_pairs(arguments("rebuilt"), config(), llm=llm)  # a new directory: generated again

        lines = (root / "rebuilt" / "samples.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "rebuilt" / "samples.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40], encoding="utf-8")
        sent = server.num_chat_requests
        resumed = build_pairs(arguments("rebuilt"), config(), llm=llm)
        resumed_sent = server.num_chat_requests - sent

        shards = [
            build_pairs(arguments(f"shard{i}", shard_index=i, num_shards=2), config(), llm=llm) for i in range(2)
        ]
        merged = merge_pair_shards(MergeShardsArguments(shards=[str(root / "shard0"), str(root / "shard1")],
                                                        output_dir=str(root / "merged")))  # fmt: skip
        other_seed = build_pairs(arguments("seed4", seed=4), config(), llm=llm)

        evaluation = evaluate_models(
            EvaluateArguments(
                model=[model],
                input=str(prompts),
                output_dir=str(root / "eval"),
                max_completion_length=16,
                max_prompt_length=MAX_PROMPT_LENGTH,
                dtype=dtype,
                use_vllm=True,
                vllm_max_model_length=MAX_MODEL_LENGTH,
                vllm_enforce_eager=True,
            ),
            config(),
            llms={model: llm},
        )

    records = samples("first")
    pairs = [json.loads(line) for line in (root / "first" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    answers = list(read_jsonl(root / "eval" / "answers.jsonl"))
    return {
        "engine": {
            "max_model_len": engine.max_model_len,
            "enforce_eager": bool(engine.enforce_eager),
            "dtype": str(engine.dtype),
        },
        "built_s": built_s,
        "first_s": first_s,
        "k": K,
        "max_prompt_length": MAX_PROMPT_LENGTH,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "summaries": {
            "first": first,
            "rebuilt": rebuilt,
            "resumed": resumed,
            "merged": merged,
            "seed4": other_seed,
            "shards": shards,
        },  # fmt: skip
        "resumed_judge_requests": resumed_sent,
        "responses": {name: responses(name) for name in ("first", "rebuilt", "merged", "seed4")},
        "seeds": [record["seed"] for record in records],
        "truncated": [record["truncated"] for record in records],
        "prompt_tokens": [len(tokenize_prompt(tokenizer, record["prompt"])) for record in records],
        "marker_in_prompts": [TRUNCATION_MARKER in record["prompt"][0]["content"] for record in records],
        "completion_tokens": [len(tokenizer(r)["input_ids"]) for record in records for r in record["responses"]],
        "rewards": [record["rewards"] for record in records],
        "pairs": pairs,
        "merged_pairs": [
            json.loads(line) for line in (root / "merged" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
        ],
        "eval": {
            "answers": [a["answer"] for a in answers],
            "generation": answers[0]["generation"],
            "table": evaluation["table"],
        },
    }


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from re-running this
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
