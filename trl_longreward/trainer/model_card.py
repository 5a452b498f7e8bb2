"""What the model card says about a LongReward model, after TRL's own card: method, judge, dimensions, pairs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..pairs import SKIP_REASONS
from .rewards import describe_reward


def long_reward_card_section(args: Any, reward_funcs: Sequence[Callable], pair_stats: Mapping[str, int]) -> str:
    """Markdown appended to `README.md` (no secret: the judges' `describe()` holds none)."""
    lines = [
        "",
        "",
        "## LongReward online DPO",
        "",
        "Trained with trl-longreward's `LongContextDPOTrainer` ([LongReward](https://arxiv.org/abs/2410.21252)): "
        "each step, "
        f"{args.num_generations} responses per prompt were sampled from the policy (temperature "
        f"{args.temperature}), scored by an LLM judge, and the best and worst formed a DPO pair "
        f"(beta {args.beta}, losses {args.loss_type} weighted {args.loss_weights}).",
        "",
    ]
    for info in map(describe_reward, reward_funcs):
        judge = info.get("judge", {})
        judge_text = ", ".join(f"{k}: {v}" for k, v in judge.items()) if judge else "n/a"
        lines.append(f"- Reward `{info['name']}`; judge: {judge_text}")
        if "dimensions" in info:
            lines.append(f"  - dimensions: {', '.join(info['dimensions'])} (weights: {info['weights']})")
    if pair_stats.get("prompts"):
        lines.append(
            f"- Pairs: {pair_stats['pairs']} online pairs from {pair_stats['prompts']} prompts "
            f"({pair_stats['pairs'] / pair_stats['prompts']:.0%}), {pair_stats.get('offline_pairs', 0)} offline "
            "pairs; skipped: "
            + ", ".join(f"{reason} {pair_stats.get(f'skipped_{reason}', 0)}" for reason in SKIP_REASONS)
        )
    lines.append(
        f"- Prompt budget {args.max_prompt_length} tokens (documents cut in the middle), "
        f"responses up to {args.max_completion_length} tokens."
    )
    return "\n".join(lines) + "\n"
