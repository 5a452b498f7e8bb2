"""The four LongReward dimensions, one module each, joined by this registry."""

from .base import FAILED, NOT_APPLICABLE, OK, DimensionResult, DimensionScorer, PromptState, ScoringServices
from .completeness import CompletenessScorer
from .direct import HelpfulnessScorer, LogicalityScorer
from .faithfulness import FaithfulnessScorer

SCORERS: dict[str, type[DimensionScorer]] = {
    "helpfulness": HelpfulnessScorer,
    "logicality": LogicalityScorer,
    "faithfulness": FaithfulnessScorer,
    "completeness": CompletenessScorer,
}

__all__ = [
    "FAILED",
    "NOT_APPLICABLE",
    "OK",
    "SCORERS",
    "CompletenessScorer",
    "DimensionResult",
    "DimensionScorer",
    "FaithfulnessScorer",
    "HelpfulnessScorer",
    "LogicalityScorer",
    "PromptState",
    "ScoringServices",
]
