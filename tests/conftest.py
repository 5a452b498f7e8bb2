"""Shared fixtures: a scripted LongReward judge served over real HTTP on loopback."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl_longreward import LongRewardFunction, OpenAIJudge  # noqa: E402
from trl_longreward.testing.openai_server import ScriptedOpenAIServer  # noqa: E402
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge  # noqa: E402


@pytest.fixture
def script() -> ScriptedLongRewardJudge:
    return ScriptedLongRewardJudge()


@pytest.fixture
def server(script):
    with ScriptedOpenAIServer(script) as running:
        yield running


@pytest.fixture
def make_reward(server):
    """Build a LongRewardFunction against the scripted server; closes every one it built."""
    built: list[LongRewardFunction] = []

    def factory(**overrides) -> LongRewardFunction:
        judge = OpenAIJudge(
            "scripted-judge",
            server.base_url,
            max_concurrency=overrides.pop("max_concurrency", 16),
            max_retries=overrides.pop("max_retries", 2),
        )
        overrides.setdefault("retriever", "bm25")
        overrides.setdefault("chunk_tokenizer", "regex")
        reward = LongRewardFunction(judge=judge, **overrides)
        built.append(reward)
        return reward

    yield factory
    for reward in built:
        reward.close()
