"""Shared fixtures: a scripted LongReward judge served over real HTTP on loopback."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from trl_longreward import LongRewardFunction, OpenAIJudge  # noqa: E402
from trl_longreward.testing.openai_server import ScriptedOpenAIServer  # noqa: E402
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge  # noqa: E402


@pytest.fixture(scope="module")
def recipe():
    """The training command's module, `trl_longreward.commands.dpo` (what `recipes/dpo_longreward.py` runs; importing
    it runs nothing; it may set OMP_WAIT_POLICY, restored afterwards)."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        from trl_longreward.commands import dpo

        yield dpo
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved


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


# Test files that take minutes, longest first. `.ci/test` runs files on two xdist workers, one file per worker at a
# time, in collection order (`--no-loadscope-reorder`): starting the long files first keeps both workers busy to the
# end, instead of one long file running alone at the tail while the other worker idles. The order within a file
# and of all other files is kept (a stable sort).
LONG_FILES_FIRST = (
    "test_engines.py",
    "test_epoch_coverage.py",
    "test_recipe.py",
    "test_ddp_uneven.py",
    "test_sequence_parallel.py",
    "test_async_judging.py",
    "test_reliability.py",
    "test_transformers_serve.py",
    "test_prompt_once_matrix.py",
    "test_trainer.py",
    "test_distributed.py",
    "test_reward_inprocess.py",
    "test_judge_counts_over_ranks.py",
    "test_callback.py",
    "test_local_judges.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
