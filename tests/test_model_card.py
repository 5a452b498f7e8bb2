"""The model card written by training: the real base model and judge by name, no local path, no `None` link."""

import pytest
from tiny_models import prompts_dataset, small_dpo_config, tiny_llama

from trl_longreward import LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge
from trl_longreward.trainer.model_card import public_judge, public_name


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-base-model")


@pytest.fixture
def judge_server():
    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as server:
        yield server


def _trainer(model, tmp_path, server, **config):
    reward = LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
        retriever="bm25",
        chunk_tokenizer="regex",
        cache_path=str(tmp_path / "judge_cache.sqlite"),
    )
    args = small_dpo_config(tmp_path / "out", **config)
    return LongContextDPOTrainer(model=model, args=args, train_dataset=prompts_dataset(), reward_funcs=[reward])


def _assert_no_local_path(card: str, tmp_path, base_model: str) -> None:
    assert "None" not in card.split("## Training procedure")[0], card  # no `[None](...)`, no `model="None"`
    assert "huggingface.co/None" not in card
    for local in (str(tmp_path), base_model, "/tmp", str(tmp_path.parent)):
        assert local not in card, f"{local} in the card"


def test_trained_model_card_names_base_model_judge_settings_and_tags(base_model, tmp_path, judge_server):
    trainer = _trainer(base_model, tmp_path, judge_server, max_steps=1)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    _assert_no_local_path(card, tmp_path, base_model)
    assert "fine-tuned version of `tiny-base-model`" in card  # a local folder: named, not linked to the Hub
    assert "base_model:" not in card.split("---")[1]  # nor in the metadata, which the Hub checks
    assert 'model="out"' in card  # no Hub repo: the quick start loads the saved folder
    assert "model: scripted-judge" in card and "LongReward online DPO" in card
    assert "helpfulness, logicality, faithfulness, completeness" in card and "beta " in card
    metadata = card.split("---")[1]
    for tag in ("long-reward", "trl-longreward", "dpo", "trl"):
        assert f"- {tag}\n" in metadata, tag


def test_card_of_a_loaded_model_links_hub_dataset_and_names_local_data(base_model, tmp_path, judge_server):
    from transformers import AutoModelForCausalLM

    trainer = _trainer(AutoModelForCausalLM.from_pretrained(base_model), tmp_path, judge_server)
    trainer.create_model_card(model_name="tiny-dpo", dataset_name="org/long-qa")
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    _assert_no_local_path(card, tmp_path, base_model)
    assert "`tiny-base-model`" in card  # from config._name_or_path
    assert "[org/long-qa](https://huggingface.co/datasets/org/long-qa)" in card and 'model="tiny-dpo"' in card

    trainer.card_dataset_name = str(tmp_path / "data" / "prompts.jsonl")
    trainer.create_model_card(model_name="tiny-dpo")
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    _assert_no_local_path(card, tmp_path, base_model)
    assert "- Prompts: prompts.jsonl" in card and "huggingface.co/datasets" not in card


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", ("HuggingFaceTB/SmolLM2-135M-Instruct", True)),
        ("/home/u/models/judge-7b/", ("judge-7b", False)),
        ("~/models/judge.gguf", ("judge.gguf", False)),
        ("/h/.cache/huggingface/hub/models--Org--Judge-7B/snapshots/0123abc", ("Org/Judge-7B", True)),
        ("https://user:secret@host.example/v1?api_key=secret#x", ("https://host.example/v1", False)),
        (r"C:\models\judge-7b", ("judge-7b", False)),
        (None, (None, False)),
    ],
)
def test_public_name(value, expected):
    assert public_name(value) == expected


def test_public_judge_drops_local_paths_and_credentials():
    shown = public_judge(
        {
            "backend": "vllm",
            "model": "/home/u/.cache/judges/judge-7b",
            "base_url": "http://u:pw@a.example:8000/v1?key=pw,http://b.example/v1",
        }
    )
    assert shown == {
        "backend": "vllm",
        "model": "judge-7b",
        "base_url": "http://a.example:8000/v1,http://b.example/v1",
    }
