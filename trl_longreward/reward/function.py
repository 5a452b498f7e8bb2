"""`LongRewardFunction`: LongReward as a TRL reward function."""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from ..judges.base import Judge
from ..judges.cache import JudgeCallCache
from ..judges.loops import JudgeLoop
from .config import LongRewardConfig
from .dimensions import FAILED, NOT_APPLICABLE, OK, SCORERS, DimensionResult, PromptState, ScoringServices
from .inputs import Sample, resolve_samples
from .retrieval import Retriever, RetrieverUnavailableError, TokenChunker, check_retriever
from .runner import CallCounters, JudgeRunner, prompt_scope

_MAX_PROMPT_STATES = 256


@dataclass
class Judgement:
    """The reward of one response with everything behind it: per-dimension scores, statuses and judge traces."""

    reward: float | None
    scores: dict[str, float | None]
    status: dict[str, str]
    question: str
    response: str
    trace: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LoopThread(JudgeLoop):
    """A private event loop in a daemon thread: the sync `__call__` works inside notebooks and inside a trainer's
    own event loop, and the reward's shared per-prompt work stays on one loop for its lifetime. Stopping it cancels
    what still runs there, so a caller waiting on it gets an error instead of waiting forever."""

    # Held while a reward creates its loop: a trainer may make its first calls from several threads at once.
    creating = threading.Lock()

    def __init__(self) -> None:
        super().__init__(name="long-reward-loop")

    def run(self, coroutine) -> Any:
        return self.run_sync(coroutine)

    async def arun(self, coroutine) -> Any:
        return await self.call(coroutine, stall_timeout=None, what="LongReward scoring")


# Keyword arguments a trainer may pass besides dataset columns; each one is optional.
_TRAINER_KWARGS = ("trainer_state", "log_metric", "log_extra")


def _dataset_columns(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key not in _TRAINER_KWARGS}


def _log_metrics(kwargs: dict[str, Any], metrics: dict[str, float]) -> None:
    """Report the batch's metrics through the trainer's `log_metric`, when it passes one (GRPO, RLOO); trainers
    that pass none (OnlineDPO, async GRPO) leave them to `score_batch` and `stats()`."""
    log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
    if callable(log_metric):
        for name, value in metrics.items():
            log_metric(name, value)


class AsyncLongReward:
    """The async face of a `LongRewardFunction` (see `as_async`); picklable when the reward is."""

    __name__ = "long_reward"

    def __init__(self, reward: LongRewardFunction) -> None:
        self.reward = reward

    async def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **kwargs: Any,
    ) -> list[float | None]:
        judgements, metrics = await self.reward.ascore_batch(
            prompts=prompts, completions=completions, **_dataset_columns(kwargs)
        )
        _log_metrics(kwargs, metrics)
        return [j.reward for j in judgements]


def aggregate(results: dict[str, DimensionResult], config: LongRewardConfig) -> float | None:
    """Weighted mean of the scored dimensions; None when more than `max_missing_dimensions` failed."""
    failed = sum(1 for r in results.values() if r.status == FAILED)
    scored = {d: r.score for d, r in results.items() if r.status == OK and r.score is not None}
    total_weight = sum(config.weight(d) for d in scored)
    if failed > config.max_missing_dimensions or not scored or total_weight == 0:
        return None
    return sum(config.weight(d) * s for d, s in scored.items()) / total_weight


class LongRewardFunction:
    """LongReward (arXiv 2410.21252) as a TRL reward function.

    Scores each completion 0-10 on helpfulness, logicality, faithfulness and completeness with an LLM judge and
    returns their (weighted) mean, or None for a completion whose scoring failed (TRL then skips it). Works as
    `reward_funcs=[LongRewardFunction(...)]` in TRL's GRPO/RLOO and in `LongContextDPOTrainer`.

    ```python
    reward = LongRewardFunction(judge_base_url="http://127.0.0.1:8000/v1", judge_model="Qwen/Qwen2.5-72B-Instruct")
    rewards = reward(prompts=[...], completions=[...], context=[...], question=[...])
    judgements = reward.score(prompts=[...], completions=[...])  # with per-dimension scores and judge traces
    ```

    Args:
        config: a `LongRewardConfig`; keyword arguments override its fields.
        judge: a `Judge` backend; default built from the config (`judge_backend`, `judge_model`, ...).
        retriever: a `Retriever` for faithfulness; default from `config.retriever`, checked here (its extra
            installed, its default model present: `check_retriever`) and loaded on first use.
        chunker: a `TokenChunker`; default from `config.chunk_tokenizer`.
        cache: a `JudgeCallCache`; default: on disk at `config.cache_path`, else in memory.

    All judge calls of a batch are in flight together (up to the judge's concurrency limit): every response's
    dimensions run at once, statement checks start as soon as that response's breakdown is back, and the per-chunk
    notes extraction runs once per prompt and is awaited by all of its responses. Identical (context, question,
    response) rows are judged once. Judge failures never raise: they make dimensions missing. A setup that cannot
    work raises instead of making a dimension missing on every sample: construction fails when faithfulness's
    retriever needs an extra that is not installed (the message names it), and scoring raises when a module cannot
    be imported or the retriever cannot be built.
    """

    __name__ = "long_reward"

    def __init__(
        self,
        config: LongRewardConfig | None = None,
        *,
        judge: Judge | None = None,
        retriever: Retriever | str | None = None,
        chunker: TokenChunker | None = None,
        cache: JudgeCallCache | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(retriever, str):  # the config field's name: "embedding", "openai" or "bm25"
            overrides["retriever"], retriever = retriever, None
        if config is None:
            config = LongRewardConfig(**overrides)
        elif overrides:
            config = LongRewardConfig(**{**asdict(config), **overrides})
        self.config = config
        if retriever is None and "faithfulness" in config.dimensions:
            # before the judge is built: a missing extra fails here, not as a missing dimension on every sample
            check_retriever(config.retriever, config.embedding_model)
        if judge is None:
            from .judge_factory import build_judge

            judge = build_judge(config)
        self.judge = judge
        self.cache = cache if cache is not None else JudgeCallCache(config.cache_path)
        self.runner = JudgeRunner(
            judge,
            self.cache,
            max_attempts=config.max_attempts,
            first_temperature=config.first_temperature,
            retry_temperature=config.retry_temperature,
            verdict_followup=config.verdict_followup,
            verdict_decoding=config.verdict_decoding,
            prompt_dir=config.prompt_dir,
        )
        self._retriever = retriever
        self.services = ScoringServices(
            config=config,
            runner=self.runner,
            chunker=chunker if chunker is not None else _default_chunker(config, judge),
            retriever_factory=self._make_retriever,
        )
        self.scorers = {name: SCORERS[name](self.services) for name in config.dimensions}
        self._states: OrderedDict[str, PromptState] = OrderedDict()
        self._loop: _LoopThread | None = None

    # ----- TRL reward-function protocol -----

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """The reward of each completion (None where scoring failed). Besides dataset columns, a trainer may pass
        `log_metric` (then the batch's metrics are logged through it), `log_extra` and `trainer_state`; none is
        required, and `completion_ids` is ignored. Safe to call from several threads at once."""
        with _LoopThread.creating:
            self._loop_thread()
        judgements, metrics = self.score_batch(prompts=prompts, completions=completions, **_dataset_columns(kwargs))
        _log_metrics(kwargs, metrics)
        return [j.reward for j in judgements]

    def score(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **kwargs: Any):
        """Like `__call__`, but returns a `Judgement` (scores, statuses, traces) per completion."""
        return self.score_batch(prompts=prompts, completions=completions, **kwargs)[0]

    def score_batch(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **kwargs: Any
    ) -> tuple[list[Judgement], dict[str, float]]:
        """The `Judgement`s of a batch and its metrics (per-dimension means, standard deviations and missing rates,
        and the batch's judge calls, HTTP requests, cache hits, parse failures and errors, as `__call__` logs them).
        The counts are the batch's own calls, counted as they are made (`counting()`): exact while other threads
        judge with this reward at the same time."""
        samples = self._samples(prompts, completions, kwargs)
        return self.run(self._score_samples(samples))

    async def ascore(self, prompts=None, completions=None, **kwargs: Any) -> list[Judgement]:
        """Async face of `score`, awaitable from any event loop."""
        return (await self.ascore_batch(prompts=prompts, completions=completions, **kwargs))[0]

    async def ascore_batch(self, prompts=None, completions=None, **kwargs: Any):
        """Async face of `score_batch`, awaitable from any event loop."""
        samples = self._samples(prompts, completions, kwargs)
        return await self._loop_thread().arun(self._score_samples(samples))

    def run(self, coroutine: Any) -> Any:
        """Run a coroutine on the reward's own event loop (where its judge's connections live) and return its
        result; for code that issues its own judge calls through this reward's runner (e.g. `ReferenceRater`)."""
        return self._loop_thread().run(coroutine)

    def call_counts(self) -> dict[str, int]:
        """Cumulative counts of this reward function's judge calls (logged per batch as `long_reward/<name>`):
        `judge_calls` (logical calls sent), `judge_requests` (HTTP requests sent for them, retries included),
        `cache_hits`, `shared_calls` (identical calls in flight that awaited one call), `parse_failures`,
        `judge_errors` (calls that failed, each once), `permanent_judge_errors` (of those, refused for good) and
        `verdict_followups`; see `runner.CallCounters`. For the cost of some calls of your own, use `counting()`,
        not the difference of two readings: calls made meanwhile by other threads would be in it."""
        return self.runner.counters.totals()

    @contextmanager
    def counting(self) -> Iterator[CallCounters]:
        """The judge calls of this reward made by the code in this block, in fresh `CallCounters` (read them with
        `.totals()`, named as `call_counts()`), exact while other threads judge with this reward at the same time:

        ```python
        with reward.counting() as cost:
            judgements = reward.score(prompts=prompts, completions=completions)
        cost.totals()["judge_calls"]  # the calls of this `score` only
        ```

        The calls follow the block into the reward's event loop (`score`, `score_batch`, `run`, `ascore` awaited in
        it); see `JudgeRunner.counting`. `score_batch` reports the same counts of its own batch in its metrics."""
        with self.runner.counting() as counts:
            yield counts

    def as_async(self) -> AsyncLongReward:
        """An async reward function with the same name and keyword handling, for trainers that await async rewards
        (GRPO gathers them; async GRPO awaits them in its rollout process, so this one is picklable)."""
        return AsyncLongReward(self)

    def score_samples(self, samples: Sequence[Sample]) -> list[Judgement]:
        return self.run(self._score_samples(list(samples)))[0]

    # ----- internals -----

    def _samples(self, prompts, completions, kwargs) -> list[Sample]:
        if completions is None:
            raise ValueError("LongRewardFunction needs `completions` (one response per row).")
        return resolve_samples(
            prompts,
            completions,
            kwargs,
            context_column=self.config.context_column,
            question_column=self.config.question_column,
            separator=self.config.prompt_separator,
        )

    def _loop_thread(self) -> _LoopThread:
        if self._loop is None:
            self._loop = _LoopThread()
        return self._loop

    def _make_retriever(self) -> Retriever:
        if self._retriever is None:
            try:
                self._retriever = build_retriever(self.config)
            except ImportError:
                raise
            except Exception as err:  # e.g. embedding_model names no model: no sample's faithfulness could be scored
                raise RetrieverUnavailableError(
                    f"The faithfulness retriever (retriever={self.config.retriever!r}, embedding_model="
                    f"{self.config.embedding_model!r}) could not be built: {err!r}. Fix embedding_model (a local "
                    "path, or a Hub id that can be downloaded or is cached), set retriever='bm25' (lexical, no "
                    "model), or leave faithfulness out of dimensions."
                ) from err
        return self._retriever

    def _state(self, sample: Sample) -> PromptState:
        key = hashlib.sha256(f"{sample.context}\x00{sample.question}".encode()).hexdigest()
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = PromptState(sample.context, sample.question)
            while len(self._states) > _MAX_PROMPT_STATES:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return state

    async def _score_dimension(self, name: str, sample: Sample, state: PromptState) -> DimensionResult:
        try:
            return await self.scorers[name].score(sample, state)
        except (ImportError, RetrieverUnavailableError):
            raise  # never transient: the dimension would be missing on every sample, so scoring stops instead
        except Exception as err:  # e.g. the embedding endpoint is down: the dimension is missing, the run goes on
            return DimensionResult(score=None, status=FAILED, trace={"error": repr(err)})

    async def _judge_one(self, sample: Sample) -> Judgement:
        state = self._state(sample)
        names = list(self.scorers)
        with prompt_scope(sample.context, sample.question):  # one prompt's calls: one replica per template
            results = await asyncio.gather(*(self._score_dimension(n, sample, state) for n in names))
        by_name = dict(zip(names, results, strict=True))
        return Judgement(
            reward=aggregate(by_name, self.config),
            scores={n: r.score for n, r in by_name.items()},
            status={n: r.status for n, r in by_name.items()},
            question=sample.question,
            response=sample.response,
            trace={n: r.trace for n, r in by_name.items()},
        )

    async def _score_samples(self, samples: list[Sample]) -> tuple[list[Judgement], dict[str, float]]:
        # The batch's own judge calls: exact while other batches are judged by this reward at the same time.
        with self.runner.counting() as counts:
            unique: dict[Sample, asyncio.Task] = {}
            for sample in samples:
                if sample not in unique:  # identical (context, question, response) rows are judged once
                    unique[sample] = asyncio.ensure_future(self._judge_one(sample))
            # None: a bar only when stderr is a terminal (tqdm's disable=None), so logs and CI stay clean
            disable = None if self.config.show_progress is None else not self.config.show_progress
            from tqdm.auto import tqdm

            with tqdm(total=len(unique), desc="LongReward judging", unit="response", disable=disable) as bar:
                try:
                    for task in asyncio.as_completed(list(unique.values())):
                        await task
                        bar.update(1)
                        bar.set_postfix(calls=sum(counts.sent.values()), refresh=False)
                except BaseException:  # a setup error (`_score_dimension`): stop the batch's other responses too
                    for task in unique.values():
                        task.cancel()
                    await asyncio.gather(*unique.values(), return_exceptions=True)
                    raise
            done = {sample: await task for sample, task in unique.items()}
        judgements = [done[s] for s in samples]
        return judgements, batch_metrics(judgements, list(self.scorers), counts.totals())

    def stats(self) -> dict[str, Any]:
        """Cumulative cost of this reward function: `call_counts()` (judge calls, HTTP requests, cache hits, shared
        calls, parse failures, judge errors, permanent ones, follow-ups), the same per prompt template
        (`by_template`), and with a judge over HTTP endpoints each endpoint's calls, failures and time out of
        rotation."""
        stats: dict[str, Any] = {**self.runner.counters.totals(), "by_template": self.runner.counters.snapshot()}
        endpoint_stats = getattr(self.judge, "endpoint_stats", None)
        if callable(endpoint_stats):
            stats["judge_endpoints"] = endpoint_stats()
        return stats

    def __getstate__(self) -> dict:
        """A pickled reward keeps its config, judge, cache and counters; the per-prompt state (asyncio tasks of
        this process) and the event loop thread are rebuilt on first use."""
        state = dict(self.__dict__)
        state.update(_states=OrderedDict(), _loop=None)
        return state

    @property
    def closed(self) -> bool:
        """Whether `close()` was called: the judge's connections and the cache file are released."""
        return getattr(self, "_closed", False)

    def close(self) -> None:
        """Release the judge's connections, its event loop and the cache file (safe to call twice)."""
        self._closed = True
        if self._loop is not None:
            try:
                self._loop.run(self.judge.aclose())
            finally:
                self._loop.stop()
                self._loop = None
        self.cache.close()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()


def batch_metrics(
    judgements: Sequence[Judgement], dimensions: Sequence[str], counts: dict[str, int]
) -> dict[str, float]:
    """Per-dimension mean/std and missing rate, reward mean, and the judge cost of this batch: `counts` are the
    batch's own call counts (`CallCounters.totals()` of its `JudgeRunner.counting()` block), logged as
    `long_reward/<name>`."""
    metrics: dict[str, float] = {}
    for name in [*dimensions, "reward"]:
        values = [j.reward if name == "reward" else j.scores[name] for j in judgements]
        present = [v for v in values if v is not None]
        if present:
            mean = sum(present) / len(present)
            metrics[f"long_reward/{name}/mean"] = mean
            metrics[f"long_reward/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
        # missing = the judge failed; a dimension that does not apply (no factual statement) is not missing
        applicable = [j for j in judgements if name == "reward" or j.status.get(name) != NOT_APPLICABLE]
        missing = sum(1 for j in applicable if (j.reward if name == "reward" else j.scores[name]) is None)
        metrics[f"long_reward/{name}/missing_rate"] = missing / len(values) if values else 0.0
        if name != "reward" and values:
            metrics[f"long_reward/{name}/not_applicable_rate"] = 1 - len(applicable) / len(values)
    for key, value in counts.items():
        metrics[f"long_reward/{key}"] = float(value)
    return metrics


def build_retriever(config: LongRewardConfig) -> Retriever:
    from .retrieval import BM25Retriever, EmbeddingRetriever, OpenAIEmbedder, SentenceTransformerEmbedder

    if config.retriever == "bm25":
        return BM25Retriever()
    if config.retriever == "openai":
        embedder = OpenAIEmbedder(
            config.embedding_base_url or "", config.embedding_model or "", api_key_env=config.judge_api_key_env
        )
        return EmbeddingRetriever(embedder)
    return EmbeddingRetriever(SentenceTransformerEmbedder(config.embedding_model))


def _default_chunker(config: LongRewardConfig, judge: Judge) -> TokenChunker:
    """`auto`: the in-process judge's tokenizer, else the default embedding model's, else the regex tokenizer."""
    choice = config.chunk_tokenizer
    if choice == "regex":
        return TokenChunker(None)
    from transformers import AutoTokenizer

    if choice != "auto":
        return TokenChunker(AutoTokenizer.from_pretrained(choice))
    tokenizer = getattr(judge, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        return TokenChunker(tokenizer)
    try:
        from .retrieval import default_embedding_model_path

        own_model = config.retriever == "embedding" and config.embedding_model
        return TokenChunker(AutoTokenizer.from_pretrained(own_model or default_embedding_model_path()))
    except (ImportError, OSError, ValueError):
        return TokenChunker(None)
