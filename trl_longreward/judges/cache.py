"""A persistent judge-call cache, so a rerun or a resumed run never pays twice for the same judge call.

SQLite in WAL mode: every answer is committed as soon as it arrives, a crash mid-write loses at most the answer being
written (never a committed one, never the file), and several processes (training ranks, a CLI run) can share one file.
Only the judge's raw text is stored, keyed by a hash of everything that determines it: judge model, prompt template
and its version, the full request (messages and sampling parameters) and the attempt number (a re-sample is a new
call, and a resumed run must see the same re-samples again). No credential is part of a key or a value.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


def cache_key(
    *, judge_model: str, template: str, template_version: str, request_fingerprint: str, attempt: int
) -> str:
    payload = json.dumps([judge_model, template, template_version, request_fingerprint, attempt], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCallCache:
    """`get(key) -> text | None` and `put(key, text)`; `path=None` keeps the cache in memory for this process only."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: the connection is used under self._lock from the reward's loop thread and
            # from callers' threads alike.
            self._conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS judge_calls (key TEXT PRIMARY KEY, text TEXT NOT NULL, meta TEXT)"
            )

    def get(self, key: str) -> str | None:
        with self._lock:
            if self._conn is None:
                text = self._memory.get(key)
            else:
                row = self._conn.execute("SELECT text FROM judge_calls WHERE key = ?", (key,)).fetchone()
                text = None if row is None else row[0]
            if text is None:
                self.misses += 1
            else:
                self.hits += 1
            return text

    def put(self, key: str, text: str, meta: dict | None = None) -> None:
        with self._lock:
            if self._conn is None:
                self._memory[key] = text
            else:
                self._conn.execute(
                    "INSERT OR REPLACE INTO judge_calls (key, text, meta) VALUES (?, ?, ?)",
                    (key, text, None if meta is None else json.dumps(meta, ensure_ascii=False)),
                )

    def __len__(self) -> int:
        with self._lock:
            if self._conn is None:
                return len(self._memory)
            return self._conn.execute("SELECT COUNT(*) FROM judge_calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __getstate__(self) -> dict:
        # Pickled copies (e.g. a trainer's deepcopy) reopen the same file instead of sharing a connection.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
