"""Prefix-affine vs least-loaded dispatch over two judge replicas: each server's prefix-cache hit rate and wall time.

The same LongReward judge calls (k responses to each of several long-document prompts; the four dimensions) are sent
through one `OpenAIJudge` over two already-running OpenAI-compatible servers, once with prefix-affine dispatch (the
calls of one prompt and template go to one replica while it is healthy and has room) and once least-loaded only. Each
server's Prometheus `/metrics` is read before and after each mode; the prefix-cache hit rate of a mode is
(hits after - hits before) / (queries after - queries before), per server and over both. vLLM's counters are
`vllm:prefix_cache_queries` and `vllm:prefix_cache_hits` (tokens; exposed with a `_total` suffix); older names
(`vllm:gpu_prefix_cache_*`) are read too. A server without `/metrics`, or without these counters, is reported as
"hit rate unavailable": no number is made up.

Between the two modes the servers' prefix caches are emptied (`POST /reset_prefix_cache`, which `vllm serve` offers
with `VLLM_SERVER_DEV_MODE=1`), so the second mode does not find the first one's prefixes; when a server refuses, the
two modes judge two disjoint halves of the prompts instead (same sizes, not the same calls), and the JSON says so.
Each mode uses a fresh in-memory judge cache: both send every call.

    python benchmarks/prefix_affinity.py --base_url http://127.0.0.1:8001/v1 http://127.0.0.1:8002/v1 \
        --model judge --json benchmarks/results/prefix_affinity_cpu_vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERY_COUNTERS = ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
HIT_COUNTERS = ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
MODES = ("affine", "least_loaded")
# The CPU demo's judge budgets, greedy and one try per call (a small judge on CPU servers): both modes send exactly
# the same calls, which is all the comparison needs; the prefixes they share are the prompts' documents.
JUDGE_BUDGETS: dict[str, Any] = {
    "max_attempts": 1,
    "first_temperature": 0.0,
    "score_max_tokens": 32,
    "break_max_tokens": 64,
    "check_max_tokens": 32,
    "extract_max_tokens": 64,
    "max_statements": 2,
    "completeness_chunk_tokens": 1024,
}


def server_root(base_url: str) -> str:
    """`http://host:port` of an API base URL such as `http://host:port/v1`."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def parse_counter(text: str, names: tuple[str, ...]) -> float | None:
    """The sum over label sets of the first of `names` found in a Prometheus text exposition (with or without the
    `_total` suffix of counters); None when none is there."""
    for name in names:
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            metric = line.split("{", 1)[0].split(" ", 1)[0]
            if metric in (name, f"{name}_total"):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                    found = True
                except ValueError:
                    continue
        if found:
            return total
    return None


def read_prefix_counters(base_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """{"queries", "hits"} from the server's `/metrics`, or {"unavailable": why}."""
    url = server_root(base_url) + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as err:
        return {"unavailable": f"GET {url} failed: {err}"}
    queries, hits = parse_counter(text, QUERY_COUNTERS), parse_counter(text, HIT_COUNTERS)
    if queries is None or hits is None:
        return {"unavailable": f"{url} has no prefix-cache counters ({', '.join(QUERY_COUNTERS + HIT_COUNTERS)})"}
    return {"queries": queries, "hits": hits}


def reset_prefix_cache(base_url: str, timeout: float = 30.0) -> bool:
    request = urllib.request.Request(server_root(base_url) + "/reset_prefix_cache", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def hit_rate(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    if "unavailable" in before or "unavailable" in after:
        return {"hit_rate": None, "unavailable": after.get("unavailable") or before.get("unavailable")}
    queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries > 0 else None}


def workload(num_prompts: int, num_responses: int) -> list[dict[str, str]]:
    """Rows (context, question, response): `num_responses` responses to each of `num_prompts` bundled long-document
    prompts, built from the document's own sentences (so the statements are checkable)."""
    from trl_longreward.data import load_long_qa

    rows = []
    for record in list(load_long_qa("train"))[:num_prompts]:
        sentences = [s.strip() + "." for s in record["context"].split(".") if len(s.strip()) > 20]
        for j in range(num_responses):
            picked = sentences[j :: max(1, num_responses)][:3] or sentences[:1]
            rows.append({"context": record["context"], "question": record["question"], "response": " ".join(picked)})
    return rows


def run_mode(mode: str, rows: list[dict[str, str]], urls: list[str], model: str, concurrency: int) -> dict[str, Any]:
    from trl_longreward import LongRewardFunction, OpenAIJudge

    judge = OpenAIJudge(model, urls, max_concurrency=concurrency, affinity=mode == "affine", max_retries=1)
    reward = LongRewardFunction(
        judge=judge, retriever="bm25", chunk_tokenizer="regex", show_progress=False, **JUDGE_BUDGETS
    )
    before = {url: read_prefix_counters(url) for url in urls}
    started = time.perf_counter()
    try:
        judgements, _ = reward.score_batch(
            prompts=None,
            completions=[r["response"] for r in rows],
            context=[r["context"] for r in rows],
            question=[r["question"] for r in rows],
        )
        wall = time.perf_counter() - started
        stats = reward.stats()
    finally:
        reward.close()
    after = {url: read_prefix_counters(url) for url in urls}
    per_server = {url: hit_rate(before[url], after[url]) for url in urls}
    available = [r for r in per_server.values() if r.get("hit_rate") is not None or "queries" in r]
    overall: dict[str, Any] = {"hit_rate": None}
    if len(available) == len(urls):
        queries = sum(r["queries"] for r in available)
        hits = sum(r["hits"] for r in available)
        overall = {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries > 0 else None}
    else:
        overall["unavailable"] = "; ".join(r["unavailable"] for r in per_server.values() if "unavailable" in r)
    return {
        "mode": mode,
        "wall_s": wall,
        "judge_calls": stats["judge_calls"],
        "scored": sum(1 for j in judgements if j.reward is not None),
        "responses": len(rows),
        "endpoints": stats.get("judge_endpoints"),
        "prefix_cache": {"per_server": per_server, "overall": overall},
    }


def benchmark(urls: list[str], model: str, *, num_prompts: int, num_responses: int, concurrency: int) -> dict:
    rows = workload(num_prompts, num_responses)
    results, same_calls = [], True
    halves = {MODES[0]: rows, MODES[1]: rows}
    if not all(reset_prefix_cache(url) for url in urls):
        same_calls = False
        cut = (len(rows) // num_responses // 2) * num_responses
        halves = {MODES[0]: rows[:cut], MODES[1]: rows[cut : 2 * cut]}
    for mode in MODES:
        if same_calls:
            for url in urls:
                reset_prefix_cache(url)
        results.append(run_mode(mode, halves[mode], urls, model, concurrency))
    return {
        "config": {
            "base_urls": urls,
            "model": model,
            "prompts": num_prompts,
            "responses_per_prompt": num_responses,
            "max_concurrency_per_endpoint": concurrency,
            "same_calls_in_both_modes": same_calls,
            "cache_reset_between_modes": same_calls,
        },
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_url", nargs=2, required=True, metavar="URL", help="two running judge replicas (/v1)")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (k)")
    parser.add_argument("--max-concurrency", type=int, default=8, help="calls in flight per replica")
    parser.add_argument("--json", default="benchmarks/results/prefix_affinity.json")
    cli = parser.parse_args()
    payload = benchmark(
        list(cli.base_url),
        cli.model,
        num_prompts=cli.prompts,
        num_responses=cli.responses,
        concurrency=cli.max_concurrency,
    )
    for row in payload["results"]:
        overall = row["prefix_cache"]["overall"]
        rate = "unavailable" if overall["hit_rate"] is None else f"{overall['hit_rate']:.3f}"
        print(f"{row['mode']}: {row['wall_s']:.1f} s, {row['judge_calls']} judge calls, prefix-cache hit rate {rate}")
    Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {cli.json}")


if __name__ == "__main__":
    main()
