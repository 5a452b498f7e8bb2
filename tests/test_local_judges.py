"""In-process judges: micro-batching in `BatchingJudge`, the transformers judge on SmolLM2, and the vLLM judge."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from trl_longreward.judges.base import ChatRequest, JudgeError
from trl_longreward.judges.batching import BatchingJudge, BatchResult


class RecordingJudge(BatchingJudge):
    """Echoes each prompt and records every batch it was given."""

    model_id = "recording"

    def __init__(self, *, delay: float = 0.0, fail: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.batches: list[list[ChatRequest]] = []
        self.threads: set[int] = set()
        self.delay, self.fail = delay, fail

    def _generate_batch(self, requests: list[ChatRequest]) -> BatchResult:
        self.batches.append(list(requests))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("backend exploded")
        return [
            JudgeError("refused") if r.messages[-1]["content"] == "refuse" else f"echo:{r.messages[-1]['content']}"
            for r in requests
        ]


def _prompt(text: str, **sampling: float | int) -> ChatRequest:
    return ChatRequest.from_prompt(text, **sampling)


def test_concurrent_requests_are_batched() -> None:
    judge = RecordingJudge(max_batch_size=8)

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(judge.acomplete(_prompt(f"q{i}")) for i in range(10)))
        finally:
            await judge.aclose()

    answers = asyncio.run(main())
    assert answers == [f"echo:q{i}" for i in range(10)]  # every result in its caller's slot
    assert len(judge.batches) <= 2
    assert all(len(batch) <= 8 for batch in judge.batches)
    assert judge.threads and threading.get_ident() not in judge.threads  # ran off the event loop thread
    assert judge.stats.requests == 10 and judge.stats.failures == 0


def test_requests_arriving_within_the_wait_join_one_batch() -> None:
    judge = RecordingJudge(max_batch_size=16, batch_wait_s=0.2)

    async def late(i: int) -> str:
        await asyncio.sleep(0.02 * i)
        return await judge.acomplete(_prompt(f"q{i}"))

    async def main() -> list[str]:
        return await asyncio.gather(*(late(i) for i in range(5)))

    assert asyncio.run(main()) == [f"echo:q{i}" for i in range(5)]
    assert [len(batch) for batch in judge.batches] == [5]


def test_different_sampling_params_are_never_mixed() -> None:
    judge = RecordingJudge(max_batch_size=32)
    requests = [
        _prompt(f"q{i}", temperature=[0.0, 0.7][i % 2], max_tokens=[16, 32, 16][i % 3], top_p=1.0) for i in range(12)
    ]

    async def main() -> list[str]:
        return await asyncio.gather(*(judge.acomplete(request) for request in requests))

    assert asyncio.run(main()) == [f"echo:q{i}" for i in range(12)]
    for batch in judge.batches:
        assert len({request.sampling_key() for request in batch}) == 1
    assert len(judge.batches) == 4  # all 12 arrived together: one batch per distinct sampling key


def test_batch_exception_becomes_judge_error_per_request() -> None:
    judge = RecordingJudge(fail=True)

    async def main() -> list[str | JudgeError]:
        results = await judge.agenerate([_prompt("a"), _prompt("b"), _prompt("c")])
        with pytest.raises(JudgeError, match="backend exploded"):
            await judge.acomplete(_prompt("d"))
        return results

    results = asyncio.run(main())
    assert len(results) == 3 and all(isinstance(result, JudgeError) for result in results)
    assert len({id(result) for result in results}) == 3
    assert isinstance(results[0].__cause__, RuntimeError)
    assert judge.stats.failures == 4 and judge.stats.requests == 4


def test_per_request_error_fails_only_that_request() -> None:
    judge = RecordingJudge()
    results = judge.generate([_prompt("a"), _prompt("refuse"), _prompt("c")])
    assert results[0] == "echo:a" and results[2] == "echo:c"
    assert isinstance(results[1], JudgeError)
    assert judge.stats.failures == 1


def test_event_loop_stays_free_during_a_batch() -> None:
    judge = RecordingJudge(delay=0.3)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await judge.acomplete(_prompt("slow"))
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 10


def test_worker_restarts_after_aclose_and_across_loops() -> None:
    judge = RecordingJudge()
    assert judge.generate([_prompt("a")]) == ["echo:a"]
    assert judge.generate([_prompt("b")]) == ["echo:b"]  # asyncio.run made a new loop: a new worker

    async def main() -> tuple[str, str]:
        first = await judge.acomplete(_prompt("c"))
        await judge.aclose()
        return first, await judge.acomplete(_prompt("d"))

    assert asyncio.run(main()) == ("echo:c", "echo:d")
    assert judge.generate([]) == []


def test_aclose_answers_what_is_queued() -> None:
    judge = RecordingJudge(delay=0.05, max_batch_size=2)

    async def main() -> list[str]:
        tasks = [asyncio.create_task(judge.acomplete(_prompt(f"q{i}"))) for i in range(5)]
        await asyncio.sleep(0)  # let every task enqueue its request
        await judge.aclose()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [f"echo:q{i}" for i in range(5)]


def test_invalid_batch_size() -> None:
    with pytest.raises(ValueError):
        RecordingJudge(max_batch_size=0)


# --- TransformersJudge on the embedded SmolLM2 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_judge():
    from trl_longreward.judges.transformers_judge import TransformersJudge

    return TransformersJudge(max_batch_size=8)


@pytest.mark.slow
def test_transformers_judge_answers_a_batch(smollm2_judge) -> None:
    from trl_longreward.models import DEFAULT_MODEL_NAME

    judge = smollm2_judge
    assert judge.model_id == DEFAULT_MODEL_NAME
    assert judge.tokenizer.chat_template
    france = _prompt("What is the capital of France?", max_tokens=24)
    requests = [
        france,
        _prompt("What is 2 + 2? Answer with a number.", max_tokens=12),
        ChatRequest(
            messages=(
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Name a primary color."},
            ),
            max_tokens=12,
        ),
        france,
    ]

    async def main() -> list[str]:
        return await asyncio.gather(*(judge.acomplete(request) for request in requests))

    answers = asyncio.run(main())
    assert all(isinstance(answer, str) and answer for answer in answers)
    assert "Paris" in answers[0]
    assert answers[3] == answers[0]  # greedy decoding is deterministic, batched or not
    assert judge.generate([france]) == [answers[0]]
    assert judge.stats.completion_tokens > 0


@pytest.mark.slow
def test_transformers_judge_too_long_input_is_a_judge_error(smollm2_judge) -> None:
    judge = smollm2_judge
    too_long = _prompt("word " * 9000, max_tokens=8)
    results = judge.generate([too_long, _prompt("What is the capital of France?", max_tokens=16)])
    assert isinstance(results[0], JudgeError) and "window" in str(results[0])
    assert "Paris" in results[1]
    # The window it enforces is the one it reports (the completeness notes are sized from it).
    assert judge.context_window == judge.model.config.max_position_embeddings == 8192


@pytest.mark.slow
def test_transformers_judge_sampling_is_seeded(smollm2_judge) -> None:
    import torch

    request = _prompt("Write one sentence about the sea.", temperature=0.9, top_p=0.95, max_tokens=12)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    (answer,) = smollm2_judge.generate([request])
    assert isinstance(answer, str) and answer
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream was not consumed


_INSTRUCTIONS = (
    "You are an impartial evaluator. Read the question and the response, think about whether the response answers "
    "the question, and then give a score from 0 to 10. "
) * 8  # a long shared instruction block, as every LongReward prompt of one kind starts with


@pytest.mark.slow
def test_prefix_cache_and_mixed_budgets_give_the_plain_answers(smollm2_judge) -> None:
    """Greedy answers with the prefix cache (several entries, cropped and extended, rows with different budgets and
    a continued assistant message in one batch) equal those of a judge without it, and most prompt tokens were cached."""
    from trl_longreward.judges.transformers_judge import TransformersJudge

    plain = TransformersJudge(smollm2_judge.model, smollm2_judge.tokenizer, prefix_cache_size=0)
    cached = TransformersJudge(smollm2_judge.model, smollm2_judge.tokenizer)
    questions = ["What is the capital of France?", "Who wrote Hamlet?", "What is 2 + 2?"]
    first = [
        _prompt(f"{_INSTRUCTIONS}\nQuestion: {q}\nResponse: I am not sure.", max_tokens=8 + 4 * i)
        for i, q in enumerate(questions)
    ]
    continued = ChatRequest(
        messages=(
            {"role": "user", "content": f"{_INSTRUCTIONS}\nQuestion: {questions[0]}\nResponse: Paris."},
            {"role": "assistant", "content": "The response names the right city.\n\nScore: [["},
        ),
        max_tokens=3,
    )
    other_kind = _prompt("Translate into French: good morning, my friend.", max_tokens=6)
    second = [_prompt(f"{_INSTRUCTIONS}\nQuestion: {q}\nResponse: Paris.", max_tokens=5) for q in questions[:2]]
    for batch in (first, [continued, other_kind, *second], [second[0]]):
        expected = plain.generate(batch)
        assert cached.generate(batch) == expected
        assert all(isinstance(text, str) for text in expected)
    assert cached.prefix_stats["cached_tokens"] > 0.6 * cached.prefix_stats["prompt_tokens"]
    assert plain.prefix_stats["cached_tokens"] == 0
    # each row stopped at its own budget (3 new tokens at most for the continuation)
    assert len(smollm2_judge.tokenizer(cached.generate([continued])[0]).input_ids) <= 3
    assert len(cached._prefixes) <= cached.prefix_cache_size


def test_prefix_cache_turns_itself_off_for_sliding_window_models() -> None:
    """A cache that is not plain per-layer keys and values (here: sliding windows) cannot be cropped and padded; the
    judge then prefills every prompt in full and still answers as a judge without a prefix cache."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from trl_longreward.judges.transformers_judge import TransformersJudge
    from trl_longreward.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        max_position_embeddings=2048,
    )
    model = MistralForCausalLM(config).eval()
    requests = [_prompt(f"{_INSTRUCTIONS} Question {i}?", max_tokens=4) for i in range(3)]
    expected = TransformersJudge(model, tokenizer, prefix_cache_size=0).generate(requests)
    judge = TransformersJudge(model, tokenizer)
    assert judge.generate(requests) == expected
    assert judge._prefixes is None and judge.generate(requests) == expected


# --- VLLMJudge ------------------------------------------------------------------------------------------------------


class _StubVLLM:
    """Stands in for the `vllm` module: records what `LLM.chat` receives and answers with fixed texts."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        stub = self

        class SamplingParams:
            def __init__(self, **kwargs: object) -> None:
                self.kwargs = kwargs

        class LLM:
            def __init__(self, model: str, **kwargs: object) -> None:
                self.model = model

            def chat(self, conversations, params, **kwargs):
                stub.calls.append({"conversations": conversations, "params": params, **kwargs})
                output = type("Completion", (), {"text": " 7]] ", "token_ids": [1, 2]})
                return [type("RequestOutput", (), {"outputs": [output]}) for _ in conversations]

        self.SamplingParams, self.LLM = SamplingParams, LLM


def test_vllm_judge_mixes_budgets_and_continues_assistant_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract with `vllm.LLM.chat` (no GPU here): new turns and continuations go in separate calls with the
    matching chat-template flags, every request keeps its own sampling parameters."""
    from trl_longreward.judges.vllm_judge import VLLMJudge

    stub = _StubVLLM()
    monkeypatch.setitem(sys.modules, "vllm", stub)
    judge = VLLMJudge("stub/model")
    continued = ChatRequest(
        messages=({"role": "user", "content": "Rate it."}, {"role": "assistant", "content": "Fine.\nScore: [["}),
        max_tokens=6,
    )
    results = judge.generate([_prompt("Rate this.", max_tokens=96), continued, _prompt("And this.", max_tokens=48)])
    assert results == ["7]]"] * 3
    turns, continuations = stub.calls
    assert turns["add_generation_prompt"] is True and turns["continue_final_message"] is False
    assert [p.kwargs["max_tokens"] for p in turns["params"]] == [96, 48]
    assert continuations["add_generation_prompt"] is False and continuations["continue_final_message"] is True
    assert continuations["conversations"] == [list(continued.messages)]
    assert [p.kwargs["max_tokens"] for p in continuations["params"]] == [6]
    assert judge.stats.completion_tokens == 6


def test_vllm_judge_without_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl_longreward.judges.vllm_judge import VLLMJudge

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match=r'pip install "trl-longreward\[vllm\]"'):
        VLLMJudge("any/model")
