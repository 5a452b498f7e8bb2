"""Dispatch over several replicas of one judge: least-loaded choice, per-replica in-flight limits, cool-downs.

Users often serve the judge as several identical replicas (one `vllm serve` per GPU node). `EndpointPool` decides
which replica answers each call; it knows nothing about HTTP (the `OpenAIJudge` makes the calls and reports back).

Rules:
- a call goes to the replica with the fewest calls in flight (ties: the one used least recently) among those in
  rotation with room under their limit; when none has room the call waits, first come first served;
- a replica whose call failed for good (connection error, timeout or 5xx after the client's own retries) is taken out
  of rotation for `cooldown` seconds; afterwards one call at a time probes it, and the first success puts it back;
- a call that failed on one replica is tried on another in rotation, at most once per replica;
- when every replica is out of rotation, a fresh call is still sent (to the one due back first), so a lone judge that
  comes back is used again at once; a call that already failed somewhere and finds only replicas out of rotation
  fails. Every call therefore makes at most one attempt per replica: its time is bounded.

Prefix affinity (`affinity=True`, the default): a call made inside `dispatch_affinity(key)` goes to the replica that
key was first sent to (its *home*), while that replica is in rotation and has room, so that calls sharing a long
prompt prefix (the reward gives one key to one prompt's calls of one template) meet that replica's prefix cache. A
key's first call takes the least-loaded replica, which becomes its home; when the home is full the call goes to the
least-loaded other replica (the home stays); when the home is out of rotation the least-loaded replica becomes the new
home. Calls without a key, and retries after a failure, are dispatched least-loaded as above.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_EXAMPLE = "http://127.0.0.1:8000/v1"
_MAX_HOMES = 4096  # affinity keys remembered (least recently used forgotten first)

# The affinity key of the judge calls made in this context (see `dispatch_affinity`).
_AFFINITY: ContextVar[str | None] = ContextVar("trl_longreward_dispatch_affinity", default=None)


@contextmanager
def dispatch_affinity(key: str | None) -> Iterator[None]:
    """Give the judge calls awaited in this block (and tasks started in it) the affinity key `key`: with several
    replicas, calls with the same key go to the same replica while it is healthy and has room (see the module
    docstring). None: no preference."""
    token = _AFFINITY.set(key)
    try:
        yield
    finally:
        _AFFINITY.reset(token)


def current_affinity() -> str | None:
    """The affinity key of the running judge call, if any."""
    return _AFFINITY.get()


def parse_base_urls(value: str | Sequence[str] | None, *, name: str = "judge_base_url") -> list[str]:
    """The endpoint URLs in `value`: one URL, a comma-separated string, or a sequence of URLs.

    Blank entries are skipped; a malformed or repeated URL raises `ValueError` naming `name` and the entry.
    """
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        items = [piece for item in value for piece in item.split(",")]
    else:
        raise ValueError(f"{name} must be a URL string, a comma-separated string or a list of URLs, got {value!r}.")
    urls = [item.strip() for item in items if item.strip()]
    for url in urls:
        _check_url(url, name)
    repeated = sorted({url for url in urls if urls.count(url) > 1})
    if repeated:
        raise ValueError(f"{name} lists {repeated} more than once; give each judge replica once.")
    return urls


def _check_url(url: str, name: str) -> None:
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as err:
        problem = str(err)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it does not start with http:// or https://"
        elif not parts.hostname:
            problem = "it has no host"
    if problem is not None:
        raise ValueError(
            f"{name} entry {url!r} is not a usable URL ({problem}). Write each judge endpoint like {_EXAMPLE}; "
            "several replicas as a list or comma-separated."
        )


def redact_url(url: str) -> str:
    """`url` without user:password (for reports and errors)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@dataclass(eq=False)
class Endpoint:
    """One judge replica: its URL, load, health and counters. `client` is the transport the judge attaches.

    `calls` counts the calls dispatched here (one slot each, `EndpointPool.acquire`). The judge that makes the
    requests counts `attempts` (every request sent here, its transport's own retries included, as the server counts
    them) and `failures` (every attempt that brought no answer); the pool only reads them."""

    index: int
    url: str
    limit: int
    client: Any = field(default=None, repr=False)
    in_flight: int = 0
    max_in_flight: int = 0
    calls: int = 0
    affine_calls: int = 0  # calls sent here because this replica is their affinity key's home
    attempts: int = 0  # requests sent here, retries included
    failures: int = 0  # attempts that failed (an error status, no response, a broken body)
    times_taken_out: int = 0
    out_since: float | None = None  # when it left rotation; None while in rotation
    back_at: float = 0.0  # when it may be probed again
    seconds_out: float = 0.0  # completed periods out of rotation
    last_dispatch: int = 0

    @property
    def in_rotation(self) -> bool:
        return self.out_since is None

    def capacity(self, now: float, *, forced: bool) -> int:
        """Calls it may take now: its limit in rotation (or when every replica is out), one probe after its
        cool-down, none while cooling down."""
        if self.in_rotation or forced:
            return self.limit
        return 1 if now >= self.back_at else 0

    def snapshot(self, now: float) -> dict[str, Any]:
        current = now - self.out_since if self.out_since is not None else 0.0
        return {
            "base_url": redact_url(self.url),
            "in_rotation": self.in_rotation,
            "calls": self.calls,
            "affine_calls": self.affine_calls,
            "attempts": self.attempts,
            "failures": self.failures,
            "times_taken_out": self.times_taken_out,
            "seconds_out_of_rotation": round(self.seconds_out + current, 3),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


@dataclass(frozen=True)
class Dispatch:
    """A slot on one endpoint, held by one attempt of one call; give it back with `EndpointPool.release`."""

    endpoint: Endpoint
    started: float
    probe: bool  # sent to an endpoint out of rotation to test it, while others are in rotation


@dataclass(eq=False)
class _Waiter:
    tried: frozenset[int]
    future: asyncio.Future
    affinity: str | None = None


_WAIT = object()


class EndpointPool:
    """Least-loaded, health-aware dispatch of judge calls over endpoints, with prefix affinity (see the module
    docstring; `affinity=False`: least-loaded only).

    All methods run on one event loop (the judge's own, see `loops.JudgeLoop`); state changes need no lock, and a
    call from a second loop while the first one still has calls in flight or waiting raises `RuntimeError` (its
    waiters could never be woken). `clock` is injectable for tests.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        limit: int,
        cooldown: float,
        affinity: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError(f"EndpointPool needs at least one URL, e.g. {_EXAMPLE}.")
        if limit < 1:
            raise ValueError(f"The per-endpoint in-flight limit must be >= 1, got {limit}.")
        if cooldown < 0:
            raise ValueError(f"The endpoint cool-down must be >= 0 seconds, got {cooldown}.")
        self.endpoints = [Endpoint(index=i, url=url, limit=limit) for i, url in enumerate(urls)]
        self.cooldown = cooldown
        self.affinity = affinity
        self.clock = clock
        self._homes: OrderedDict[str, int] = OrderedDict()  # affinity key -> its home endpoint's index
        self._waiters: deque[_Waiter] = deque()
        self._dispatches = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----- choosing -----

    def _choose(self, tried: frozenset[int], now: float, affinity: str | None = None) -> Endpoint | None | object:
        """An endpoint with room for a call that tried `tried` (with affinity key `affinity`), `_WAIT` to wait for
        room, None to give up."""
        untried = [e for e in self.endpoints if e.index not in tried]
        if not untried:
            return None
        usable = [e for e in untried if e.in_rotation or now >= e.back_at]
        forced = not usable and not any(e.in_rotation for e in self.endpoints)
        if not usable:
            if tried or not forced:
                return None
            usable = sorted(untried, key=lambda e: e.back_at)  # every replica is out: the one due back first
            free = [e for e in usable if e.in_flight < e.capacity(now, forced=True)]
            return free[0] if free else _WAIT
        free = [e for e in usable if e.in_flight < e.capacity(now, forced=False)]
        if not free:
            return _WAIT
        if self.affinity and affinity is not None and not tried:
            return self._affine(affinity, free)
        return min(free, key=lambda e: (e.in_flight, e.last_dispatch))

    def _affine(self, key: str, free: list[Endpoint]) -> Endpoint:
        """The key's home when it is in rotation and has room, else the least-loaded free endpoint (which becomes
        the key's home when it had none or its home is out of rotation)."""
        index = self._homes.get(key)
        home = self.endpoints[index] if index is not None else None
        if home is not None:
            self._homes.move_to_end(key)
            if home.in_rotation and home in free:
                home.affine_calls += 1
                return home
        chosen = min(free, key=lambda e: (e.in_flight, e.last_dispatch))
        if home is None or not home.in_rotation:
            self._homes[key] = chosen.index
            while len(self._homes) > _MAX_HOMES:
                self._homes.popitem(last=False)
        return chosen

    def _take(self, endpoint: Endpoint, now: float) -> Dispatch:
        self._dispatches += 1
        endpoint.last_dispatch = self._dispatches
        endpoint.in_flight += 1
        endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
        endpoint.calls += 1
        probe = not endpoint.in_rotation and any(e.in_rotation for e in self.endpoints)
        return Dispatch(endpoint=endpoint, started=now, probe=probe)

    async def acquire(self, tried: frozenset[int] = frozenset(), *, affinity: str | None = None) -> Dispatch | None:
        """A slot on the best endpoint this call has not tried (its affinity key's home when it can take it),
        waiting for room if need be; None when the call should give up (it tried every endpoint, or every endpoint
        it has not tried is out of rotation)."""
        self._bind(asyncio.get_running_loop())
        now = self.clock()
        if not self._waiters:  # first come first served: never overtake a waiting call
            choice = self._choose(tried, now, affinity)
            if choice is None:
                return None
            if choice is not _WAIT:
                return self._take(choice, now)  # type: ignore[arg-type]
        waiter = _Waiter(tried, asyncio.get_running_loop().create_future(), affinity)
        self._waiters.append(waiter)
        self._wake()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.result() is not None:
                self.release(waiter.future.result(), healthy=None)
            raise

    def _wake(self, *, full_scan: bool = False) -> None:
        """Hand free slots to waiting calls in arrival order (and tell calls that have to give up)."""
        now = self.clock()
        kept: deque[_Waiter] = deque()
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            choice = self._choose(waiter.tried, now, waiter.affinity)
            if choice is _WAIT:
                kept.append(waiter)
                if not full_scan and not self._has_room(now):
                    break
                continue
            waiter.future.set_result(None if choice is None else self._take(choice, now))  # type: ignore[arg-type]
        kept.extend(self._waiters)
        self._waiters = kept

    def _has_room(self, now: float) -> bool:
        forced = not any(e.in_rotation for e in self.endpoints)
        return any(e.in_flight < e.capacity(now, forced=forced) for e in self.endpoints)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is self._loop:
            return
        busy = self._waiters or any(e.in_flight for e in self.endpoints)
        if self._loop is not None and busy and not self._loop.is_closed():
            raise RuntimeError(
                "EndpointPool is bound to one event loop and still has calls of another loop in flight; run every "
                "call of one judge on one loop (OpenAIJudge does this on its own loop thread)."
            )
        self._loop = loop

    def rebind(self) -> None:
        """Forget calls and waiters of an event loop that is gone (health and counters stay)."""
        self._waiters.clear()
        for endpoint in self.endpoints:
            endpoint.in_flight = 0
        self._loop = None

    # ----- reporting back -----

    def release(self, dispatch: Dispatch, *, healthy: bool | None) -> None:
        """Give the slot back. `healthy`: True, the endpoint answered; False, it failed for good (take it out);
        None, the call failed for a reason that says nothing about the endpoint (a bad request, a wrong key)."""
        endpoint, now = dispatch.endpoint, self.clock()
        endpoint.in_flight -= 1
        # An answer to a call sent before the endpoint was taken out says nothing about it now.
        current = endpoint.out_since is None or dispatch.started >= endpoint.out_since
        full_scan = False
        if healthy is True and current and endpoint.out_since is not None:
            endpoint.seconds_out += now - endpoint.out_since
            endpoint.out_since = None
            full_scan = True
        elif healthy is False and current:
            if endpoint.out_since is None:
                endpoint.out_since = now
                endpoint.times_taken_out += 1
            endpoint.back_at = now + self.cooldown
            self._schedule_wake(self.cooldown)
            full_scan = True  # calls waiting for this endpoint may now have to go elsewhere or give up
        self._wake(full_scan=full_scan)

    def _schedule_wake(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # A small margin so the clock has certainly passed `back_at` when the waiting calls are looked at again.
        loop.call_later(delay + 0.001, functools.partial(self._wake, full_scan=True))

    def stats(self) -> list[dict[str, Any]]:
        """Per endpoint: URL (without credentials), in rotation or not, calls dispatched (`affine_calls` of them to
        their affinity key's home), attempts (requests sent, retries included) and failed attempts as the judge
        counted them, times taken out, seconds out of rotation, calls in flight and the most ever in flight."""
        now = self.clock()
        return [endpoint.snapshot(now) for endpoint in self.endpoints]
