"""Judge throughput: does LongReward keep its judge saturated, and does it scale over judge replicas?

Starts local OpenAI-compatible judge servers (`ScriptedOpenAIServer` answering as `ScriptedLongRewardJudge`, one
process each) that take a fixed time per call and answer 429 above a concurrency cap, then scores the same batch
(default 16 prompts x 4 responses) with `LongRewardFunction` through the real `openai` client, against 1, 2 and 4
servers, in one process. Every run builds a fresh reward function with an in-memory judge-call cache, so no call is
ever answered from a cache. After each run the very same judge calls are replayed all at once, with no dependencies
and no pipeline work, through the same judge client: the baseline of what the client and the servers can do at best.

It prints:
- judge calls: total, per response and per prompt, next to the reference pipeline's count (docs/method.md section 2, 6: per
  response helpfulness + logicality + completeness score + faithfulness breakdown + one check per statement; per
  prompt one notes extraction per 4096-token chunk), computed from the data, not from our counters;
- per replica count n: wall time / ideal, where ideal = calls x latency / (n x cap) (goal <= 1.15), the replay's
  wall time / ideal, and wall time / replay (what the pipeline's dependencies and work cost on top of the calls);
- throughput scaling efficiency throughput_n / (n x throughput_1), the 1-server run being the baseline
  (goal >= 0.9 at n = 4).

    python benchmarks/judge_throughput.py                 # 16 x 4, 50 ms, cap 8, median of 3 runs per setting
    python benchmarks/judge_throughput.py --quick         # 4 x 4, one run per setting (a few seconds)
    python benchmarks/judge_throughput.py --json out.json # also write the figures as JSON
    python benchmarks/judge_throughput.py --latency 0.2   # a slower judge: less weight on the client's own cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "harbour tide station sector survey barrier council rainfall orchard bridge ferry granary lantern quarry "
    "meadow canal foundry market archive chapel mill pasture reservoir signal tower valley warehouse beacon"
).split()
MONTHS = "January February March April May June July August September October November December".split()
GOAL_RATIO = 1.15
GOAL_EFFICIENCY = 0.9


# ----- data -----


@dataclass(frozen=True)
class Case:
    context: str
    question: str
    responses: tuple[tuple[str, int], ...]  # (response, number of statements in it)


def make_cases(num_prompts: int, num_responses: int, context_sentences: int) -> list[Case]:
    """Synthetic long-document QA: every statement of every response is a distinct sentence, so no two judge calls
    of the batch are identical and the call count is exactly the pipeline's."""
    cases = []
    for p in range(num_prompts):
        # One sentence in ten mentions the lighthouse, which the question asks about: the notes of a chunk are a
        # short list, as for a real question about part of a document.
        sentences = [
            f"In sector {i} the {WORDS[(p + i) % len(WORDS)]} station {p} recorded a tide of {100 + (i * 7) % 90} "
            f"centimetres{' near the lighthouse' if i % 10 == 3 else ''} during the {MONTHS[i % 12]} survey."
            for i in range(context_sentences)
        ]
        question = f"What was noted near the lighthouse in report {p}?"
        responses = []
        for r in range(num_responses):
            n = 2 + (p + r) % 4  # 2 to 5 statements
            claims = [
                f"Near the lighthouse in sector {p * 10 + r + s} the station {p} recorded a tide of {100 + s} "
                "centimetres."
                for s in range(n)
            ]
            responses.append((" ".join(claims), n))
        cases.append(Case(" ".join(sentences), question, tuple(responses)))
    return cases


def reference_calls(cases: list[Case], chunk_tokens: int = 4096) -> dict[str, float]:
    """The reference pipeline's judge calls (docs/method.md section 2.1-2.4): 4 + n per response, ceil(T / 4096) per prompt."""
    from trl_longreward.reward.retrieval import TokenChunker

    tokenizer = TokenChunker(None)  # the tokens `chunk_tokenizer="regex"` counts, as the run below uses
    per_prompt_notes = [math.ceil(tokenizer.count_tokens(case.context) / chunk_tokens) for case in cases]
    per_response = [4 + n for case in cases for _, n in case.responses]
    total = sum(per_prompt_notes) + sum(per_response)
    return {
        "total": total,
        "per_response": sum(per_response) / len(per_response),
        "per_prompt": total / len(cases),
        "notes_per_prompt": sum(per_prompt_notes) / len(cases),
    }


# ----- servers (one process each) -----


def serve(latency: float, cap: int) -> None:
    """Child process: serve the scripted judge; on each stdin line print and reset its counters; stop at EOF."""
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer
    from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(), latency_s=latency, max_concurrency=cap) as server:
        print(server.base_url, flush=True)
        for _ in sys.stdin:
            counters = {"requests": server.num_chat_requests, "max_in_flight": server.max_in_flight}
            counters["rejected_429"] = server.num_rejected
            server.reset_counters()
            print(json.dumps(counters), flush=True)


class ServerProcess:
    """A scripted judge server in its own process."""

    def __init__(self, latency: float, cap: int) -> None:
        command = [sys.executable, __file__, "--serve", "--latency", str(latency), "--cap", str(cap)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            self.close()
            raise RuntimeError(f"judge server did not start (exit code {self.process.returncode})")

    def counters(self) -> dict[str, int]:
        """Chat requests received, most in flight and 429s since the last call; resets them."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ----- runs -----


def _recording_judge(urls: list[str], cap: int, sent: list) -> Any:
    """An `OpenAIJudge` that also keeps every request it is asked, for the replay baseline."""
    from trl_longreward import OpenAIJudge

    class RecordingJudge(OpenAIJudge):
        async def _one(self, request):
            sent.append(request)
            return await super()._one(request)

    return RecordingJudge("scripted-judge", urls, max_concurrency=cap, max_retries=2)


def score_once(cases: list[Case], urls: list[str], cap: int) -> dict[str, Any]:
    """Score every response against `urls` with a fresh reward function (fresh in-memory cache); time it."""
    from trl_longreward import LongRewardFunction

    sent: list = []
    reward = LongRewardFunction(judge=_recording_judge(urls, cap, sent), retriever="bm25", chunk_tokenizer="regex")
    rows = [(case, response) for case in cases for response, _ in case.responses]
    try:
        start = time.perf_counter()
        judgements = reward.score(
            completions=[response for _, response in rows],
            context=[case.context for case, _ in rows],
            question=[case.question for case, _ in rows],
        )
        wall = time.perf_counter() - start
        stats = reward.stats()
    finally:
        reward.close()
    unscored = sum(j.reward is None for j in judgements)
    if unscored:  # a benchmark of failed calls would measure nothing
        raise RuntimeError(f"{unscored} of {len(rows)} responses were not scored: {stats}")
    return {
        "wall_s": wall,
        "requests": sent,
        "scored": len(judgements),
        "judge_calls": stats["judge_calls"],
        "cache_hits": stats["cache_hits"],
        "sent_by_template": stats["by_template"]["sent"],
    }


def replay_once(requests: list, urls: list[str], cap: int) -> float:
    """The baseline: the same judge calls sent all at once, with no dependencies and no pipeline work around them,
    through the same judge client. Its wall time is what the client and servers can do at best."""
    from trl_longreward import OpenAIJudge

    async def replay() -> float:
        judge = OpenAIJudge("scripted-judge", urls, max_concurrency=cap, max_retries=2)
        try:
            start = time.perf_counter()
            results = await judge.agenerate(requests)
            wall = time.perf_counter() - start
        finally:
            await judge.aclose()
        if any(not isinstance(result, str) for result in results):
            raise RuntimeError("the replay baseline had failed judge calls")
        return wall

    return asyncio.run(replay())


def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = make_cases(args.prompts, args.responses, args.context_sentences)
    reference = reference_calls(cases)
    counts = sorted(set(args.servers))
    servers: list[ServerProcess] = []
    try:
        for _ in range(max(counts)):
            servers.append(ServerProcess(args.latency, args.cap))
        warm = score_once(cases[:1], [servers[0].base_url], args.cap)  # imports, connections; not measured
        replay_once(warm["requests"], [servers[0].base_url], args.cap)
        for server in servers:
            server.counters()
        walls: dict[int, list[float]] = {n: [] for n in counts}
        replays: dict[int, list[float]] = {n: [] for n in counts}
        last: dict[int, dict[str, Any]] = {}
        for _ in range(args.repeats):  # interleaved, so load from elsewhere on the machine hits every setting alike
            for n in counts:
                urls = [s.base_url for s in servers[:n]]
                result = score_once(cases, urls, args.cap)
                result["servers"] = [s.counters() for s in servers[:n]]
                replays[n].append(replay_once(result.pop("requests"), urls, args.cap))
                for server in servers[:n]:
                    server.counters()
                walls[n].append(result["wall_s"])
                last[n] = result
                print(f"  {n} server(s): {result['wall_s']:.3f} s, replay {replays[n][-1]:.3f} s", file=sys.stderr)
    finally:
        for server in servers:
            server.close()
    return summarize(args, cases, reference, walls, replays, last)


def summarize(args, cases, reference, walls, replays, last) -> dict[str, Any]:
    num_responses = sum(len(case.responses) for case in cases)
    runs = []
    base_throughput = None
    for n, samples in walls.items():
        result = last[n]
        calls = sum(server["requests"] for server in result["servers"])
        wall, replay = statistics.median(samples), statistics.median(replays[n])
        ideal = calls * args.latency / (n * args.cap)
        throughput = calls / wall
        base_throughput = base_throughput or (throughput if n == 1 else None)
        notes = result["sent_by_template"].get("completeness_extract", 0)
        runs.append(
            {
                "servers": n,
                "wall_s": round(wall, 4),
                "wall_s_runs": [round(w, 4) for w in samples],
                "ideal_s": round(ideal, 4),
                "wall_over_ideal": round(wall / ideal, 4),
                "replay_wall_s": round(replay, 4),
                "replay_over_ideal": round(replay / ideal, 4),
                "wall_over_replay": round(wall / replay, 4),
                "throughput_calls_per_s": round(throughput, 2),
                "scaling_efficiency": round(throughput / (n * base_throughput), 4) if base_throughput else None,
                "calls_received": calls,
                "calls_per_server": [server["requests"] for server in result["servers"]],
                "max_in_flight_per_server": [server["max_in_flight"] for server in result["servers"]],
                "rejected_429": sum(server["rejected_429"] for server in result["servers"]),
                "calls_per_response": round((result["judge_calls"] - notes) / num_responses, 4),
                "calls_per_prompt": round(result["judge_calls"] / len(cases), 4),
                "cache_hits": result["cache_hits"],
                "scored_responses": result["scored"],
            }
        )
    largest = runs[-1]
    return {
        "benchmark": "judge_throughput",
        "date": date.today().isoformat(),
        "setup": {
            "prompts": len(cases),
            "responses_per_prompt": args.responses,
            "latency_s": args.latency,
            "cap_per_server": args.cap,
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
        },
        "reference_calls": reference,
        "runs": runs,
        "goals": {"wall_over_ideal_max": GOAL_RATIO, "scaling_efficiency_min": GOAL_EFFICIENCY},
        "met": {
            "wall_over_ideal": all(run["wall_over_ideal"] <= GOAL_RATIO for run in runs),
            "scaling_efficiency": (largest["scaling_efficiency"] or 0) >= GOAL_EFFICIENCY,
            "calls_match_reference": all(run["calls_received"] == reference["total"] for run in runs),
        },
    }


def report(result: dict[str, Any]) -> str:
    ref, setup = result["reference_calls"], result["setup"]
    first = result["runs"][0]
    lines = [
        f"judge throughput: {setup['prompts']} prompts x {setup['responses_per_prompt']} responses, "
        f"latency {setup['latency_s'] * 1000:.0f} ms, cap {setup['cap_per_server']} per server, "
        f"median of {setup['repeats']}",
        f"judge calls      measured {first['calls_received']:>6}   reference {ref['total']:>6}",
        f"  per response   measured {first['calls_per_response']:>6.2f}   reference {ref['per_response']:>6.2f}",
        f"  per prompt     measured {first['calls_per_prompt']:>6.2f}   reference {ref['per_prompt']:>6.2f}",
        f"{'servers':>7} {'wall s':>8} {'ideal s':>8} {'wall/ideal':>10} {'replay/ideal':>12} {'wall/replay':>11} "
        f"{'calls/s':>9} {'efficiency':>10} {'429s':>5}",
    ]
    for run in result["runs"]:
        efficiency = "-" if run["scaling_efficiency"] is None else f"{run['scaling_efficiency']:.3f}"
        lines.append(
            f"{run['servers']:>7} {run['wall_s']:>8.3f} {run['ideal_s']:>8.3f} {run['wall_over_ideal']:>10.3f} "
            f"{run['replay_over_ideal']:>12.3f} {run['wall_over_replay']:>11.3f} "
            f"{run['throughput_calls_per_s']:>9.1f} {efficiency:>10} {run['rejected_429']:>5}"
        )
    met = result["met"]
    lines.append(
        f"goals: wall/ideal <= {GOAL_RATIO}: {'met' if met['wall_over_ideal'] else 'NOT met'}; "
        f"efficiency >= {GOAL_EFFICIENCY} at {result['runs'][-1]['servers']}: "
        f"{'met' if met['scaling_efficiency'] else 'NOT met'}; "
        f"calls = reference: {'yes' if met['calls_match_reference'] else 'NO'}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, one run per setting")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt")
    parser.add_argument("--context-sentences", type=int, default=350, help="document length (~17 tokens each)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per judge call")
    parser.add_argument("--cap", type=int, default=8, help="concurrent calls per server (and per-endpoint limit)")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4], help="replica counts to run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (the median is reported)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.repeats = min(args.prompts, 4), 1
    if 1 not in args.servers:
        parser.error("--servers must include 1: the one-server run is the baseline of the scaling efficiency")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args.latency, args.cap)
        return
    result = run(args)
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
