"""The embedded default judge: SmolLM2-135M-Instruct in process, scoring long-context answers end to end.

SmolLM2-135M is a weak judge that often ignores the output protocol; these tests check the pipeline's behaviour
(rewards in range or None, failures counted and traced, cache reuse), not the quality of its verdicts.
"""

import pytest

from trl_longreward import LongRewardFunction

pytestmark = pytest.mark.slow

DOCUMENT = " ".join(
    [
        "The Harbour Bridge of Eastport was designed by the engineer Clara Voss and opened to traffic in 1932.",
        "It is 503 metres long and carries four lanes of road traffic and two railway tracks.",
        "Construction took six years and employed about 1,400 workers, sixteen of whom died in accidents.",
        "The steel came from mills in the north of the country, and the granite for the pylons from a local quarry.",
        "In 1987 the bridge was painted grey instead of its original green, a change many residents opposed.",
        "A toll was charged until 1995, when the city council paid off the last of the construction loans.",
    ]
    * 3
)
QUESTION = "Who designed the Harbour Bridge, and when did it open?"
ANSWERS = ["The bridge was designed by Clara Voss and opened in 1932.", "Thomas Reed designed it in 1950."]
BUDGETS = {
    "max_attempts": 2,
    "score_max_tokens": 32,
    "break_max_tokens": 64,
    "check_max_tokens": 24,
    "extract_max_tokens": 64,
    "max_statements": 1,
    "completeness_chunk_tokens": 2048,
    "faithfulness_chunk_tokens": 64,
    "retriever": "bm25",
    "max_missing_dimensions": 3,
}


@pytest.fixture(scope="module")
def judge():
    from trl_longreward.judges.transformers_judge import TransformersJudge

    return TransformersJudge(max_batch_size=8)


def _check_judgements(judgements, reward):
    for judgement in judgements:
        assert judgement.reward is None or 0.0 <= judgement.reward <= 10.0
        for name, score in judgement.scores.items():
            assert score is None or 0.0 <= score <= 10.0
            assert judgement.status[name] in {"ok", "failed", "not_applicable"}
            assert (score is None) == (judgement.status[name] != "ok")
    stats = reward.stats()
    assert stats["judge_calls"] > 0
    assert isinstance(stats["parse_failures"], int) and stats["parse_failures"] >= 0
    # The judge scored something: at least one dimension came back ok, out of those that apply.
    statuses = [status for judgement in judgements for status in judgement.status.values()]
    applicable = [status for status in statuses if status != "not_applicable"]
    scored_rate = sum(status == "ok" for status in applicable) / len(applicable)
    assert "ok" in statuses and scored_rate > 0, [j.status for j in judgements]
    # ...and some of its answers parsed: calls sent minus those whose answer had no valid verdict or that failed
    # (and minus verdict follow-ups, themselves extra calls for an answer that did not parse).
    parsed = stats["judge_calls"] - stats["parse_failures"] - stats["judge_errors"] - stats["verdict_followups"]
    assert 0 < parsed <= stats["judge_calls"], stats
    print(f"scored {scored_rate:.0%} of applicable dimensions; {parsed} of {stats['judge_calls']} answers parsed")


def test_inprocess_smollm2_judge_scores_end_to_end_and_reuses_the_cache(judge, tmp_path):
    cache = str(tmp_path / "judge_cache.sqlite")
    reward = LongRewardFunction(judge=judge, cache_path=cache, **BUDGETS)
    # "auto" chunking uses the in-process judge's own tokenizer.
    assert reward.services.chunker.tokenizer is judge.tokenizer
    judgements = reward.score(
        prompts=[DOCUMENT + "\n\n" + QUESTION] * 2,
        completions=ANSWERS,
        context=[DOCUMENT] * 2,
        question=[QUESTION] * 2,
    )
    _check_judgements(judgements, reward)
    assert judge.stats.requests == reward.stats()["judge_calls"]
    # Failures are traced with every judge text that failed to parse.
    for judgement in judgements:
        for name, status in judgement.status.items():
            if status == "failed" and "call" in judgement.trace[name]:
                assert judgement.trace[name]["call"]["error"]
    requests_before = judge.stats.requests
    again = LongRewardFunction(judge=judge, cache_path=cache, **BUDGETS)
    second = again.score(
        prompts=[DOCUMENT + "\n\n" + QUESTION] * 2,
        completions=ANSWERS,
        context=[DOCUMENT] * 2,
        question=[QUESTION] * 2,
    )
    assert judge.stats.requests == requests_before and again.stats()["judge_calls"] == 0
    assert [j.scores for j in second] == [j.scores for j in judgements]
    print("in-process SmolLM2 judge:", reward.stats())
    reward.close()
    again.close()
