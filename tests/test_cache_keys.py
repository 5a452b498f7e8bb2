"""The judge-call cache key: a cached answer is reused only when nothing that can change it changed.

Each test scores one known row (helpfulness only: one judge call) twice against scripted judges on loopback, through
the real `openai` client, with one cache file; a hit sends no request, a miss sends one.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from known_answers import GOOD, PARTLY_WRONG
from known_answers import rows as known_rows

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.judges.base import ChatRequest, Judge, JudgeConfigError
from trl_longreward.judges.cache import CONTEXT_LIMITS, cache_key, failure_key
from trl_longreward.reward.config import LongRewardConfig
from trl_longreward.reward.judge_factory import build_judge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

ROOT = "/models/judge-v1"


def serve(**options: Any) -> ScriptedOpenAIServer:
    """A scripted judge (not started) that reports `root` for its model, as vLLM does."""
    options.setdefault("root", ROOT)
    return ScriptedOpenAIServer(ScriptedLongRewardJudge(), **options)


@pytest.fixture
def servers() -> Iterator[list[ScriptedOpenAIServer]]:
    """Two replicas of the same served model (same root), and one that loaded another checkpoint."""
    running = [serve().start(), serve().start(), serve(root="/models/judge-v2").start()]
    yield running
    for server in running:
        server.stop()


def score(cache: Path, urls: str | list[str], *, response: str = GOOD, judge: dict | None = None, **config: Any):
    """Score one row with helpfulness only; returns the reward's stats."""
    options = {"max_retries": 0, **(judge or {})}
    model = options.pop("model", "scripted-judge")
    reward = LongRewardFunction(
        judge=OpenAIJudge(model, urls, **options),
        retriever="bm25",
        chunk_tokenizer="regex",
        dimensions=["helpfulness"],
        cache_path=str(cache),
        **config,
    )
    try:
        (judgement,) = reward.score(**known_rows(response))
        assert judgement.status == {"helpfulness": "ok"}, judgement.trace
        return reward.stats()
    finally:
        reward.close()


def sent(servers: list[ScriptedOpenAIServer]) -> int:
    return sum(server.num_chat_requests for server in servers)


def edited_prompts(tmp_path: Path) -> str:
    prompt_dir = tmp_path / "prompts"
    shutil.copytree(resources.files("trl_longreward.reward") / "prompts", prompt_dir)
    helpfulness = prompt_dir / "helpfulness.txt"
    helpfulness.write_text(helpfulness.read_text() + "\nBe concise.\n")
    return str(prompt_dir)


# What must miss: each changes what the judge would answer.
MISSES: dict[str, dict[str, Any]] = {
    "another model name": {"judge": {"model": "other-judge"}},
    "a seed in extra_body": {"judge": {"extra_body": {"seed": 1}}},
    "top_k in extra_body": {"judge": {"extra_body": {"top_k": 20}}},
    "thinking mode (chat template kwargs)": {
        "judge": {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    },
    "a fingerprint instead of the server's report": {"judge": {"fingerprint": "judge-v1"}},
    "another response (the messages)": {"response": PARTLY_WRONG},
    "another temperature": {"first_temperature": 0.3},
    "another output budget": {"score_max_tokens": 300},
}

# What must hit: none of these can change an answer.
HITS: dict[str, dict[str, Any]] = {
    "another replica of the same model": {"server": 1},
    "another api key": {"judge": {"api_key_env": "CACHE_KEYS_OTHER_KEY"}},
    "other limits and timeouts": {
        "judge": {"max_concurrency": 3, "timeout": 17.0, "max_retries": 4, "endpoint_cooldown": 1.0}
    },
    "the user field of extra_body": {"judge": {"extra_body": {"user": "rank-1"}}},
    "both replicas, in the other order": {"server": [1, 0]},
}


@pytest.mark.parametrize("change", list(MISSES))
def test_a_change_that_can_change_the_answer_misses(change: str, servers, tmp_path: Path) -> None:
    cache = tmp_path / "judge_cache.sqlite"
    first = score(cache, servers[0].base_url)
    assert first["judge_calls"] == 1 and sent(servers) == 1
    second = score(cache, servers[0].base_url, **MISSES[change])
    assert second["judge_calls"] == 1 and second["cache_hits"] == 0, change
    assert sent(servers) == 2


@pytest.mark.parametrize("change", list(HITS))
def test_a_change_that_cannot_change_the_answer_hits(
    change: str, servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_KEYS_OTHER_KEY", "sk-another-key")
    cache = tmp_path / "judge_cache.sqlite"
    score(cache, servers[0].base_url)
    options = dict(HITS[change])
    where = options.pop("server", 0)
    urls = servers[where].base_url if isinstance(where, int) else [servers[i].base_url for i in where]
    second = score(cache, urls, **options)
    assert second["judge_calls"] == 0 and second["cache_hits"] == 1, change
    assert sent(servers) == 1


def test_a_server_that_loaded_another_checkpoint_misses_and_a_fingerprint_overrides_it(servers, tmp_path) -> None:
    """Same name, same everything, but `/v1/models` reports another root: a miss. With `judge_fingerprint` set, the
    servers' reports are not asked for: the fingerprint alone names the model."""
    cache = tmp_path / "judge_cache.sqlite"
    score(cache, servers[0].base_url)
    assert score(cache, servers[2].base_url)["cache_hits"] == 0
    pinned = {"fingerprint": "judge-v1"}
    score(cache, servers[0].base_url, judge=pinned)
    models_asked = [server.num_model_requests for server in servers]
    assert score(cache, servers[2].base_url, judge=pinned)["cache_hits"] == 1
    assert [server.num_model_requests for server in servers] == models_asked  # nothing asked with a fingerprint
    assert sent(servers) == 3


def test_another_owner_or_a_model_name_the_server_does_not_list_miss(tmp_path: Path) -> None:
    cache = tmp_path / "judge_cache.sqlite"
    with serve() as first, serve(owned_by="sglang") as second, serve(model="renamed") as third:
        score(cache, first.base_url)
        assert score(cache, second.base_url)["cache_hits"] == 0  # another server software
        assert score(cache, third.base_url)["cache_hits"] == 0  # lists only "renamed": reports nothing
        assert score(cache, third.base_url)["cache_hits"] == 1  # ...which is itself a stable identity


def test_an_edited_prompt_template_misses(servers, tmp_path: Path) -> None:
    cache = tmp_path / "judge_cache.sqlite"
    score(cache, servers[0].base_url)
    assert score(cache, servers[0].base_url, prompt_dir=edited_prompts(tmp_path))["cache_hits"] == 0
    assert sent(servers) == 2


def test_the_server_is_asked_once_per_endpoint(servers, tmp_path: Path) -> None:
    judge = OpenAIJudge("scripted-judge", [s.base_url for s in servers[:2]], max_retries=0)
    reward = LongRewardFunction(
        judge=judge, retriever="bm25", chunk_tokenizer="regex", cache_path=str(tmp_path / "c.sqlite")
    )
    try:
        reward.score(**known_rows(GOOD, PARTLY_WRONG))
        reward.score(**known_rows("The council built a flood barrier in 1998."))
    finally:
        reward.close()
    assert reward.stats()["judge_calls"] > 10
    assert [server.num_model_requests for server in servers[:2]] == [1, 1]


def test_replicas_that_report_different_models_stop_the_run_naming_both(servers, tmp_path: Path) -> None:
    urls = [servers[0].base_url, servers[2].base_url]
    with pytest.raises(JudgeConfigError) as stopped:
        score(tmp_path / "c.sqlite", urls)
    message = str(stopped.value)
    assert servers[0].base_url in message and servers[2].base_url in message
    assert "judge-v1" in message and "judge-v2" in message and "judge_fingerprint" in message
    assert sent(servers) == 0  # stopped before any judge call
    # The same replicas with a fingerprint (the user says they are one model) are accepted.
    assert score(tmp_path / "c.sqlite", urls, judge={"fingerprint": "judge"})["judge_calls"] == 1


def test_an_unreachable_server_is_judged_uncached_and_cached_once_it_answers(tmp_path: Path) -> None:
    """While no endpoint can say what it serves, calls go to the judge without a lookup (and fail as calls do); the
    answer of a call that went through is stored once the server can be asked."""
    cache = tmp_path / "judge_cache.sqlite"
    with serve() as server:
        score(cache, server.base_url)
        server.set_down(True)  # /v1/models answers 503 too
        reward = LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
            retriever="bm25",
            chunk_tokenizer="regex",
            dimensions=["helpfulness"],
            cache_path=str(cache),
        )
        try:
            (judgement,) = reward.score(**known_rows(GOOD))
            assert judgement.status == {"helpfulness": "failed"}
            assert "503" in judgement.trace["helpfulness"]["call"]["error"]
            stats = reward.stats()
            assert stats["cache_hits"] == 0 and stats["judge_calls"] == 1 and stats["judge_errors"] == 1
            server.set_down(False)
            time.sleep(1.1)  # an endpoint that could not be asked is asked again after a second
            (judgement,) = reward.score(**known_rows(GOOD))  # asked again: the cached answer is found
            assert judgement.status == {"helpfulness": "ok"} and reward.stats()["cache_hits"] == 1
        finally:
            reward.close()


class _Local(Judge):
    """An in-process judge answering a fixed verdict."""

    model_id = "scripted-judge"

    async def agenerate(self, requests):
        return ["Score: [[7]]" for _ in requests]


def test_key_covers_backend_identity_template_request_and_attempt() -> None:
    request = ChatRequest.from_prompt("Rate it.")
    http = OpenAIJudge("scripted-judge", "http://127.0.0.1:9/v1").cache_identity()
    local = _Local().cache_identity()
    base = {"judge": http, "template": "helpfulness", "template_version": "v1", "attempt": 0}
    key = cache_key(**base, request_fingerprint=request.fingerprint())
    variants = [
        {**base, "judge": local},  # another backend kind, same model name
        {**base, "template": "logicality"},
        {**base, "template_version": "v2"},
        {**base, "attempt": 1},
    ]
    keys = {cache_key(**variant, request_fingerprint=request.fingerprint()) for variant in variants}
    keys.add(cache_key(**base, request_fingerprint=ChatRequest.from_prompt("Rate it.", top_p=0.9).fingerprint()))
    assert key not in keys and len(keys) == len(variants) + 1
    # The context window keys only stored failures: answers stay valid when it grows.
    wide = {**http, CONTEXT_LIMITS: {"max_model_len": 8192}}
    assert cache_key(**{**base, "judge": wide}, request_fingerprint=request.fingerprint()) == key
    assert failure_key(key, wide) != failure_key(key, http)


def test_the_fingerprint_and_extra_body_reach_the_judge_from_the_config() -> None:
    config = LongRewardConfig(
        judge_base_url="http://127.0.0.1:9/v1",
        judge_model="m",
        judge_fingerprint="ckpt-7",
        judge_extra_body='{"seed": 3, "user": "me"}',
    )
    judge = build_judge(config)
    assert judge.fingerprint == "ckpt-7" and judge.extra_body == {"seed": 3, "user": "me"}
    assert judge.cache_identity()["extra_body"] == {"seed": 3}
    with pytest.raises(ValueError, match="judge_extra_body"):
        LongRewardConfig(judge_extra_body="{not json")


def test_in_process_identity_covers_dtype_seed_weights_and_template(tmp_path: Path) -> None:
    import torch
    from tiny_models import tiny_llama

    from trl_longreward.judges.transformers_judge import TransformersJudge

    first, other = tiny_llama(tmp_path / "a", seed=0), tiny_llama(tmp_path / "b", seed=1)
    identity = TransformersJudge(first, device="cpu").cache_identity()
    assert TransformersJudge(first, device="cpu").cache_identity() == identity  # stable across loads
    assert identity["dtype"] == "torch.float32" and identity["device"] == "cpu" and identity["seed"] == 0
    changed = {
        "dtype": TransformersJudge(first, device="cpu", dtype=torch.bfloat16).cache_identity(),
        "seed": TransformersJudge(first, device="cpu", seed=1).cache_identity(),
        "weights": TransformersJudge(other, device="cpu").cache_identity(),
    }
    for what, other_identity in changed.items():
        assert other_identity != identity, what
    assert changed["weights"]["weights_sample"] != identity["weights_sample"]
    judge = TransformersJudge(first, device="cpu")
    judge.fingerprint = "run-3"
    assert judge.cache_identity() == {**identity, "fingerprint": "run-3"}
    # Nothing in it is a batch size or a cache setting.
    assert TransformersJudge(first, device="cpu", max_batch_size=2, prefix_cache_size=0).cache_identity() == identity


def test_identity_errors_never_fail_a_call() -> None:
    """A backend whose identity raises (a bug) still answers: the call just goes uncached."""

    class Broken(_Local):
        def cache_identity(self):
            raise RuntimeError("no identity")

    from trl_longreward.judges.cache import JudgeCallCache
    from trl_longreward.reward.runner import JudgeRunner

    runner = JudgeRunner(Broken(), JudgeCallCache(), max_attempts=1, first_temperature=0.0, retry_temperature=1.0)
    result = asyncio.run(
        runner.run(
            "helpfulness", {"question": "q", "response": "r"}, lambda t: 7.0 if "7" in t else None, max_tokens=8
        )
    )
    assert result.ok and result.value == 7.0 and runner.counters.totals()["judge_calls"] == 1
