"""In-process judge backends: many concurrent single requests are gathered into micro-batches for one model.

The reward pipeline awaits `acomplete` from many tasks at once, one request each. A local model is fastest when it
sees those requests together, so `BatchingJudge` queues them and a single worker task hands batches to the
subclass's synchronous `_generate_batch`, run in a worker thread so that the event loop stays responsive.

The queue and the worker live on the judge's own loop thread (`loops.JudgeLoop`): rewards running their own event
loops, and `generate()` from any thread, all feed the same queue, so one model still sees one batch at a time.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from trl_longreward.judges.base import ChatRequest, Judge, JudgeError
from trl_longreward.judges.loops import JudgeLoop

__all__ = ["BatchingJudge"]

BatchResult = list[str | JudgeError]


@dataclass
class _Pending:
    """A queued request and the future its caller awaits (resolved with a text or a `JudgeError` value)."""

    request: ChatRequest
    future: asyncio.Future[str | JudgeError]


class _Stop:
    """Queue sentinel: the worker finishes what was queued before it, then exits."""


class BatchingJudge(Judge):
    """Base class of in-process backends that answer requests in micro-batches.

    Subclasses implement `_generate_batch`, a blocking call that answers requests which all share one `_group_key`
    (by default `ChatRequest.sampling_key()`). It returns one entry per request: the text, or a `JudgeError` to fail only that
    request. If it raises, every request of that batch gets a `JudgeError`. Only one `_generate_batch` runs at a time
    (one worker), so a model needs no locking. Subclasses may add `completion_tokens` to `self.stats` themselves; the
    base class counts requests and failures.

    Args:
        max_batch_size: the most requests handed to one `_generate_batch` call.
        batch_wait_s: how long the worker waits for more requests after the first one of a batch arrives.
        stall_timeout_s: if set, a request fails with a `JudgeError` once it has waited this many seconds while no
            request of this judge was answered (a model call that never returns); None waits as long as batches
            keep running (a batch on a CPU can take minutes).
    """

    def __init__(
        self, *, max_batch_size: int = 8, batch_wait_s: float = 0.01, stall_timeout_s: float | None = None
    ) -> None:
        super().__init__()
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0 seconds or None, got {stall_timeout_s}")
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.stall_timeout_s = stall_timeout_s
        self._queue: asyncio.Queue[_Pending | _Stop] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._home = JudgeLoop(name=f"{type(self).__name__}-loop")
        # One thread for `_generate_batch`, owned by the judge: even a batch left running by a stopped loop never
        # overlaps the next one.
        self._executor: ThreadPoolExecutor | None = None

    @abstractmethod
    def _generate_batch(self, requests: list[ChatRequest]) -> BatchResult:
        """Answer `requests` (same `_group_key`, at most `max_batch_size`); runs in a worker thread."""

    def _group_key(self, request: ChatRequest) -> tuple:
        """Requests with equal keys may share one `_generate_batch` call. Default: all sampling parameters equal;
        a backend that handles a different `max_tokens` per row in one call returns a coarser key."""
        return request.sampling_key()

    async def agenerate(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        """Queue every request for the batching worker (on the judge's own loop) and wait for all of them."""
        return list(await asyncio.gather(*(self._on_home_loop(request) for request in requests)))

    async def _on_home_loop(self, request: ChatRequest) -> str | JudgeError:
        try:
            return await self._home.call(
                self._answer_one(request), stall_timeout=self.stall_timeout_s, what=f"{type(self).__name__} call"
            )
        except JudgeError as err:  # stuck or closed: the request is cancelled on the judge's loop
            self.stats.add(requests=1, failures=1)
            return err

    async def _answer_one(self, request: ChatRequest) -> str | JudgeError:
        item = _Pending(request, asyncio.get_running_loop().create_future())
        self._ensure_worker().put_nowait(item)
        return await item.future

    async def aclose(self) -> None:
        """Answer what is already queued, then stop the worker and the judge's loop. A later call starts anew."""
        try:
            if self._home.loop is not None:
                await self._home.call(self._aclose_on_loop(), stall_timeout=None, what="Closing the judge")
        finally:
            self._home.stop()
            self._worker = self._queue = self._loop = None
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=False)

    async def _aclose_on_loop(self) -> None:
        worker, queue = self._worker, self._queue
        self._worker = self._queue = self._loop = None
        if worker is None or queue is None or worker.done():
            return
        if worker.get_loop() is not asyncio.get_running_loop():
            worker.cancel()  # cannot await a task of another loop; the caller left that loop behind
            return
        queue.put_nowait(_Stop())
        await worker

    def _ensure_worker(self) -> asyncio.Queue[_Pending | _Stop]:
        """Start the worker on the running loop (the judge's own), again if that loop was restarted."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop or self._queue is None:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue), name=f"{type(self).__name__}-batcher")
            if loop is self._home.loop:
                self._home.hold(self._worker)
        return self._queue

    async def _run(self, queue: asyncio.Queue[_Pending | _Stop]) -> None:
        """The worker: collect a micro-batch, answer it group by group, repeat until stopped."""
        stopping = False
        while not stopping:
            first = await queue.get()
            if isinstance(first, _Stop):
                return
            batch, stopping = await self._collect(queue, first)
            try:
                await self._answer(batch)
            except BaseException:
                # Cancelled (the loop is shutting down): no caller may wait forever on this batch or the queue.
                self._fail_all(batch, "the judge's batching worker was stopped")
                self._fail_queued(queue)
                raise

    async def _collect(self, queue: asyncio.Queue[_Pending | _Stop], first: _Pending) -> tuple[list[_Pending], bool]:
        """Take what is pending (up to `max_batch_size`), waiting at most `batch_wait_s` for stragglers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        batch = [first]
        while len(batch) < self.max_batch_size:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if isinstance(item, _Stop):
                return batch, True
            batch.append(item)
        return batch, False

    async def _answer(self, batch: list[_Pending]) -> None:
        """Split a micro-batch by `_group_key` (one `generate` call cannot mix temperatures) and answer each group."""
        groups: dict[tuple, list[_Pending]] = {}
        for item in batch:
            if not item.future.done():  # skip callers that were cancelled meanwhile
                groups.setdefault(self._group_key(item.request), []).append(item)
        for group in groups.values():
            results = await self._run_group([item.request for item in group])
            failures = sum(isinstance(result, JudgeError) for result in results)
            self.stats.add(requests=len(group), failures=failures)
            for item, result in zip(group, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    async def _run_group(self, requests: list[ChatRequest]) -> BatchResult:
        """Run `_generate_batch` in a thread; turn an exception or a malformed answer into per-request errors."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{type(self).__name__}-batch")
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._generate_batch, requests)
        except Exception as exc:  # any backend failure fails this batch only, never the caller or the worker
            return [self._batch_error(len(requests), exc) for _ in requests]
        if not isinstance(results, list) or len(results) != len(requests):
            got = len(results) if isinstance(results, list) else type(results).__name__
            message = f"{type(self).__name__}._generate_batch returned {got} results for {len(requests)} requests"
            return [JudgeError(message) for _ in requests]
        return [r if isinstance(r, str | JudgeError) else JudgeError(f"non-text judge answer: {r!r}") for r in results]

    def _batch_error(self, size: int, exc: Exception) -> JudgeError:
        error = JudgeError(f"{type(self).__name__} ({self.model_id}) failed on a batch of {size}: {exc!r}")
        error.__cause__ = exc
        return error

    @staticmethod
    def _fail_all(batch: list[_Pending], reason: str) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_result(JudgeError(reason))

    @classmethod
    def _fail_queued(cls, queue: asyncio.Queue[_Pending | _Stop]) -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if isinstance(item, _Pending):
                cls._fail_all([item], "the judge's batching worker was stopped")

    def __getstate__(self) -> dict[str, Any]:
        # Loop-bound state and the batch thread stay behind; a copy starts its own on its first call.
        state = self.__dict__.copy()
        state.update(_queue=None, _worker=None, _loop=None, _executor=None)
        return state
