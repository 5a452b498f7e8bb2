"""The `verdict_parsing` modes: which parsers read a judge's scores, support labels, statements and chunk notes.

`strict` is the paper's protocol (`parsing.py`); `lenient` adds the forms weak judges write instead
(`lenient_parsing.py`, a documented deviation). Both modules only define parsers; this registry joins them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .lenient_parsing import (
    parse_notes_lenient,
    parse_score_lenient,
    parse_statements_lenient,
    parse_support_lenient,
)
from .parsing import parse_notes, parse_score, parse_statements, parse_support

VERDICT_PARSING_MODES = ("strict", "lenient")


@dataclass(frozen=True)
class VerdictParsers:
    """The parsers of one `verdict_parsing` mode: 0-10 scores, support labels, statements and chunk notes."""

    score: Callable[[str], float | None]
    support: Callable[[str], float | None]
    statements: Callable[[str], list[str] | None]
    notes: Callable[[str], str | None]


STRICT_PARSERS = VerdictParsers(
    score=parse_score, support=parse_support, statements=parse_statements, notes=parse_notes
)
LENIENT_PARSERS = VerdictParsers(
    score=parse_score_lenient,
    support=parse_support_lenient,
    statements=parse_statements_lenient,
    notes=parse_notes_lenient,
)
_MODES = {"strict": STRICT_PARSERS, "lenient": LENIENT_PARSERS}


def verdict_parsers(mode: str = "strict") -> VerdictParsers:
    """`"strict"`: the paper's protocol; `"lenient"`: it plus the forms weak judges write instead."""
    try:
        return _MODES[mode]
    except KeyError:
        raise ValueError(f"verdict_parsing={mode!r}: use strict or lenient.") from None
