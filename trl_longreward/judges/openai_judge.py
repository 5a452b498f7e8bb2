"""A judge behind any OpenAI-compatible chat endpoint: `vllm serve`, `transformers serve`, hosted APIs.

One judge may stand for several identical replicas (one `vllm serve` per GPU node): each call goes to the least-loaded
replica in rotation, or to its affinity key's replica (calls sharing a long prompt prefix, so that the replica's prefix
cache serves them), and a replica that fails is taken out for a cool-down (see `endpoints.EndpointPool`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .base import (
    ChatRequest,
    Judge,
    JudgeAuthError,
    JudgeConfigError,
    JudgeError,
    JudgeFatalError,
    PermanentJudgeError,
    record_requests,
)
from .cache import CONTEXT_LIMITS
from .endpoints import Dispatch, Endpoint, EndpointPool, current_affinity, parse_base_urls, redact_url
from .loops import JudgeLoop

#: The longest exponential backoff before a retry: the `openai` client's cap (its `MAX_RETRY_DELAY`), and the
#: judge's own after a malformed body (`OpenAIJudge._attempt`).
BACKOFF_CAP_S = 8.0
_LEGACY_RETRY_AFTER_CAP_S = 60.0  # the largest `Retry-After` an `openai` client before 3.x honoured


def retry_wait_cap_s() -> float:
    """The longest wait before one retry of a judge request: the largest `Retry-After` the installed `openai` client
    honours (its `MAX_RETRY_AFTER_DELAY`: 120 s in openai 3.x; 60 s in earlier versions, which have no such
    constant), and at least the exponential backoff's cap, `BACKOFF_CAP_S`."""
    try:
        from openai._constants import MAX_RETRY_AFTER_DELAY
    except ImportError:
        return max(_LEGACY_RETRY_AFTER_CAP_S, BACKOFF_CAP_S)
    return max(float(MAX_RETRY_AFTER_DELAY), BACKOFF_CAP_S)


def worst_case_call_s(
    timeout: float, max_retries: int, endpoints: int = 1, *, retry_wait_s: float | None = None
) -> float:
    """Seconds one `OpenAIJudge` call can take at most when its endpoints stop answering:

        endpoints x ((1 + max_retries) x timeout + max_retries x retry_wait_s)

    A call tries each endpoint at most once; on each it sends at most `1 + max_retries` requests (the client's
    transport retries and the judge's retries of malformed bodies share that budget), each given up after `timeout`
    seconds, and waits at most `retry_wait_s` (default `retry_wait_cap_s()`) before each retry. Waiting for a free
    slot under `max_concurrency` comes on top (see `trl_longreward.reward.scale_limits`).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
    if endpoints < 1:
        raise ValueError(f"endpoints must be >= 1, got {endpoints}.")
    wait = retry_wait_cap_s() if retry_wait_s is None else retry_wait_s
    return endpoints * ((1 + max_retries) * timeout + max_retries * wait)


@dataclass
class _Attempt:
    """What one attempt on one endpoint gave: the text, or an error and whether another endpoint may try."""

    text: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    healthy: bool | None = None  # True: answered; False: failed for good (take it out); None: says nothing
    failover: bool = False
    permanent: int | None = None  # the HTTP status when the judge refused the request itself (400, 413, 422)
    fatal: JudgeFatalError | None = None  # every call would fail the same way (401, 403): stop the run


@dataclass(eq=False)
class _Tally:
    """Where the HTTP requests of one attempt on one endpoint are counted, as the client sends them (its own
    retries included): the endpoint's `attempts` and `failures`, the judge's `stats.http_requests`, and the running
    judge call's request meter (`record_requests`, the reward's `judge_requests`)."""

    judge: OpenAIJudge
    endpoint: Endpoint

    def sent(self) -> None:
        self.endpoint.attempts += 1
        self.judge.stats.add(http_requests=1)
        record_requests(1)

    def failed(self) -> None:
        self.endpoint.failures += 1


# The attempt whose requests the client sends in this context (set by `OpenAIJudge._attempt`); None: not counted
# (the `GET /v1/models` that asks what a server serves).
_TALLY: ContextVar[_Tally | None] = ContextVar("trl_longreward_attempt_tally", default=None)


@functools.cache
def _counting_http_client_class() -> type:
    """The `openai` SDK's default async HTTP client (its timeouts, connection limits, redirects, proxies), counting
    each request it sends for the attempt running in its context (`_TALLY`): every `send` is one HTTP request, the
    SDK's own retries included, and one that raises or answers an error status is a failed attempt."""
    import openai

    class CountingHttpClient(openai.DefaultAsyncHttpxClient):
        async def send(self, request: Any, **kwargs: Any) -> Any:
            tally = _TALLY.get()
            if tally is None:
                return await super().send(request, **kwargs)
            tally.sent()
            try:
                response = await super().send(request, **kwargs)
            except BaseException:  # no response, or a body cut short (read here: the SDK does not stream it)
                tally.failed()
                raise
            if response.is_error:
                tally.failed()
            return response

    return CountingHttpClient


class OpenAIJudge(Judge):
    """Chat completions through the `openai` async client, over one endpoint or several replicas.

    Args:
        model: the model name at the endpoint(s).
        base_url: one URL (`http://127.0.0.1:8000/v1`), several as a list, or a comma-separated string. Several URLs
            must be replicas of the same judge model: a call may be answered by any of them.
        api_key_env: environment variable holding the API key (the same key is sent to every endpoint).
        max_concurrency: calls in flight at once *per endpoint* (per process: every reward and thread sharing this
            judge draws on the same limit); n endpoints take n x this many.
        timeout: seconds before one HTTP call times out.
        max_retries: transport retries of the client, per endpoint.
        extra_body: extra JSON fields of every request.
        endpoint_cooldown: seconds a failed endpoint stays out of rotation before it is probed again.
        context_window: the served model's context window in tokens, if known (None: unknown); used to size the
            completeness notes.
        fingerprint: a name for the served model's state (`judge_fingerprint`); when set, it stands for the server's
            own report of what it serves in cache keys (see below).
        affinity: prefix-affine dispatch over several replicas: calls made inside `endpoints.dispatch_affinity(key)`
            (the reward gives one key to the calls of one prompt and template, which share a long prefix) go to the
            same replica while it is in rotation and has room, so its prefix cache serves them; False: least-loaded
            dispatch only. No effect with one endpoint; never part of the cache identity.

    Transport failures (429 honouring `Retry-After`, 5xx, timeouts, dropped connections) are retried by the client
    itself with exponential backoff; a 200 whose body is not JSON is retried here. Both draw on one budget of
    `max_retries` retries per call and endpoint, so one call sends at most `1 + max_retries` requests to an endpoint.
    An endpoint whose call still fails with a connection error,
    a timeout, a 5xx or malformed bodies is taken out of rotation for `endpoint_cooldown` seconds and the call is tried
    on another endpoint (at most once per endpoint); after the cool-down one call at a time probes it (without client
    retries, so a dead replica costs the probing call little), and the first success puts it back. When every
    endpoint is out of rotation a new call is still sent, with full retries, to the one due back first (with a single
    endpoint this is plain retry-then-fail). A call that fails for good becomes a `JudgeError`, which the reward
    records as a missing dimension. A request the judge refuses (400, 413, 422: a prompt over the context window, a
    bad parameter) fails at once as a `PermanentJudgeError` with the server's message (not retried, not failed over:
    every replica would refuse it). A rejected key (401, 403) raises `JudgeAuthError`, which stops the run, naming
    `api_key_env` (`judge_api_key_env`), never the key.

    Cache identity (`acache_identity`): the model name, `extra_body` (sampling fields such as `seed`, `top_k`,
    `chat_template_kwargs`; `user` only names the caller and is left out) and what the server says it serves: the
    `root`, `parent` and `owned_by` of `model` in its `GET /v1/models`, fetched once per endpoint on the judge's loop
    (a server that lists nothing there, or not this model, reports nothing). Replicas that report different models
    are a configuration error (`JudgeConfigError`). URLs, the key, limits and timeouts are not part of it, so a moved
    server or another replica of the same model reuses the cache. `fingerprint` replaces the server's report (no
    request is made). The context window a server reports (`max_model_len`, the smallest over replicas) keys only
    stored permanent failures. While no endpoint could be asked, calls go uncached.

    `stats.http_requests` counts every request sent (attempts, transport retries included), as the server sees them:
    the client's HTTP transport counts each request as it leaves, so the client's own retries are in.

    `endpoint_stats()` reports per endpoint the calls dispatched to it, the `attempts` (HTTP requests sent to it,
    retries included: they add up to `stats.http_requests`) and `failures` (attempts that brought no answer: an error
    status, no response or a timeout, a body cut short or not JSON, a completion without message content), and its
    time out of rotation.

    The API key is read from the environment variable `api_key_env` when the clients are built and is held only by
    the client objects: it is not an attribute of this judge, not part of `describe()` or the stats, not pickled.
    """

    counts_requests = True  # the client reports every HTTP request it sends (`record_requests`, see `_Tally`)

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
        fingerprint: str | None = None,
        affinity: bool = True,
    ) -> None:
        super().__init__()
        self.affinity = affinity
        self.fingerprint = fingerprint
        # Called (in a worker thread) before any request goes out, e.g. to wait for a judge server that is still
        # starting (`trl-longreward dpo --judge_server vllm` samples the first step meanwhile); must be idempotent.
        self.wait_until_ready: Callable[[], None] | None = None
        self._served = _ServedModels()
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
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the clients are bound to
        self._home = JudgeLoop(name="openai-judge")  # every call runs on this judge's own loop thread
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
        self._pool = EndpointPool(
            urls, limit=self.max_concurrency, cooldown=self.endpoint_cooldown, affinity=self.affinity
        )
        self._loop = None

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Per endpoint: URL (credentials removed), in rotation or not, `calls` dispatched to it (`affine_calls` of
        them to their affinity key's home), `attempts` (HTTP requests sent, the client's retries included, as the
        server counts them), `failures` (attempts that brought no answer), times taken out of rotation, seconds out
        of rotation, calls in flight now and the most ever in flight."""
        return self._pool.stats()

    @property
    def _client(self) -> Any:
        """The client of the first endpoint (None before the first call)."""
        return self._pool.endpoints[0].client

    def _ensure_pool(self) -> EndpointPool:
        """The pool, with clients bound to the running loop: the judge's own (`_home`), where every call runs."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import openai

            # Clients are bound to the loop they were first used on; a new home loop (after `aclose`) gets new ones.
            api_key = os.environ.get(self.api_key_env) or "EMPTY"  # local servers accept any key
            for endpoint in self._pool.endpoints:
                endpoint.client = openai.AsyncOpenAI(
                    base_url=endpoint.url,
                    api_key=api_key,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                    http_client=_counting_http_client_class()(timeout=self.timeout),  # counts every attempt
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
            dispatch = await pool.acquire(frozenset(tried), affinity=current_affinity())
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
                self._served.retry_at.pop(dispatch.endpoint.url, None)  # it answers: it can say what it serves
                return attempt.text
            errors.append(attempt.error or "unknown error")
            if attempt.fatal is not None:
                self.stats.add(requests=1, failures=1)
                raise attempt.fatal
            if not attempt.failover:
                self.stats.add(requests=1, failures=1)
                if attempt.permanent is not None:
                    return PermanentJudgeError(errors[-1], status=attempt.permanent)
                return JudgeError(errors[-1])

    async def _attempt(self, dispatch: Dispatch, request: ChatRequest) -> _Attempt:
        """One call on one endpoint, with at most `max_retries` retries in all (none for a probe)."""
        import openai

        client = dispatch.endpoint.client
        retries = 0 if dispatch.probe else self.max_retries
        url = redact_url(dispatch.endpoint.url)
        used = 0  # retries spent so far, by the client (transport errors) and here (malformed bodies)
        tally = _Tally(self, dispatch.endpoint)
        token = _TALLY.set(tally)  # the client counts every request it sends for this attempt, retries included
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
                    tally.failed()
                    if used < retries:
                        await asyncio.sleep(min(0.5 * 2**used, BACKOFF_CAP_S))
                        used += 1
                        continue
                    return _Attempt(
                        error=f"Judge at {url} kept answering malformed bodies: {err!r}", healthy=False, failover=True
                    )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            fatal = self._auth_error(url, err)
            return _Attempt(error=str(fatal), fatal=fatal)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
            return self._refused(url, err)
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
        except openai.APIStatusError as err:
            if err.status_code == 413:  # the request body is too large for the server
                return self._refused(url, err)
            return _Attempt(error=f"Judge call to {url} failed after {retries} retries: {err!r}")
        except Exception as err:  # a judge failure never crashes the caller: it becomes a missing score
            return _Attempt(error=f"Judge call to {url} failed after {retries} retries: {err!r}")
        finally:
            _TALLY.reset(token)
        choices = getattr(completion, "choices", None)
        content = choices[0].message.content if choices else None
        if not isinstance(content, str):
            tally.failed()
            return _Attempt(
                error=f"Judge at {url} returned no message content: {str(completion)[:200]!r}", healthy=True
            )
        usage = getattr(completion, "usage", None)
        tokens = getattr(usage, "completion_tokens", 0) or 0
        return _Attempt(text=content, completion_tokens=tokens, healthy=True)

    def _refused(self, url: str, err: Any) -> _Attempt:
        """The judge refused the request itself: a permanent failure, with the server's own message."""
        status = getattr(err, "status_code", None)
        reason = {400: "Bad Request", 413: "Payload Too Large", 422: "Unprocessable Entity"}.get(status, "")
        message = f"Judge at {url} refused the request ({status} {reason}): {_server_message(err)}"
        return _Attempt(error=message, permanent=status or 400)

    def _auth_error(self, url: str, err: Any) -> JudgeAuthError:
        """A clear error for a rejected key: the variable it came from, never the key (removed from the server's
        message as well)."""
        status = getattr(err, "status_code", None)
        name = self.api_key_env
        key = os.environ.get(name)
        said = _server_message(err)
        if key:
            said = said.replace(key, "***")
            problem = f"it rejected the API key read from the environment variable {name} (judge_api_key_env)"
        else:
            problem = f"no API key was sent: the environment variable {name} (judge_api_key_env) is not set"
        reason = {401: "401 Unauthorized", 403: "403 Forbidden"}.get(status, str(status))
        return JudgeAuthError(
            f"Judge at {url} answered {reason} ({said}): {problem}. Set {name} to a key this server accepts, or set "
            "judge_api_key_env to the name of the variable that holds one. The run stopped; every judge result so "
            "far is kept in the judge-call cache."
        )

    # ----- cache identity -----

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this judge's answers without asking the server (see the class docstring): the model,
        the answer-changing `extra_body` fields and the fingerprint."""
        identity = {**super().cache_identity(), "backend": "openai-compatible"}
        identity["extra_body"] = {k: v for k, v in (self.extra_body or {}).items() if k not in _NOT_SAMPLING}
        return identity

    async def acache_identity(self) -> dict[str, Any] | None:
        """`cache_identity()` plus what the servers report they serve (fetched once per endpoint, on the judge's
        loop); None while no endpoint could be asked."""
        identity = self.cache_identity()
        if self.fingerprint is not None:
            return identity
        await self._ready()
        home = getattr(self, "_home", None)
        if home is None:
            reports = await self._served_reports()
        else:
            reports = await home.call(self._served_reports(), stall_timeout=None, what="Asking the judge's models")
        if not reports:
            return None
        served = {url: report for url, report in reports.items() if report is not None}
        distinct = {json.dumps(report["served"], sort_keys=True) for report in served.values()}
        if len(distinct) > 1:
            listing = "; ".join(
                f"{redact_url(url)} serves {report['served']}" for url, report in sorted(served.items())
            )
            raise JudgeConfigError(
                f"judge_base_url lists replicas that report different models for {self.model_id!r}: {listing}. A call "
                "may go to any replica, so they must serve the same checkpoint: fix judge_base_url, or, if they do "
                "serve the same model (e.g. from different paths), set judge_fingerprint to name it."
            )
        identity["server"] = next(iter(served.values()))["served"] if served else None
        windows = [report["max_model_len"] for report in served.values() if report.get("max_model_len")]
        if windows:
            identity[CONTEXT_LIMITS] = {"max_model_len": min(windows)}
        return identity

    async def _served_reports(self) -> dict[str, dict[str, Any] | None]:
        """Each endpoint's report (None: it reports nothing), for the endpoints that could be asked so far."""
        pool = self._ensure_pool()
        served = self._served
        loop = asyncio.get_running_loop()
        if served.loop is not loop:
            served.loop, served.tasks = loop, {}
        if served.error is not None:
            raise type(served.error)(str(served.error))
        now = time.monotonic()
        for endpoint in pool.endpoints:
            url = endpoint.url
            if url in served.known or url in served.tasks or now < served.retry_at.get(url, 0.0):
                continue
            task = loop.create_task(self._ask_served(endpoint.client, url))
            task.add_done_callback(_retrieved)
            served.tasks[url] = task
        waiting = [served.tasks[e.url] for e in pool.endpoints if e.url in served.tasks]
        if waiting:
            await asyncio.wait(waiting)
        for url, task in list(served.tasks.items()):
            if not task.done():
                continue
            del served.tasks[url]
            if task.cancelled():
                continue
            error = task.exception()
            if error is None:
                served.known[url] = task.result()
            elif isinstance(error, JudgeFatalError):
                served.error = error
                raise type(error)(str(error))
            else:  # unreachable for now: ask again on a later call
                served.retry_at[url] = time.monotonic() + _ASK_AGAIN_S
        return {e.url: served.known[e.url] for e in pool.endpoints if e.url in served.known}

    async def _ask_served(self, client: Any, url: str) -> dict[str, Any] | None:
        """What `url` says it serves as `model_id` (`GET /v1/models`); None when it says nothing about it.

        Raises `JudgeAuthError` for a rejected key and `ConnectionError` when the endpoint cannot be reached."""
        import openai

        asker = client.with_options(max_retries=1, timeout=min(self.timeout, 30.0))
        try:
            page = await asker.models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise self._auth_error(redact_url(url), err) from None
        except openai.InternalServerError as err:
            if getattr(err, "status_code", None) == 500:  # the route itself fails (`transformers serve` does)
                return None  # a server that never answers it reports nothing: its calls must still be cached
            raise ConnectionError(repr(err)) from None  # 502/503/504: down or starting, ask again later
        except (openai.APIConnectionError, openai.RateLimitError) as err:
            raise ConnectionError(repr(err)) from None
        except Exception:  # 404, an HTML page, a body of another shape: this server reports nothing
            return None
        for model in getattr(page, "data", None) or []:
            if getattr(model, "id", None) != self.model_id:
                continue
            extra = getattr(model, "model_extra", None) or {}
            served = {"root": extra.get("root"), "parent": extra.get("parent"), "owned_by": model.owned_by}
            window = extra.get("max_model_len")
            return {"served": served, "max_model_len": window if isinstance(window, int) else None}
        return None

    async def agenerate(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        """Answer every request on the judge's own loop, awaited from whichever loop calls this."""
        await self._ready()
        return list(await asyncio.gather(*(self._on_home_loop(r) for r in requests)))

    async def _ready(self) -> None:
        if self.wait_until_ready is not None:
            await asyncio.to_thread(self.wait_until_ready)

    async def _on_home_loop(self, request: ChatRequest) -> str | JudgeError:
        try:
            return await self._home.call(
                self._one(request), stall_timeout=self._stall_timeout(), what=f"Judge call to {self.model_id!r}"
            )
        except JudgeError as err:  # stuck or closed: the call is cancelled on the judge's loop
            self.stats.add(requests=1, failures=1)
            return err

    def worst_case_call_s(self) -> float:
        """Seconds one call of this judge can take at most when its endpoints stop answering (`worst_case_call_s`
        with this judge's timeout, retries and endpoints), not counting the wait for a free slot."""
        return worst_case_call_s(self.timeout, self.max_retries, len(self._pool.endpoints))

    def _stall_timeout(self) -> float:
        """How long a call may wait while no call of this judge finishes: every endpoint tried once, each with
        `1 + max_retries` requests of up to `timeout` seconds and up to 60 s of backoff (a `Retry-After`) before each,
        and never less than `worst_case_call_s()` (the installed client may honour a longer `Retry-After`)."""
        legacy = len(self._pool.endpoints) * (1 + self.max_retries) * (self.timeout + 60.0)
        return max(legacy, self.worst_case_call_s()) + 10.0

    def describe(self) -> dict[str, str]:
        urls = ",".join(redact_url(url) for url in self.base_urls)
        return {"backend": "openai-compatible", "model": self.model_id, "base_url": urls}

    async def aclose(self) -> None:
        """Close the clients on the judge's loop and stop it (calls still in flight fail); a later call starts anew."""
        try:
            await self._home.call(self._aclose_on_loop(), stall_timeout=None, what="Closing the judge")
        finally:
            self._home.stop()

    async def _aclose_on_loop(self) -> None:
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
        pool = EndpointPool(
            self.base_urls, limit=self.max_concurrency, cooldown=self.endpoint_cooldown, affinity=self.affinity
        )
        for mine, theirs in zip(self._pool.endpoints, pool.endpoints, strict=True):
            theirs.__dict__.update({k: v for k, v in vars(mine).items() if k not in ("client", "in_flight")})
        state.update(_pool=pool, _retired=[], _loop=None, wait_until_ready=None)
        return state


def _extra_body(extra: dict | None, request: ChatRequest) -> dict | None:
    """The request's extra JSON fields: the judge's own, plus vLLM's continuation flags when the request continues a
    final assistant message (`ChatRequest.continues_final_message`), plus vLLM's `structured_outputs` regular
    expression when the request's verdict is constrained (`ChatRequest.verdict`, vLLM >= 0.12's field name)."""
    body = dict(extra or {})
    if request.continues_final_message:
        body.update(continue_final_message=True, add_generation_prompt=False)
    if request.verdict is not None:
        body["structured_outputs"] = {"regex": request.verdict.regex()}
    return body or extra


# `extra_body` fields that name the caller and cannot change an answer: not part of the cache identity.
_NOT_SAMPLING = frozenset({"user"})
_ASK_AGAIN_S = 1.0  # an endpoint that could not be asked what it serves is asked again after this long


@dataclass
class _ServedModels:
    """What each endpoint reported serving (by URL), and the asks under way on the judge's loop. A copy (a pickle)
    asks again: another process may reach other servers behind the same URLs."""

    known: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    error: JudgeFatalError | None = None

    def __getstate__(self) -> dict:
        return {"fresh": True}  # not empty: pickle skips `__setstate__` for an empty state

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _retrieved(task: asyncio.Task) -> None:
    """Mark a finished task's exception as retrieved: its callers may all have gone."""
    if not task.cancelled():
        task.exception()


def _server_message(err: Any) -> str:
    """The server's own error message (OpenAI's `{"error": {"message": ...}}`), else the error's text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return str(getattr(err, "message", None) or err)
