"""Structured verdicts (`verdict_decoding="structured"`): the judge reasons freely, its answer ends in the verdict.

Three backends: vLLM's `structured_outputs` regular expression (over HTTP, checked on the request bodies the scripted
server receives, and in process, on a stub `vllm` module), and the transformers judge's logits processor, checked for
exactness on a random tiny Llama with the real SmolLM2 tokenizer (the worst judge there is) and on the real SmolLM2.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from pathlib import Path

import pytest

from trl_longreward import LongRewardConfig, LongRewardFunction, OpenAIJudge
from trl_longreward.judges.base import ChatRequest, VerdictConstraint
from trl_longreward.reward.parsing import parse_score, parse_support
from trl_longreward.reward.runner import SCORE_CHOICES, verdict_constraint
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge, detect_task

QUESTION = "When was the Harlow tower completed?"
CONTEXT = "The Harlow tower was completed in 1928 by the county engineers. A small museum occupies its ground floor."
ANSWER = "The Harlow tower was completed in 1928 by the county engineers."
SUPPORT = ("Fully supported", "Partially supported", "No support")


def test_verdict_decoding_is_validated_with_the_choices_named() -> None:
    assert LongRewardConfig().verdict_decoding == "free"
    with pytest.raises(ValueError, match=r"verdict_decoding='json'.*free.*structured"):
        LongRewardConfig(verdict_decoding="json")


def test_the_regex_accepts_exactly_answers_that_end_in_a_protocol_verdict() -> None:
    score = verdict_constraint("helpfulness")
    assert score.choices == SCORE_CHOICES == tuple(str(n) for n in range(11)) and score.cue == "\n\nScore: "
    pattern = score.regex()
    for text in ("Analysis.\nScore: [[10]]", "[[0]]", "It says [[3]] then\n\nScore: [[7]]"):
        assert re.fullmatch(pattern, text) and parse_score(text) is not None
    for text in ("Score: [[11]]", "Score: [[7]] and more", "Score: 7", "[[7.5]]", "[[ 7]]"):
        assert not re.fullmatch(pattern, text)
    support = verdict_constraint("faithfulness_check").regex()
    assert re.fullmatch(support, "ok\nVerdict: [[Partially supported]]")
    assert not re.fullmatch(support, "Verdict: [[Mostly supported]]")
    assert re.fullmatch(verdict_constraint("helpfulness", opened=True).regex(), "10]]")
    assert verdict_constraint("faithfulness_break") is None and verdict_constraint("completeness_extract") is None
    # Free requests keep the cache keys they always had; a constrained one is another request.
    free = ChatRequest.from_prompt("p")
    before = {"messages": [{"role": "user", "content": "p"}], "temperature": 0.0, "max_tokens": 512, "top_p": 1.0}
    payload = json.dumps(before, sort_keys=True, ensure_ascii=False).encode("utf-8")
    assert free.fingerprint() == hashlib.sha256(payload).hexdigest()
    assert ChatRequest.from_prompt("p", verdict=score).fingerprint() != free.fingerprint()


def _score(server: ScriptedOpenAIServer, **overrides) -> tuple[dict, dict]:
    judge = OpenAIJudge("scripted-judge", server.base_url, max_retries=0)
    missing = len(overrides.get("dimensions", range(4))) - 1
    reward = LongRewardFunction(
        judge=judge,
        retriever="bm25",
        chunk_tokenizer="regex",
        max_attempts=1,
        max_missing_dimensions=missing,
        **overrides,
    )
    try:
        (judgement,) = reward.score(completions=[ANSWER], context=[CONTEXT], question=[QUESTION])
        return judgement.scores, reward.call_counts()
    finally:
        reward.close()


def test_openai_requests_carry_vllm_structured_outputs_and_a_weak_judge_then_scores() -> None:
    """A judge that never writes its verdict: free decoding leaves helpfulness and logicality missing; structured
    decoding sends the verdict's regex (only on verdict calls) and a constrained server's answer ends in it."""
    weak = ScriptedLongRewardJudge(verdict_only_when_continued=True)
    with ScriptedOpenAIServer(weak) as server:
        free, _ = _score(server, dimensions=["helpfulness", "logicality"])
        assert free == {"helpfulness": None, "logicality": None}
        assert not any("structured_outputs" in body for body in server.requests)
        server.reset_counters()
        structured, counts = _score(server, dimensions=["helpfulness", "logicality"], verdict_decoding="structured")
        assert structured == {"helpfulness": 8.0, "logicality": 9.0} and counts["parse_failures"] == 0
        sent = [body["structured_outputs"] for body in server.requests]
        assert sent == [{"regex": verdict_constraint("helpfulness").regex()}] * 2
    # Statement lists and notes go out free; support checks carry the labels' regex.
    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as server:
        scores, _ = _score(server, verdict_decoding="structured")
        assert scores == {"helpfulness": 8.0, "logicality": 9.0, "faithfulness": 10.0, "completeness": 10.0}
        by_task: dict[str, set] = {}
        for body in server.requests:
            task = detect_task(body["messages"][0]["content"])
            by_task.setdefault(task, set()).add((body.get("structured_outputs") or {}).get("regex"))
        assert by_task["faithfulness_break"] == by_task["completeness_extract"] == {None}
        assert by_task["faithfulness_check"] == {verdict_constraint("faithfulness_check").regex()}
        assert by_task["completeness_score"] == by_task["helpfulness"] == {verdict_constraint("helpfulness").regex()}


def test_a_structured_follow_up_constrains_the_continuation_to_the_verdict() -> None:
    weak = ScriptedLongRewardJudge(verdict_only_when_continued=True)
    with ScriptedOpenAIServer(weak) as server:
        # The first answer comes back without a verdict only when the server ignores the grammar: emulate one.
        weak.structured_regexes.clear()
        original = weak.__call__

        def ignoring_new_turns(messages, body):
            if messages[-1]["role"] != "assistant":
                body = {k: v for k, v in body.items() if k != "structured_outputs"}
            return original(messages, body)

        server.responder = ignoring_new_turns
        scores, counts = _score(
            server, dimensions=["helpfulness"], verdict_decoding="structured", verdict_followup=True
        )
    assert scores == {"helpfulness": 8.0} and counts["verdict_followups"] == 1
    continued = [body for body in server.requests if body["messages"][-1]["role"] == "assistant"]
    assert [body["structured_outputs"]["regex"] for body in continued] == [r"(?:10|0|1|2|3|4|5|6|7|8|9)\]\]"]
    assert continued[0]["continue_final_message"] is True


def test_in_process_vllm_gets_structured_outputs_params(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl_longreward.judges.vllm_judge import VLLMJudge

    seen: list = []

    class StructuredOutputsParams:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

    class SamplingParams:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

    class LLM:
        def __init__(self, model: str, **kwargs: object) -> None:
            self.model = model

        def chat(self, conversations, params, **kwargs):
            seen.extend(params)
            output = types.SimpleNamespace(text="Fine.\nScore: [[7]]", token_ids=[1, 2, 3])
            return [types.SimpleNamespace(outputs=[output]) for _ in conversations]

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams, vllm.LLM = SamplingParams, LLM
    sampling_module = types.ModuleType("vllm.sampling_params")
    sampling_module.StructuredOutputsParams = StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_module)
    judge = VLLMJudge("stub/model")
    constraint = verdict_constraint("helpfulness")
    texts = judge.generate([ChatRequest.from_prompt("Rate.", verdict=constraint), ChatRequest.from_prompt("Free.")])
    assert texts == ["Fine.\nScore: [[7]]"] * 2
    constrained, free = seen
    assert constrained.kwargs["structured_outputs"].kwargs == {"regex": constraint.regex()}
    assert "structured_outputs" not in free.kwargs


# --- the transformers judge's logits processor --------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_judge(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_llama

    from trl_longreward.judges.transformers_judge import TransformersJudge

    return TransformersJudge(tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"), max_batch_size=64)


def test_every_constrained_answer_of_a_random_model_ends_in_a_valid_verdict(random_judge) -> None:
    """A random-weight model writes noise: every constrained row, greedy or sampled, at every budget that fits the
    verdict, ends with a verdict the strict parser reads; a continuation after `[[` is only the verdict."""
    requests, kinds = [], []
    for budget in (3, 5, 8, 13, 21, 40):
        for temperature in (0.0, 1.0):
            for template, parse in (("helpfulness", parse_score), ("faithfulness_check", parse_support)):
                constraint = verdict_constraint(template)
                requests.append(ChatRequest.from_prompt(f"Judge {budget}.", temperature=temperature,
                                                        max_tokens=budget, verdict=constraint))  # fmt: skip
                kinds.append((parse, constraint))
    opened = ChatRequest(
        messages=({"role": "user", "content": "Rate it."}, {"role": "assistant", "content": "Fine.\nScore: [["}),
        max_tokens=4,
        verdict=verdict_constraint("helpfulness", opened=True),
    )
    texts = random_judge.generate([*requests, opened])
    for request, (parse, constraint), text in zip(requests, kinds, texts, strict=False):
        if request.max_tokens < 4 and constraint.choices == SUPPORT:
            continue  # "[[Partially supported]]" needs more than 3 tokens
        assert parse(text) is not None, (request.max_tokens, request.temperature, text)
        assert re.fullmatch(constraint.regex(), text), text
    assert re.fullmatch(r"(10|[0-9])\]\]", texts[-1]), texts[-1]
    # Longer budgets leave room for free text before the verdict line.
    assert any(len(text) > len("Verdict: [[Partially supported]]") for text in texts[:-1])


def test_free_rows_in_a_constrained_batch_are_untouched(random_judge) -> None:
    free = [ChatRequest.from_prompt(f"Say something {i}.", max_tokens=12) for i in range(3)]
    alone = random_judge.generate(free)
    constrained = ChatRequest.from_prompt("Rate.", max_tokens=12, verdict=VerdictConstraint(("A", "B")))
    mixed = random_judge.generate([*free, constrained])
    assert mixed[:3] == alone
    assert re.fullmatch(r"[\s\S]*\[\[(A|B)\]\]", mixed[3])


@pytest.mark.slow
def test_the_embedded_smollm2_writes_parseable_verdicts_when_structured() -> None:
    from trl_longreward.judges.transformers_judge import TransformersJudge

    judge = TransformersJudge(max_batch_size=4)
    reward = LongRewardFunction(
        judge=judge, retriever="bm25", max_attempts=1, score_max_tokens=48, check_max_tokens=48,
        verdict_decoding="structured", dimensions=["helpfulness", "logicality"],
    )  # fmt: skip
    try:
        judgements = reward.score(completions=[ANSWER, "No idea."], context=[CONTEXT] * 2, question=[QUESTION] * 2)
        counts = reward.call_counts()
    finally:
        reward.close()
    assert counts["judge_calls"] == 4 and counts["parse_failures"] == 0
    assert all(0 <= score <= 10 for j in judgements for score in j.scores.values())
