"""Judge prompt templates: package data files under `reward/prompts/`, versioned by their content hash."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

TEMPLATE_NAMES = (
    "helpfulness",
    "logicality",
    "faithfulness_break",
    "faithfulness_check",
    "completeness_extract",
    "completeness_score",
)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """A judge prompt with `{name}` placeholders.

    `version` is a hash of the text, so editing a prompt changes every cache key built from it and a run never reuses
    answers to an older prompt.
    """

    name: str
    text: str
    placeholders: frozenset[str] = field(init=False)
    version: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "placeholders", frozenset(_PLACEHOLDER.findall(self.text)))
        object.__setattr__(self, "version", hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12])

    def render(self, **values: str) -> str:
        """Fill the placeholders in ONE pass: text substituted in (a response, a document) is never re-expanded."""
        missing = self.placeholders - values.keys()
        if missing:
            raise KeyError(f"Prompt {self.name!r} needs values for {sorted(missing)}.")
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), self.text)


@cache
def load_template(name: str, directory: str | None = None) -> PromptTemplate:
    """Load a template by name from the package data, or from `directory` (a user's own prompt set)."""
    if directory is not None:
        path = Path(directory) / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"Prompt directory {directory!r} has no {name}.txt (needs: {TEMPLATE_NAMES}).")
        text = path.read_text(encoding="utf-8")
    else:
        text = resources.files("trl_longreward.reward").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    return PromptTemplate(name=name, text=text)
