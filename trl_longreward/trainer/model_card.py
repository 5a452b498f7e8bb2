"""What the model card says about a LongReward model, after TRL's own card: method, judge, dimensions, pairs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..pairs import SKIP_REASONS
from .rewards import describe_reward

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_CACHE_FOLDER = re.compile(r"^(models|datasets)--(.+)$")  # huggingface_hub's cache: models--org--name


def public_name(value: Any) -> tuple[str | None, bool]:
    """What a card may say for a model or dataset name, and whether that is a Hub id (then it may be linked).

    A Hub id stays as it is; a local path becomes its last folder's name (a Hub cache snapshot its repo id), never
    the full local path; a URL loses its credentials, query and fragment."""
    if value is None:
        return None, False
    text = os.fspath(value).strip() if isinstance(value, str | os.PathLike) else str(value).strip()
    if not text:
        return None, False
    if "://" in text:
        parts = urlsplit(text)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")), False
    is_windows = re.match(r"^[A-Za-z]:[\\/]", text) is not None or "\\" in text
    local = is_windows or text.startswith(("/", "~", ".")) or os.path.exists(text) or not _HUB_ID.match(text)
    if not local:
        return text, True
    parts = (PureWindowsPath(text) if is_windows else PurePosixPath(text)).parts
    for index, part in enumerate(parts):
        cached = _HUB_CACHE_FOLDER.match(part)
        if cached and index + 1 < len(parts) and parts[index + 1] == "snapshots":
            return cached.group(2).replace("--", "/", 1), True
    names = [part for part in parts if part not in ("/", "\\", ".", "..", "~") and not part.endswith((":\\", ":/"))]
    return (names[-1] if names else None), False


def public_judge(judge: Mapping[str, Any]) -> dict[str, str]:
    """A judge's `describe()` for a card: its model by name (`public_name`), URLs without credentials or query."""
    shown = {}
    for key, value in judge.items():
        name = public_name(value)[0] if key == "model" or "://" in str(value) else value
        if key == "base_url":
            name = ",".join(filter(None, (public_name(url)[0] for url in str(value).split(","))))
        if name:
            shown[key] = str(name)
    return shown


def long_reward_card_section(
    args: Any, reward_funcs: Sequence[Callable], pair_stats: Mapping[str, int], dataset_name: str | None = None
) -> str:
    """Markdown appended to `README.md` (no secret, no local path: the judges' `describe()` through `public_judge`)."""
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
        judge = public_judge(info.get("judge", {}))
        judge_text = ", ".join(f"{k}: {v}" for k, v in judge.items()) if judge else "n/a"
        lines.append(f"- Reward `{info['name']}`; judge: {judge_text}")
        if "dimensions" in info:
            lines.append(f"  - dimensions: {', '.join(info['dimensions'])} (weights: {info['weights']})")
    if dataset_name:
        lines.append(f"- Prompts: {dataset_name}")
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
