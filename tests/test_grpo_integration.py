"""TRL's own `GRPOTrainer` trains with `LongRewardFunction` as its reward, judged by the scripted judge over HTTP.

The policy is a tiny Llama built from a config with SmolLM2's tokenizer (a chat template, available offline); the
judge is `ScriptedLongRewardJudge` behind `ScriptedOpenAIServer`, reached through the real `openai` client.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import FOUR_HEADS, tiny_llama

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

pytestmark = pytest.mark.slow

DOCUMENTS = [
    (
        "The Orchard Street library opened in 1911 with money from a local mill owner, Edith Crane. It held 4,000 "
        "books at first and was run by two librarians. In 1958 a reading room for children was added on the north "
        "side, and in 1994 the building was connected to the city network of libraries. The roof was replaced in 2008 "
        "after a storm damaged the old slate tiles. Today the library lends about 60,000 books a year, offers free "
        "language classes on Tuesday evenings, and keeps a small archive of photographs of the mill and its workers.",
        "When did the Orchard Street library open, and who paid for it?",
    ),
    (
        "The Selby ferry crosses the river Wend between Selby and Marrow Point. The crossing takes eleven minutes and "
        "the ferry runs every half hour from six in the morning until ten at night. The current boat, the Heron, was "
        "built in 2015 and carries up to eighteen cars and 120 passengers. It replaced an older boat that had served "
        "for forty years. In winter the service stops when the river is frozen, which happened on nine days in 2021. "
        "A bridge has been proposed several times, but the council rejected it in 2019 because of its cost.",
        "How long does the ferry crossing take, and how often does the ferry run?",
    ),
    (
        "Greyfield farm grows apples, pears and plums on 35 hectares of land near the village of Hollin. The farm was "
        "bought by the Marsh family in 1972. Most of the fruit is sold to a cooperative that makes juice and cider, "
        "and about a fifth is sold at the farm shop. In 2018 the family planted 2,000 new apple trees of an old local "
        "variety called Hollin Red. The farm uses sheep to keep the grass short between the trees, and it employs up "
        "to thirty seasonal pickers in September and October.",
        "What fruit does Greyfield farm grow, and where is the fruit sold?",
    ),
    (
        "The Arden Observatory stands on a hill 600 metres above sea level. Its main telescope, with a mirror 1.2 "
        "metres across, was installed in 1967. Students from the university use it on clear nights to measure the "
        "brightness of variable stars. In 2010 the dome motor was replaced, and in 2020 a camera cooled to minus forty "
        "degrees was added. Light from the growing town below has made faint objects harder to see, and the "
        "observatory has asked the town to use shielded street lamps.",
        "What do students use the Arden Observatory telescope for?",
    ),
]


def digest_score(question: str, response: str) -> float:
    """A deterministic, response-dependent 0-10 score: the two completions of a group get different rewards, so
    the group-normalized advantages are non-zero and every parameter receives a gradient."""
    return int(hashlib.sha256(response.encode("utf-8")).hexdigest(), 16) % 101 / 10


def build_tiny_model(output_dir: Path) -> Path:
    """A 2-layer Llama from a config with SmolLM2's tokenizer (eos as pad), saved to `output_dir`."""
    return Path(tiny_llama(output_dir, pad_with_eos=True, **FOUR_HEADS))


@pytest.fixture
def scripted_server() -> Iterator[tuple[ScriptedOpenAIServer, ScriptedLongRewardJudge]]:
    script = ScriptedLongRewardJudge(helpfulness=digest_score)
    with ScriptedOpenAIServer(script) as server:
        yield server, script


@pytest.mark.parametrize(
    ("trainer_name", "face"),
    [("GRPO", "sync"), ("GRPO", "async"), ("RLOO", "sync")],
    ids=["grpo", "grpo-async", "rloo"],
)
def test_trl_online_trainers_train_with_long_reward(
    trainer_name: str, face: str, tmp_path: Path, scripted_server: tuple[ScriptedOpenAIServer, ScriptedLongRewardJudge]
) -> None:
    """TRL's GRPOTrainer and RLOOTrainer take the reward as `reward_funcs`; `face="async"` passes
    `reward.as_async()`, which GRPO gathers on its own event loop."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    config_class = getattr(trl, f"{trainer_name}Config")
    trainer_class = getattr(trl, f"{trainer_name}Trainer")

    server, script = scripted_server
    model_dir = build_tiny_model(tmp_path / "tiny-llama")
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{context}\n\n{question}"}],
                "context": context,
                "question": question,
            }
            for context, question in DOCUMENTS
        ]
    )
    reward = LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url), retriever="bm25", completeness_chunk_tokens=64
    )
    args = config_class(
        output_dir=str(tmp_path / trainer_name.lower()),
        num_generations=2,
        per_device_train_batch_size=2,  # generation batch = 2 = one prompt group of num_generations per step
        max_completion_length=16,
        temperature=1.0,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reward_func = reward if face == "sync" else reward.as_async()
    trainer = trainer_class(model=model, reward_funcs=[reward_func], args=args, train_dataset=dataset)
    assert trainer.reward_func_names == ["long_reward"]
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}

    try:
        trainer.train()
    finally:
        reward.close()

    logs = [entry for entry in trainer.state.log_history if "rewards/long_reward/mean" in entry]
    assert len(logs) == 2, trainer.state.log_history
    for entry in logs:
        assert 0.0 <= entry["rewards/long_reward/mean"] <= 10.0
        # What the reward reports through `log_metric`, averaged by the trainer over the logging step.
        for dimension in ("helpfulness", "logicality", "completeness", "reward"):
            assert 0.0 <= entry[f"long_reward/{dimension}/mean"] <= 10.0
            assert entry[f"long_reward/{dimension}/missing_rate"] == 0.0
        assert entry["long_reward/judge_calls"] > 0
        assert entry["long_reward/judge_errors"] == 0
        assert entry["long_reward/parse_failures"] == 0
        assert "long_reward/faithfulness/missing_rate" in entry
        assert not math.isnan(entry["reward"])
    # The scripted helpfulness differs between the two completions of a group: the groups carried a signal.
    assert any(entry["reward_std"] > 0 for entry in logs)

    assert server.num_chat_requests == reward.stats()["judge_calls"] > 0
    assert server.num_chat_requests == sum(entry["long_reward/judge_calls"] for entry in logs)
    for task in ("helpfulness", "logicality", "faithfulness_break", "completeness_extract", "completeness_score"):
        assert script.calls[task] > 0, script.calls
    assert {body["model"] for body in server.requests} == {"scripted-judge"}

    changed = {name: not torch.equal(initial[name], param) for name, param in trainer.model.named_parameters()}
    unchanged = [
        name for name, moved in changed.items() if not moved and trainer.model.get_parameter(name).requires_grad
    ]
    assert not unchanged, f"parameters that did not change: {unchanged}"
