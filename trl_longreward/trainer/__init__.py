"""Online DPO on LongReward pairs: `LongContextDPOConfig` and `LongContextDPOTrainer`."""

from .config import LongContextDPOConfig
from .outage import JudgeUnavailableError
from .trainer import LongContextDPOTrainer

__all__ = ["JudgeUnavailableError", "LongContextDPOConfig", "LongContextDPOTrainer"]
