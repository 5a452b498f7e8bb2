"""trl-longreward: LongReward (arXiv 2410.21252) for TRL."""

from .judges import ChatRequest, Judge, JudgeCallCache, JudgeError, OpenAIJudge
from .reward import DIMENSIONS, Judgement, LongRewardConfig, LongRewardFunction

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer pulls in trl/transformers training code: import it only when asked for.
    if name in ("LongContextDPOConfig", "LongContextDPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'trl_longreward' has no attribute {name!r}")


__all__ = [
    "DIMENSIONS",
    "ChatRequest",
    "Judge",
    "JudgeCallCache",
    "JudgeError",
    "LongContextDPOConfig",
    "LongContextDPOTrainer",
    "Judgement",
    "LongRewardConfig",
    "LongRewardFunction",
    "OpenAIJudge",
]
