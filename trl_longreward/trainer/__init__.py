"""Online DPO on LongReward pairs: config, trainer, pair selection, middle truncation."""

from .config import LongContextDPOConfig
from .pairs import PairSelection, select_best_worst
from .trainer import LongContextDPOTrainer
from .truncation import fit_prompt, truncate_context_middle

__all__ = [
    "LongContextDPOConfig",
    "LongContextDPOTrainer",
    "PairSelection",
    "fit_prompt",
    "select_best_worst",
    "truncate_context_middle",
]
