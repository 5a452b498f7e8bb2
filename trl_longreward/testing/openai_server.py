"""A scripted OpenAI-compatible judge server on loopback, built on the standard library only.

`ScriptedOpenAIServer` answers `POST /v1/chat/completions` with text from a Python callable (the *responder*), in
exactly the JSON shape OpenAI's API uses, so code under test can talk to it through the real `openai` client. It can
also simulate what makes a remote judge hard to use: latency, a rate limiter (`max_concurrency` -> 429), seeded
random faults (5xx, 429 with `Retry-After`, hangs, dropped connections, bodies cut short, broken JSON, answers without
a verdict), a context window (`max_context_tokens` / `max_context_chars` -> 400), an API key it requires (`api_key`
-> 401 or 403 for any other) and full outages (`set_down`). `/v1/models` reports what it serves as vLLM does
(`root`, `owned_by`, `max_model_len`). Counters (`requests`, `request_log`, `max_in_flight`,
`max_in_flight_by_client`, `num_rejected`, `num_faults`, `num_answered`, `num_model_requests`) let tests assert what
happened.

Clients can be told apart: a path prefix names the client (`http://HOST:PORT/NAME/v1` is the same API as
`http://HOST:PORT/v1`, its requests counted under NAME), else the request's `user` field does.

Run it as a separate process for benchmarks::

    python -m trl_longreward.testing.openai_server --port 8123 --latency 0.05 --max-concurrency 8 --reply "[[7]]"

The first stdout line is the base URL; the server runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

Responder = Callable[[list[dict], dict], str]
"""(messages, full request body) -> assistant text."""

Embedder = Callable[[list[str]], list[list[float]]]
"""A batch of texts -> one vector each."""

FAULT_KINDS: tuple[str, ...] = (
    "500",
    "502",
    "503",
    "429",
    "timeout",
    "disconnect",
    "truncated",
    "malformed",
    "no_verdict",
)
NO_VERDICT_TEXT = "I am not sure."

# What a handler hits when the client went away first (broken pipe, reset, a socket shut by stop()), e.g. after the
# client's own timeout; nothing to report then. All are OSError subclasses.
_CLIENT_GONE = OSError

# `/NAME/v1/...`: the same API, with the client named in the path (see the module docstring).
_CLIENT_PREFIX = re.compile(r"^/([A-Za-z0-9_.-]+)(/v1/.*)$")


def _count_tokens(text: str) -> int:
    """A rough token count (whitespace words); only meant to make `usage` plausible."""
    return len(text.split())


def _content_text(content: Any) -> str:
    """The text of a message's content, which is a string or a list of typed parts in OpenAI's format."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _error_body(message: str, err_type: str, code: str | None = None) -> dict[str, Any]:
    """An error payload in OpenAI's shape, so the client's error objects carry the message."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


class _HTTPServer(ThreadingHTTPServer):
    """The socket server; holds a back reference to its `ScriptedOpenAIServer`."""

    # Handler threads must never keep the interpreter alive, and `stop()` joins them itself with a bound, so the
    # base class's unbounded join in `server_close` is switched off.
    daemon_threads = True
    block_on_close = False
    # A judge sees bursts of hundreds of concurrent connections; the default listen backlog of 5 would make the
    # kernel drop connection attempts and the client wait for a SYN retransmit (a full second).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], owner: ScriptedOpenAIServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up is routine here (timeouts, disconnect faults); anything else still gets reported.
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_GONE):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection; dispatches each request to the owning `ScriptedOpenAIServer`."""

    # HTTP/1.1 keeps connections alive, as a real API server does; every response therefore sets Content-Length.
    protocol_version = "HTTP/1.1"
    # Buffer writes and disable Nagle so headers and body leave as one segment: otherwise each small response waits
    # on the peer's delayed ACK (~40 ms), which would dominate every test and benchmark.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.owner._register_connection(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        except _CLIENT_GONE:
            pass
        finally:
            self.server.owner._unregister_connection(self.connection, threading.current_thread())

    def log_message(self, format: str, *args: Any) -> None:
        # Silence per-request logging: tests and benchmarks send thousands of requests.
        pass

    # --- response helpers -------------------------------------------------------------------------------------

    def send_raw(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """Write a full response; a client that already left is ignored."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except _CLIENT_GONE:
            self.close_connection = True

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_raw(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def send_error_json(self, status: int, message: str, err_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_json(status, _error_body(message, err_type, code=str(status)), headers)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # --- routing ----------------------------------------------------------------------------------------------

    client_name: str | None = None

    def _path(self) -> str:
        """The request path without query and trailing slash; a client-name prefix is stored and removed."""
        path = self.path.split("?", 1)[0].rstrip("/")
        self.client_name = None
        match = _CLIENT_PREFIX.match(path)
        if match is not None and match.group(1) != "v1":
            self.client_name, path = match.group(1), match.group(2)
        return path

    def do_GET(self) -> None:
        self.server.owner._handle_get(self, self._path())

    def do_POST(self) -> None:
        # Read the body before anything else so a keep-alive connection stays in sync whatever we answer.
        raw = self.read_body()
        self.server.owner._handle_post(self, self._path(), raw)


class ScriptedOpenAIServer:
    """An OpenAI-compatible chat/embeddings server answering from a Python callable.

    Args:
        responder: called as `responder(messages, body)` for each normal chat answer; its return value becomes the
            assistant message. If it raises, the request is answered 500 with the error message.
        model: the one model id listed by `/v1/models` and echoed in responses.
        host, port: where to bind; port 0 picks a free port (read it back from `base_url`).
        latency_s: time each admitted chat request takes at least (simulated judge latency); the responder's own
            time counts toward it.
        max_concurrency: if set, a chat request arriving while this many are being handled is answered 429 with
            `Retry-After: retry_after_s` (a rate limiter) and counted in `num_rejected`.
        fault_rate: probability that an admitted chat request gets a fault instead of a normal answer.
        faults: fault kinds drawn uniformly when a fault fires; any of `FAULT_KINDS`: "500"/"502"/"503" (that status),
            "429" (rate limited, with `Retry-After`), "timeout" (stall `timeout_sleep_s`, then answer normally),
            "disconnect" (close the connection without a response), "truncated" (headers and half the body, then
            close), "malformed" (200 with a broken JSON body), "no_verdict" (200 with `NO_VERDICT_TEXT`).
        seed: seed of the fault draws, so a run's fault sequence is reproducible for a given arrival order.
        embedder: serves `POST /v1/embeddings` when given (404 otherwise).
        timeout_sleep_s: how long a "timeout" fault stalls before answering normally.
        retry_after_s: the `Retry-After` header (seconds) of every 429, injected or from the rate limiter.
        max_context_tokens: the judge's context window: a chat request whose messages (in whitespace-separated
            words) plus its `max_tokens` exceed it is answered 400 `context_length_exceeded`, as vLLM does.
        max_context_chars: the same limit in characters of the messages (for text without spaces, e.g. CJK).
        root: what `/v1/models` reports as the model's `root` (vLLM: the checkpoint it loaded); None: no `root`.
        owned_by: what `/v1/models` reports as the model's `owned_by`.
        api_key: the one key accepted (`Authorization: Bearer KEY`); any other request is answered `auth_status`
            (401 or 403) on every path under /v1, as `vllm serve --api-key` does. None: any key.
        auth_status: the status of a request with a wrong key: 401 (unauthorized) or 403 (forbidden).

    Every chat request body received is appended to `requests` (including those answered with a fault, a 429, a 400
    or a 503), so `num_chat_requests` counts what actually reached the judge, retries included; `request_log` holds,
    in the same order, each request's client name, API key, arrival time (`time.monotonic()`), retry number (the
    `openai` client's `x-stainless-retry-count` header: 0 for a call's first request, None without it) and outcome
    ("answered", a fault kind, "rejected", "down", "too_long", "unauthorized" or "error"). A request counts as in flight from its arrival until the server starts writing
    its answer, so `max_in_flight` never exceeds what the clients had in flight.
    """

    def __init__(
        self,
        responder: Responder,
        *,
        model: str = "scripted-judge",
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        fault_rate: float = 0.0,
        faults: Sequence[str] = ("500",),
        seed: int = 0,
        embedder: Embedder | None = None,
        timeout_sleep_s: float = 5.0,
        retry_after_s: float = 0.0,
        max_context_tokens: int | None = None,
        max_context_chars: int | None = None,
        root: str | None = None,
        owned_by: str = "trl_longreward",
        api_key: str | None = None,
        auth_status: int = 401,
    ) -> None:
        if auth_status not in (401, 403):
            raise ValueError(f"auth_status must be 401 or 403, got {auth_status}")
        unknown = [kind for kind in faults if kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; choose from {list(FAULT_KINDS)}")
        if fault_rate > 0 and not faults:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        for name, limit in (("max_context_tokens", max_context_tokens), ("max_context_chars", max_context_chars)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}")
        self.responder = responder
        self.model = model
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.embedder = embedder
        self.timeout_sleep_s = timeout_sleep_s
        self.retry_after_s = retry_after_s
        self.max_context_tokens = max_context_tokens
        self.max_context_chars = max_context_chars
        self.root = root
        self.owned_by = owned_by
        self.api_key = api_key
        self.auth_status = auth_status
        self.num_model_requests = 0  # GET /v1/models received

        self.requests: list[dict] = []
        self.request_log: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self.max_in_flight_by_client: dict[str, int] = {}
        self.num_rejected = 0
        self.num_faults: dict[str, int] = dict.fromkeys(self.faults, 0)
        self._in_flight_by_client: dict[str, int] = {}

        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._down = False
        # Set on stop() so sleeping handlers (latency, "timeout" faults) wake up instead of outliving the server.
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> ScriptedOpenAIServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="scripted-openai-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and wait (bounded) for handler threads to finish."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        # Idle keep-alive connections leave handler threads blocked in a read; shutting the sockets wakes them.
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        for _, thread in connections:
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The URL to give the `openai` client, e.g. "http://127.0.0.1:PORT/v1"."""
        return f"http://{self.host}:{self.port}/v1"

    # --- counters and switches --------------------------------------------------------------------------------

    @property
    def num_chat_requests(self) -> int:
        """How many chat-completion requests arrived (every attempt, whatever the answer was)."""
        with self._lock:
            return len(self.requests)

    @property
    def num_answered(self) -> int:
        """How many chat requests got a normal answer from the responder (no fault, no error)."""
        with self._lock:
            return sum(1 for entry in self.request_log if entry["outcome"] == "answered")

    def clients_seen(self) -> set[str]:
        """Names of the clients that sent at least one chat request (see the module docstring)."""
        with self._lock:
            return {entry["client"] for entry in self.request_log}

    @property
    def retry_after_header(self) -> dict[str, str]:
        return {"Retry-After": f"{self.retry_after_s:g}"}

    def reset_counters(self) -> None:
        """Forget logged requests and zero every counter (the fault RNG keeps its state)."""
        with self._lock:
            self.requests.clear()
            self.request_log.clear()
            self.max_in_flight = 0
            self.max_in_flight_by_client.clear()
            self.num_rejected = 0
            self.num_faults = dict.fromkeys(self.faults, 0)
            self.num_model_requests = 0

    def set_down(self, down: bool) -> None:
        """Simulate a judge outage: while down, every request is answered 503."""
        with self._lock:
            self._down = down

    # --- connection bookkeeping (called from handler threads) -------------------------------------------------

    def _register_connection(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections[sock] = thread

    def _unregister_connection(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections.pop(sock, None)

    def _is_down(self) -> bool:
        with self._lock:
            return self._down

    # --- request handling -------------------------------------------------------------------------------------

    def _answer_down(self, handler: _Handler) -> None:
        handler.send_error_json(503, "The judge server is down.", "server_error")

    def _unauthorized(self, handler: _Handler) -> bool:
        """Whether the request lacks the required key (then it was answered 401/403, in OpenAI's shape)."""
        if self.api_key is None:
            return False
        if (handler.headers.get("Authorization") or "").removeprefix("Bearer ") == self.api_key:
            return False
        if self.auth_status == 401:
            message, kind = "Incorrect API key provided.", "invalid_request_error"
        else:
            message, kind = "This key may not use this model.", "permission_error"
        handler.send_error_json(self.auth_status, message, kind)
        return True

    def _handle_get(self, handler: _Handler, path: str) -> None:
        if path == "/v1/models":
            with self._lock:
                self.num_model_requests += 1
        if self._is_down():
            self._answer_down(handler)
        elif path == "/health":
            handler.send_json(200, {"status": "ok"})
        elif path.startswith("/v1/") and self._unauthorized(handler):
            return
        elif path == "/v1/models":
            model: dict[str, Any] = {"id": self.model, "object": "model", "created": 0, "owned_by": self.owned_by}
            if self.root is not None:
                model["root"] = self.root
            if self.max_context_tokens is not None:
                model["max_model_len"] = self.max_context_tokens
            handler.send_json(200, {"object": "list", "data": [model]})
        else:
            handler.send_error_json(404, f"Unknown path {path}", "invalid_request_error")

    def _handle_post(self, handler: _Handler, path: str, raw: bytes) -> None:
        if path not in ("/v1/chat/completions", "/v1/embeddings"):
            handler.send_error_json(404, f"Unknown path {path}", "invalid_request_error")
            return
        if path == "/v1/embeddings" and not self._is_down() and self._unauthorized(handler):
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as err:
            handler.send_error_json(400, f"Invalid JSON body: {err}", "invalid_request_error")
            return
        if path == "/v1/chat/completions":
            self._handle_chat(handler, body)
        else:
            self._handle_embeddings(handler, body)

    def _too_long(self, body: dict) -> str | None:
        """Why the request does not fit the context window (None when it does), worded as vLLM words it."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        texts = [_content_text(m.get("content")) for m in messages]
        if self.max_context_tokens is not None:
            prompt_tokens = sum(_count_tokens(text) for text in texts)
            completion_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
            if prompt_tokens + completion_tokens > self.max_context_tokens:
                return (
                    f"This model's maximum context length is {self.max_context_tokens} tokens. However, you requested "
                    f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} "
                    "in the completion). Please reduce the length of the messages or completion."
                )
        if self.max_context_chars is not None:
            chars = sum(len(text) for text in texts)
            if chars > self.max_context_chars:
                return (
                    f"This model's maximum context length is {self.max_context_chars} characters. However, your "
                    f"messages have {chars} characters. Please reduce the length of the messages."
                )
        return None

    def _handle_chat(self, handler: _Handler, body: dict) -> None:
        # Log, check outage, admit and draw a fault under one lock so the counters and the fault sequence follow
        # the order requests arrived in.
        client = handler.client_name or (body.get("user") if isinstance(body.get("user"), str) else None) or ""
        auth = handler.headers.get("Authorization") or ""
        entry: dict[str, Any] = {
            "client": client,
            "api_key": auth.removeprefix("Bearer "),
            "arrived": time.monotonic(),
            "outcome": "pending",
            "retry": _retry_count(handler.headers.get("x-stainless-retry-count")),
        }
        too_long = self._too_long(body)
        unauthorized = self.api_key is not None and entry["api_key"] != self.api_key
        down = admitted = False
        fault: str | None = None
        with self._lock:
            self.requests.append(body)
            self.request_log.append(entry)
            if self._down:
                down = True
                entry["outcome"] = "down"
            elif unauthorized:
                entry["outcome"] = "unauthorized"
            elif too_long is not None:
                entry["outcome"] = "too_long"
            elif self.max_concurrency is not None and self._in_flight >= self.max_concurrency:
                self.num_rejected += 1
                entry["outcome"] = "rejected"
            else:
                admitted = True
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
                mine = self._in_flight_by_client[client] = self._in_flight_by_client.get(client, 0) + 1
                self.max_in_flight_by_client[client] = max(self.max_in_flight_by_client.get(client, 0), mine)
                if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
                    fault = self._rng.choice(self.faults)
                    self.num_faults[fault] = self.num_faults.get(fault, 0) + 1
        if down:
            self._answer_down(handler)
            return
        if unauthorized:
            self._unauthorized(handler)
            return
        if too_long is not None:
            handler.send_json(400, _error_body(too_long, "invalid_request_error", code="context_length_exceeded"))
            return
        if not admitted:
            handler.send_error_json(429, "Too many concurrent requests.", "rate_limit_error", self.retry_after_header)
            return
        released = False

        def release(outcome: str) -> None:
            # Called just before the answer is written: once a client can see the answer, it may send its next
            # request, which must not find this one still counted.
            nonlocal released
            if released:
                return
            released = True
            with self._lock:
                self._in_flight -= 1
                self._in_flight_by_client[client] -= 1
                entry["outcome"] = outcome

        try:
            self._answer_chat(handler, body, fault, time.monotonic() + self.latency_s, release)
        finally:
            release("error")

    def _wait_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            self._stopping.wait(remaining)

    def _answer_chat(
        self, handler: _Handler, body: dict, fault: str | None, deadline: float, release: Callable[[str], None]
    ) -> None:
        """Answer after `deadline` (arrival + latency): the responder's own time counts toward the latency, so a
        slow responder does not stretch it, as a real judge's latency includes its compute. `release(outcome)` is
        called right before the answer is written."""
        if fault not in (None, "no_verdict"):
            self._wait_until(deadline)
        if fault in ("500", "502", "503"):
            release(fault)
            handler.send_error_json(int(fault), f"Injected fault {fault}.", "server_error")
            return
        if fault == "429":
            release(fault)
            handler.send_error_json(429, "Injected rate limit.", "rate_limit_error", self.retry_after_header)
            return
        if fault == "disconnect":
            # Close the socket with no response at all: the client sees the connection drop mid-request.
            release(fault)
            _hang_up(handler)
            return
        if fault == "truncated":
            # Announce a full body, send half of it and close: the client sees the connection cut mid-response.
            release(fault)
            payload = json.dumps(self._completion(body.get("messages") or [], "[[5]]")).encode("utf-8")
            try:
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(payload)))
                handler.end_headers()
                handler.wfile.write(payload[: len(payload) // 2])
                handler.wfile.flush()
            except OSError:
                pass
            _hang_up(handler)
            return
        if fault == "malformed":
            release(fault)
            handler.send_raw(200, b'{"id": "chatcmpl-broken", "choices": [', "application/json")
            return
        if fault == "timeout":
            # Stall long enough for a client with a short timeout to give up, then answer normally.
            self._stopping.wait(self.timeout_sleep_s)
        messages = body.get("messages") or []
        if fault == "no_verdict":
            text = NO_VERDICT_TEXT
        else:
            try:
                text = self.responder(messages, body)
            except Exception as err:  # any responder failure becomes a server error, as with a real judge
                self._wait_until(deadline)
                release("error")
                handler.send_error_json(500, f"Responder failed: {type(err).__name__}: {err}", "server_error")
                return
        completion = self._completion(messages, text)
        self._wait_until(deadline)
        release(fault or "answered")
        handler.send_json(200, completion)

    def _completion(self, messages: list[dict], text: str) -> dict[str, Any]:
        """A ChatCompletion payload in exactly OpenAI's shape."""
        prompt_tokens = sum(_count_tokens(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))
        completion_tokens = _count_tokens(text)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _handle_embeddings(self, handler: _Handler, body: dict) -> None:
        if self._is_down():
            self._answer_down(handler)
            return
        if self.embedder is None:
            handler.send_error_json(404, "This server has no embeddings endpoint.", "invalid_request_error")
            return
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
            handler.send_error_json(400, "`input` must be a string or a list of strings.", "invalid_request_error")
            return
        try:
            vectors = self.embedder(inputs)
        except Exception as err:  # any embedder failure becomes a server error
            handler.send_error_json(500, f"Embedder failed: {type(err).__name__}: {err}", "server_error")
            return
        # The openai client asks for base64 by default (little-endian float32), and decodes it transparently.
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, vector in enumerate(vectors):
            values = [float(x) for x in vector]
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii") if as_base64 else values
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_count_tokens(text) for text in inputs)
        handler.send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model") or self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a fixed reply as an OpenAI-compatible judge.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", default="scripted-judge")
    parser.add_argument("--reply", default="[[7]]", help="assistant text returned for every chat request")
    parser.add_argument("--latency", type=float, default=0.0, help="minimum seconds per chat request")
    parser.add_argument("--max-concurrency", type=int, default=None, help="answer 429 above this many in flight")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default="500", help=f"comma-separated, from {','.join(FAULT_KINDS)}")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _retry_count(header: str | None) -> int | None:
    """The retry number the `openai` client sends with each request (None when it sends none)."""
    try:
        return None if header is None else int(header)
    except ValueError:
        return None


def _hang_up(handler: Any) -> None:
    """Close the client's connection at once (whatever was sent so far is all it gets)."""
    handler.close_connection = True
    try:
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a fixed reply until SIGTERM or SIGINT; prints the base URL as the first stdout line."""
    args = _parse_args(argv)
    reply: str = args.reply
    server = ScriptedOpenAIServer(
        lambda messages, body: reply,
        model=args.model,
        host=args.host,
        port=args.port,
        latency_s=args.latency,
        max_concurrency=args.max_concurrency,
        fault_rate=args.fault_rate,
        faults=[kind.strip() for kind in args.faults.split(",") if kind.strip()],
        seed=args.seed,
    )
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    # The parent process reads this line to learn the port.
    print(server.base_url, flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
