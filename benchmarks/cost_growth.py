"""How the cost of one LongReward DPO step grows with the context: judge calls and DPO step time, 1k -> 8k tokens.

For each context length (in SmolLM2 tokens), a bundled document is cut (or repeated) to that length and:
- 4 responses to its question are scored by `LongRewardFunction` against a scripted OpenAI-compatible judge server
  on loopback (real client, no cache): judge calls per prompt and per response, split by pipeline;
- one DPO pair with that prompt and ~128-token responses takes a `training_step` with TRL's two rows and with
  prompt-once (same weights, same process, see `dpo_step.py`): time of each and the ratio.

    python benchmarks/cost_growth.py                        # CPU: 1k, 2k, 4k, 8k tokens, tiny config-built model
    python benchmarks/cost_growth.py --lengths 1024 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpo_step  # noqa: E402

RESPONSES = [
    "The document says the answer is in the second part, where the author explains the events in detail.",
    "It is about a journey. The narrator meets several people. Nothing else is said.",
    "According to the text, the main figure acts out of duty, and the closing section confirms this.",
    "I do not know.",
]


def judge_calls(context_tokens: list[int], tokenizer) -> list[dict]:
    from trl_longreward import LongRewardFunction, OpenAIJudge
    from trl_longreward.data import load_long_qa
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer
    from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

    row = load_long_qa("train")[0]
    doc_ids = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
    rows = []
    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as server:
        for length in context_tokens:
            ids = (doc_ids * (length // len(doc_ids) + 1))[:length]
            context = tokenizer.decode(ids)
            reward = LongRewardFunction(
                judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
                retriever="bm25",
                chunk_tokenizer="regex",
                cache_path=None,
                show_progress=False,
            )
            reward(
                prompts=[row["question"]] * len(RESPONSES),
                completions=RESPONSES,
                context=[context] * len(RESPONSES),
                question=[row["question"]] * len(RESPONSES),
            )
            stats = reward.stats()
            sent = stats["by_template"]["sent"]
            rows.append(
                {
                    "context_tokens": length,
                    "judge_calls": stats["judge_calls"],
                    "calls_per_response": stats["judge_calls"] / len(RESPONSES),
                    "by_template": sent,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", help="tokenizer path (default: the embedded SmolLM2's)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from trl_longreward.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_path())
    calls = judge_calls(args.lengths, tokenizer)
    namespace = argparse.Namespace(
        device=args.device,
        model=args.model,
        lengths=args.lengths,
        response_tokens=128,
        pairs=1,
        repeats=args.repeats,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        attn="sdpa",
        gradient_checkpointing=False,
        tokenizer=args.tokenizer,
        json=None,
    )
    steps = dpo_step.run(namespace)
    print()
    print(
        "| context tokens | judge calls (4 responses) | per response | chunk-notes calls | TRL step s | prompt-once s | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for call, step in zip(calls, steps, strict=True):
        notes = call["by_template"].get("completeness_extract", 0)
        print(
            f"| {call['context_tokens']} | {call['judge_calls']} | {call['calls_per_response']:.2f} | {notes} | "
            f"{step['trl_seconds']:.2f} | {step['ours_seconds']:.2f} | {step['speedup']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"judge": calls, "dpo_step": steps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
