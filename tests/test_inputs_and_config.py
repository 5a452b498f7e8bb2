"""Bad config and bad data give errors that name the option or column and the fix."""

import pytest

from trl_longreward import LongRewardConfig
from trl_longreward.reward.inputs import Sample, resolve_samples
from trl_longreward.reward.judge_factory import build_judge

KW = {"context_column": "context", "question_column": "question", "separator": "\n\n"}


def test_columns_win_over_the_prompt():
    (sample,) = resolve_samples(["ignored"], ["an answer"], {"context": ["doc"], "question": ["q?"]}, **KW)
    assert sample == Sample("doc", "q?", "an answer")


def test_prompt_is_split_into_context_and_question():
    (sample,) = resolve_samples(["line one\n\nline two\n\nWhat is it?"], ["x"], {}, **KW)
    assert sample.context == "line one\n\nline two" and sample.question == "What is it?"


def test_known_question_is_cut_from_the_end_of_the_prompt():
    (sample,) = resolve_samples(
        ["The doc.\nWho? Answer briefly."], ["x"], {"question": ["Who? Answer briefly."]}, **KW
    )
    assert sample.context == "The doc."


def test_context_column_with_a_prompt_that_embeds_the_document():
    (sample,) = resolve_samples(["The doc text.\n\nWho wrote it?"], ["x"], {"context": ["The doc text."]}, **KW)
    assert sample.question == "Who wrote it?"


def test_conversational_rows_use_the_last_user_and_assistant_messages():
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Doc.\n\nQ?"}]
    completion = [{"role": "assistant", "content": "A."}]
    (sample,) = resolve_samples([prompt], [completion], {}, **KW)
    assert sample == Sample("Doc.", "Q?", "A.")


def test_mixed_conversational_and_plain_rows():
    samples = resolve_samples(["Doc.\n\nQ?", [{"role": "user", "content": "Doc.\n\nQ?"}]], ["A.", "A."], {}, **KW)
    assert samples[0] == samples[1]


def test_prompt_without_separator_names_the_columns_to_add():
    with pytest.raises(ValueError, match="'context' and 'question' columns"):
        resolve_samples(["just a question"], ["x"], {}, **KW)


def test_empty_context_is_rejected():
    with pytest.raises(ValueError, match="context is empty"):
        resolve_samples(None, ["x"], {"context": ["   "], "question": ["q"]}, **KW)


def test_non_string_values_name_the_column_and_row():
    with pytest.raises(TypeError, match=r"Column 'context', row 1"):
        resolve_samples(None, ["x", "y"], {"context": ["doc", 42], "question": ["q", "q"]}, **KW)
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        resolve_samples(["Doc.\n\nQ?"], [3.5], {}, **KW)


def test_column_length_mismatch():
    with pytest.raises(ValueError, match="one value per completion"):
        resolve_samples(None, ["x", "y"], {"context": ["doc"], "question": ["q", "q"]}, **KW)
    with pytest.raises(ValueError, match="one prompt per completion"):
        resolve_samples(["a\n\nb"], ["x", "y"], {}, **KW)


def test_cjk_prompt_split():
    (sample,) = resolve_samples(["北京是中国的首都。\n\n中国的首都是哪里？"], ["北京。"], {}, **KW)
    assert sample.context == "北京是中国的首都。" and sample.question == "中国的首都是哪里？"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dimensions": ["helpfulness", "style"]}, "choose one or more of"),
        ({"dimensions": []}, "choose one or more of"),
        ({"dimensions": ["logicality", "logicality"]}, "twice"),
        ({"dimension_weights": {"completeness": 1.0}, "dimensions": ["helpfulness"]}, "not in dimensions"),
        ({"dimension_weights": {"helpfulness": 0.0}}, "remove 'helpfulness' from dimensions instead"),
        ({"dimension_weights": {"helpfulness": -1}}, "is negative"),
        ({"dimension_weights": {"style": 1.0}}, "not a dimension"),
        ({"max_missing_dimensions": 4}, r"must be in \[0, 3\]"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"zero_statement_policy": "half"}, "exclude, full or zero"),
        ({"verdict_parsing": "fuzzy"}, "use strict"),
        ({"faithfulness_top_k": 0}, "faithfulness_top_k"),
        ({"retriever": "openai"}, "embedding_base_url and embedding_model"),
        ({"judge_backend": "llamacpp"}, "openai, transformers or vllm"),
    ],
)
def test_bad_config_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LongRewardConfig(**kwargs)


def test_openai_judge_without_endpoint_says_how_to_point_it():
    with pytest.raises(ValueError, match="judge_base_url and judge_model"):
        build_judge(LongRewardConfig())


def test_api_key_is_not_a_config_value_and_not_described(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-canary-123")
    config = LongRewardConfig(
        judge_base_url="http://127.0.0.1:9/v1", judge_model="m", judge_api_key_env="MY_JUDGE_KEY"
    )
    judge = build_judge(config)
    assert "sk-canary-123" not in repr(vars(config))
    assert "sk-canary-123" not in repr(judge.describe()) and "sk-canary-123" not in repr(vars(judge))
