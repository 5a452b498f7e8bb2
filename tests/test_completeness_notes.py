"""Completeness notes longer than the judge's window: condensed by the extraction prompt, never refused.

A scripted judge over real HTTP: the document has 240 relevant sentences, so its chunk notes (one numbered item per
sentence) are far longer than the judge's 3000-token window; asked about notes (a chunk that holds position labels),
the judge condenses them into one item, as a real judge summarises.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from transformers import HfArgumentParser

from trl_longreward import LongRewardConfig, LongRewardFunction
from trl_longreward.judges import OpenAIJudge
from trl_longreward.report import dimension_reasons
from trl_longreward.reward.dimensions.completeness import NotesBlock, group_blocks, position_label, render_notes
from trl_longreward.reward.judge_factory import build_judge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge, rule_extract, sentences

QUESTION = "What did the inspections of the flood barrier find?"
DOCUMENT = " ".join(f"Inspection {i} of the flood barrier found crack number {i}." for i in range(240))
RESPONSE = "Every inspection of the flood barrier found a crack."
WINDOW = 3000


def condensing_extract(question: str, chunk: str) -> list[str]:
    """Document chunks: every relevant sentence. Notes (labelled blocks): one item naming the inspections they hold."""
    if "[Relevant information from" not in chunk:
        return rule_extract(question, chunk)
    numbers = [int(n) for n in re.findall(r"Inspection (\d+)", chunk)] + [
        int(n) for pair in re.findall(r"Inspections (\d+)-(\d+)", chunk) for n in pair
    ]
    return [f"Inspections {min(numbers)}-{max(numbers)} of the flood barrier found cracks."]


def reward_for(server: ScriptedOpenAIServer, context_window: int | None = None, **options) -> LongRewardFunction:
    judge = OpenAIJudge("scripted-judge", server.base_url, max_retries=0, context_window=context_window)
    return LongRewardFunction(
        judge=judge,
        retriever="bm25",
        chunk_tokenizer="regex",
        dimensions=["completeness"],
        completeness_chunk_tokens=256,
        **options,
    )


def test_notes_are_grouped_in_document_order_and_labelled_with_their_span() -> None:
    blocks = [NotesBlock(0, 100, "1. a"), NotesBlock(100, 200, "1. b"), NotesBlock(300, 400, "1. c")]
    assert group_blocks(blocks, [60, 50, 60], budget=120) == [blocks[:2], blocks[2:]]
    assert group_blocks(blocks, [500, 10, 10], budget=120) == [blocks[:1], blocks[1:]]  # too big: a group alone
    rendered = render_notes(blocks[1:], total_tokens=400)
    assert rendered.split("\n\n") == [
        f"{position_label(100, 200, 400)}\n1. b",
        f"{position_label(300, 400, 400)}\n1. c",
    ]
    assert position_label(100, 200, 400) == "[Relevant information from 25%-50% of the document]"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "cap", [{"completeness_max_notes_tokens": 1500}, {"context_window": WINDOW}], ids=["set-cap", "judge-window"]
)
def test_notes_over_the_cap_are_condensed_so_the_scoring_call_fits_the_window(tmp_path, cap: dict) -> None:
    """The cap is set (1500 tokens), or follows from the judge's known window (3000 -> at most 1500 of notes)."""
    judge = ScriptedLongRewardJudge(extract=condensing_extract)
    with ScriptedOpenAIServer(judge, max_context_tokens=WINDOW) as server:
        # The paper's way (no cap): the notes do not fit the window, the judge refuses the scoring call.
        uncapped = reward_for(server, completeness_max_notes_tokens=0)
        (refused,) = uncapped.score(prompts=None, completions=[RESPONSE], context=[DOCUMENT], question=[QUESTION])
        uncapped.close()
        refusals = Counter(entry["outcome"] for entry in server.request_log)["too_long"]
        server.reset_counters()

        cache = str(tmp_path / "judge_cache.sqlite")
        capped = reward_for(server, cache_path=cache, **cap)
        (judgement,) = capped.score(prompts=None, completions=[RESPONSE], context=[DOCUMENT], question=[QUESTION])
        capped.close()
        outcomes = Counter(entry["outcome"] for entry in server.request_log)
        scoring_prompt = server.requests[-1]["messages"][-1]["content"]
        server.reset_counters()

        again = reward_for(server, cache_path=cache, **cap)
        (rerun,) = again.score(prompts=None, completions=[RESPONSE], context=[DOCUMENT], question=[QUESTION])
        again.close()
        rerun_requests = server.num_chat_requests

    assert refused.scores["completeness"] is None and refusals == 1
    assert "maximum context length" in str(refused.trace["completeness"])

    trace = judgement.trace["completeness"]
    num_chunks = trace["num_chunks"]
    (condensed,) = trace["condensed"]  # one round was enough
    assert condensed["tokens_before"] > 1500 and condensed["groups"] >= 2
    # Every call fitted: one extraction per chunk, one per group of notes, one scoring call.
    assert outcomes == {"answered": num_chunks + condensed["groups"] + 1}
    assert judgement.scores["completeness"] == 10.0  # the response covers every condensed item
    notes = trace["notes"]
    assert notes in scoring_prompt
    items = re.findall(r"Inspections (\d+)-(\d+)", notes)
    assert len(items) == condensed["groups"]
    # The condensed items cover the 240 inspections in document order, without overlap; the one sentence that a
    # chunk boundary cuts in two ("Inspection 23 of the flood | barrier found ...") is the only gap between groups.
    spans = [(int(a), int(b)) for a, b in items]
    assert spans[0][0] == 0 and spans[-1][1] == 239
    assert all(nxt[0] - prev[1] in (1, 2) for prev, nxt in zip(spans, spans[1:], strict=False))
    labels = re.findall(r"from (\d+)%-(\d+)% of the document", notes)
    assert labels[0][0] == "0" and labels[-1][1] == "100"
    # The report says why the notes differ from the document's chunks.
    reasons = dict((label, text) for label, text, _ in dimension_reasons(trace))
    assert reasons["notes condensed, round 1"].endswith(f"condensed in {condensed['groups']} groups")
    # A rerun on the same cache pays for nothing and gives the same score.
    assert rerun_requests == 0 and rerun.scores == judgement.scores


@pytest.mark.timeout(300)
def test_notes_that_do_not_shrink_make_completeness_missing_with_the_reason() -> None:
    verbose = ScriptedLongRewardJudge(extract=lambda q, chunk: [*rule_extract(q, chunk), *sentences(chunk)[:1]])
    with ScriptedOpenAIServer(verbose) as server:
        reward = reward_for(server, completeness_max_notes_tokens=1500)
        (judgement,) = reward.score(prompts=None, completions=[RESPONSE], context=[DOCUMENT], question=[QUESTION])
        reward.close()
        extract_calls = sum("<chunk>" in str(body) for body in server.requests)
    trace = judgement.trace["completeness"]
    assert judgement.scores["completeness"] is None and judgement.status["completeness"] == "failed"
    assert "completeness_max_notes_tokens=1500" in trace["error"]
    # It stopped as soon as a round did not shorten the notes: the chunks plus one round of groups, no more.
    (only_round,) = trace["condensed"]
    assert "after 1 condensing rounds" in trace["error"] and only_round["groups"] >= 2
    assert extract_calls == trace["num_chunks"] + sum(r["groups"] for r in trace["condensed"])


def test_the_cap_and_the_window_are_validated() -> None:
    with pytest.raises(ValueError, match=r"completeness_max_notes_tokens must be >= 1, or 0 \(or None\)"):
        LongRewardConfig(completeness_max_notes_tokens=-1)
    # On the command line, where an int option cannot be None, 0 turns condensing off.
    parser = HfArgumentParser(LongRewardConfig)
    (config,) = parser.parse_args_into_dataclasses(["--completeness_max_notes_tokens", "0"])
    assert config.completeness_max_notes_tokens == 0
    with pytest.raises(ValueError, match="judge_context_window must be >= 1"):
        LongRewardConfig(judge_context_window=-5)
    assert (
        build_judge(
            LongRewardConfig(judge_base_url="http://127.0.0.1:1/v1", judge_model="m", judge_context_window=8192)
        ).context_window
        == 8192
    )
