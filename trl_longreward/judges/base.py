"""The judge interface: a batch of chat requests in, texts out.

A judge backend knows nothing about LongReward's dimensions: it turns chat messages plus sampling parameters into
text. Everything above it (prompts, parsing, retries on unparseable answers, caching) lives in `trl_longreward.reward`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class VerdictConstraint:
    """Structured verdict decoding: the answer must END with `[[choice]]`, one of `choices`; what comes before it (the
    judge's reasoning) is free.

    `cue` is what a backend that forces the verdict itself (the transformers judge, when the budget runs out) writes
    before `[[`: the verdict line of the prompt's examples. `opened`: the request continues an answer that already ends
    with the opening `[[` (a verdict follow-up), so the answer is only `choice]]`. Backends with a grammar engine take
    `regex()` (vLLM's `structured_outputs`).
    """

    choices: tuple[str, ...]
    cue: str = "\n\n"
    opened: bool = False

    def __post_init__(self) -> None:
        if not self.choices or any(not c or "[" in c or "]" in c for c in self.choices):
            raise ValueError(f"VerdictConstraint needs non-empty choices without brackets, got {self.choices!r}.")

    def regex(self) -> str:
        """The whole answer as a regular expression: free text, then the verdict (only the verdict when `opened`)."""
        # Longest first: a regex engine that takes the first alternative that matches never stops at "1" of "10".
        alternatives = "|".join(_regex_escape(c) for c in sorted(self.choices, key=len, reverse=True))
        verdict = rf"(?:{alternatives})\]\]"
        return verdict if self.opened else rf"[\s\S]*\[\[{verdict}"


def _regex_escape(text: str) -> str:
    """Escape the regex metacharacters only (`re.escape` also escapes spaces, which not every grammar engine reads)."""
    return "".join("\\" + ch if ch in ".^$*+?{}[]\\|()" else ch for ch in text)


@dataclass(frozen=True)
class ChatRequest:
    """One judge call: a chat conversation and how to sample the answer.

    When the last message is the assistant's, the judge CONTINUES that message (a prefilled answer, e.g. a verdict
    cue after the judge's own analysis) instead of opening a new assistant turn; see `continues_final_message`.
    `verdict` (structured verdict decoding, `LongRewardConfig.verdict_decoding`): the answer must end with that
    verdict; None leaves the answer free.
    """

    messages: tuple[Message, ...]
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0
    verdict: VerdictConstraint | None = None

    @classmethod
    def from_prompt(cls, prompt: str, **sampling) -> ChatRequest:
        return cls(messages=({"role": "user", "content": prompt},), **sampling)

    @property
    def continues_final_message(self) -> bool:
        """Whether the answer continues the final (assistant) message rather than starting a new turn."""
        return bool(self.messages) and self.messages[-1].get("role") == "assistant"

    def sampling_key(self) -> tuple[float, int, float]:
        return (self.temperature, self.max_tokens, self.top_p)

    def fingerprint(self) -> str:
        """A stable hash of the request (messages and sampling), part of the judge-call cache key."""
        fields = asdict(self)
        if fields["verdict"] is None:  # free decoding keeps the keys it always had
            del fields["verdict"]
        payload = json.dumps(fields, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def identity_digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value (sorted keys; other objects by `str`), for cache identities."""
    payload = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class JudgeError(RuntimeError):
    """A judge call failed for good (after the backend's own transport retries). A later run may succeed (the server
    was down, overloaded, timed out), so the failure is not cached: a rerun sends the call again."""


class PermanentJudgeError(JudgeError):
    """The judge refused this request itself (HTTP 400, 413 or 422: the prompt is over the context window, a
    parameter is invalid): sending it again gets the same refusal, so it is not retried, and the judge-call cache
    stores it as a failure so that a rerun does not send it again. The message is the server's."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JudgeFatalError(BaseException):
    """Every judge call would fail the same way (the API key is rejected, the replicas serve different models): the
    run stops at once instead of recording every call as failed.

    A `BaseException`, like `KeyboardInterrupt`, so that no `except Exception` that turns one failed dimension into a
    missing score swallows it."""


class JudgeAuthError(JudgeFatalError):
    """The judge answered 401 or 403: the API key (read from `judge_api_key_env`) is missing or not accepted."""


class JudgeConfigError(JudgeFatalError):
    """The judge is misconfigured, e.g. `judge_base_url` lists replicas that serve different models."""


# The judge call running in this context counts its HTTP requests here (see `request_meter`).
_REQUEST_METER: ContextVar[list[int] | None] = ContextVar("trl_longreward_judge_requests", default=None)


@contextmanager
def request_meter() -> Iterator[list[int]]:
    """Count the HTTP requests a backend sends (`record_requests`) for the judge calls awaited in this block, e.g.
    `with request_meter() as sent: await judge.acomplete(request)`, then `sent[0]`. Tasks started inside share it."""
    meter = [0]
    token = _REQUEST_METER.set(meter)
    try:
        yield meter
    finally:
        _REQUEST_METER.reset(token)


def record_requests(count: int) -> None:
    """Add `count` HTTP requests (attempts, retries included) to the meter of the running judge call, if any."""
    meter = _REQUEST_METER.get()
    if meter is not None:
        meter[0] += count


@dataclass
class JudgeStats:
    """Counters a backend keeps; read them to see what a run cost: `requests` are calls (one per request answered or
    failed), `http_requests` what an HTTP backend sent for them (every attempt)."""

    requests: int = 0
    failures: int = 0
    completion_tokens: int = 0
    http_requests: int = 0  # HTTP backends: every request sent, transport retries included
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, failures: int = 0, completion_tokens: int = 0, http_requests: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.failures += failures
            self.completion_tokens += completion_tokens
            self.http_requests += http_requests

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "completion_tokens": self.completion_tokens,
            "http_requests": self.http_requests,
        }

    def __getstate__(self) -> dict:
        return self.as_dict()  # a lock does not pickle; the copy gets its own

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())


class Judge(ABC):
    """Base class of judge backends.

    Subclasses implement `agenerate` (a batch of requests -> one text each, a `JudgeError` in the slot of a request
    that failed for good, a `PermanentJudgeError` for one the judge refused; a `JudgeFatalError` is raised) and set
    `model_id`, which names the judge in reports and, with `cache_identity()`, in cache keys. All coroutines of one
    judge run on one event loop (the owning `LongRewardFunction` keeps a private loop thread for that).
    """

    model_id: str = "judge"
    # A user-given name of the judge's model state (`LongRewardConfig.judge_fingerprint`), part of every cache key.
    fingerprint: str | None = None
    # Whether the backend reports its HTTP requests with `record_requests` (else each call counts as one request).
    counts_requests: bool = False

    def __init__(self) -> None:
        self.stats = JudgeStats()

    def cache_identity(self) -> dict[str, Any]:
        """Everything about this judge that can change its answer to a request, as a JSON-able dict: the judge-call
        cache key is built from it (with the request, the prompt template and the attempt), so a cached answer is
        reused only by the same judge. Default: the backend class, `model_id` and `fingerprint`; backends add their
        model state and settings. Settings that cannot change an answer (URLs, keys, limits, timeouts) stay out.

        An optional `"context_limits"` entry (e.g. the server's context window) keys only stored permanent failures:
        a larger window sends a refused prompt again, and answers stay valid."""
        identity: dict[str, Any] = {"backend": type(self).__name__, "model": self.model_id}
        if self.fingerprint is not None:
            identity["fingerprint"] = self.fingerprint
        return identity

    async def acache_identity(self) -> dict[str, Any] | None:
        """`cache_identity()`, for backends that must ask a server first. None while it cannot be known (the server
        is unreachable): the call is then sent without a cache lookup."""
        return self.cache_identity()

    @property
    def context_window(self) -> int | None:
        """The judge's context window in tokens (prompt + answer) when known, else None. The completeness
        dimension keeps its notes to at most half of it."""
        return None

    @abstractmethod
    async def agenerate(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        """Answer every request; a request that failed for good yields a `JudgeError` in its slot."""

    async def acomplete(self, request: ChatRequest) -> str:
        """Answer one request, raising `JudgeError` on failure."""
        (result,) = await self.agenerate([request])
        if isinstance(result, JudgeError):
            raise result
        return result

    def generate(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        """Synchronous convenience wrapper (not for use inside a running event loop)."""
        return asyncio.run(self.agenerate(requests))

    def describe(self) -> dict[str, str]:
        """What to write in reports and model cards about this judge. Never includes secrets."""
        return {"backend": type(self).__name__, "model": self.model_id}

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients or models; default: nothing to release."""
