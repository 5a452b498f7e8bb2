"""Structured verdicts for the in-process transformers judge: the judge reasons freely, its answer ends in the verdict.

`VerdictLogitsProcessor` reads each row's `ChatRequest.verdict` (a `VerdictConstraint`) and, at every decoding step:

1. the answer already ends with `[[choice]]`: only end-of-sequence is allowed (the answer ends at its verdict);
2. the answer has an open `[[` whose text since is the start of some `choice]]` (the judge began its verdict): only
   tokens that continue it towards a `choice]]` are allowed;
3. the row's budget is nearly spent (the tokens left are just enough for the longest `cue[[choice]]`): the verdict
   line `cue[[choice]]` is forced, the judge choosing which choice (`cue` is the prompt's own, e.g. "Score: "); a
   budget too small for the cue gets the bare `[[choice]]` (a verdict needs about 3 tokens at least);
4. otherwise the judge writes freely, except that it cannot end the answer (end-of-sequence is masked).

Exact by construction: a forced token is allowed only if the text stays a prefix of a target that can still be
finished within the row's budget (the fewest tokens each rest needs is worked out from the vocabulary's pieces), so
every answer ends with a verdict the strict parser reads. A row without a constraint is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import VerdictConstraint

__all__ = ["TokenPieces", "VerdictLogitsProcessor"]

_UNREACHABLE = 1 << 30


class TokenPieces:
    """Every ordinary token's text as it reads after other text (decoded after an anchor token, so a SentencePiece
    token keeps its leading space), and the fewest tokens that spell a string. Built once per tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        special = set(tokenizer.all_special_ids)
        anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
        lead = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        texts = tokenizer.batch_decode(
            [[anchor, i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        self.pieces: dict[int, str] = {
            i: text[len(lead) :] for i, text in zip(ids, texts, strict=True) if text.startswith(lead) and text != lead
        }
        self._by_alphabet: dict[frozenset[str], dict[str, list[tuple[str, int]]]] = {}
        self._costs: dict[str, list[int]] = {}

    def spelling(self, alphabet: frozenset[str]) -> dict[str, list[tuple[str, int]]]:
        """The tokens made only of `alphabet`'s characters, by first character: the only ones a target can use."""
        table = self._by_alphabet.get(alphabet)
        if table is None:
            table = {}
            for token, piece in self.pieces.items():
                if alphabet.issuperset(piece):
                    table.setdefault(piece[0], []).append((piece, token))
            self._by_alphabet[alphabet] = table
        return table

    def costs(self, target: str, table: dict[str, list[tuple[str, int]]]) -> list[int]:
        """`costs[i]`: the fewest tokens that spell `target[i:]` (`_UNREACHABLE` if none does)."""
        found = self._costs.get(target)
        if found is None:
            found = [_UNREACHABLE] * (len(target) + 1)
            found[-1] = 0
            for i in range(len(target) - 1, -1, -1):
                for piece, _ in table.get(target[i], ()):
                    if target.startswith(piece, i):
                        found[i] = min(found[i], 1 + found[i + len(piece)])
            self._costs[target] = found
        return found


class _Row:
    """One constrained row: its verdict choices, its targets and what is known about where forcing began."""

    def __init__(self, constraint: VerdictConstraint, budget: int, pieces: TokenPieces) -> None:
        self.constraint = constraint
        self.budget = budget
        self.closings = [f"{choice}]]" for choice in constraint.choices]
        self.lines = [f"{constraint.cue}[[{choice}]]" for choice in constraint.choices]
        self.verdicts = [f"[[{choice}]]" for choice in constraint.choices]
        alphabet = frozenset("".join(self.lines))
        self.table = pieces.spelling(alphabet)
        self.pieces = pieces
        # The tokens the longest forced verdict line needs: forcing starts when no more are left.
        self.reserve = max(pieces.costs(line, self.table)[0] for line in self.lines)
        self.forced_from: int | None = None  # where in the text the forced verdict line began


class VerdictLogitsProcessor:
    """A transformers `LogitsProcessor` for one `generate` call over left-padded rows (see the module docstring).

    Args:
        tokenizer: the judge's tokenizer (decodes each row's answer so far).
        pieces: the tokenizer's `TokenPieces`.
        constraints: one per row (None: that row is free).
        budgets: each row's `max_tokens`.
        prompt_width: the padded prompt length (generated tokens start there).
        eos_ids: the end-of-sequence ids.
    """

    def __init__(
        self,
        tokenizer: Any,
        pieces: TokenPieces,
        constraints: Sequence[VerdictConstraint | None],
        budgets: Sequence[int],
        prompt_width: int,
        eos_ids: set[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.eos_ids = sorted(eos_ids)
        self.rows = [
            None if constraint is None else _Row(constraint, budget, pieces)
            for constraint, budget in zip(constraints, budgets, strict=True)
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :].tolist()
        for index, row in enumerate(self.rows):
            if row is None:
                continue
            allowed = self._allowed(row, generated[index])
            if allowed is None:  # free text, but the answer cannot end here
                if self.eos_ids and not torch.isinf(scores[index]).all():
                    masked = scores[index].clone()
                    masked[self.eos_ids] = float("-inf")
                    if not torch.isinf(masked).all():
                        scores[index] = masked
                continue
            keep = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
            keep[allowed] = True
            values = scores[index].masked_fill(~keep, float("-inf"))
            if torch.isinf(values[keep]).all():  # a sampling filter removed every allowed token: choose among them
                values = torch.where(keep, torch.zeros_like(values), values)
            scores[index] = values
        return scores

    def _allowed(self, row: _Row, ids: list[int]) -> list[int] | None:
        """The tokens `row` may take next (rules 1-3), or None for free text (rule 4)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if row.constraint.opened:
            text = "[[" + text  # the continued message ends with the opening brackets
        remaining = row.budget - len(ids)
        if any(text.endswith(verdict) for verdict in row.verdicts):
            return self.eos_ids or None  # rule 1
        start = text.rfind("[[")
        if start >= 0 and "]]" not in text[start + 2 :]:
            partial = text[start + 2 :]
            if any(closing.startswith(partial) for closing in row.closings):
                found = self._continuations(row, row.closings, partial, remaining)  # rule 2
                if found:
                    return found
        if row.forced_from is None and remaining <= row.reserve:
            row.forced_from = len(text)
        if row.forced_from is not None:
            written = text[row.forced_from :]
            # Rule 3; a budget too small for the cue gets the bare verdict.
            found = self._continuations(row, row.lines, written, remaining) or self._continuations(
                row, row.verdicts, written, remaining
            )
            if found:
                return found
        return None  # rule 4

    @staticmethod
    def _continuations(row: _Row, targets: list[str], written: str, remaining: int) -> list[int]:
        """Tokens that extend `written` along some target that can still be finished in `remaining` tokens."""
        allowed: set[int] = set()
        position = len(written)
        for target in targets:
            if len(target) <= position or not target.startswith(written):
                continue
            costs = row.pieces.costs(target, row.table)
            for piece, token in row.table.get(target[position], ()):
                end = position + len(piece)
                if target.startswith(piece, position) and 1 + costs[end] <= remaining:
                    allowed.add(token)
        return sorted(allowed)
