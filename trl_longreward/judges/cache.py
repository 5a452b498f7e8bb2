"""A persistent judge-call cache, so a rerun or a resumed run never pays twice for the same judge call.

What is stored: the judge's raw text, keyed by a hash of everything that can change it (`cache_key`): the judge's
identity (`Judge.cache_identity()`: backend, model, the server's own report of what it serves or `judge_fingerprint`,
in-process model state and settings, extra request fields), the prompt template and its version, the full request
(messages and sampling parameters) and the attempt number (a re-sample is a new call, and a resumed run must see the
same re-samples again). A request the judge refused for good (`PermanentJudgeError`, e.g. a prompt over the server's
context window) is stored as a failure, keyed also by the judge's context limits, so a rerun does not send it again
but a larger window does. No credential is part of a key or a value.

In memory: the newest `memory_entries` entries (least recently used first out; default `DEFAULT_MEMORY_ENTRIES`,
about 40 MB for answers of 2 kB; `None` lets it grow). With `path=None` that is the whole cache, for this process
only; with a file it is a read-through layer, and answers not yet written stay in memory until they are.

On disk (SQLite, WAL mode):
- Writes never block the event loop: `put_nowait` hands the answer to one writer thread per cache, which commits
  whatever is queued in one transaction and waits, in its own thread, for a lock another process holds. A crash loses
  at most the answers queued and not yet committed (milliseconds' worth), never a committed one, never the file.
  `put` waits until its answer is committed; `flush` until everything queued is.
- Reads off the loop: `aget` answers from memory, else reads the file in a small thread pool (WAL readers never wait
  for writers).
- Processes of one machine (training ranks, a CLI run) share one file: SQLite's locks and the WAL index serialize them.
- Machines do not share a WAL file: its index lives in shared memory, which a network filesystem does not share
  between hosts. When the job spans several nodes (torch's `WORLD_SIZE` > `LOCAL_WORLD_SIZE`, or `per_node=True`),
  each node writes its own file, `<stem>.<hostname><suffix>` next to `path` (e.g. `judge_cache.node-3.sqlite`), shared
  by that node's ranks. Every cache also reads through, on a miss, the other files of that family (`<stem>.*<suffix>`
  and `path` itself): opened `immutable` (no lock, no WAL index: only what their writer has checkpointed, which a
  per-node writer does every few seconds), each row checked against the SHA-256 of its text stored with it, and any
  read error taken as a miss, so another node's file can at worst cost a judge call, never give a wrong answer.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import os
import queue
import re
import socket
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .base import PermanentJudgeError

logger = logging.getLogger(__name__)

KEY_FORMAT = 2  # bump when what a key covers changes: older entries then miss instead of answering for new calls
DEFAULT_MEMORY_ENTRIES = 20_000
# The one identity entry that keys stored failures only (see `Judge.cache_identity`).
CONTEXT_LIMITS = "context_limits"

Cached = str | PermanentJudgeError

_FAILURE = "\x00failure:"  # memory-layer prefix of failure keys (answer keys never start with a NUL)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS judge_calls (key TEXT PRIMARY KEY, text TEXT NOT NULL, meta TEXT)",
    "CREATE TABLE IF NOT EXISTS judge_failures (key TEXT PRIMARY KEY, error TEXT NOT NULL, meta TEXT)",
)
_CHECKPOINT_EVERY_S = 5.0  # per-node files: make new entries visible to other nodes' read-through this often
_SIBLINGS_EVERY_S = 30.0  # how often the list of other nodes' files is refreshed
_OPEN_WAIT_S = 2.0  # how long the constructor waits for the writer to open the file (longer: a lock; go on)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(
    *, judge: Mapping[str, Any], template: str, template_version: str, request_fingerprint: str, attempt: int
) -> str:
    """The key of one judge call: the judge's identity (without its context limits), the template and its version,
    the request's fingerprint and the attempt number."""
    identity = {k: v for k, v in judge.items() if k != CONTEXT_LIMITS}
    payload = json.dumps(
        {
            "format": KEY_FORMAT,
            "judge": identity,
            "template": template,
            "version": template_version,
            "request": request_fingerprint,
            "attempt": attempt,
        },
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return _digest(payload)


def failure_key(answer_key: str, judge: Mapping[str, Any]) -> str:
    """The key of a stored permanent failure of the call `answer_key`: also the judge's context limits, so a judge
    with a larger window sends the refused prompt again."""
    limits = json.dumps(judge.get(CONTEXT_LIMITS), sort_keys=True, default=str)
    return _digest(f"{answer_key}\x00{limits}")


def node_name() -> str:
    """This machine's name as used in per-node file names (the hostname, made safe for a file name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "node"


def job_spans_nodes() -> bool:
    """Whether this process belongs to a torch distributed job on several machines (torchrun's environment)."""

    def number(name: str) -> int | None:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            return None

    world, local = number("WORLD_SIZE"), number("LOCAL_WORLD_SIZE")
    if world is not None and local is not None and world > local:
        return True
    groups = number("GROUP_WORLD_SIZE")  # torchrun: the number of nodes
    return groups is not None and groups > 1


@dataclass
class _Write:
    key: str
    value: str
    meta: str | None
    failure: bool
    done: threading.Event | None = None


@dataclass
class _Barrier:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()
_OPEN: weakref.WeakSet[JudgeCallCache] = weakref.WeakSet()  # caches with a writer thread, flushed at exit
_EXIT_FLUSH_S = 30.0


@atexit.register
def _flush_at_exit() -> None:
    """Commit what open caches still queue before the interpreter stops their (daemon) writer threads."""
    for cache in list(_OPEN):
        if not cache._closed and not cache.flush(timeout=_EXIT_FLUSH_S):
            logger.warning("Judge cache %s: answers still queued at exit were not written.", cache.file)


class JudgeCallCache:
    """`get(key) -> text | None` and `put(key, text)`, with async, non-blocking faces for the reward's event loop
    (`aget`, `put_nowait`); see the module docstring for memory, disk, processes and nodes.

    Args:
        path: the SQLite file; `None` keeps the cache in memory for this process only.
        memory_entries: entries kept in memory (least recently used first out); `None`: no bound.
        per_node: write a per-node file next to `path` (`None`: when the job spans several nodes).
        node: the node's name in that file name (default: the hostname).
        timeout: seconds SQLite waits for another process's lock before the writer retries (it never gives up
            while the cache is open).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        memory_entries: int | None = DEFAULT_MEMORY_ENTRIES,
        per_node: bool | None = None,
        node: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        if memory_entries is not None and memory_entries < 0:
            raise ValueError(f"memory_entries must be >= 0 (or None for no bound), got {memory_entries}.")
        self.path = None if path is None else Path(path)
        self.memory_entries = memory_entries
        self.per_node = per_node
        self.node = node
        self.timeout = timeout
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, Cached] = OrderedDict()
        self._pending: dict[str, Cached] = {}  # handed to the writer, not yet committed
        self._closed = False
        self._pid = os.getpid()
        self.file: Path | None = None  # the file this process writes
        if self.path is None:
            return
        spans = job_spans_nodes() if per_node is None else per_node
        self.file = (
            self.path.with_name(f"{self.path.stem}.{node or node_name()}{self.path.suffix}") if spans else self.path
        )
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._opened = threading.Event()
        self._broken: BaseException | None = None
        self._per_node_file = self.file != self.path
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._siblings: list[Path] = []
        self._siblings_at = float("-inf")
        self._writer = threading.Thread(target=self._write_forever, name="judge-cache-writer", daemon=True)
        self._writer.start()
        _OPEN.add(self)
        self._opened.wait(_OPEN_WAIT_S)
        if self._broken is not None:
            raise self._broken

    # ----- reading -----

    def _forked(self) -> None:
        """In a forked child the writer thread and the connections are the parent's: open the file anew."""
        if self._pid != os.getpid() and self.path is not None:
            memory = self._memory
            self.__setstate__(self.__getstate__())
            self._memory = memory

    def get(self, key: str, *, failure_key: str | None = None) -> Cached | None:
        """The cached text of `key` (or its stored permanent failure, under `failure_key`), else None; blocking."""
        self._forked()
        found = self._from_memory(key, failure_key)
        if found is None and self.file is not None:
            found = self._from_files(key, failure_key)
        return self._counted(found)

    async def aget(self, key: str, *, failure_key: str | None = None) -> Cached | None:
        """`get` without blocking the event loop: memory first, the files in a reader thread."""
        self._forked()
        found = self._from_memory(key, failure_key)
        if found is None and self.file is not None and not self._closed:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._reader_pool(), self._from_files, key, failure_key)
        return self._counted(found)

    def _counted(self, found: Cached | None) -> Cached | None:
        with self._lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        return found

    def _from_memory(self, key: str, failure_key: str | None) -> Cached | None:
        with self._lock:
            for name in (key, None if failure_key is None else _FAILURE + failure_key):
                if name is None:
                    continue
                found = self._pending.get(name)
                if found is None:
                    found = self._memory.get(name)
                    if found is not None:
                        self._memory.move_to_end(name)
                if found is not None:
                    return found
        return None

    def _remember(self, name: str, value: Cached) -> None:
        with self._lock:
            self._memory[name] = value
            self._memory.move_to_end(name)
            if self.memory_entries is not None:
                while len(self._memory) > self.memory_entries:
                    self._memory.popitem(last=False)

    def _from_files(self, key: str, failure_key: str | None) -> Cached | None:
        """Own file first, then the other files of the family (other nodes); what is found is kept in memory."""
        found = self._read(self._reader(), key, failure_key, verify=False)
        if found is None:
            for sibling in self._sibling_files():
                found = self._read_foreign(sibling, key, failure_key)
                if found is not None:
                    break
        if found is not None:
            self._remember(key if isinstance(found, str) else _FAILURE + (failure_key or key), found)
        return found

    @staticmethod
    def _read(conn: sqlite3.Connection | None, key: str, failure_key: str | None, *, verify: bool) -> Cached | None:
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT text, meta FROM judge_calls WHERE key = ?", (key,)).fetchone()
            if row is not None and (not verify or _verified(row[0], row[1])):
                return row[0]
            if failure_key is not None:
                row = conn.execute("SELECT error, meta FROM judge_failures WHERE key = ?", (failure_key,)).fetchone()
                if row is not None and (not verify or _verified(row[0], row[1])):
                    return _stored_failure(row[0], row[1])
        except sqlite3.Error as err:  # no table yet (the writer is still opening it), a torn foreign read: a miss
            logger.debug("judge cache read missed: %r", err)
        return None

    def _read_foreign(self, path: Path, key: str, failure_key: str | None) -> Cached | None:
        """A read of another node's file: immutable (no lock, no WAL index), each row checked against its digest."""
        try:
            conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?immutable=1", uri=True, check_same_thread=False)
        except sqlite3.Error:
            return None
        try:
            return self._read(conn, key, failure_key, verify=True)
        finally:
            conn.close()

    def _reader(self) -> sqlite3.Connection | None:
        """This thread's read connection to the own file (None while the file does not exist yet)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            assert self.file is not None
            if not self.file.exists():
                return None
            try:
                conn = sqlite3.connect(self.file, timeout=5.0, check_same_thread=False, isolation_level=None)
            except sqlite3.Error:
                return None
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _reader_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="judge-cache-read")
            return self._readers

    def _sibling_files(self) -> list[Path]:
        """The other files of this cache's family (other nodes' files, and `path` when this node writes its own)."""
        assert self.path is not None and self.file is not None
        now = time.monotonic()
        if now - self._siblings_at >= _SIBLINGS_EVERY_S:
            family = set(self.path.parent.glob(f"{glob_escape(self.path.stem)}.*{glob_escape(self.path.suffix)}"))
            family.add(self.path)
            family.discard(self.file)
            self._siblings = sorted(p for p in family if p.is_file())
            self._siblings_at = now
        return self._siblings

    # ----- writing -----

    def put(self, key: str, text: str, meta: dict | None = None) -> None:
        """Store `text` under `key`; returns once it is committed to the file (at once for a memory-only cache)."""
        done = threading.Event()
        if self._enqueue(key, text, meta, failure=False, done=done):
            self._wait(done, None)
            if self._broken is not None:
                raise self._broken

    def put_nowait(self, key: str, text: str, meta: dict | None = None) -> None:
        """Store `text` under `key` without waiting: in memory now, committed by the writer thread soon."""
        self._enqueue(key, text, meta, failure=False)

    def put_failure(self, failure_key: str, error: PermanentJudgeError, meta: dict | None = None) -> None:
        """Store a permanent failure (its message and HTTP status) under `failure_key`, without waiting."""
        meta = {**(meta or {}), "status": error.status}
        self._enqueue(failure_key, str(error), meta, failure=True)

    def _enqueue(
        self, key: str, text: str, meta: dict | None, *, failure: bool, done: threading.Event | None = None
    ) -> bool:
        """Remember the entry and queue it for the writer; False when there is no file (or it cannot be written)."""
        self._forked()
        name = _FAILURE + key if failure else key
        value: Cached = PermanentJudgeError(text, status=(meta or {}).get("status")) if failure else text
        self._remember(name, value)
        if self.file is None or self._closed or self._broken is not None:
            return False
        stored = json.dumps({**(meta or {}), "sha256": _digest(text)}, ensure_ascii=False, default=str)
        with self._lock:
            self._pending[name] = value
        self._queue.put(_Write(key, text, stored, failure, done))
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed; False if `timeout` seconds passed first."""
        self._forked()
        if self.file is None or self._broken is not None or not self._writer.is_alive():
            return True
        barrier = _Barrier()
        self._queue.put(barrier)
        return self._wait(barrier.done, timeout)

    def _wait(self, done: threading.Event, timeout: float | None) -> bool:
        """Wait for the writer to set `done`, at most `timeout` s; stop waiting if the writer is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if not self._writer.is_alive() or (deadline is not None and time.monotonic() >= deadline):
                return done.is_set()
        return True

    def _write_forever(self) -> None:
        """The writer thread: open the file, then commit what is queued, a batch per transaction, until stopped."""
        try:
            conn = self._open()
        except BaseException as err:  # a bad path, a read-only directory: the constructor raises it
            self._broken = err
            self._opened.set()
            return
        self._opened.set()
        last_checkpoint = time.monotonic()
        stopping = False
        try:
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < 512:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                writes = [item for item in batch if isinstance(item, _Write)]
                stopping = any(item is _STOP for item in batch)
                if writes:
                    self._commit(conn, writes)
                with self._lock:
                    for write in writes:
                        name = _FAILURE + write.key if write.failure else write.key
                        self._pending.pop(name, None)
                for item in batch:
                    if isinstance(item, _Write) and item.done is not None:
                        item.done.set()
                    elif isinstance(item, _Barrier):
                        item.done.set()
                if self._per_node_file and time.monotonic() - last_checkpoint >= _CHECKPOINT_EVERY_S:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error:
                        pass
                    last_checkpoint = time.monotonic()
        finally:
            conn.close()

    def _open(self) -> sqlite3.Connection:
        """The file's connection, in WAL mode with the schema. Several processes (training ranks) may create the
        file at the same moment: switching to WAL and creating the tables then meet "database is locked" at once,
        which SQLite's busy timeout does not cover, so they are retried until `timeout`."""
        assert self.file is not None
        deadline = time.monotonic() + self.timeout
        while True:
            conn = sqlite3.connect(self.file, timeout=self.timeout, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                for statement, table in zip(_SCHEMA, ("judge_calls", "judge_failures"), strict=True):
                    if table not in existing:
                        conn.execute(statement)
                return conn
            except sqlite3.OperationalError as err:
                conn.close()
                busy = "locked" in str(err) or "busy" in str(err)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                conn.close()
                raise

    def _commit(self, conn: sqlite3.Connection, writes: list[_Write]) -> None:
        """One transaction for the batch; a lock held elsewhere is waited out (in this thread), other errors are
        logged and the batch stays in memory only."""
        answers = [(w.key, w.value, w.meta) for w in writes if not w.failure]
        failures = [(w.key, w.value, w.meta) for w in writes if w.failure]
        warned = False
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if answers:
                        conn.executemany(
                            "INSERT OR REPLACE INTO judge_calls (key, text, meta) VALUES (?, ?, ?)", answers
                        )
                    if failures:
                        conn.executemany(
                            "INSERT OR REPLACE INTO judge_failures (key, error, meta) VALUES (?, ?, ?)", failures
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    logger.error("Judge cache %s: %d answers not written: %r", self.file, len(writes), err)
                    return
                if not warned:
                    logger.warning(
                        "Judge cache %s is locked by another process for over %.0f s; %d answers wait in memory.",
                        self.file,
                        self.timeout,
                        len(writes),
                    )
                    warned = True
            except sqlite3.Error as err:
                logger.error("Judge cache %s: %d answers not written: %r", self.file, len(writes), err)
                return

    # ----- the rest -----

    def __len__(self) -> int:
        """Entries stored: answers committed to the own file (after `flush`), or in memory without a file."""
        if self.file is None:
            with self._lock:
                return sum(1 for name in self._memory if not name.startswith(_FAILURE))
        self.flush()
        conn = self._reader()
        return 0 if conn is None else conn.execute("SELECT COUNT(*) FROM judge_calls").fetchone()[0]

    def close(self, timeout: float | None = 120.0) -> None:
        """Commit what is queued (waiting at most `timeout` s for a lock held elsewhere), then close the files."""
        if self._closed:
            return
        self._closed = True
        if self.file is None:
            return
        if self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join(timeout)
            if self._writer.is_alive():
                with self._lock:
                    waiting = len(self._pending)
                logger.warning(
                    "Judge cache %s: %d answers still wait for a lock held by another process; the writer keeps "
                    "trying until this process exits.",
                    self.file,
                    waiting,
                )
        with self._lock:
            readers, self._readers = self._readers, None
            connections, self._connections = self._connections, []
        if readers is not None:
            readers.shutdown(wait=True)
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def __getstate__(self) -> dict:
        # Pickled copies (e.g. a trainer's deepcopy) open the same file anew instead of sharing threads.
        return {
            "path": self.path,
            "memory_entries": self.memory_entries,
            "per_node": self.per_node,
            "node": self.node,
            "timeout": self.timeout,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["path"],
            memory_entries=state.get("memory_entries", DEFAULT_MEMORY_ENTRIES),
            per_node=state.get("per_node"),
            node=state.get("node"),
            timeout=state.get("timeout", 60.0),
        )


def glob_escape(text: str) -> str:
    """`text` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _verified(text: str, meta: str | None) -> bool:
    """Whether a row read from another node's file is whole: its text matches the digest stored with it."""
    try:
        return json.loads(meta or "{}").get("sha256") == _digest(text)
    except (ValueError, AttributeError):
        return False


def _stored_failure(message: str, meta: str | None) -> PermanentJudgeError:
    try:
        status = json.loads(meta or "{}").get("status")
    except (ValueError, AttributeError):
        status = None
    return PermanentJudgeError(message, status=status if isinstance(status, int) else None)
