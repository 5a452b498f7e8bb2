"""Limits that grow with the size of a training job: how long one HTTP judge call can keep a rank waiting (it must
fit in the job's collective timeout), and how one judge server's concurrency budget is shared by the job's ranks.

Worst-case wait of one judge call (`judge_call_worst_case_s`), for an `OpenAIJudge` with `n` endpoints
(`judge_base_url` replicas), `judge_timeout` T, `judge_max_retries` R and `B` = `retry_wait_cap_s()`:

    W = n x ((1 + R) x T + R x B)

Each endpoint is tried at most once per call (failover after a connection error, a timeout or a 5xx); on each one the
call sends at most 1 + R requests (the client's transport retries and the judge's retries of malformed bodies draw on
one budget), each given up after T seconds, and waits at most B seconds before each retry: the `openai` client honours
a server's `Retry-After` up to its cap (120 s in openai 3.x, 60 s before), and its own exponential backoff, like the
judge's after a malformed body, stays under 8 s. The bound is what a judge that stops answering mid-step (hung, or
behind a proxy that never replies) costs a call already in flight. With one process nothing else waits for it; in a
distributed job the other ranks wait at their next collective, which gives up after `ddp_timeout`
(`LongContextDPOConfig.check_judge_wait_fits`).

What it does not cover (each multiplies the wait, so keep a margin):
- queueing: a call waits for a free slot under `judge_max_concurrency`; a step with more calls than the slots (per
  endpoint and rank) waits for them in waves, each up to W when the judge hangs;
- sequential calls of one sample: faithfulness breaks the response into statements, then checks them (2 calls in a
  row); completeness extracts notes, may condense them (up to 3 rounds), then scores (2 to 5 calls in a row); each
  call is re-sampled up to `max_attempts` times when its answer does not parse. Only a call that is answered leads to
  the next one, so a judge outage costs one W per pipeline; a judge that answers just before every timeout costs up
  to the sum. The four dimensions and all samples of a batch run concurrently.
- `httpx` applies the timeout per phase (connect, write, read): a request that connects slowly and then reads slowly
  can exceed T. For a non-streamed completion the read (the judge generating) dominates.
"""

from __future__ import annotations

import math

from ..judges.openai_judge import BACKOFF_CAP_S, retry_wait_cap_s
from ..judges.openai_judge import worst_case_call_s as judge_call_worst_case_s

__all__ = [
    "BACKOFF_CAP_S",
    "judge_call_worst_case_s",
    "largest_timeout_that_fits",
    "per_rank_concurrency",
    "retry_wait_cap_s",
]


def largest_timeout_that_fits(budget_s: float, max_retries: int, endpoints: int = 1) -> float | None:
    """The largest `judge_timeout` whose `judge_call_worst_case_s` fits in `budget_s` with these retries and
    endpoints, rounded down to whole seconds; None when not even 1 s fits (fewer retries are needed)."""
    per_endpoint = budget_s / endpoints - max_retries * retry_wait_cap_s()
    timeout = math.floor(per_endpoint / (1 + max_retries))
    return float(timeout) if timeout >= 1 else None


def per_rank_concurrency(total: int, world_size: int, rank: int) -> int:
    """Rank `rank`'s share of a judge server's concurrency budget `total` (`judge_max_concurrency`) in a job of
    `world_size` ranks: `total // world_size`, plus one for the first `total % world_size` ranks, and never below 1
    (a rank with no slot could never judge). The shares add up to `max(total, world_size)`: exactly `total` whenever
    there are at least as many slots as ranks.

    The budget is per judge server: an `OpenAIJudge` applies its `max_concurrency` to each endpoint, so with several
    replicas in `judge_base_url` each replica sees at most this many calls of the job in flight, and n replicas up to
    n x `total` in all.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be an integer >= 1 (judge_max_concurrency), got {total!r}.")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size - 1}], got {rank!r}.")
    base, extra = divmod(total, world_size)
    return max(base + (1 if rank < extra else 0), 1)
