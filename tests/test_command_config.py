"""Every `LongRewardConfig` field is a command-line flag (dict-valued ones as JSON), and the commands leave the
caller's config as they found it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from known_answers import CONTEXT, GOOD, QUESTION
from transformers import HfArgumentParser

from trl_longreward import LongRewardConfig
from trl_longreward.commands.score import ScoreArguments, run_score


def test_every_long_reward_config_field_is_a_flag():
    parser = HfArgumentParser(LongRewardConfig)
    flags = {option for action in parser._actions for option in action.option_strings}
    missing = [f.name for f in dataclasses.fields(LongRewardConfig) if f"--{f.name}" not in flags]
    assert not missing, missing


def test_dimension_weights_parse_from_a_json_flag():
    (config,) = HfArgumentParser(LongRewardConfig).parse_args_into_dataclasses(
        ["--dimension_weights", '{"faithfulness": 2, "helpfulness": 0.5}']
    )
    assert config.dimension_weights == {"faithfulness": 2, "helpfulness": 0.5}
    assert config.weight("faithfulness") == 2.0 and config.weight("logicality") == 1.0  # unnamed: weight 1
    with pytest.raises(ValueError, match="dimension_weights=.*is not a JSON object"):
        LongRewardConfig(dimension_weights="faithfulness=2")


def test_score_leaves_the_callers_config_unchanged(tmp_path, server):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"context": CONTEXT, "question": QUESTION, "response": GOOD}) + "\n")
    config = LongRewardConfig(
        judge_base_url=server.base_url, judge_model="scripted-judge", retriever="bm25", chunk_tokenizer="regex"
    )
    before = dataclasses.asdict(config)
    summary = run_score(ScoreArguments(input=str(rows), output=str(tmp_path / "scores.jsonl")), config)
    assert summary["rows"] == 1 and summary["reward"]["scored"] == 1
    assert (tmp_path / "scores.jsonl.judge_cache.sqlite").is_file()  # the command's own default cache
    assert dataclasses.asdict(config) == before  # cache_path is still None: the caller's config is untouched
