"""The judge-call cache on disk: several processes on one file, per-node files, and writes that never stall the loop.

Real files and real processes (multiprocessing, spawned); the judge is a scripted server on loopback.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from known_answers import CONTEXT, QUESTION

from trl_longreward import LongRewardFunction, OpenAIJudge
from trl_longreward.judges.base import PermanentJudgeError
from trl_longreward.judges.cache import DEFAULT_MEMORY_ENTRIES, JudgeCallCache, job_spans_nodes
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

ENTRIES = 240  # per writer


def text_of(writer: int, index: int) -> str:
    """A large text (several SQLite pages, so a torn write would show), distinct per entry."""
    return f"writer {writer} entry {index}: " + f"verdict [[{index % 10}]] " * 300


def write_entries(path: str, writer: int) -> None:
    """Child: half the entries with `put` (returns once committed), half with `put_nowait`, then `close`."""
    cache = JudgeCallCache(path)
    for index in range(ENTRIES):
        if index % 2:
            cache.put_nowait(f"w{writer}-{index:04d}", text_of(writer, index), meta={"writer": writer})
        else:
            cache.put(f"w{writer}-{index:04d}", text_of(writer, index), meta={"writer": writer})
    cache.close()


def read_while_written(path: str, results: Any) -> None:
    """Child: read every key again and again while the writers run; report what was found and anything wrong."""
    cache = JudgeCallCache(path, memory_entries=0)  # every read goes to the file
    found: set[str] = set()
    wrong: list[str] = []
    deadline = time.monotonic() + 120
    while len(found) < 2 * ENTRIES and time.monotonic() < deadline:
        for writer in (0, 1):
            for index in range(ENTRIES):
                key = f"w{writer}-{index:04d}"
                if key in found:
                    continue
                text = cache.get(key)
                if text is None:
                    continue
                if text != text_of(writer, index):
                    wrong.append(key)
                found.add(key)
        time.sleep(0.01)
    cache.close()
    results.put({"found": len(found), "wrong": wrong})


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.timeout(300)
def test_two_processes_write_one_file_while_a_third_reads(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.sqlite"
    JudgeCallCache(path).close()  # the file exists before the children start
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    reader = context.Process(target=read_while_written, args=(str(path), results))
    writers = [context.Process(target=write_entries, args=(str(path), n)) for n in (0, 1)]
    reader.start()
    for writer in writers:
        writer.start()
    for process in [*writers, reader]:
        process.join(180)
        assert process.exitcode == 0, process
    seen = results.get(timeout=10)
    assert seen["wrong"] == [] and seen["found"] == 2 * ENTRIES  # every entry read whole while being written
    assert integrity(path) == "ok"
    cache = JudgeCallCache(path)
    try:
        assert len(cache) == 2 * ENTRIES
        for writer in (0, 1):
            for index in range(ENTRIES):
                assert cache.get(f"w{writer}-{index:04d}") == text_of(writer, index)
    finally:
        cache.close()


def test_memory_only_cache_is_bounded_lru() -> None:
    cache = JudgeCallCache(memory_entries=3)
    for index in range(4):
        cache.put(f"k{index}", f"t{index}")
    assert cache.get("k0") is None and len(cache) == 3
    cache.get("k1")  # used: k2 is now the least recently used
    cache.put("k4", "t4")
    assert cache.get("k2") is None and cache.get("k1") == "t1"
    assert JudgeCallCache().memory_entries == DEFAULT_MEMORY_ENTRIES > 0


def test_a_permanent_failure_is_stored_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.sqlite"
    cache = JudgeCallCache(path)
    cache.put_failure("f1", PermanentJudgeError("prompt too long", status=400))
    cache.close()
    again = JudgeCallCache(path)
    try:
        found = again.get("answer-key", failure_key="f1")
        assert isinstance(found, PermanentJudgeError) and str(found) == "prompt too long" and found.status == 400
        assert again.get("answer-key") is None  # a failure is found only under its own key
    finally:
        again.close()


def test_nodes_write_their_own_files_and_read_each_other(tmp_path: Path) -> None:
    """Two nodes with one shared directory: each writes `judge_cache.<node>.sqlite` (never the shared name), and
    finds what the other committed and checkpointed; a row whose text does not match its digest is a miss."""
    path = tmp_path / "judge_cache.sqlite"
    first = JudgeCallCache(path, per_node=True, node="node-a")
    first.put("shared-key", "the answer of node a")
    first.put("tampered", "original text")
    first.close()  # closing checkpoints the WAL into the file
    assert first.file == tmp_path / "judge_cache.node-a.sqlite" and not path.exists()
    with closing(sqlite3.connect(first.file)) as conn, conn:
        conn.execute("UPDATE judge_calls SET text = 'changed' WHERE key = 'tampered'")
    second = JudgeCallCache(path, per_node=True, node="node-b")
    try:
        assert second.get("shared-key") == "the answer of node a"
        assert second.get("tampered") is None
        second.put("own-key", "the answer of node b")
        assert second.file is not None and second.file.name == "judge_cache.node-b.sqlite"
    finally:
        second.close()
    # A single-node run over the same directory reads both nodes' files.
    single = JudgeCallCache(path, per_node=False)
    try:
        assert single.get("shared-key") == "the answer of node a" and single.get("own-key") == "the answer of node b"
    finally:
        single.close()


def test_a_job_spanning_nodes_is_detected_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not job_spans_nodes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not job_spans_nodes()  # two ranks on one machine share one file
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert job_spans_nodes()


@pytest.mark.timeout(300)
def test_a_writer_waiting_for_a_lock_does_not_stall_judge_calls(tmp_path: Path) -> None:
    """Another process holds the cache file's write lock for the whole scoring: calls still complete at once (the
    answers wait in memory, and what was committed before is still read from the file); once the lock is released
    every answer is committed."""
    path = tmp_path / "judge_cache.sqlite"
    responses = [f"The council built a flood barrier in {1990 + i}." for i in range(4)]

    def reward_for(server: ScriptedOpenAIServer, cache: JudgeCallCache) -> LongRewardFunction:
        return LongRewardFunction(
            judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
            retriever="bm25",
            chunk_tokenizer="regex",
            cache=cache,
        )

    def rows(texts: list[str]) -> dict[str, list[str]]:
        return {"completions": texts, "context": [CONTEXT] * len(texts), "question": [QUESTION] * len(texts)}

    with ScriptedOpenAIServer(ScriptedLongRewardJudge()) as server:
        before = reward_for(server, JudgeCallCache(path))
        before.score(**rows(responses[:1]))
        before.close()
        committed = before.stats()["judge_calls"]
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, held until the rollback below
        try:
            cache = JudgeCallCache(path, timeout=300.0)
            reward = reward_for(server, cache)
            started = time.monotonic()
            judgements = reward.score(**rows(responses))
            elapsed = time.monotonic() - started
            stats = reward.stats()
            assert all(j.reward is not None for j in judgements)
            # a hang guard, not a speed test: a write blocking the loop would stall it for the lock's 300 s
            assert elapsed < 120.0, elapsed
            assert stats["cache_hits"] >= committed  # the first response's calls, read from the file under the lock
            sent = server.num_chat_requests
            reward.score(**rows(responses))  # the uncommitted answers are found in memory
            assert server.num_chat_requests == sent
            assert not cache.flush(timeout=0.5)  # still locked out
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert cache.flush(timeout=60.0)
        reward.close()
    with closing(sqlite3.connect(path)) as conn:
        rows_on_disk = conn.execute("SELECT COUNT(*) FROM judge_calls").fetchone()[0]
    assert rows_on_disk == committed + stats["judge_calls"]
    assert integrity(path) == "ok"


def _open_and_write(path: str, barrier, results) -> None:
    from trl_longreward.judges.cache import JudgeCallCache

    barrier.wait()
    try:
        cache = JudgeCallCache(path)
        cache.put(f"key-{os.getpid()}", "answer")
        cache.close()
        results.put("ok")
    except Exception as err:  # the failure is the test's finding: report it, do not crash the child
        results.put(repr(err))


def test_ranks_creating_one_new_cache_file_at_the_same_moment_all_open_it(tmp_path):
    """Switching a new file to WAL meets "database is locked" when another process does the same at once (SQLite's
    busy timeout does not cover it): every process must still open the cache and write."""
    context = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(15):
        path = str(tmp_path / f"race-{round_}.sqlite")
        barrier, results = context.Barrier(3), context.Queue()
        workers = [context.Process(target=_open_and_write, args=(path, barrier, results)) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        outcomes += [results.get(timeout=5) for _ in workers]
    assert outcomes == ["ok"] * 45, [o for o in outcomes if o != "ok"]
