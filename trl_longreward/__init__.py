"""trl-longreward: LongReward (arXiv 2410.21252) for TRL."""

from .judges import ChatRequest, Judge, JudgeCallCache, JudgeError, OpenAIJudge
from .reward import DIMENSIONS, Judgement, LongRewardConfig, LongRewardFunction

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer and the callback pull in trl/transformers training code: import them only when asked for.
    if name in ("LongContextDPOConfig", "LongContextDPOTrainer", "JudgeUnavailableError"):
        from . import trainer

        return getattr(trainer, name)
    if name == "LongRewardCallback":
        from .callback import LongRewardCallback

        return LongRewardCallback
    raise AttributeError(f"module 'trl_longreward' has no attribute {name!r}")


__all__ = [
    "DIMENSIONS",
    "ChatRequest",
    "Judge",
    "JudgeCallCache",
    "JudgeError",
    "JudgeUnavailableError",
    "LongContextDPOConfig",
    "LongContextDPOTrainer",
    "LongRewardCallback",
    "Judgement",
    "LongRewardConfig",
    "LongRewardFunction",
    "OpenAIJudge",
]
