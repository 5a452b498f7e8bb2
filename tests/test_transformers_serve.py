"""LongReward against a real OpenAI-compatible server: `transformers serve` with SmolLM2-135M-Instruct on the CPU.

`transformers serve MODEL_DIR` is pinned to that model: a request must name it exactly as given on the command line
(`str(model_dir)`), any other `model` is answered 400 ("Server is pinned to ..."); responses report it as
`MODEL_DIR@main`. SmolLM2-135M is a weak judge that often ignores the `[[N]]` protocol, so these tests check the
pipeline's behaviour over real HTTP (ranges, statuses, counters, cache reuse), not the quality of its verdicts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from servers import ServerProcess, start_transformers_serve, stop_process

from trl_longreward import DIMENSIONS, Judgement, LongRewardFunction, OpenAIJudge

pytestmark = pytest.mark.slow

DOCUMENT = """\
The Harbor Lighthouse Restoration Project: Final Report of the Maritime Heritage Committee

Background. The Harbor Lighthouse stands on a granite outcrop at the northern entrance of Kessel Bay. It was built in
1874 by the engineer Margaret Hollis, who designed a conical tower of local granite 31 metres tall. For more than a
century the light guided fishing boats and cargo ships past the Kessel reefs, which had claimed eleven vessels in the
two decades before the tower was lit. The light was automated in 1962 and the last keeper, Tomas Brenner, left the
island that year. After automation the keeper's cottage was abandoned and the tower received only minimal maintenance.

Condition survey. In 2016 the committee commissioned a condition survey from the engineering firm Aldous and Pike. The
survey found three serious problems. First, salt water had entered the mortar joints of the lower tower and the outer
granite blocks had begun to crack during winter frosts. Second, the cast-iron lantern room at the top of the tower was
badly corroded, and two of its twelve glass panes were broken. Third, the spiral staircase had lost several of its
iron treads, which made the tower unsafe for visitors and for maintenance crews. The survey estimated that without
repairs the lantern room could collapse within ten years.

Funding. The committee estimated the total cost of the restoration at 2.4 million euros. The national heritage fund
agreed to pay 1.5 million euros, on the condition that the tower would be opened to the public after the works. The
regional government contributed 600,000 euros, and the remaining 300,000 euros came from a public fundraising campaign
led by the Kessel Bay Historical Society. The campaign reached its target in eighteen months, helped by a concert
series held in the harbor every summer. Local businesses donated a further 45,000 euros in materials.

The works. Restoration began in March 2019 and was carried out in three phases. In the first phase, masons removed the
damaged mortar from the lower tower and repointed the joints with a lime mortar that lets moisture escape. Fourteen
cracked granite blocks were replaced with stone from the original quarry at Dunmore, which had to be reopened for a few
weeks for this purpose. In the second phase, the lantern room was lifted off the tower by crane, taken to a workshop in
the port town of Ashby, repaired and repainted, and then returned by barge. All twelve glass panes were replaced with
laminated glass. In the third phase, the missing stair treads were recast from a surviving original, and a steel
handrail was added for safety.

Delays. The project was planned to finish in September 2020 but was completed in June 2021. The report gives three
main reasons for the delay. The reopening of the Dunmore quarry needed a new environmental permit, which took five
months to obtain. Storms in the winter of 2019 stopped all work on the island for seven weeks, because the barge could
not land. Finally, the workshop in Ashby found that the iron frame of the lantern room was more corroded than the
survey had shown, and four of its structural ribs had to be remade by hand.

The light. The original Fresnel lens, made in Paris in 1873, was cleaned and kept in place. The old halogen lamp was
replaced by an LED lamp that uses about one tenth of the electricity. The light still flashes white twice every
fifteen seconds and is visible from about 18 nautical miles in clear weather.

Opening to the public. The tower opened to visitors on 14 July 2021. Visitors reach the island by a small ferry from
Kessel harbor that runs four times a day from May to October. Groups of at most fifteen people may climb the staircase
at one time. In its first season the tower received 21,300 visitors, well above the 12,000 the committee had expected.
The former keeper's cottage became a small museum about the history of the light.

Outlook. The committee recommends an inspection of the mortar every five years and a repainting of the lantern room
every eight years. It also proposes a small jetty so that the ferry can land in rougher weather, at a cost of about
350,000 euros; funding for the jetty has not yet been found.
"""
QUESTION = "According to the report, why was the restoration of the lighthouse delayed?"
ANSWERS = [
    "The restoration finished in June 2021 instead of September 2020. The Dunmore quarry needed a new environmental "
    "permit, which took five months, and storms in the winter of 2019 stopped work for seven weeks.",
    "The restoration was delayed because the architect Margaret Hollis fell ill and the ferry company went bankrupt.",
]
# Judge budgets sized for a 135M model on two CPU cores: a call costs a ~1,000-token prefill (the judge prompts carry
# worked examples, ~1.5 s) plus ~70 ms per generated token, so the run time is set by the number of calls and their
# output budgets. About 16 calls, 1.5-3 minutes on an otherwise idle machine.
BUDGETS: dict[str, Any] = {
    "retriever": "bm25",
    "max_attempts": 2,
    "completeness_chunk_tokens": 512,
    "faithfulness_chunk_tokens": 64,
    "faithfulness_top_k": 3,
    "score_max_tokens": 48,
    "break_max_tokens": 64,
    "check_max_tokens": 32,
    "extract_max_tokens": 64,
    "max_statements": 2,
    "max_missing_dimensions": 3,
    # SmolLM2 behind `transformers serve` rarely writes the paper's [[N]]: read the forms it writes instead
    "verdict_parsing": "lenient",
}
STATUSES = {"ok", "failed", "not_applicable"}
_POST_CHAT = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})')


@dataclass
class Served:
    """A running `transformers serve` and the model name its requests must use."""

    process: ServerProcess
    base_url: str
    model: str

    def chat_posts(self, at_least: int = 0, wait: float = 10.0) -> list[int]:
        """HTTP status of every chat completion the server logged (uvicorn access log); waits up to `wait` seconds
        for `at_least` of them, as a line is written just after its response went out."""
        deadline = time.monotonic() + wait
        while True:
            codes = [int(code) for code in _POST_CHAT.findall(self.process.log_path.read_text(errors="replace"))]
            if len(codes) >= at_least or time.monotonic() > deadline:
                return codes
            time.sleep(0.1)


@dataclass
class FirstRun:
    """What the first scoring (empty cache) produced and cost."""

    judgements: list[Judgement]
    stats: dict
    judge_requests: int
    server_codes: list[int]
    cache_path: Path


def _judge(served: Served) -> OpenAIJudge:
    # `transformers serve` samples only when the model's generation config says so and otherwise ignores
    # `temperature`: without `do_sample`, the re-sampled tries (retry_temperature) would repeat the greedy answer.
    # A request-level generation config turns sampling on; temperature 0 (the first try) still switches it off.
    return OpenAIJudge(
        model=served.model,
        base_url=served.base_url,
        max_concurrency=2,
        timeout=300,
        max_retries=1,
        extra_body={"generation_config": json.dumps({"do_sample": True})},
    )


def _score(served: Served, cache_path: Path) -> tuple[LongRewardFunction, list[Judgement]]:
    reward = LongRewardFunction(judge=_judge(served), cache_path=str(cache_path), **BUDGETS)
    judgements = reward.score(completions=ANSWERS, context=[DOCUMENT] * 2, question=[QUESTION] * 2)
    return reward, judgements


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # `.ci/install` installs the serving extra and the SmolLM2 wheel: a missing piece fails here instead of skipping.
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401

    from trl_longreward.models import default_model_path

    model_dir = default_model_path()
    process, base_url = start_transformers_serve(model_dir)
    try:
        yield Served(process, base_url, str(model_dir))
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def first_run(served: Served, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    cache_path = tmp_path_factory.mktemp("serve_cache") / "cache.sqlite"
    posts_before = len(served.chat_posts())
    reward, judgements = _score(served, cache_path)
    try:
        return FirstRun(
            judgements=judgements,
            stats=reward.stats(),
            judge_requests=reward.judge.stats.requests,
            server_codes=served.chat_posts(at_least=posts_before + reward.stats()["judge_calls"])[posts_before:],
            cache_path=cache_path,
        )
    finally:
        reward.close()


def test_server_is_pinned_to_the_model_path(served: Served) -> None:
    client = openai.OpenAI(base_url=served.base_url, api_key="EMPTY", max_retries=0, timeout=120)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        completion = client.chat.completions.create(model=served.model, messages=messages, max_tokens=8, temperature=0)
        # The echoed model name's format differs between transformers releases (e.g. a "@main" revision suffix):
        # what matters is that the server answers for the model it was pinned to and refuses any other.
        assert served.model in completion.model
        assert isinstance(completion.choices[0].message.content, str) and completion.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="some-other-model", messages=messages, max_tokens=1)
        assert "pinned" in refused.value.response.text
    finally:
        client.close()


def test_scores_long_context_answers_end_to_end(first_run: FirstRun) -> None:
    assert len(first_run.judgements) == len(ANSWERS)
    for judgement, answer in zip(first_run.judgements, ANSWERS, strict=True):
        assert judgement.response == answer and judgement.question == QUESTION
        assert judgement.reward is None or 0.0 <= judgement.reward <= 10.0
        assert set(judgement.scores) == set(judgement.status) == set(DIMENSIONS)
        for name, score in judgement.scores.items():
            assert judgement.status[name] in STATUSES
            assert score is None or 0.0 <= score <= 10.0
            assert (score is None) == (judgement.status[name] != "ok")
        if judgement.reward is not None:
            assert any(status == "ok" for status in judgement.status.values())
    stats = first_run.stats
    assert stats["judge_calls"] > 0
    assert isinstance(stats["parse_failures"], int) and stats["parse_failures"] >= 0
    assert stats["judge_errors"] == 0, stats
    # The judge scored something: at least one dimension came back ok, out of those that apply.
    statuses = [status for judgement in first_run.judgements for status in judgement.status.values()]
    applicable = [status for status in statuses if status != "not_applicable"]
    scored_rate = sum(status == "ok" for status in applicable) / len(applicable)
    assert "ok" in statuses and scored_rate > 0, [j.status for j in first_run.judgements]
    # ...and some of its answers parsed: calls sent minus those whose answer had no valid verdict (and minus verdict
    # follow-ups, themselves extra calls for an answer that did not parse).
    parsed = stats["judge_calls"] - stats["parse_failures"] - stats["verdict_followups"]
    assert 0 < parsed <= stats["judge_calls"], stats
    print(f"scored {scored_rate:.0%} of applicable dimensions; {parsed} of {stats['judge_calls']} answers parsed")
    # The completeness notes are extracted once per prompt and shared by both answers.
    num_chunks = first_run.judgements[0].trace["completeness"]["num_chunks"]
    assert num_chunks >= 2
    assert num_chunks <= stats["by_template"]["sent"]["completeness_extract"] <= num_chunks * BUDGETS["max_attempts"]


def test_every_judge_call_reached_the_server(first_run: FirstRun) -> None:
    assert first_run.judge_requests == first_run.stats["judge_calls"]
    # uvicorn logs every chat completion it answered; transport retries would only add to them.
    assert len(first_run.server_codes) >= first_run.stats["judge_calls"]
    assert set(first_run.server_codes) == {200}


def test_a_fresh_reward_replays_the_on_disk_cache(served: Served, first_run: FirstRun) -> None:
    posts_before = len(served.chat_posts())
    reward, judgements = _score(served, first_run.cache_path)
    try:
        stats = reward.stats()
        assert stats["judge_calls"] == 0
        assert reward.judge.stats.requests == 0
        assert stats["cache_hits"] == first_run.stats["judge_calls"] + first_run.stats["cache_hits"]
        assert len(served.chat_posts()) == posts_before
        assert [j.reward for j in judgements] == [j.reward for j in first_run.judgements]
        assert [j.scores for j in judgements] == [j.scores for j in first_run.judgements]
        assert [j.status for j in judgements] == [j.status for j in first_run.judgements]
    finally:
        reward.close()
