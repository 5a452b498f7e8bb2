"""One event loop per judge: every coroutine of a judge runs on its own loop thread, whichever loop awaits it.

A judge holds loop-bound state (HTTP clients, the endpoint pool's waiters, a batching queue). Two rewards that share
a judge each run their own event loop, and `judge.generate()` runs yet another; `JudgeLoop` gives the judge one
daemon thread with one loop, and `call` submits each coroutine there (`asyncio.run_coroutine_threadsafe`) and awaits
it from the caller's loop (`asyncio.wrap_future`). The judge's state is then touched by one loop only, and its
limits (in-flight calls per endpoint, one model batch at a time) hold across all callers of the process.

Waiting is bounded: `call` gives up with a `JudgeError` when the loop stops before answering (the judge was closed)
or, with `stall_timeout`, when no call of this judge finished for that many seconds while it waited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from .base import JudgeError

T = TypeVar("T")

__all__ = ["JudgeLoop"]


def _serve(loop: asyncio.AbstractEventLoop, held: set[asyncio.Task]) -> None:
    """Thread target: run `loop` until stopped, then cancel what is left (its callers get an error) and close it.

    `held` keeps long-lived tasks (a batching worker) alive as long as the loop runs, even once their owner is gone.
    """
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # also shuts the default executor down, without waiting for its threads


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.call_soon_threadsafe(loop.stop)
    except RuntimeError:  # already closed
        pass


def _fresh(cls: type[JudgeLoop], name: str) -> JudgeLoop:
    loop = cls.__new__(cls)
    JudgeLoop.__init__(loop, name)
    return loop


class JudgeLoop:
    """A lazily started event loop in a daemon thread, owned by one judge (or one reward).

    The thread starts on the first `submit`/`call`/`run_sync` and again after `stop()`; it stops when the owner is
    garbage-collected. A copy or a pickle is a fresh, unstarted loop.
    """

    def __init__(self, name: str = "judge-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: threading.Thread | None = None
        self._held: set[asyncio.Task] = set()
        self._last_finished = 0.0  # time.monotonic() when a call last finished on the loop

    def __reduce__(self) -> tuple[Any, ...]:
        return (_fresh, (type(self), self.name))

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop while its thread runs, else None."""
        return self._loop

    def _ensure_locked(self) -> asyncio.AbstractEventLoop:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive() and not loop.is_closed():
            return loop
        stopping, self._stopping = self._stopping, None
        if stopping is not None and stopping is not threading.current_thread():
            stopping.join(timeout=5.0)  # the old loop finishes cancelling its calls before a new one starts
        loop = asyncio.new_event_loop()
        self._held = set()
        thread = threading.Thread(target=_serve, args=(loop, self._held), name=self.name, daemon=True)
        self._loop, self._thread = loop, thread
        weakref.finalize(self, _stop_loop, loop)
        thread.start()
        return loop

    def hold(self, task: asyncio.Task) -> None:
        """Keep `task` (created on this loop) referenced until it is done: the loop stops it when it stops."""
        held = self._held
        held.add(task)
        task.add_done_callback(held.discard)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coroutine` on the loop (starting it if need be); thread-safe."""
        with self._lock:
            return asyncio.run_coroutine_threadsafe(self._finish(coroutine), self._ensure_locked())

    async def _finish(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            result = await coroutine
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._last_finished = time.monotonic()
            raise
        self._last_finished = time.monotonic()
        return result

    async def call(self, coroutine: Coroutine[Any, Any, T], *, stall_timeout: float | None, what: str) -> T:
        """Await `coroutine` run on this loop, from any event loop (directly when already on it).

        Raises `JudgeError` naming `what` when the loop stops before it finishes, or when no call on this loop
        finished during the last `stall_timeout` seconds of the wait (the coroutine is then cancelled).
        """
        if asyncio.get_running_loop() is self._loop:
            return await coroutine
        future = self.submit(coroutine)
        waiter = asyncio.wrap_future(future)
        started = time.monotonic()
        try:
            while True:
                remaining = None
                if stall_timeout is not None:
                    remaining = max(started, self._last_finished) + stall_timeout - time.monotonic()
                    if remaining <= 0:
                        raise JudgeError(
                            f"{what}: no answer within {stall_timeout:g} s, and no other call of this judge finished "
                            "meanwhile; the judge is stuck (an answer that never comes, or its event loop is blocked)."
                        )
                done, _ = await asyncio.wait({waiter}, timeout=remaining)
                if done:
                    break
        finally:
            if not future.done():
                future.cancel()  # cancels the coroutine on the judge's loop
        if waiter.cancelled():
            raise JudgeError(f"{what}: the judge was closed (its event loop stopped) before it answered.")
        return waiter.result()

    def run_sync(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on this loop and block until it finishes; from any thread but the loop's own."""
        if self._thread is threading.current_thread():
            coroutine.close()
            raise RuntimeError(f"{self.name}: a blocking call from the loop's own thread would wait forever.")
        future = self.submit(coroutine)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RuntimeError(f"{self.name}: the event loop was stopped before the call finished.") from None

    def stop(self, *, wait: bool = True) -> None:
        """Stop the thread: calls still running are cancelled (their callers get an error). A later call starts a
        new loop."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if thread is not None:
                self._stopping = thread
        if loop is None:
            return
        _stop_loop(loop)
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
