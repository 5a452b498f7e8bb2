"""Pair selection (best vs worst, minimum scored samples, ties, minimum gap) and middle truncation."""

import math

import pytest

from trl_longreward.documents import TRUNCATION_MARKER, fit_prompt, truncate_context_middle
from trl_longreward.pairs import select_best_worst


def test_best_and_worst_are_chosen_and_rejected():
    selection = select_best_worst([5.0, 9.0, None, 2.0, 7.5])
    assert (selection.chosen, selection.rejected) == (1, 3)
    assert selection.gap == 7.0 and selection.num_scored == 4


def test_unscored_samples_are_ignored_and_too_few_means_no_pair():
    assert select_best_worst([None, 3.0, math.nan, 4.0], min_scored=3).skip_reason == "too_few_scored"
    assert select_best_worst([None, 3.0, math.nan, 4.0], min_scored=2).ok


def test_ties_and_gap():
    assert select_best_worst([6.0, 6.0, 6.0]).skip_reason == "tie"
    tie = select_best_worst([6.0, 6.0, 6.0], ties="first_last")
    assert (tie.chosen, tie.rejected) == (0, 2)
    assert select_best_worst([6.0, 6.5], min_gap=1.0).skip_reason == "gap_below_minimum"
    assert select_best_worst([6.0, 7.0], min_gap=1.0).ok


def test_equal_rewards_resolve_deterministically():
    selection = select_best_worst([9.0, 1.0, 9.0, 1.0])
    assert (selection.chosen, selection.rejected) == (0, 3)


def test_min_scored_below_two_is_rejected():
    with pytest.raises(ValueError, match="min_scored"):
        select_best_worst([1.0, 2.0], min_scored=1)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from trl_longreward.reward.retrieval import default_embedding_model_path

    return AutoTokenizer.from_pretrained(default_embedding_model_path())


def test_middle_truncation_keeps_head_and_tail(tokenizer):
    context = "HEAD begins here. " + " ".join(f"middle{i}" for i in range(400)) + " TAIL ends here."
    kept, cut = truncate_context_middle(context, 40, tokenizer)
    assert cut and kept.startswith("HEAD begins here.") and kept.endswith("TAIL ends here.")
    assert TRUNCATION_MARKER in kept and "middle200 " not in kept
    head, tail = kept.split(TRUNCATION_MARKER)
    assert context.startswith(head) and context.endswith(tail)
    n = len(tokenizer(head, add_special_tokens=False)["input_ids"]) + len(
        tokenizer(tail, add_special_tokens=False)["input_ids"]
    )
    assert n == 40


def test_short_context_is_untouched(tokenizer):
    assert truncate_context_middle("A short document.", 50, tokenizer) == ("A short document.", False)


def test_fit_prompt_never_cuts_the_question(tokenizer):
    context = "Start. " + "filler words " * 500 + "End."
    question = "What happens at the start and at the end of the document?"
    prompt, cut = fit_prompt(context, question, tokenizer=tokenizer, max_prompt_tokens=120)
    assert cut and prompt.endswith("\n\n" + question) and prompt.startswith("Start.")
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 120 + 3  # the marker's own tokens
    with pytest.raises(ValueError, match="Raise max_prompt_length"):
        fit_prompt(context, question, tokenizer=tokenizer, max_prompt_tokens=10)


def test_cjk_context_is_cut_at_token_boundaries(tokenizer):
    context = "北京是中国的首都。" * 100
    kept, cut = truncate_context_middle(context, 30, tokenizer)
    assert cut and kept.startswith("北京是中国") and kept.endswith("的首都。")
