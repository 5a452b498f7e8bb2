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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

Message = dict[str, str]


@dataclass(frozen=True)
class ChatRequest:
    """One judge call: a chat conversation and how to sample the answer.

    When the last message is the assistant's, the judge CONTINUES that message (a prefilled answer, e.g. a verdict
    cue after the judge's own analysis) instead of opening a new assistant turn; see `continues_final_message`.
    """

    messages: tuple[Message, ...]
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0

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
        payload = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeError(RuntimeError):
    """A judge call failed for good (after the backend's own transport retries)."""


@dataclass
class JudgeStats:
    """Counters a backend keeps; read them to see what a run cost."""

    requests: int = 0
    failures: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, failures: int = 0, completion_tokens: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.failures += failures
            self.completion_tokens += completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "failures": self.failures, "completion_tokens": self.completion_tokens}

    def __getstate__(self) -> dict:
        return self.as_dict()  # a lock does not pickle; the copy gets its own

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())


class Judge(ABC):
    """Base class of judge backends.

    Subclasses implement `agenerate` (a batch of requests -> one text each, raising `JudgeError` for a request that
    failed for good) and set `model_id`, which names the judge in cache keys and reports. All coroutines of one judge
    run on one event loop (the owning `LongRewardFunction` keeps a private loop thread for that).
    """

    model_id: str = "judge"

    def __init__(self) -> None:
        self.stats = JudgeStats()

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
