"""Lenient verdict parsing for weak judges (`LongRewardConfig.verdict_parsing="lenient"`): a deviation from the paper.

The paper's protocol (docs/method.md section 2, `parsing.py`) reads only `[[N]]`, `[[label]]` and `<statement>` tags. Small
judges rarely copy that format: on the bundled data the demo's SmolLM2-135M wrote `[[N]]` in 2 of 64 scoring and
checking calls, and instead wrote e.g. `[Score: 6]`, `Score: [3]`, `Output [10]` or `**The score is 10**`, and listed
statements as numbered items, so that no preference pair formed. The lenient parsers read those forms too:

- A judge that used the paper's format (`[[...]]`, `<statement>...</statement>`) is read exactly as strict mode reads
  it, and strict mode's value always wins: lenient mode only reads answers that strict mode would discard.
- Scores: the LAST of `Score: N` / `Rating: N` / `Grade: N` / `Verdict: N` (also `score is N`, `score of N`,
  `**Score:** N`, `[Score: N]`), `N/10`, `N out of 10`, and `[N]` or `**N**` ending a line. Only 0-10 counts: a
  larger number, a percentage, a range (`9-10`), a scale definition (`3 = ...`), another scale (`8/100`, `4 out of
  5`), a negative number or a list marker (`[2] text`) is not a rating and is skipped, never clipped.
- Support labels: the three labels in any case, with spaces, hyphens or underscores (`FULLY-SUPPORTED`), in single
  brackets, bold or after `Verdict:` / `Label:` anywhere, or bare on the last line (not after "not"). A line naming
  two different labels lists the options and is ignored.
- Statements: unclosed `<statement>` lines, else numbered or bulleted list items of three words or more.
- Chunk notes: as in strict mode (`parse_notes` already reads any numbered list).

The injection rule still holds: only the judge's own text counts and the last match wins. Text the judge quotes
(inside double quotes, `>` block quotes, or an echoed `<response>`/`<question>`/... block) is ignored, and a verdict
defused by `neutralize` (`[ [10] ]`) is not read as `[10]`. What a judge echoes without any such mark cannot be told
apart from its own words: use strict mode with judges strong enough to follow the protocol.
"""

from __future__ import annotations

import re

from .parsing import (
    STATEMENT_PATTERN,
    SUPPORT_PATTERN,
    SUPPORT_VALUES,
    parse_notes,
    parse_score,
    parse_statements,
    parse_support,
)

# A rating number: 0-99 with optional decimals, not part of a longer number, not negative.
_NUMBER = r"(?<![\d.,\-−])(\d{1,2}(?:\.\d+)?)"
# Not followed by more digits, a percent sign, a range ("9-10"), "=" (a scale definition such as "3 = weak") or
# another scale ("8/100", "4 out of 5").
_NOT_A_RATING_AFTER = r"(?!\d|\.\d|\s*%|\s*[-–]\s*\d|\s*=|\s*(?:/|out of)\s*(?!10(?!\d|\.\d))\d)"
_GAP = r"[^\S\n]*"  # spaces on the same line
# Between a keyword and its number: colons, bold, an opening bracket ("**Score:** 7", "[Score: 6]", "Score: [7]").
_SEPARATOR = r"[ \t:=*\[(]{0,6}"
_SCORE_KEYWORD = re.compile(
    r"\b(?:score|rating|grade|verdict)s?\b"
    rf"(?:{_SEPARATOR}|{_GAP}(?:is|of|was|would be){_SEPARATOR})" + _NUMBER + _NOT_A_RATING_AFTER,
    re.IGNORECASE,
)
_OUT_OF_TEN = re.compile(_NUMBER + rf"{_GAP}(?:/|out of){_GAP}10(?!\d|\.\d)", re.IGNORECASE)
# `[N]` or `**N**` that ends its line (a bracketed number opening a line is a list marker or a citation).
_LINE_END = rf"{_GAP}[.!]?{_GAP}$"
_BRACKETED = re.compile(r"(?<!\[)(?<!\[ )\[" + _NUMBER + r"\](?! ?\])" + _LINE_END, re.MULTILINE)
_BOLD = re.compile(r"\*\*" + _NUMBER + rf"(?:{_GAP}/{_GAP}10)?\*\*" + _LINE_END, re.MULTILINE)
_SCORE_PATTERNS = (_SCORE_KEYWORD, _OUT_OF_TEN, _BRACKETED, _BOLD)

_LABEL = r"(fully|partially|no)[\s_-]*(supported|support)"
_MARKED_LABEL = re.compile(
    rf"\[{_GAP}{_LABEL}{_GAP}\]|\*\*{_GAP}{_LABEL}{_GAP}\*\*|\b(?:verdict|label){_GAP}:[^\w\n]*{_LABEL}", re.IGNORECASE
)
_BARE_LABEL = re.compile(rf"(?<!not )(?<!n't )\b{_LABEL}\b", re.IGNORECASE)

_UNCLOSED_STATEMENT = re.compile(r"<statement>(.*)$", re.IGNORECASE | re.MULTILINE)
_LIST_ITEM = re.compile(r"^[^\S\n]*(?:(?:\d+[.)]|[-*•])[^\S\n]+)+(.+)$", re.MULTILINE)  # "2. 2. text" too
_MIN_STATEMENT_WORDS = 3

_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
_BLOCK_QUOTE = re.compile(r"^[^\S\n]*>.*$", re.MULTILINE)
_ECHO_TAGS = ("response", "question", "statement", "passages", "notes", "chunk")


def _quoted_spans(text: str, echo_tags: tuple[str, ...] = _ECHO_TAGS) -> list[tuple[int, int]]:
    """Character spans of text the judge quotes rather than writes: quotes, block quotes, echoed delimiter blocks.

    An echoed block runs from `<tag>` to `</tag>`. An opening tag left open runs to the end of the text (the judge was
    still echoing when it stopped); a closing tag before any opening one covers everything before it.
    """
    spans = [m.span() for m in _QUOTED.finditer(text)] + [m.span() for m in _BLOCK_QUOTE.finditer(text)]
    for tag in echo_tags:
        opened_at: int | None = None
        for index, match in enumerate(re.finditer(rf"<(/?){tag}>", text, re.IGNORECASE)):
            if not match.group(1):
                opened_at = match.start() if opened_at is None else opened_at
            elif opened_at is not None or index == 0:
                spans.append((opened_at or 0, match.end()))
                opened_at = None
        if opened_at is not None:
            spans.append((opened_at, len(text)))
    return spans


def _outside(spans: list[tuple[int, int]], position: int) -> bool:
    return not any(start <= position < end for start, end in spans)


def parse_score_lenient(text: str) -> float | None:
    """The strict `[[N]]` if there is one, else the last rating-like number in 0-10 outside quoted text."""
    strict = parse_score(text)
    if strict is not None:
        return strict
    quoted = _quoted_spans(text)
    candidates: list[tuple[int, float]] = []
    for pattern in _SCORE_PATTERNS:
        for match in pattern.finditer(text):
            value = float(match.group(1))
            if value <= 10.0 and _outside(quoted, match.start(1)):
                candidates.append((match.start(1), value))
    return max(candidates)[1] if candidates else None


def _label_value(groups: tuple[str | None, ...]) -> float:
    words = [g for g in groups if g]
    return SUPPORT_VALUES[f"{words[0].lower()} {'supported' if words[0].lower() != 'no' else 'support'}"]


def parse_support_lenient(text: str) -> float | None:
    """The strict reading if there is a `[[...]]`, else the last marked label, else a bare label on the last line."""
    if SUPPORT_PATTERN.search(text):  # the paper's format (even an invalid `[[Maybe]]`) is read as strict mode does
        return parse_support(text)
    quoted = _quoted_spans(text)
    last_line_start = text.rstrip().rfind("\n") + 1
    found = [(m.start(), _label_value(m.groups())) for m in _MARKED_LABEL.finditer(text)]
    found += [(m.start(), _label_value(m.groups())) for m in _BARE_LABEL.finditer(text, last_line_start)]
    candidates = [(position, value) for position, value in found if _outside(quoted, position)]
    # A line that names two different labels lists the options ("[Fully supported] or [No support]"): no verdict.
    values_by_line: dict[int, set[float]] = {}
    for position, value in candidates:
        values_by_line.setdefault(text.count("\n", 0, position), set()).add(value)
    verdicts = [(p, v) for p, v in candidates if len(values_by_line[text.count("\n", 0, p)]) == 1]
    return max(verdicts)[1] if verdicts else None


def parse_statements_lenient(text: str) -> list[str] | None:
    """Strict statements (or `[]`) if any, else unclosed `<statement>` lines, else list items of 3+ words."""
    strict = parse_statements(text)
    if strict is not None or STATEMENT_PATTERN.search(text):
        return strict
    quoted = _quoted_spans(text, tuple(t for t in _ECHO_TAGS if t != "statement"))  # the output format here
    for pattern in (_UNCLOSED_STATEMENT, _LIST_ITEM):
        items = [
            " ".join(m.group(1).split())
            for m in pattern.finditer(text)
            if _outside(quoted, m.start(1)) and len(m.group(1).split()) >= _MIN_STATEMENT_WORDS
        ]
        if items:
            return items
    return None


def parse_notes_lenient(text: str) -> str | None:
    """Chunk notes are read as in strict mode: `parse_notes` already accepts any numbered list after a preamble."""
    return parse_notes(text)
