"""`push_to_hub` of `LongContextDPOTrainer` and of `trl-longreward build-pairs`, checked at the Hub's HTTP API.

Both push to `FakeHub` (tests/hub_server.py), a loopback server speaking the Hub API that `huggingface_hub` and
`datasets` use, which records every request and every committed file. The tests check that the right files arrive
(model card with its LongReward section and the LoRA adapter; the pairs dataset as parquet) and that no secret
leaks: the judge's OpenAI key never reaches the Hub, and the Hub token travels only in `Authorization` headers, never
inside an uploaded file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hub_server import FakeHub
from known_answers import CONTEXT, QUESTION
from tiny_models import FOUR_HEADS, prompts_dataset, small_dpo_config, tiny_llama

from trl_longreward import LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
from trl_longreward.commands import main
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

OPENAI_CANARY = "sk-canary-0123456789"
HUB_TOKEN = "hf_FAKE_TOKEN_abc123"
CARD_SECTION = "## LongReward online DPO"


def length_helpfulness(question: str, response: str) -> float:
    """Helpfulness by response length, so a prompt's samples get different rewards and best-vs-worst pairs exist."""
    return float(len(response) % 11)


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The judge's API key is a canary; no Hub token comes from the environment or a stored login."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def assert_no_secret_reached_the_hub(hub: FakeHub) -> None:
    """The OpenAI canary is nowhere in what the Hub received; the Hub token only in `Authorization` headers (and
    there on every request that has one), never in a committed file, a body, a URL or another header. Fails with
    the list of every place a secret was found."""
    committed = hub.committed_files()
    assert committed, "nothing was committed"
    leaks: list[str] = []
    for path, contents in committed.items():
        for data in contents:
            if OPENAI_CANARY.encode() in data:
                leaks.append(f"the OpenAI API key is inside the committed file {path}")
            if HUB_TOKEN.encode() in data:
                leaks.append(f"the Hub token is inside the committed file {path}")
    authorized = 0
    for request in hub.requests:
        where = f"{request.method} {request.path}"
        url = request.path + json.dumps(request.query)
        if OPENAI_CANARY in url or HUB_TOKEN in url:
            leaks.append(f"a secret is in the URL of {where}")
        if OPENAI_CANARY.encode() in request.body:
            leaks.append(f"the OpenAI API key is in the body of {where}")
        if HUB_TOKEN.encode() in request.body:
            leaks.append(f"the Hub token is in the body of {where}")
        for name, value in request.headers.items():
            if OPENAI_CANARY in value:
                leaks.append(f"the OpenAI API key is in header {name} of {where}")
            if name.lower() == "authorization":
                authorized += 1
                if value != f"Bearer {HUB_TOKEN}":
                    leaks.append(f"{where} was authorized with another credential")
            elif HUB_TOKEN in value:
                leaks.append(f"the Hub token is in header {name} of {where}")
    assert not leaks, "\n".join(leaks)
    assert authorized > 0  # the writes were authenticated with the token (the fake Hub refuses them otherwise)


@pytest.mark.slow
def test_trainer_push_to_hub_uploads_card_and_adapter_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secrets_env: None
) -> None:
    from peft import LoraConfig

    model_path = tiny_llama(tmp_path / "model")
    output_dir = tmp_path / "out"
    args = small_dpo_config(
        output_dir,
        max_steps=1,
        save_strategy="no",
        push_to_hub=True,
        hub_model_id="user/tiny-longreward",
        hub_token=HUB_TOKEN,
    )
    with (
        FakeHub(token=HUB_TOKEN) as hub,
        ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as judge,
    ):
        hub.patch_clients(monkeypatch)
        reward = LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", judge.base_url, max_retries=0),
            retriever="bm25",
            chunk_tokenizer="regex",
            cache_path=str(tmp_path / "judge_cache.sqlite"),
        )
        try:
            trainer = LongContextDPOTrainer(
                model=model_path,
                args=args,
                train_dataset=prompts_dataset(),
                reward_funcs=[reward],
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            )
            assert ("model", "user/tiny-longreward") in hub.repos  # created when the trainer was built
            trainer.train()
            assert trainer.state.global_step == 1 and trainer.pair_stats["pairs"] > 0

            trainer.save_model()
            card = output_dir / "README.md"
            assert card.exists(), "save_model() wrote no model card (save_strategy='no')"
            local_card = card.read_text(encoding="utf-8")
            assert CARD_SECTION in local_card and "scripted-judge" in local_card

            trainer.push_to_hub()
        finally:
            reward.close()
        assert judge.num_chat_requests > 0
        assert {entry["api_key"] for entry in judge.request_log} == {OPENAI_CANARY}  # the key was live

    assert hub.unhandled == []
    assert hub.commits and all(c.repo_id == "user/tiny-longreward" for c in hub.commits)
    files = hub.repo_files("user/tiny-longreward")
    readme = files["README.md"].decode("utf-8")
    assert CARD_SECTION in readme and "scripted-judge" in readme
    assert readme == (output_dir / "README.md").read_text(encoding="utf-8")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert name in files, f"{name} was not uploaded: {sorted(files)}"
        assert files[name] == (output_dir / name).read_bytes()
    assert "adapter_model.safetensors" in {path for c in hub.commits for path in c.lfs}
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    assert_no_secret_reached_the_hub(hub)


PROMPT_ROWS = [
    {"context": CONTEXT, "question": QUESTION},
    {
        "context": CONTEXT + " The stone bridge over the Alder was rebuilt in 1975.",
        "question": "When was the stone bridge rebuilt?",
    },
]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_build_pairs_push_to_hub_uploads_the_pairs_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secrets_env: None
) -> None:
    model_path = tiny_llama(tmp_path / "model", **FOUR_HEADS)
    input_path = tmp_path / "prompts.jsonl"
    input_path.write_text("".join(json.dumps(row) + "\n" for row in PROMPT_ROWS), encoding="utf-8")
    output_dir = tmp_path / "out"
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    with (
        FakeHub(token=HUB_TOKEN) as hub,
        ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as judge,
    ):
        hub.patch_clients(monkeypatch)
        arguments = [
            "build-pairs", "--model", model_path, "--input", str(input_path), "--output_dir", str(output_dir),
            "--num_generations", "4", "--max_completion_length", "12", "--max_prompt_length", "160",
            "--batch_size", "2", "--seed", "3", "--judge_base_url", judge.base_url, "--judge_model", "scripted-judge",
            "--retriever", "bm25", "--chunk_tokenizer", "regex", "--push_to_hub", "true", "--hub_dataset_id", "user/pairs",
        ]  # fmt: skip
        assert main(arguments) == 0
        assert judge.num_chat_requests > 0
        assert {entry["api_key"] for entry in judge.request_log} == {OPENAI_CANARY}  # the key was live

    assert hub.unhandled == []
    local = _read_jsonl(output_dir / "pairs.jsonl")
    assert local, "build-pairs made no pair to push"
    assert [(c.repo_type, c.repo_id) for c in hub.commits] == [("dataset", "user/pairs")]
    files = hub.repo_files("user/pairs", repo_type="dataset")
    shards = sorted(path for path in files if path.endswith(".parquet"))
    assert shards == ["data/train-00000-of-00001.parquet"], sorted(files)
    pushed = [row for shard in shards for row in pq.read_table(io.BytesIO(files[shard])).to_pylist()]
    assert [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in pushed] == [
        {k: row[k] for k in ("prompt", "chosen", "rejected")} for row in local
    ]
    assert pushed == local  # every column, rewards and the full document included
    card = files["README.md"].decode("utf-8")
    assert f"num_examples: {len(local)}" in card and "path: data/train-*" in card
    assert_no_secret_reached_the_hub(hub)
