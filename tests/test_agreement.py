"""`trl-longreward agreement`: agreement with the preferred answer, per dimension and ablation, with intervals.

The judge is the scripted judge behind a real OpenAI-compatible HTTP server, on the bundled demo set. Every answer's
scripted scores are worked out by hand below from the rules in `trl_longreward/testing/scripted_judge.py`; the
expected counts and intervals are derived from them here, never read from the command's output. The reward-model
baseline is checked against a tiny random reward model whose scores are computed here with plain transformers.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from trl_longreward.commands import main
from trl_longreward.commands.agreement import RESULTS_FILE
from trl_longreward.data import agreement_demo_path
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

# Each document's notes are its two sentences that share a 5+-letter word with the question; `good` restates both
# verbatim, `incomplete` one of them, `invented` changes facts. Scripted scores (helpfulness, logicality,
# faithfulness, completeness):
# - good: 8, 9, 10 (both statements verbatim: Fully), 10 (both notes covered).
# - incomplete: 8, 9, 10, 5 (the second note shares no 5+-letter word with it).
# - tower/invented: 8, 9, faithfulness 5 (each statement has half or more of its 4+-letter words in the document:
#   Partially, 0.5 each), 10.
# - ferry/invented: 8, 3 ("however, it is not"), 5 (two Partially), 10.
# - bakery/invented and garden/invented: 8, 9, 7.5 (one Fully, one Partially), 10.
# - garden/evasive ("I cannot tell from the document", no sentence): 2, 9, not applicable (no statement), 0.
GOOD = (8, 9, 10, 10)
OTHER = {  # pair order of the demo file: (document, the other answer's scores)
    "tower/p1": (8, 9, 10, 5),
    "tower/p2": (8, 9, 5, 10),
    "ferry/p1": (8, 9, 10, 5),
    "ferry/p2": (8, 3, 5, 10),
    "bakery/p1": (8, 9, 10, 5),
    "bakery/p2": (8, 9, 7.5, 10),
    "garden/p1": (2, 9, None, 0),
    "garden/p2": (8, 9, 7.5, 10),
}
DIMENSIONS = ("helpfulness", "logicality", "faithfulness", "completeness")


def _mean(values):
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _hand_values(method: str, scores: tuple) -> float | None:
    if method == "longreward":
        return _mean(scores)
    if method in DIMENSIONS:
        return scores[DIMENSIONS.index(method)]
    left_out = DIMENSIONS.index(method.removeprefix("without_"))
    return _mean([s for i, s in enumerate(scores) if i != left_out])


def _hand_counts(method: str) -> dict[str, int]:
    counts = {"agree": 0, "ties": 0, "disagree": 0, "unscored": 0}
    for other in OTHER.values():
        good, bad = _hand_values(method, GOOD), _hand_values(method, other)
        if good is None or bad is None:
            counts["unscored"] += 1
        else:
            counts["agree" if good > bad else "ties" if good == bad else "disagree"] += 1
    return counts


# The same counts, written out by hand as a check on the helper above (e.g. faithfulness alone: the three
# incomplete answers tie at 10, the evasive answer has no faithfulness, the four invented ones lose).
HAND = {
    "longreward": (8, 0, 0, 0),
    "helpfulness": (1, 7, 0, 0),
    "logicality": (1, 7, 0, 0),
    "faithfulness": (4, 3, 0, 1),
    "completeness": (4, 4, 0, 0),
    "without_helpfulness": (8, 0, 0, 0),
    "without_logicality": (8, 0, 0, 0),
    "without_faithfulness": (5, 3, 0, 0),
    "without_completeness": (5, 3, 0, 0),
    # The scripted direct comparison prefers the answer with more sentences and says A on a tie: good vs incomplete
    # or evasive agree in both orders; good vs invented (two sentences each) picks A both times, a tie.
    "pairwise": (4, 4, 0, 0),
}


def _bootstrap(outcomes: list[int], resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[float]:
    """The documented percentile bootstrap, written again here."""
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        draws = [outcomes[rng.randrange(len(outcomes))] for _ in range(len(outcomes))]
        means.append(sum(draws) / len(draws))
    means.sort()
    alpha = 1 - confidence
    return [
        means[math.floor(round(resamples * alpha / 2, 9))],
        means[math.ceil(round(resamples * (1 - alpha / 2), 9)) - 1],
    ]


@pytest.fixture
def server():
    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as running:
        yield running


def run(server: ScriptedOpenAIServer, out: Path, capsys, *extra: str) -> tuple[dict, str]:
    argv = ["agreement", "--output_dir", str(out), "--judge_base_url", server.base_url, "--judge_model"]
    argv += ["scripted-judge", *extra, "--retriever", "bm25", "--chunk_tokenizer", "regex"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    return json.loads((out / RESULTS_FILE).read_text()), printed


def test_every_number_of_the_demo_set_matches_the_hand_computed_scores(tmp_path: Path, server, capsys) -> None:
    results, printed = run(server, tmp_path / "out", capsys, "--pairwise", "true")
    assert results["pairs"] == len(OTHER) == 8
    table = results["judges"]["scripted-judge"]
    assert set(table) == set(HAND)
    for method, (agree, ties, disagree, unscored) in HAND.items():
        entry = table[method]
        if method != "pairwise":
            assert _hand_counts(method) == {"agree": agree, "ties": ties, "disagree": disagree, "unscored": unscored}
        compared = agree + ties + disagree
        assert (entry["agree"], entry["ties"], entry["disagree"], entry["unscored"]) == (
            agree,
            ties,
            disagree,
            unscored,
        )
        assert entry["compared"] == compared
        assert entry["agreement"] == agree / compared, method
        assert entry["interval"] == _bootstrap([1] * agree + [0] * (ties + disagree)), method
    # A unanimous row has the degenerate interval; a mixed one a real interval around its agreement.
    assert table["longreward"]["interval"] == [1.0, 1.0]
    low, high = table["completeness"]["interval"]
    assert low < 0.5 < high
    assert "LongReward without faithfulness" in printed and "0.625" in printed
    page = (tmp_path / "out" / "agreement.html").read_text()
    assert page.count("<rect") == len(HAND) and "judge compares directly (both orders)" in page


def test_a_rerun_makes_no_judge_call_and_a_second_judge_gets_its_own_column(tmp_path: Path, server, capsys) -> None:
    out = tmp_path / "out"
    first, _ = run(server, out, capsys)
    sent = server.num_chat_requests
    assert sent > 0
    again, printed = run(server, out, capsys)
    assert server.num_chat_requests == sent and "this run: 0 judge calls" in printed
    assert again["judges"] == first["judges"]
    # Two judge names side by side: the new one is judged, the first comes from judged.jsonl.
    both, printed = run(server, out, capsys, "other-judge")
    assert list(both["judges"]) == ["scripted-judge", "other-judge"]
    assert both["judges"]["other-judge"] == both["judges"]["scripted-judge"] == first["judges"]["scripted-judge"]
    assert re.search(r"method\s+scripted-judge\s+other-judge", printed)


def test_the_chosen_rejected_layout_and_clear_errors(tmp_path: Path, server, capsys) -> None:
    rows = [json.loads(line) for line in agreement_demo_path().read_text().splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    with flipped.open("w") as sink:
        for row in rows:
            chosen, rejected = (row["response_a"], row["response_b"])[:: 1 if row["preferred"] == "a" else -1]
            sink.write(json.dumps({"context": row["context"], "question": row["question"], "good": chosen,
                                   "bad": rejected}) + "\n")  # fmt: skip
    results, _ = run(
        server, tmp_path / "cr", capsys, "--input", str(flipped), "--layout", "chosen_rejected",
        "--chosen_column", "good", "--rejected_column", "bad",
    )  # fmt: skip
    assert results["judges"]["scripted-judge"]["longreward"]["agree"] == 8
    with pytest.raises(ValueError, match=r"no column 'chosen'.*--chosen_column"):
        run(server, tmp_path / "x", capsys, "--input", str(flipped), "--layout", "chosen_rejected")
    bad_label = tmp_path / "label.jsonl"
    bad_label.write_text(json.dumps({**rows[0], "preferred": "first"}) + "\n")
    with pytest.raises(ValueError, match=r"--preference_column 'preferred' holds 'first'.*a or b"):
        run(server, tmp_path / "y", capsys, "--input", str(bad_label))


def test_the_long_rewardbench_layout_reads_pair_rows_only(tmp_path: Path, server, capsys) -> None:
    rows = [json.loads(line) for line in agreement_demo_path().read_text().splitlines()][:2]
    path = tmp_path / "lrb.jsonl"
    with path.open("w") as sink:
        for row, tasktype in zip(rows * 2, ["pair", "pair", "rank", "rank"], strict=True):
            chosen, rejected = (row["response_a"], row["response_b"])[:: 1 if row["preferred"] == "a" else -1]
            record = {"prompt_template": [{"role": "user", "content": row["context"]}], "question": row["question"],
                      "chosen": chosen, "rejected": rejected, "tasktype": tasktype}  # fmt: skip
            sink.write(json.dumps(record) + "\n")
    results, _ = run(server, tmp_path / "lrb", capsys, "--input", str(path), "--layout", "long_rewardbench")
    assert results["pairs"] == 2
    assert results["judges"]["scripted-judge"]["longreward"]["agree"] == 2


@pytest.mark.slow
def test_the_command_runs_end_to_end_with_the_embedded_smollm2_and_reports_a_parse_rate(
    tmp_path: Path, capsys
) -> None:
    argv = ["agreement", "--output_dir", str(tmp_path / "smol"), "--judge_backend", "transformers", "--limit", "1"]
    argv += ["--dimensions", "helpfulness", "--score_max_tokens", "24", "--max_attempts", "1"]
    assert main([*argv, "--verdict_decoding", "structured"]) == 0
    printed = capsys.readouterr().out
    match = re.search(
        r"this run: (\d+) judge calls, \d+ cache hits, (\d+) parse failures, parse rate ([0-9.]+)", printed
    )
    assert match, printed
    calls, failures, rate = int(match[1]), int(match[2]), float(match[3])
    assert calls == 2 and failures == 0 and rate == 1.0  # two distinct answers, one verdict call each, all parsed
    results = json.loads((tmp_path / "smol" / RESULTS_FILE).read_text())
    assert results["judges"]["SmolLM2-135M-Instruct"]["longreward"]["unscored"] == 0


def _tiny_reward_model(path: Path) -> str:
    """A randomly initialised 2-layer `LlamaForSequenceClassification` with one output and the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from trl_longreward.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, num_labels=1, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _user_scores(path: str, rows: list[tuple[str, str, str]]) -> list[float]:
    """The reward model's score of each (document, question, answer) as a user computes it with transformers: the
    chat template over user = document + blank line + question, assistant = answer; the single logit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    scores = []
    for context, question, answer in rows:
        chat = [{"role": "user", "content": f"{context}\n\n{question}"}, {"role": "assistant", "content": answer}]
        inputs = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            scores.append(model(**inputs).logits[0, 0].item())
    return scores


def test_a_reward_model_baseline_scores_every_answer_as_transformers_does(tmp_path: Path, server, capsys) -> None:
    model = _tiny_reward_model(tmp_path / "rm")
    out = tmp_path / "out"
    results, printed = run(server, out, capsys, "--reward_model", model)
    rows = [json.loads(line) for line in agreement_demo_path().read_text().splitlines()]
    other = {"a": "b", "b": "a"}
    chosen_rows = [(r["context"], r["question"], r["response_" + r["preferred"]]) for r in rows]
    rejected_rows = [(r["context"], r["question"], r["response_" + other[r["preferred"]]]) for r in rows]
    chosen, rejected = _user_scores(model, chosen_rows), _user_scores(model, rejected_rows)

    # Every distinct answer got the user's score (the demo set repeats its good answers across pairs: 12 distinct).
    stored = [json.loads(line) for line in (out / "reward_models.jsonl").read_text().splitlines()]
    by_text = {row: score for row, score in zip(chosen_rows + rejected_rows, chosen + rejected, strict=True)}
    assert len(stored) == len(by_text) == 12 and len(set(by_text.values())) == 12  # no two answers score alike
    from trl_longreward.commands.agreement import answer_digest

    expected = {answer_digest(*row): score for row, score in by_text.items()}
    assert {r["answer_sha"]: r["score"] for r in stored} == pytest.approx(expected, rel=1e-5, abs=1e-6)

    agree = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    ties = sum(c == r for c, r in zip(chosen, rejected, strict=True))
    entry = results["reward_models"][f"reward_model:{model}"]
    assert (entry["agree"], entry["ties"], entry["disagree"], entry["unscored"]) == (agree, ties, 8 - agree - ties, 0)
    assert entry["compared"] == 8 and entry["agreement"] == agree / 8
    assert entry["interval"] == _bootstrap([int(c > r) for c, r in zip(chosen, rejected, strict=True)])  # pair order
    assert f"reward model {model}" in printed and f"({agree}/8" in printed
    assert results["judges"]["scripted-judge"]["longreward"]["agree"] == 8  # the judge's column is unchanged

    # A rerun scores nothing again: the scores come from reward_models.jsonl.
    again, _ = run(server, out, capsys, "--reward_model", model)
    assert len((out / "reward_models.jsonl").read_text().splitlines()) == 12
    assert again["reward_models"] == results["reward_models"]
    # Another token budget is another score: the answers are scored again (here none fits in 20 tokens).
    cut, printed = run(server, out, capsys, "--reward_model", model, "--reward_model_max_length", "20")
    assert len((out / "reward_models.jsonl").read_text().splitlines()) == 24
    entry = cut["reward_models"][f"reward_model:{model}"]
    assert (entry["unscored"], entry["compared"], entry["agreement"], entry["interval"]) == (8, 0, None, None)
    assert "0 compared, 8 unscored" in printed  # counted apart, not as disagreement


def test_a_reward_model_reads_a_middle_cut_document_within_its_budget_or_nothing(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trl_longreward.reward.reward_model import reward_model_input_ids

    model = _tiny_reward_model(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(model)
    row = json.loads(agreement_demo_path().read_text().splitlines()[0])
    context, question, answer = row["context"], row["question"], row["response_a"]
    full = reward_model_input_ids(tokenizer, context, question, answer, max_length=8192)
    for max_length in (len(full), len(full) - 1, len(full) - 20):
        ids = reward_model_input_ids(tokenizer, context, question, answer, max_length=max_length)
        text = tokenizer.decode(ids)
        assert len(ids) <= max_length and question in text and answer in text  # never the question or the answer
        assert (ids == full) == (max_length == len(full))
        if max_length < len(full):  # the document's head and tail, the middle replaced by the marker
            assert "\n...\n" in text and context[:20] in text and context[-20:] in text
    assert reward_model_input_ids(tokenizer, context, question, answer, max_length=20) == []
