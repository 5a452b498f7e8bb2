"""A self-contained HTML report of a LongReward DPO run: reward curves per step and every judged sample with the
judge's reasons, so that a person can see what was preferred over what, and why, without reading logs.

`JudgedStepRecorder` (a `transformers.TrainerCallback`) keeps each step's judged samples while training;
`write_report` turns them and the trainer's `log_history` into `report.html` (inline SVG charts, no scripts, nothing
loaded from the network) and `judged_samples.jsonl` (the same samples with the judge's full, untruncated traces).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .reward.config import DIMENSIONS

__all__ = ["JudgedStepRecorder", "judged_prompt_records", "write_report"]

REPORT_FILE = "report.html"
SAMPLES_FILE = "judged_samples.jsonl"
_COLORS = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2")
_RESPONSE_CHARS = 1500
_JUDGE_CHARS = 700
_NOTES_CHARS = 900
_SUPPORT = {1.0: "fully supported", 0.5: "partially supported", 0.0: "not supported"}


# ----- recording during training -----


def judged_prompt_records(
    judgements: Sequence[Any],
    rewards: Sequence[float | None],
    selections: Sequence[Any],
    num_generations: int,
    *,
    step: int,
    rank: int = 0,
) -> list[dict[str, Any]]:
    """One record per prompt of a step: the question, the pair selection and its k judged samples.

    `judgements` are the reward function's `Judgement`s (prompt-major, `num_generations` per prompt), `rewards` the
    trainer's combined rewards in the same order, `selections` the trainer's `PairSelection` per prompt.
    """
    records = []
    for i, selection in enumerate(selections):
        block = judgements[i * num_generations : (i + 1) * num_generations]
        if not block:
            break
        samples = []
        for j, judgement in enumerate(block):
            data = judgement.to_dict() if hasattr(judgement, "to_dict") else dict(judgement)
            reward = rewards[i * num_generations + j] if i * num_generations + j < len(rewards) else data.get("reward")
            samples.append(
                {
                    "index": j,
                    "reward": reward,
                    "scores": data.get("scores", {}),
                    "status": data.get("status", {}),
                    "response": data.get("response", ""),
                    "trace": data.get("trace", {}),
                }
            )
        records.append(
            {
                "step": step,
                "rank": rank,
                "prompt": i,
                "question": block[0].question if hasattr(block[0], "question") else block[0].get("question", ""),
                "selection": {
                    "chosen": selection.chosen,
                    "rejected": selection.rejected,
                    "chosen_reward": selection.chosen_reward,
                    "rejected_reward": selection.rejected_reward,
                    "num_scored": selection.num_scored,
                    "skip_reason": selection.skip_reason,
                },
                "samples": samples,
            }
        )
    return records


class JudgedStepRecorder(TrainerCallback):
    """Keeps the training steps' judged samples, from the trainer's `on_step_judged` event
    (`LongContextDPOTrainer` sends each micro-step's judgements, rewards and pair selections).

    With several processes the records of all ranks are gathered at the end of each micro-step (every rank runs the
    callback) and kept on every rank. Memory stays bounded on long runs: past `max_records` prompt records, every
    other recorded step is dropped (the first and the latest step are always kept), so the report still spans the
    whole run.
    """

    def __init__(self, max_records: int = 200) -> None:
        self.max_records = max_records
        self.steps: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []

    def on_step_judged(self, args: Any, state: Any, control: Any, *, judged: Any, **kwargs: Any) -> None:
        """A micro-step's judged samples (`LongContextDPOTrainer`'s event); kept until the micro-step ends."""
        if judged.judgements is None:  # no reward function gave judgements: nothing to show
            return
        self._pending = judged_prompt_records(
            judged.judgements,
            judged.rewards,
            judged.selections,
            judged.num_generations,
            step=judged.step,
            rank=judged.rank,
        )

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A gradient-accumulation micro-step: it belongs to the optimizer step still to come."""
        self._flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The last micro-step of an optimizer step."""
        self._flush()

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        from accelerate import PartialState

        if PartialState().num_processes > 1:
            from accelerate.utils import gather_object

            records = gather_object(records)
        self.steps.extend(records)
        if len(self.steps) > self.max_records:
            recorded = sorted({r["step"] for r in self.steps})
            keep = set(recorded[::2]) | {recorded[-1]}
            self.steps = [r for r in self.steps if r["step"] in keep]


# ----- the report -----


def write_report(
    output_dir: str | Path,
    log_history: Sequence[dict[str, Any]],
    judged_steps: Sequence[dict[str, Any]],
    *,
    title: str,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write `report.html` and `judged_samples.jsonl` to `output_dir`; return the path of the report.

    Args:
        output_dir: where both files go (created if needed).
        log_history: `trainer.state.log_history` (the per-step metrics of `LongContextDPOTrainer`).
        judged_steps: records from `JudgedStepRecorder.steps` / `judged_prompt_records`.
        title: the page title.
        summary: optional facts about the run shown at the top (model, judge, budgets, ...).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / SAMPLES_FILE).open("w", encoding="utf-8") as sink:
        for record in judged_steps:
            sink.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    logs = [entry for entry in log_history if "step" in entry and "train_runtime" not in entry]
    page = [
        _HEAD.format(title=_esc(title)),
        f"<h1>{_esc(title)}</h1>",
        f"<p class='muted'>Written {datetime.now():%Y-%m-%d %H:%M}. Rewards and scores are 0-10 (the reward is the "
        "mean of the scored dimensions). Judged samples: <code>judged_samples.jsonl</code>.</p>",
        _summary_table(summary or {}),
        "<h2>Per step</h2>",
        _charts(logs),
        f"<h2>Judged samples ({len(judged_steps)} prompts)</h2>",
        _samples_section(judged_steps, logs),
        "</body></html>",
    ]
    path = out / REPORT_FILE
    path.write_text("\n".join(page), encoding="utf-8")
    return path


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _clip(text: str, limit: int) -> str:
    text = str(text).strip()
    return text if len(text) <= limit else f"{text[:limit].rstrip()} … [{len(text) - limit} more characters]"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _summary_table(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in summary.items())
    return f"<table class='summary'>{rows}</table>"


# ----- charts -----


def _series(logs: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for entry in logs:
        value = entry.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            points.append((float(entry["step"]), float(value)))
    return points


def _charts(logs: Sequence[dict[str, Any]]) -> str:
    dimensions = [d for d in DIMENSIONS if any(f"long_reward/{d}/mean" in e for e in logs)]
    reward_keys = [
        ("all samples (mean)", "long_reward/reward/mean"),
        ("chosen (mean)", "long_reward/chosen_mean"),
        ("rejected (mean)", "long_reward/rejected_mean"),
    ]
    pair_keys = [("valid-pair rate", "pairs/valid_pair_rate"), ("unscored-sample rate", "pairs/unscored_sample_rate")]
    specs = [
        ("Reward", (0.0, 10.0), reward_keys),
        ("Dimension scores (mean over samples)", (0.0, 10.0), [(d, f"long_reward/{d}/mean") for d in dimensions]),
        ("Pairs", (0.0, 1.0), pair_keys),
        ("Loss", None, [("loss", "loss")]),
    ]
    if any(key.startswith("eval_long_reward/") for e in logs for key in e):  # LongRewardCallback, held-out prompts
        held_out = [(d, f"eval_long_reward/{d}") for d in (*DIMENSIONS, "reward")]
        specs.insert(1, ("Held-out prompts (LongRewardCallback)", (0.0, 10.0), held_out))
    charts = []
    for title, y_range, keys in specs:
        series = [(label, _series(logs, key)) for label, key in keys]
        charts.append(_line_chart(title, [(label, pts) for label, pts in series if pts], y_range))
    return "<div class='charts'>" + "".join(charts) + "</div>"


def _line_chart(
    title: str, series: Sequence[tuple[str, list[tuple[float, float]]]], y_range: tuple[float, float] | None
) -> str:
    """An inline SVG line chart (steps on x) with a legend; points carry native tooltips."""
    width, height, left, right, top, bottom = 520, 250, 46, 14, 12, 34
    if not series:
        empty = "<p class='muted'>nothing logged (e.g. no sample was scored yet)</p>"
        return f"<figure class='chart'><figcaption>{_esc(title)}</figcaption>{empty}</figure>"
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x_lo, x_hi = min(xs), max(xs)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_range is None:
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.1 or abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    else:
        y_lo, y_hi = y_range

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f"<svg viewBox='0 0 {width} {height}' role='img' aria-label='{_esc(title)}'>"]
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{py(y):.1f}' y2='{py(y):.1f}' class='grid'/>")
        parts.append(f"<text x='{left - 6}' y='{py(y) + 4:.1f}' class='tick' text-anchor='end'>{y:.3g}</text>")
    steps = sorted(set(xs))
    stride = max(1, math.ceil(len(steps) / 10))
    for x in steps[::stride]:
        parts.append(
            f"<text x='{px(x):.1f}' y='{height - bottom + 16}' class='tick' text-anchor='middle'>{x:g}</text>"
        )
    parts.append(
        f"<text x='{(left + width - right) / 2}' y='{height - 4}' class='tick' text-anchor='middle'>step</text>"
    )
    legend = []
    for n, (label, points) in enumerate(series):
        color = _COLORS[n % len(_COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f"<polyline points='{coords}' fill='none' stroke='{color}' stroke-width='2'/>")
        for x, y in points:
            parts.append(
                f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='3.5' fill='{color}'>"
                f"<title>{_esc(label)}, step {x:g}: {y:.3g}</title></circle>"
            )
        legend.append(f"<span><i style='background:{color}'></i>{_esc(label)}</span>")
    parts.append("</svg>")
    return (
        f"<figure class='chart'><figcaption>{_esc(title)}</figcaption>{''.join(parts)}"
        f"<div class='legend'>{''.join(legend)}</div></figure>"
    )


# ----- judged samples -----


def _samples_section(records: Sequence[dict[str, Any]], logs: Sequence[dict[str, Any]]) -> str:
    if not records:
        return "<p class='muted'>No judged samples were recorded.</p>"
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_step.setdefault(int(record["step"]), []).append(record)
    metrics = {int(e["step"]): e for e in logs}
    out = []
    for step in sorted(by_step):
        entry = metrics.get(step, {})
        facts = ", ".join(
            f"{label} {_fmt(entry.get(key))}"
            for label, key in (("reward mean", "long_reward/reward/mean"), ("chosen", "long_reward/chosen_mean"),
                               ("rejected", "long_reward/rejected_mean"), ("valid-pair rate", "pairs/valid_pair_rate"),
                               ("loss", "loss"))
            if key in entry
        )  # fmt: skip
        out.append(f"<section class='step'><h3>Step {step}</h3><p class='muted'>{_esc(facts)}</p>")
        out.extend(_prompt_card(record) for record in by_step[step])
        out.append("</section>")
    return "\n".join(out)


def _prompt_card(record: dict[str, Any]) -> str:
    """A pair: chosen and rejected side by side, then all samples. No pair: why, all samples and their reasons."""
    selection, samples = record["selection"], record["samples"]
    where = f"rank {record.get('rank', 0)}, prompt {record.get('prompt', 0)}"
    paired = selection.get("skip_reason") is None and selection.get("chosen") is not None
    if paired:
        gap = (selection["chosen_reward"] or 0.0) - (selection["rejected_reward"] or 0.0)
        meta = (
            f"<span class='badge ok'>pair</span> {_esc(where)}: sample {selection['chosen']} "
            f"({_fmt(selection['chosen_reward'])}) preferred over sample {selection['rejected']} "
            f"({_fmt(selection['rejected_reward'])}), gap {_fmt(gap)}"
        )
        panels = [samples[selection["chosen"]], samples[selection["rejected"]]]
        roles = ["chosen", "rejected"]
    else:
        reason = str(selection.get("skip_reason")).replace("_", " ")
        meta = f"<span class='badge skip'>no pair</span> {_esc(where)}: {_esc(reason)}, no DPO pair from this prompt"
        panels, roles = list(samples), ["other"] * len(samples)
    meta += f"; {selection.get('num_scored', 0)} of {len(samples)} samples scored"
    body = "<div class='pair'>" + "".join(map(_sample_panel, panels, roles)) + "</div>"
    table = _samples_table(samples, selection, paired)
    return (
        f"<article class='card'><p class='meta'>{meta}</p>"
        f"<p class='question'><b>Question.</b> {_esc(record['question'])}</p>"
        + (body + table if paired else table + body)
        + "</article>"
    )


def _samples_table(samples: Sequence[dict[str, Any]], selection: dict[str, Any], paired: bool) -> str:
    dims = [d for d in DIMENSIONS if any(d in s.get("scores", {}) for s in samples)]
    head = "".join(f"<th>{_esc(d)}</th>" for d in dims)
    rows = []
    for sample in samples:
        role = {selection.get("chosen"): "chosen", selection.get("rejected"): "rejected"}.get(sample["index"], "")
        cells = "".join(f"<td>{_score_cell(sample, d)}</td>" for d in dims)
        rows.append(
            f"<tr class='{role}'><td>{sample['index']}{' (' + role + ')' if role else ''}</td>"
            f"<td><b>{_fmt(sample.get('reward'))}</b></td>{cells}"
            f"<td class='snippet'>{_esc(_clip(sample.get('response', ''), 160))}</td></tr>"
        )
    details = "".join(
        f"<details><summary>sample {s['index']}: judge's reasons</summary>{_sample_panel(s, 'other')}</details>"
        for s in samples
        if paired and s["index"] not in (selection.get("chosen"), selection.get("rejected"))
    )
    return (
        f"<details class='all'{'' if paired else ' open'}><summary>All {len(samples)} samples</summary>"
        f"<table class='samples'><tr><th>sample</th><th>reward</th>{head}<th>response</th></tr>{''.join(rows)}</table>"
        f"{details}</details>"
    )


def _score_cell(sample: dict[str, Any], dimension: str) -> str:
    score = sample.get("scores", {}).get(dimension)
    if score is not None:
        return _esc(_fmt(float(score), 1))
    status = sample.get("status", {}).get(dimension, "")
    return f"<span class='muted'>{_esc(status.replace('_', ' ') or '–')}</span>"


def _sample_panel(sample: dict[str, Any], role: str) -> str:
    label = {"chosen": "Chosen", "rejected": "Rejected"}.get(role, "Sample")
    dims = [d for d in DIMENSIONS if d in sample.get("scores", {})]
    scores = "".join(f"<tr><th>{_esc(d)}</th><td>{_score_cell(sample, d)}</td></tr>" for d in dims)
    reasons = "".join(
        f"<div class='dim'><h5>{_esc(d)}: {_score_cell(sample, d)}</h5>"
        f"{_reasons_html(sample.get('trace', {}).get(d, {}))}</div>"
        for d in dims
    )
    return (
        f"<div class='side {role}'><h4>{label}: sample {sample['index']}, reward {_fmt(sample.get('reward'))}</h4>"
        f"<pre class='response'>{_esc(_clip(sample.get('response', ''), _RESPONSE_CHARS)) or '(empty response)'}</pre>"
        f"<table class='scores'>{scores}</table><div class='reasons'><p class='label'>The judge's reasons</p>{reasons}"
        "</div></div>"
    )


def _reasons_html(trace: dict[str, Any]) -> str:
    """The judge's outputs for one dimension; the per-chunk notes extraction (shared by all samples) is folded."""
    shown, folded, unusable = [], [], 0
    for label, text, limit in dimension_reasons(trace):
        item = (
            f"<div class='reason'><span class='label'>{_esc(label)}</span><pre>{_esc(_clip(text, limit))}</pre></div>"
        )
        if label.startswith("notes extraction"):
            folded.append(item)
            unusable += label.endswith(("no verdict found", "no output"))
        else:
            shown.append(item)
    if folded:
        summary = f"notes extraction: {len(folded)} judge outputs, {unusable} unusable (shared by all samples)"
        shown.insert(0, f"<details><summary>{_esc(summary)}</summary>{''.join(folded)}</details>")
    return "".join(shown) or "<p class='muted'>no judge output</p>"


def dimension_reasons(trace: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(label, text, character limit) items that explain one dimension's score, from its judge trace."""
    items: list[tuple[str, str, int]] = []
    if trace.get("notes"):
        items.append(("notes extracted from the document", trace["notes"], _NOTES_CHARS))
    for n, call in enumerate(trace.get("extraction", [])):
        items.extend(_call_items(f"notes extraction, chunk {n + 1}", call))
    for condensed in trace.get("condensed", []):
        summary = (
            f"{condensed['tokens_before']} tokens of notes over the cap, condensed in {condensed['groups']} groups"
        )
        items.append((f"notes condensed, round {condensed['round']}", summary, 200))
    if "break" in trace:
        statements = trace.get("statements")
        if statements is None:
            items.extend(_call_items("statement breakdown", trace["break"]))
        elif not statements:
            items.append(("statements", f"no factual statements (policy: {trace.get('zero_statement_policy')})", 200))
    for n, check in enumerate(trace.get("checks", [])):
        verdict = _SUPPORT.get(check.get("value"), "unparsed") if check.get("value") is not None else "unparsed"
        outputs = check.get("judge_outputs") or [""]
        text = f"{check.get('statement', '')}\n→ {_clip(outputs[-1], _JUDGE_CHARS)}"
        items.append((f"statement {n + 1}: {verdict}", text, _JUDGE_CHARS + 400))
    if "call" in trace:
        items.extend(_call_items("verdict", trace["call"]))
    if trace.get("error"):
        items.append(("error", str(trace["error"]), 400))
    return items


def _call_items(label: str, call: dict[str, Any]) -> Iterable[tuple[str, str, int]]:
    outputs = call.get("judge_outputs") or []
    failed = call.get("error") is not None
    for n, text in enumerate(outputs):
        last = n == len(outputs) - 1
        if last and not failed:
            name = label if len(outputs) == 1 else f"{label} (try {n + 1})"
        else:
            name = f"{label}, try {n + 1} of {len(outputs)}: no verdict found"
        yield name, text, _JUDGE_CHARS
    if failed and not outputs:
        yield f"{label}: no output", str(call["error"]), 400


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
  padding: 0 16px; color: #1f2937; background: #f8fafc; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }}
h2 {{ font-size: 18px; margin-top: 28px; border-bottom: 1px solid #cbd5e1; }}
h3 {{ font-size: 16px; margin: 18px 0 2px; }} h4 {{ margin: 0 0 6px; font-size: 14px; }} h5 {{ margin: 8px 0 2px; }}
.muted {{ color: #64748b; }} code {{ background: #e2e8f0; padding: 0 3px; border-radius: 3px; }}
table.summary {{ border-collapse: collapse; margin: 8px 0; }}
table.summary th {{ text-align: left; padding: 2px 18px 2px 0; color: #475569; font-weight: 600; white-space: nowrap;
  vertical-align: top; }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 14px; }}
.chart {{ background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; margin: 0; padding: 8px 10px; }}
.chart figcaption {{ font-weight: 600; margin-bottom: 4px; }} .chart svg {{ width: 100%; height: auto; }}
.grid {{ stroke: #e2e8f0; }} .tick {{ font-size: 11px; fill: #64748b; }}
.legend span {{ margin-right: 14px; font-size: 12px; white-space: nowrap; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }}
.card {{ background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px 14px; margin: 10px 0; }}
.meta {{ margin: 0 0 6px; color: #475569; }} .question {{ margin: 4px 0 10px; font-size: 15px; }}
.badge {{ display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }}
.badge.ok {{ background: #dcfce7; color: #166534; }} .badge.skip {{ background: #fef3c7; color: #92400e; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }}
.side {{ border-radius: 6px; padding: 8px 10px; min-width: 0; }}
.side.chosen {{ background: #f0fdf4; border: 1px solid #bbf7d0; }}
.side.rejected {{ background: #fef2f2; border: 1px solid #fecaca; }}
.side.other {{ background: #f8fafc; border: 1px solid #e2e8f0; }}
pre {{ white-space: pre-wrap; word-break: break-word; margin: 0; font: 12.5px/1.4 ui-monospace, Menlo, monospace; }}
pre.response {{ background: #fff; border: 1px solid #e2e8f0; padding: 6px 8px; border-radius: 4px;
  max-height: 260px; overflow: auto; font-size: 13px; }}
table.scores {{ margin: 6px 0; border-collapse: collapse; }}
table.scores th {{ text-align: left; font-weight: 500; padding: 0 12px 0 0; color: #475569; }}
.reasons .label {{ font-size: 12px; color: #64748b; font-weight: 600; }} .reasons > p.label {{ margin: 6px 0 0; }}
.reason {{ margin: 2px 0 6px; }} .reason pre {{ background: #fff; border-left: 3px solid #cbd5e1; padding: 3px 7px;
  max-height: 180px; overflow: auto; }}
.dim h5 {{ font-size: 13px; text-transform: capitalize; }}
details.all {{ margin-top: 8px; }} details summary {{ cursor: pointer; color: #1d4ed8; }}
table.samples {{ border-collapse: collapse; width: 100%; margin: 6px 0; font-size: 13px; }}
table.samples th, table.samples td {{ border-bottom: 1px solid #e2e8f0; padding: 3px 6px; text-align: left;
  vertical-align: top; }}
table.samples tr.chosen {{ background: #f0fdf4; }} table.samples tr.rejected {{ background: #fef2f2; }}
td.snippet {{ color: #475569; }}
@media (max-width: 800px) {{ .pair {{ grid-template-columns: 1fr; }} }}
</style></head><body>"""
