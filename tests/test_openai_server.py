"""The scripted OpenAI-compatible server, exercised through the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletion

from trl_longreward.testing import ScriptedOpenAIServer
from trl_longreward.testing.openai_server import NO_VERDICT_TEXT

REPO_ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "Rate this answer."}]


def echo_responder(messages: list[dict], body: dict) -> str:
    """Answers with a verdict that names the last user message, so tests can tell answers apart."""
    return f"[[7]] {messages[-1]['content']}"


_open_clients: list[openai.OpenAI] = []


def client_for(server: ScriptedOpenAIServer, **kwargs: object) -> openai.OpenAI:
    """A real client for the server; closed after the test so no socket is left for the garbage collector."""
    client = openai.OpenAI(base_url=server.base_url, api_key="test", **kwargs)  # type: ignore[arg-type]
    _open_clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open_clients:
        _open_clients.pop().close()


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(echo_responder) as srv:
        yield srv


def test_chat_completion_returns_responder_text_and_logs_body(server: ScriptedOpenAIServer) -> None:
    client = client_for(server, max_retries=0)
    completion = client.chat.completions.create(
        model="scripted-judge", messages=MESSAGES, temperature=0.3, max_tokens=17
    )
    assert isinstance(completion, ChatCompletion)
    assert completion.object == "chat.completion"
    assert completion.model == "scripted-judge"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "[[7]] Rate this answer."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 7  # "You are a judge." + "Rate this answer." in whitespace words
    assert completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == 11

    assert server.num_chat_requests == 1
    logged = server.requests[0]
    assert logged["messages"] == MESSAGES
    assert logged["temperature"] == 0.3
    assert logged["max_tokens"] == 17
    assert server.max_in_flight == 1


def test_models_endpoint_lists_the_model(server: ScriptedOpenAIServer) -> None:
    models = client_for(server).models.list()
    assert [model.id for model in models.data] == ["scripted-judge"]


def test_embeddings_endpoint_float_and_base64() -> None:
    def embedder(texts: list[str]) -> list[list[float]]:
        return [[float(len(text)), 1.0, -0.5] for text in texts]

    with ScriptedOpenAIServer(echo_responder, embedder=embedder) as srv:
        client = client_for(srv, max_retries=0)
        # The client asks for base64 by default and decodes it itself.
        batch = client.embeddings.create(model="emb", input=["abc", "hello"])
        assert [item.embedding for item in batch.data] == [[3.0, 1.0, -0.5], [5.0, 1.0, -0.5]]
        assert [item.index for item in batch.data] == [0, 1]
        single = client.embeddings.create(model="emb", input="four", encoding_format="float")
        assert single.data[0].embedding == [4.0, 1.0, -0.5]
        assert single.usage.prompt_tokens == 1
        # Embedding calls are not chat requests.
        assert srv.num_chat_requests == 0


def test_embeddings_absent_without_embedder(server: ScriptedOpenAIServer) -> None:
    with pytest.raises(openai.NotFoundError):
        client_for(server, max_retries=0).embeddings.create(model="emb", input="x")


def test_latency_and_rate_limit_under_concurrency() -> None:
    async def run(srv: ScriptedOpenAIServer) -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="test", max_retries=10)
        calls = [
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(16)
        ]
        try:
            results = await asyncio.gather(*calls)
        finally:
            await client.close()
        return [r.choices[0].message.content for r in results]

    with ScriptedOpenAIServer(echo_responder, latency_s=0.2, max_concurrency=4) as srv:
        started = time.monotonic()
        contents = asyncio.run(run(srv))
        elapsed = time.monotonic() - started
        assert contents == [f"[[7]] q{i}" for i in range(16)]
        assert srv.max_in_flight <= 4
        assert srv.num_rejected > 0
        # Every attempt is logged: 16 admitted answers plus each rejected try.
        assert srv.num_chat_requests == 16 + srv.num_rejected
        # 16 requests through 4 slots of 0.2 s cannot finish faster than 4 rounds.
        assert elapsed >= 0.8


@pytest.mark.parametrize(
    ("fault", "error_type", "status"),
    [
        ("500", openai.InternalServerError, 500),
        ("502", openai.InternalServerError, 502),
        ("503", openai.InternalServerError, 503),
        ("429", openai.RateLimitError, 429),
    ],
)
def test_status_faults(fault: str, error_type: type[openai.APIStatusError], status: int) -> None:
    with ScriptedOpenAIServer(echo_responder, fault_rate=1.0, faults=[fault]) as srv:
        with pytest.raises(error_type) as info:
            client_for(srv, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.status_code == status
        if fault == "429":
            assert info.value.response.headers["retry-after"] == "0"
        assert srv.num_faults == {fault: 1}


def test_timeout_fault() -> None:
    with ScriptedOpenAIServer(echo_responder, fault_rate=1.0, faults=["timeout"]) as srv:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client_for(srv, max_retries=0, timeout=0.5).chat.completions.create(model="m", messages=MESSAGES)
        assert time.monotonic() - started < 3.0
        assert srv.num_faults == {"timeout": 1}
    # stop() woke the stalled handler instead of waiting out the 5 s stall (checked by the suite's runtime).


def test_timeout_fault_answers_normally_for_a_patient_client() -> None:
    with ScriptedOpenAIServer(echo_responder, fault_rate=1.0, faults=["timeout"], timeout_sleep_s=0.2) as srv:
        completion = client_for(srv, max_retries=0, timeout=5.0).chat.completions.create(model="m", messages=MESSAGES)
        assert completion.choices[0].message.content == "[[7]] Rate this answer."


def test_disconnect_fault() -> None:
    with ScriptedOpenAIServer(echo_responder, fault_rate=1.0, faults=["disconnect"]) as srv:
        with pytest.raises(openai.APIConnectionError) as info:
            client_for(srv, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
        # A dropped connection, not a timeout (APITimeoutError subclasses APIConnectionError).
        assert not isinstance(info.value, openai.APITimeoutError)
        assert srv.num_faults == {"disconnect": 1}


def test_malformed_fault() -> None:
    # The client decodes an application/json body after the status check, outside its retry loop, so a broken
    # body surfaces as a plain JSONDecodeError (not an openai error) and is not retried.
    with ScriptedOpenAIServer(echo_responder, fault_rate=1.0, faults=["malformed"]) as srv:
        with pytest.raises(json.JSONDecodeError):
            client_for(srv, max_retries=3).chat.completions.create(model="m", messages=MESSAGES)
        assert srv.num_chat_requests == 1
        assert srv.num_faults == {"malformed": 1}


def test_no_verdict_fault() -> None:
    with ScriptedOpenAIServer(echo_responder, fault_rate=1.0, faults=["no_verdict"]) as srv:
        completion = client_for(srv, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
        assert completion.choices[0].message.content == NO_VERDICT_TEXT == "I am not sure."
        assert srv.num_faults == {"no_verdict": 1}


def test_retries_recover_from_transient_faults() -> None:
    # Half the attempts fail with a retryable fault; the client's own retries get every call through.
    with ScriptedOpenAIServer(echo_responder, fault_rate=0.5, faults=["500", "503"], seed=3) as srv:
        client = client_for(srv, max_retries=8)
        for i in range(4):
            content = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
            assert content.choices[0].message.content == f"[[7]] q{i}"
        assert sum(srv.num_faults.values()) == srv.num_chat_requests - 4


def test_fault_sequence_is_seeded() -> None:
    def outcomes(seed: int) -> list[str]:
        with ScriptedOpenAIServer(echo_responder, fault_rate=0.5, faults=["500", "no_verdict"], seed=seed) as srv:
            client = client_for(srv, max_retries=0)
            seen = []
            for _ in range(12):
                try:
                    seen.append(
                        client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
                    )
                except openai.InternalServerError:
                    seen.append("500")
            return seen

    first = outcomes(7)
    assert first == outcomes(7)
    assert set(first) == {"500", NO_VERDICT_TEXT, "[[7]] Rate this answer."}


def test_responder_error_becomes_500() -> None:
    def broken(messages: list[dict], body: dict) -> str:
        raise RuntimeError("judge exploded")

    with ScriptedOpenAIServer(broken) as srv:
        with pytest.raises(openai.InternalServerError) as info:
            client_for(srv, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
        assert "judge exploded" in str(info.value)


def test_set_down_and_back_up(server: ScriptedOpenAIServer) -> None:
    client = client_for(server, max_retries=0)
    server.set_down(True)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 503
    with pytest.raises(openai.InternalServerError):
        client.models.list()
    server.set_down(False)
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content.startswith("[[7]]")
    assert server.num_chat_requests == 2


def test_reset_counters(server: ScriptedOpenAIServer) -> None:
    client = client_for(server, max_retries=0)
    client.chat.completions.create(model="m", messages=MESSAGES)
    assert server.num_chat_requests == 1
    server.reset_counters()
    assert server.num_chat_requests == 0
    assert server.requests == []
    assert server.max_in_flight == 0
    assert server.num_rejected == 0


def test_health_and_clean_shutdown() -> None:
    before = threading.active_count()
    srv = ScriptedOpenAIServer(echo_responder).start()
    client = client_for(srv, max_retries=0)
    with urllib.request.urlopen(srv.base_url.removesuffix("/v1") + "/health", timeout=5) as response:
        assert response.status == 200
    # The client keeps its connection alive; stop() must not wait on the idle handler thread.
    client.chat.completions.create(model="m", messages=MESSAGES)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 2.0
    assert threading.active_count() == before


def test_cli_serves_fixed_reply() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trl_longreward.testing.openai_server", "--latency", "0.01", "--max-concurrency", "8"]
        + ["--reply", "[[7]]"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with openai.OpenAI(base_url=base_url, api_key="test", max_retries=0) as client:
            completion = client.chat.completions.create(model="m", messages=MESSAGES)
        assert completion.choices[0].message.content == "[[7]]"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("fault", ["disconnect", "truncated"])
def test_cli_server_hangs_up_cleanly_on_a_connection_fault(fault: str) -> None:
    """Run as a program (`python -m`), the server drops the connection for these faults without a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trl_longreward.testing.openai_server", "--fault-rate", "1", "--faults", fault],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        with openai.OpenAI(base_url=base_url, api_key="test", max_retries=0) as client:
            with pytest.raises(openai.APIConnectionError):
                client.chat.completions.create(model="m", messages=MESSAGES)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
