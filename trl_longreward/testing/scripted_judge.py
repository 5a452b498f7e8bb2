"""A deterministic, rule-based LongReward judge for tests and benchmarks.

It reads the six judge prompts the way a real judge would (which task, and the material between the delimiter tags)
and answers in the judge output protocol with simple, predictable rules, so a test can compute the exact expected
score of a known answer. Serve it over HTTP with `ScriptedOpenAIServer(ScriptedLongRewardJudge())`.

Rules (each can be replaced by passing a callable):
- helpfulness(question, response): 2 if the response says "cannot tell" or "not in the document", else 8.
- logicality(question, response): 3 if the response contains "however, it is not", else 9.
- break(question, response): every sentence ending in "." is a statement; `No factual statements` if there is none.
- check(statement, passages): Fully supported if the statement (without its final period) occurs verbatim in a
  passage; Partially supported if at least half of its words of 4+ letters do; else No support.
- extract(question, chunk): the chunk's sentences that share a word of 5+ letters with the question, as a numbered
  list; else `No relevant information`.
- completeness(question, notes, response): 10 x the share of note items that share a word of 5+ letters with the
  response, rounded to one decimal.
- reference(question, reference, response) (the reference-based rating, not a LongReward dimension): 1 + 9 x the
  share of the reference's words of 5+ letters that occur in the response, rounded to one decimal.
- pairwise(document, question, response_a, response_b) (the direct-comparison baseline of `trl-longreward
  agreement`): the response with more sentences wins; equal counts give A, a position bias that judging both orders
  turns into a tie.

Structured outputs: a request carrying vLLM's `structured_outputs` regular expression gets an answer that matches it
(the scripted answer if it does; else, as a grammar-constrained server would, the text the judge wanted followed by
the scripted verdict); `structured_regexes` records every expression received.
"""

from __future__ import annotations

import re
from collections.abc import Callable

TASK_MARKERS = {
    "helpfulness": "how helpful the response is",
    "logicality": "logical quality of the response",
    "faithfulness_break": "list the factual statements",
    "faithfulness_check": "impartial fact checker",
    "completeness_extract": "extract from this chunk",
    "completeness_score": "how complete the response is",
    "reference_rating": "rate the assistant's answer against the reference answer",
    "pairwise_comparison": "decide which of the two responses answers the question better",
}
# A run between sentence ends that ends in "."; runs without a visible character are dropped in `sentences`. (The
# one-pattern form, [^.!?]*[^.!?\s][^.!?]*\., backtracks cubically over long runs without a ".", e.g. CJK text.)
_SENTENCE = re.compile(r"[^.!?]*\.")
_VISIBLE = re.compile(r"[^.!?\s]")


def detect_task(prompt: str) -> str:
    for task, marker in TASK_MARKERS.items():
        if marker in prompt:
            return task
    raise ValueError(f"Not a LongReward judge prompt: {prompt[:120]!r}")


def tagged(prompt: str, tag: str) -> str:
    """The material in the LAST <tag>...</tag> of the prompt (the real task comes after the examples)."""
    matches = re.findall(rf"<{tag}>\n?(.*?)\n?</{tag}>", prompt, flags=re.DOTALL)
    if not matches:
        raise ValueError(f"Prompt has no <{tag}> section.")
    return matches[-1]


def words(text: str, min_len: int) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= min_len}


def sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in _SENTENCE.findall(text) if _VISIBLE.search(s)]


def rule_helpfulness(question: str, response: str) -> float:
    lowered = response.lower()
    return 2.0 if "not in the document" in lowered or "cannot tell" in lowered else 8.0


def rule_logicality(question: str, response: str) -> float:
    return 3.0 if "however, it is not" in response.lower() else 9.0


def rule_break(question: str, response: str) -> list[str]:
    return sentences(response)


def rule_check(statement: str, passages: str) -> str:
    flat = " ".join(passages.split())
    core = statement.rstrip(".")
    if core and core in flat:
        return "Fully supported"
    key = words(statement, 4)
    if key and len(key & words(flat, 4)) >= len(key) / 2:
        return "Partially supported"
    return "No support"


def rule_extract(question: str, chunk: str) -> list[str]:
    key = words(question, 5)
    return [s for s in sentences(chunk) if words(s, 5) & key]


def rule_completeness(question: str, notes: str, response: str) -> float:
    items = re.findall(r"^\s*\d+[.)]\s+(.*)$", notes, flags=re.MULTILINE)
    if not items:
        return 10.0
    covered = sum(1 for item in items if words(item, 5) & words(response, 5))
    return round(10 * covered / len(items), 1)


def rule_pairwise(document: str, question: str, response_a: str, response_b: str) -> str:
    return "B" if len(sentences(response_b)) > len(sentences(response_a)) else "A"


def rule_reference(question: str, reference: str, response: str) -> float:
    key = words(reference, 5)
    if not key:
        return 10.0
    return round(1 + 9 * len(key & words(response, 5)) / len(key), 1)


class ScriptedLongRewardJudge:
    """A `Responder` for `ScriptedOpenAIServer`: (messages, request body) -> judge text.

    `garbage_below_temperature`: answer without any verdict while the request's temperature is below this value (tests
    the re-sampling path: the first, cold try fails and a hot re-sample succeeds). `verdict_only_when_continued`: a weak
    judge that never ends a new answer with its verdict, but completes it when its answer is continued after a verdict
    cue (a request whose last message is the assistant's, as `verdict_followup` sends). `calls` counts answers per
    task.
    """

    def __init__(
        self,
        *,
        helpfulness: Callable[[str, str], float] = rule_helpfulness,
        logicality: Callable[[str, str], float] = rule_logicality,
        break_statements: Callable[[str, str], list[str]] = rule_break,
        check: Callable[[str, str], str] = rule_check,
        extract: Callable[[str, str], list[str]] = rule_extract,
        completeness: Callable[[str, str, str], float] = rule_completeness,
        reference: Callable[[str, str, str], float] = rule_reference,
        pairwise: Callable[[str, str, str, str], str] = rule_pairwise,
        garbage_below_temperature: float | None = None,
        verdict_only_when_continued: bool = False,
    ) -> None:
        self.rules = {
            "helpfulness": helpfulness,
            "logicality": logicality,
            "faithfulness_break": break_statements,
            "faithfulness_check": check,
            "completeness_extract": extract,
            "completeness_score": completeness,
            "reference_rating": reference,
            "pairwise_comparison": pairwise,
        }
        self.structured_regexes: list[str] = []
        self.garbage_below_temperature = garbage_below_temperature
        self.verdict_only_when_continued = verdict_only_when_continued
        self.calls: dict[str, int] = dict.fromkeys(self.rules, 0)

    def __call__(self, messages: list[dict], body: dict) -> str:
        regex = (body.get("structured_outputs") or {}).get("regex")
        if regex is None:
            return self._respond(messages, body)
        self.structured_regexes.append(regex)
        text = self._respond(messages, body)
        if re.fullmatch(regex, text):
            return text
        prompt = messages[0]["content"]
        verdict = re.findall(r"\[\[[^\[\]]*\]\]", self.answer(detect_task(prompt), prompt))
        forced = f"{text}\n{verdict[-1]}" if verdict else text
        if not re.fullmatch(regex, forced):
            raise ValueError(f"The scripted answer cannot match the structured-outputs regex {regex!r}: {forced!r}")
        return forced

    def _respond(self, messages: list[dict], body: dict) -> str:
        if messages and messages[-1].get("role") == "assistant":
            return self.continuation(messages[0]["content"], messages[-1]["content"])
        prompt = messages[-1]["content"]
        task = detect_task(prompt)
        self.calls[task] += 1
        if self.verdict_only_when_continued:
            return "Let me think about this carefully. The answer has some merit."
        if (
            self.garbage_below_temperature is not None
            and body.get("temperature", 0.0) < self.garbage_below_temperature
        ):
            return "Let me think about this carefully. The answer has some merit."
        return self.answer(task, prompt)

    def continuation(self, prompt: str, partial: str) -> str:
        """The rest of the scripted answer after `partial` (the judge's text plus a verdict cue): after an opening
        `[[` the verdict and its closing brackets (`8]]`), otherwise the whole scripted answer."""
        task = detect_task(prompt)
        self.calls[task] += 1
        full = self.answer(task, prompt)
        if partial.endswith("[[") and "[[" in full:
            return full.rsplit("[[", 1)[1]
        return full

    def answer(self, task: str, prompt: str) -> str:
        rule = self.rules[task]
        if task in ("helpfulness", "logicality"):
            score = rule(tagged(prompt, "question"), tagged(prompt, "response"))
            return f"Analysis: scripted {task} judgement.\nScore: [[{score:g}]]"
        if task == "faithfulness_break":
            statements = rule(tagged(prompt, "question"), tagged(prompt, "response"))
            if not statements:
                return "No factual statements"
            return "\n".join(f"<statement>{s}</statement>" for s in statements)
        if task == "faithfulness_check":
            label = rule(tagged(prompt, "statement"), tagged(prompt, "passages"))
            return f"Analysis: compared the statement with the passages.\nVerdict: [[{label}]]"
        if task == "completeness_extract":
            items = rule(tagged(prompt, "question"), tagged(prompt, "chunk"))
            if not items:
                return "No relevant information"
            return "\n".join(f"{i}. {item}" for i, item in enumerate(items, start=1))
        if task == "pairwise_comparison":
            parts = (tagged(prompt, tag) for tag in ("document", "question", "response_a", "response_b"))
            return f"Analysis: scripted comparison.\nVerdict: [[{rule(*parts)}]]"
        if task == "reference_rating":
            rating = rule(tagged(prompt, "question"), tagged(prompt, "reference"), tagged(prompt, "response"))
            return f"Analysis: compared the answer with the reference.\nRating: [[{rating:g}]]"
        score = rule(tagged(prompt, "question"), tagged(prompt, "notes"), tagged(prompt, "response"))
        return f"Analysis: scripted completeness judgement.\nScore: [[{score:g}]]"
