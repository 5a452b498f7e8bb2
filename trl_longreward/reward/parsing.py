"""Parsers for the judge output protocol (docs/method.md section 2).

Every parser returns `None` when the judge's text does not follow the protocol; the caller then re-samples. Only the
LAST verdict in the judge's text counts: the judge writes its analysis first and its verdict at the end, and a verdict
quoted from the judged response (an injection attempt) comes earlier than the judge's own.

`verdicts.verdict_parsers(mode)` gives the parser set a reward uses: these strict ones (the paper), or the lenient
ones for weak judges (`lenient_parsing.py`, a documented deviation).
"""

from __future__ import annotations

import re

SCORE_PATTERN = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
SUPPORT_PATTERN = re.compile(r"\[\[([ /a-zA-Z]+)\]\]")
STATEMENT_PATTERN = re.compile(r"<statement>(.*?)</statement>", re.DOTALL | re.IGNORECASE)
NUMBERED_ITEM_PATTERN = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)

SUPPORT_VALUES = {"fully supported": 1.0, "partially supported": 0.5, "no support": 0.0}
NO_STATEMENTS = "no factual statements"
NO_RELEVANT_INFORMATION = "no relevant information"


def _final_line_is(text: str, phrase: str) -> bool:
    """Whether the last non-empty line is exactly `phrase` (case, surrounding punctuation and markup ignored).

    Stricter than a substring test: a judge that echoes the instructions ("... output exactly No factual statements")
    or writes "there are no factual statements that are wrong, but ..." has not given the verdict.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and lines[-1].strip(" \t.*_`'\"").lower() == phrase


def parse_score(text: str) -> float | None:
    """The last `[[N]]` in `text`, clipped to [0, 10]; None if there is none."""
    matches = SCORE_PATTERN.findall(text)
    if not matches:
        return None
    return min(max(float(matches[-1]), 0.0), 10.0)


def parse_support(text: str) -> float | None:
    """The last `[[label]]` as 1 / 0.5 / 0; None if it is missing or not one of the three labels."""
    matches = SUPPORT_PATTERN.findall(text)
    if not matches:
        return None
    return SUPPORT_VALUES.get(" ".join(matches[-1].lower().split()))


def parse_statements(text: str) -> list[str] | None:
    """The `<statement>` items in order (empty ones dropped), `[]` for an explicit `No factual statements`, else None."""
    statements = [" ".join(s.split()) for s in STATEMENT_PATTERN.findall(text)]
    statements = [s for s in statements if s]
    if statements:
        return statements
    if _final_line_is(text, NO_STATEMENTS):
        return []
    return None


def parse_notes(text: str) -> str | None:
    """A chunk's relevant-information notes: the numbered list, `""` for `No relevant information`, else None.

    Text before the first numbered item (a preamble) is dropped. An answer that has numbered items wins over a stray
    "no relevant information" phrase inside it.
    """
    first = NUMBERED_ITEM_PATTERN.search(text)
    if first is not None:
        return text[first.start() :].strip()
    if _final_line_is(text, NO_RELEVANT_INFORMATION):
        return ""
    return None
