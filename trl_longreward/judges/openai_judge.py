"""A judge behind any OpenAI-compatible chat endpoint: `vllm serve`, `transformers serve`, hosted APIs.

One judge may stand for several identical replicas (one `vllm serve` per GPU node): each call goes to the least-loaded
replica in rotation, and a replica that fails is taken out for a cool-down (see `endpoints.EndpointPool`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import ChatRequest, Judge, JudgeError
from .endpoints import Dispatch, EndpointPool, parse_base_urls, redact_url


@dataclass
class _Attempt:
    """What one attempt on one endpoint gave: the text, or an error and whether another endpoint may try."""

    text: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    healthy: bool | None = None  # True: answered; False: failed for good (take it out); None: says nothing
    failover: bool = False


class OpenAIJudge(Judge):
    """Chat completions through the `openai` async client, over one endpoint or several replicas.

    Args:
        model: the model name at the endpoint(s).
        base_url: one URL (`http://127.0.0.1:8000/v1`), several as a list, or a comma-separated string. Several URLs
            must be replicas of the same judge model: a call may be answered by any of them.
        api_key_env: environment variable holding the API key (the same key is sent to every endpoint).
        max_concurrency: calls in flight at once *per endpoint* (per process); n endpoints take n x this many.
        timeout: seconds before one HTTP call times out.
        max_retries: transport retries of the client, per endpoint.
        extra_body: extra JSON fields of every request.
        endpoint_cooldown: seconds a failed endpoint stays out of rotation before it is probed again.
        context_window: the served model's context window in tokens, if known (None: unknown); used to size the
            completeness notes.

    Transport failures (429 honouring `Retry-After`, 5xx, timeouts, dropped connections) are retried by the client
    itself with exponential backoff; a 200 whose body is not JSON is retried here. Both draw on one budget of
    `max_retries` retries per call and endpoint, so one call sends at most `1 + max_retries` requests to an endpoint.
    An endpoint whose call still fails with a connection error,
    a timeout, a 5xx or malformed bodies is taken out of rotation for `endpoint_cooldown` seconds and the call is tried
    on another endpoint (at most once per endpoint); after the cool-down one call at a time probes it (without client
    retries, so a dead replica costs the probing call little), and the first success puts it back. When every
    endpoint is out of rotation a new call is still sent, with full retries, to the one due back first (with a single
    endpoint this is plain retry-then-fail). A call that fails for good becomes a `JudgeError`, which the reward
    records as a missing dimension; a rejected key or a bad request fails at once, on any endpoint.

    `endpoint_stats()` reports calls, failures and time out of rotation per endpoint.

    The API key is read from the environment variable `api_key_env` when the clients are built and is held only by
    the client objects: it is not an attribute of this judge, not part of `describe()` or the stats, not pickled.
    """

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str],
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 32,
        timeout: float = 300.0,
        max_retries: int = 5,
        extra_body: dict | None = None,
        endpoint_cooldown: float = 30.0,
        context_window: int | None = None,
    ) -> None:
        super().__init__()
        if context_window is not None and context_window < 1:
            raise ValueError(f"context_window must be >= 1 tokens, or None when unknown; got {context_window}.")
        self._context_window = context_window
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if endpoint_cooldown < 0:
            raise ValueError(f"endpoint_cooldown must be >= 0 seconds, got {endpoint_cooldown}.")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 (0 = no retry), got {max_retries}.")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        self.model_id = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.extra_body = extra_body
        self.endpoint_cooldown = endpoint_cooldown
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_url = base_url  # parsed and checked by the setter

    @property
    def context_window(self) -> int | None:
        return self._context_window

    # ----- endpoints -----

    @property
    def base_urls(self) -> list[str]:
        """The endpoint URLs, in the order given."""
        return [endpoint.url for endpoint in self._pool.endpoints]

    @property
    def base_url(self) -> str:
        """The endpoint URL; with several replicas, their URLs joined by commas."""
        return ",".join(self.base_urls)

    @base_url.setter
    def base_url(self, value: str | Sequence[str]) -> None:
        urls = parse_base_urls(value, name="base_url")
        if not urls:
            raise ValueError("OpenAIJudge needs base_url, e.g. http://127.0.0.1:8000/v1 (a `vllm serve` endpoint).")
        old = getattr(self, "_pool", None)
        self._retired = [e.client for e in old.endpoints if e.client is not None] if old is not None else []
        self._pool = EndpointPool(urls, limit=self.max_concurrency, cooldown=self.endpoint_cooldown)
        self._loop = None

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Per endpoint: URL (credentials removed), in rotation or not, calls sent (attempts), failures, times taken
        out of rotation, seconds out of rotation, calls in flight now and the most ever in flight."""
        return self._pool.stats()

    @property
    def _client(self) -> Any:
        """The client of the first endpoint (None before the first call)."""
        return self._pool.endpoints[0].client

    def _ensure_pool(self) -> EndpointPool:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import openai

            # Clients are bound to the loop they were first used on; a new loop gets new ones.
            api_key = os.environ.get(self.api_key_env) or "EMPTY"  # local servers accept any key
            for endpoint in self._pool.endpoints:
                endpoint.client = openai.AsyncOpenAI(
                    base_url=endpoint.url, api_key=api_key, timeout=self.timeout, max_retries=self.max_retries
                )
            self._pool.rebind()
            self._loop = loop
        return self._pool

    # ----- calls -----

    async def _one(self, request: ChatRequest) -> str | JudgeError:
        pool = self._ensure_pool()
        tried: set[int] = set()
        errors: list[str] = []
        while True:
            dispatch = await pool.acquire(frozenset(tried))
            if dispatch is None:
                self.stats.add(requests=1, failures=1)
                if len(errors) == 1:
                    return JudgeError(errors[0])
                return JudgeError("Judge call failed on every endpoint it could use: " + "; ".join(errors))
            tried.add(dispatch.endpoint.index)
            attempt = _Attempt()
            try:
                attempt = await self._attempt(dispatch, request)
            finally:
                pool.release(dispatch, healthy=attempt.healthy)
            if attempt.text is not None:
                self.stats.add(requests=1, completion_tokens=attempt.completion_tokens)
                return attempt.text
            errors.append(attempt.error or "unknown error")
            if not attempt.failover:
                self.stats.add(requests=1, failures=1)
                return JudgeError(errors[-1])

    async def _attempt(self, dispatch: Dispatch, request: ChatRequest) -> _Attempt:
        """One call on one endpoint, with at most `max_retries` retries in all (none for a probe)."""
        import openai

        client = dispatch.endpoint.client
        retries = 0 if dispatch.probe else self.max_retries
        url = redact_url(dispatch.endpoint.url)
        used = 0  # retries spent so far, by the client (transport errors) and here (malformed bodies)
        try:
            while True:
                # The client's own retries get whatever is left of the budget.
                sender = (
                    client
                    if used == 0 and retries == self.max_retries
                    else client.with_options(max_retries=retries - used)
                )
                raw = await sender.chat.completions.with_raw_response.create(
                    model=self.model_id,
                    messages=list(request.messages),
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_tokens=request.max_tokens,
                    extra_body=_extra_body(self.extra_body, request),
                )
                used += raw.retries_taken
                try:
                    completion = raw.parse()
                    break
                except ValueError as err:
                    # A 200 whose body is not JSON (a broken proxy): the client does not retry it, so we do.
                    if used < retries:
                        await asyncio.sleep(min(0.5 * 2**used, 8.0))
                        used += 1
                        continue
                    return _Attempt(
                        error=f"Judge at {url} kept answering malformed bodies: {err!r}", healthy=False, failover=True
                    )
        except openai.AuthenticationError as err:
            return _Attempt(error=f"Judge at {url} rejected the API key from ${self.api_key_env}: {err}")
        except openai.NotFoundError as err:
            # A wrong base URL (a web server that is not the API, or a path without /v1) or a model it does not serve.
            return _Attempt(
                error=f"Judge at {url} answered 404 Not Found ({err.message}): check that judge_base_url is the root "
                "of an OpenAI-compatible API (usually ending in /v1, e.g. http://127.0.0.1:8000/v1) and that it "
                f"serves judge_model {self.model_id!r}."
            )
        except (openai.APIConnectionError, openai.InternalServerError) as err:
            # Unreachable, timed out or 5xx after the client's retries: this replica is unwell, try another.
            cause = f" ({err.__cause__!r})" if isinstance(err, openai.APIConnectionError) and err.__cause__ else ""
            refused = type(err.__cause__).__name__ == "ConnectError"
            hint = " Is the judge server running at that address?" if refused else ""
            message = f"Judge call to {url} failed after {retries} retries: {err!r}{cause}.{hint}"
            return _Attempt(error=message, healthy=False, failover=True)
        except openai.RateLimitError as err:
            # Busy, not broken: another replica may have room, but this one stays in rotation.
            return _Attempt(error=f"Judge call to {url} failed after {retries} retries: {err!r}", failover=True)
        except Exception as err:  # a judge failure never crashes the caller: it becomes a missing score
            return _Attempt(error=f"Judge call to {url} failed after {retries} retries: {err!r}")
        choices = getattr(completion, "choices", None)
        content = choices[0].message.content if choices else None
        if not isinstance(content, str):
            return _Attempt(
                error=f"Judge at {url} returned no message content: {str(completion)[:200]!r}", healthy=True
            )
        usage = getattr(completion, "usage", None)
        tokens = getattr(usage, "completion_tokens", 0) or 0
        return _Attempt(text=content, completion_tokens=tokens, healthy=True)

    async def agenerate(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def describe(self) -> dict[str, str]:
        urls = ",".join(redact_url(url) for url in self.base_urls)
        return {"backend": "openai-compatible", "model": self.model_id, "base_url": urls}

    async def aclose(self) -> None:
        clients = [e.client for e in self._pool.endpoints if e.client is not None]
        retired, self._retired = self._retired, []
        for endpoint in self._pool.endpoints:
            endpoint.client = None
        self._loop = None
        for client in clients:
            await client.close()
        for client in retired:  # replaced by a new base_url, maybe on an event loop that is gone
            try:
                await client.close()
            except Exception:
                pass

    def __getstate__(self) -> dict:
        # Clients (they hold the key) and loop-bound state stay behind; health and counters travel.
        state = self.__dict__.copy()
        pool = EndpointPool(self.base_urls, limit=self.max_concurrency, cooldown=self.endpoint_cooldown)
        for mine, theirs in zip(self._pool.endpoints, pool.endpoints, strict=True):
            theirs.__dict__.update({k: v for k, v in vars(mine).items() if k not in ("client", "in_flight")})
        state.update(_pool=pool, _retired=[], _loop=None)
        return state


def _extra_body(extra: dict | None, request: ChatRequest) -> dict | None:
    """The request's extra JSON fields: the judge's own, plus vLLM's continuation flags when the request continues a
    final assistant message (`ChatRequest.continues_final_message`)."""
    if not request.continues_final_message:
        return extra
    return {**(extra or {}), "continue_final_message": True, "add_generation_prompt": False}
