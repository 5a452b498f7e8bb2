"""trl-longreward: LongReward (arXiv 2410.21252) for TRL."""

from .judges import ChatRequest, Judge, JudgeCallCache, JudgeError, OpenAIJudge
from .reward import DIMENSIONS, Judgement, LongRewardConfig, LongRewardFunction

__version__ = "0.1.0"

__all__ = [
    "DIMENSIONS",
    "ChatRequest",
    "Judge",
    "JudgeCallCache",
    "JudgeError",
    "Judgement",
    "LongRewardConfig",
    "LongRewardFunction",
    "OpenAIJudge",
]
