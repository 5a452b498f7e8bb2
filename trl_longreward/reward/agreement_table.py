"""The agreement table of `trl-longreward agreement`: bootstrap intervals, the plain-text table and the HTML page
(the table and a bar plot with the intervals, one file, no scripts)."""

from __future__ import annotations

import html
import math
import random
from typing import Any


def bootstrap_interval(
    outcomes: list[int], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[float] | None:
    """Percentile bootstrap interval of the mean of `outcomes` (1 = agreed, 0 = tie or disagreed; the compared pairs
    only): `resamples` resamples of len(outcomes) draws with replacement (`random.Random(seed).randrange`), sorted
    means, the ones at floor(B x alpha/2) and ceil(B x (1 - alpha/2)) - 1. None when nothing was compared."""
    if not outcomes:
        return None
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    alpha = 1 - confidence
    low = math.floor(round(resamples * alpha / 2, 9))
    high = max(low, min(resamples, math.ceil(round(resamples * (1 - alpha / 2), 9))) - 1)
    return [means[low], means[high]]


METHOD_LABELS = {"longreward": "LongReward", "pairwise": "judge compares directly (both orders)"}


def method_label(method: str) -> str:
    if method in METHOD_LABELS:
        return METHOD_LABELS[method]
    if method.startswith("without_"):
        return f"LongReward without {method.removeprefix('without_')}"
    if method.startswith("reward_model:"):
        return f"reward model {method.removeprefix('reward_model:')}"
    return f"{method} alone"


def format_results(results: dict[str, Any]) -> str:
    """The table as aligned plain text: one row per method, one column per judge; reward models below."""
    names = list(results["judges"])
    methods = list(dict.fromkeys(m for row in results["judges"].values() for m in row))

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "-"
        if entry["agreement"] is None:
            return f"- (0 compared, {entry['unscored']} unscored)"
        low, high = entry["interval"]
        extra = f", {entry['ties']} ties" if entry["ties"] else ""
        extra += f", {entry['unscored']} unscored" if entry["unscored"] else ""
        return f"{entry['agreement']:.3f} [{low:.2f}, {high:.2f}] ({entry['agree']}/{entry['compared']}{extra})"

    lines = [["method", *names]]
    lines += [[method_label(m), *(cell(results["judges"][n].get(m)) for n in names)] for m in methods]
    for model, entry in results["reward_models"].items():
        lines.append([method_label(model), *([cell(entry)] + [""] * (len(names) - 1))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    confidence = results["config"]["bootstrap"]["confidence"]
    return f"{text}\nagreement [{confidence:.0%} bootstrap interval] (agreed/compared) over {results['pairs']} pairs"


_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")


def render_page(results: dict[str, Any]) -> str:
    """A self-contained page: per method, one bar per judge (agreement) with its bootstrap interval."""
    names = list(results["judges"])
    methods = list(dict.fromkeys(m for row in results["judges"].values() for m in row))
    bars = [(method_label(m), n, results["judges"][n].get(m)) for m in methods for n in names]
    bars += [(method_label(model), "", entry) for model, entry in results["reward_models"].items()]
    row_h, left, width = 22, 330, 420
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{row_h * len(bars) + 40}">']
    for x in (0.0, 0.25, 0.5, 0.75, 1.0):
        px = left + x * width
        svg.append(f'<line x1="{px}" y1="10" x2="{px}" y2="{row_h * len(bars) + 14}" stroke="#ddd"/>')
        svg.append(f'<text x="{px}" y="{row_h * len(bars) + 30}" font-size="11" text-anchor="middle">{x:g}</text>')
    for i, (label, name, entry) in enumerate(bars):
        y = 14 + i * row_h
        color = _COLORS[names.index(name) % len(_COLORS)] if name in names else "#999"
        text = html.escape(f"{label} ({name})" if name and len(names) > 1 else label)
        svg.append(f'<text x="{left - 6}" y="{y + 13}" font-size="12" text-anchor="end">{text}</text>')
        if entry is None or entry["agreement"] is None:
            svg.append(f'<text x="{left + 4}" y="{y + 13}" font-size="11">not scored</text>')
            continue
        svg.append(
            f'<rect x="{left}" y="{y + 2}" width="{entry["agreement"] * width:.1f}" height="14" fill="{color}"/>'
        )
        low, high = entry["interval"]
        svg.append(
            f'<line x1="{left + low * width:.1f}" y1="{y + 9}" x2="{left + high * width:.1f}" y2="{y + 9}" '
            'stroke="#222" stroke-width="1.5"/>'
        )
        svg.append(f'<text x="{left + width + 6}" y="{y + 13}" font-size="11">{entry["agreement"]:.3f}</text>')
    svg.append("</svg>")
    legend = "".join(
        f'<span style="color:{_COLORS[i % len(_COLORS)]}">&#9632;</span> {html.escape(n)} &nbsp; '
        for i, n in enumerate(names)
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>LongReward agreement</title></head>"
        "<body style='font-family:sans-serif'>\n<h1>Agreement with the preferred answer</h1>\n"
        f"<p>{results['pairs']} pairs; bars: agreement over the compared pairs; lines: bootstrap interval.</p>\n"
        f"<p>{legend}</p>\n{''.join(svg)}\n<pre>{html.escape(format_results(results))}</pre>\n</body></html>\n"
    )
