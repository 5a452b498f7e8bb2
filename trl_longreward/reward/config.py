"""`LongRewardConfig`: every knob of the LongReward pipelines, with the paper's values as defaults."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from ..judges.endpoints import parse_base_urls

DIMENSIONS = ("helpfulness", "logicality", "faithfulness", "completeness")


@dataclass
class LongRewardConfig:
    r"""
    Configuration class for [`LongRewardFunction`]. The defaults are the paper's (docs/method.md section 2); every
    field is also a command-line flag of `trl-longreward score | build-pairs | evaluate`.

    Parameters:
        > Parameters that control the judge (used when no judge object is passed to the reward function)

        judge_backend (`str`, *optional*, defaults to `"openai"`):
            `"openai"`: any OpenAI-compatible endpoint (`vllm serve`, `transformers serve`, a hosted API);
            `"transformers"`: an in-process transformers model; `"vllm"`: in-process `vllm.LLM`.
        judge_model (`str` or `None`, *optional*, defaults to `None`):
            Model name at the endpoint, or a local path / Hub id for in-process backends. `None` with an in-process
            backend means the embedded SmolLM2-135M-Instruct.
        judge_base_url (`str`, `list[str]` or `None`, *optional*, defaults to `None`):
            Base URL of the OpenAI-compatible endpoint, e.g. `http://127.0.0.1:8000/v1`. Several replicas of the same
            judge (one `vllm serve` per node) as a list or a comma-separated string: each call goes to the
            least-loaded replica in rotation, and a failing replica is taken out for `judge_endpoint_cooldown` seconds
            while its calls go to the others.
        judge_api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Name of the environment variable holding the API key (sent to every replica). The key itself is never a
            config value, so it can never be written to a saved config, checkpoint or model card.
        judge_max_concurrency (`int`, *optional*, defaults to `32`):
            HTTP judge: the budget of judge calls in flight at once per judge server (each `judge_base_url` replica),
            across all ranks of a training job: `LongContextDPOTrainer` gives each of its N ranks a share
            (`for_rank`, `scale_limits.per_rank_concurrency`: the budget split evenly, at least 1 per rank), so a
            server sees at most this many calls of the job (N when the budget is smaller than N), and n replicas up
            to n times this many in all. A single process (the `score`, `build-pairs` and `evaluate` commands, each
            shard of a sharded run) uses it whole. A `LongRewardFunction` you build on every rank for another
            trainer uses it whole per process: build it from `config.for_rank(world_size, rank)` to share it. For
            the in-process transformers judge: the most requests in one `generate` call, per process (each rank runs
            its own model).
        judge_endpoint_cooldown (`float`, *optional*, defaults to `30.0`):
            Seconds a failed judge replica stays out of rotation before one call probes it again.
        judge_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds before one HTTP judge call times out.
        judge_max_retries (`int`, *optional*, defaults to `5`):
            Transport retries (429, 5xx, timeouts, connection errors) with exponential backoff.
        judge_context_window (`int` or `None`, *optional*, defaults to `None`):
            The HTTP judge's context window in tokens, if known (e.g. vLLM's `--max-model-len`); completeness notes
            are then kept to half of it. In-process judges read it from the model.
        judge_extra_body (`dict` or `str` or `None`, *optional*, defaults to `None`):
            Extra JSON fields of every HTTP judge request, e.g. `'{"seed": 0, "top_k": 20, "chat_template_kwargs":
            {"enable_thinking": false}}'` on the command line. They are part of the judge-call cache key.
        judge_chat_template_kwargs (`dict` or `str` or `None`, *optional*, defaults to `None`):
            Keyword arguments of the judge's chat template, on every backend, e.g. `'{"enable_thinking": false}'` for
            Qwen3: sent as `chat_template_kwargs` in the HTTP request body (vLLM, `transformers serve`), passed to
            `apply_chat_template` in process. Part of the judge-call cache key.
        judge_engine_kwargs (`dict` or `str` or `None`, *optional*, defaults to `None`):
            Keyword arguments of the in-process judge's engine: `vllm.LLM(...)` for `judge_backend="vllm"` (e.g.
            `'{"gpu_memory_utilization": 0.3, "max_model_len": 32768, "enforce_eager": true}'` on the command
            line). Memory, parallelism and context-length settings are not part of the cache key; settings that can
            change an answer (`dtype`, `seed`, `quantization`, ...) are, as the engine reports them.
        judge_fingerprint (`str` or `None`, *optional*, defaults to `None`):
            A name for the judge's model state, part of every judge-call cache key. For an HTTP judge it replaces the
            server's own report of what it serves (`/v1/models`: `root`, `owned_by`), e.g. for a hosted API that
            reports nothing, or replicas that load one checkpoint from different paths; change it to start afresh.
            For an in-process judge it is added to the model's own identity.

        > Parameters that control the pipelines

        dimensions (`list[str]`, *optional*, defaults to all four):
            Which of helpfulness, logicality, faithfulness, completeness to score.
        dimension_weights (`dict[str, float]`, `str` or `None`, *optional*, defaults to `None`):
            Weights of the mean over the scored dimensions; `None` means equal (the paper: the plain mean). A
            dimension the dict does not name weighs 1.0, so `{"faithfulness": 2}` counts faithfulness twice and the
            other three once each. Every weight must be a positive number naming one of `dimensions`: a weight of 0
            is refused (the dimension's judge calls would still be paid for and then ignored; remove it from
            `dimensions` instead), and so are negative weights. A JSON object string (the command line) is parsed,
            as TRL parses its dict-valued fields.
        max_missing_dimensions (`int`, *optional*, defaults to `0`):
            The reward is `None` when more dimensions than this failed. The reference code only kept responses with
            all four scores, hence 0.
        max_attempts (`int`, *optional*, defaults to `5`):
            Tries per judge call whose answer cannot be parsed (the reference's 5).
        first_temperature (`float`, *optional*, defaults to `0.0`) and retry_temperature (`float`, *optional*,
            defaults to `0.95`):
            Sampling temperature of the first try and of the re-samples.
        verdict_parsing (`str`, *optional*, defaults to `"strict"`):
            `"strict"` (the paper): only `[[N]]`, `[[label]]` and `<statement>` tags count. `"lenient"` (a deviation,
            for weak judges such as the demo's SmolLM2-135M, which rarely copies that format) also reads `Score: 7`,
            `Rating: 7/10`, `7 out of 10`, `[7]` or `**7**` ending a line, unbracketed or differently cased support
            labels, and numbered lists of statements; a verdict in the paper's format always wins, numbers outside
            0-10 are rejected, quoted text is ignored, and cache keys are the same in both modes
            (`trl_longreward/reward/lenient_parsing.py`).
        verdict_followup (`bool`, *optional*, defaults to `False`):
            `False`: the paper (re-sample the whole answer). `True` (a deviation, for weak judges): when an answer does
            not parse, the judge's own answer is continued greedily after the verdict line of the prompt's worked
            examples ("Score: [[", "Verdict: [[", "Output:") with a few tokens, and the continued answer is parsed
            before any re-sample: a short prefill-mostly call instead of a whole new answer. Needs a backend that
            continues a final assistant message: the in-process transformers and vLLM judges, or `vllm serve` (the
            request carries `continue_final_message`). Other servers answer in a new turn (`transformers serve`
            does), which rarely parses; the call then goes on to its re-samples as without the follow-up.
        verdict_decoding (`str`, *optional*, defaults to `"free"`):
            `"free"` (the paper): the judge writes what it likes and the parser looks for the verdict. `"structured"`
            (a deviation): the judge still reasons freely, but its answer must end in the protocol's verdict
            (`[[0]]`-`[[10]]`, a support label): the in-process transformers judge forces it when the model starts
            the verdict (`[[`) or its budget is nearly spent (`judges/verdict_constraint.py`); vLLM (`vllm serve`
            and the in-process engine) gets the regular expression as `structured_outputs`. Statement lists and
            chunk notes stay free. Other OpenAI-compatible servers ignore or refuse the field.
        score_max_tokens (`int`, *optional*, defaults to `512`), break_max_tokens (`int`, *optional*, defaults to
            `2048`), check_max_tokens (`int`, *optional*, defaults to `512`), extract_max_tokens (`int`, *optional*,
            defaults to `1024`):
            Judge output budgets of the 0-10 scoring calls, the statement breakdown, one statement check and one
            chunk's notes.
        zero_statement_policy (`str`, *optional*, defaults to `"exclude"`):
            Faithfulness of a response with no factual statement. `"exclude"`: faithfulness is not applicable, the
            reward is the mean of the other dimensions (as FactScore leaves abstaining answers out of precision);
            `"full"`: 10 (nothing unsupported was claimed); `"zero"`: 0.
        faithfulness_chunk_tokens (`int`, *optional*, defaults to `128`) and faithfulness_top_k (`int`, *optional*,
            defaults to `5`):
            Retrieval chunk size and passages per statement (the paper's).
        faithfulness_min_checked_fraction (`float`, *optional*, defaults to `1.0`):
            Share of statements whose check must parse for faithfulness to be scored (all of them: a mean over a
            subset is never passed off as the score). Compared exactly, as the decimal written: 7 of 10 checks reach
            0.7, and 7 of 25 reach 0.28 (which floating-point arithmetic would miss: 0.28 x 25 = 7.000000000000001).
        max_statements (`int` or `None`, *optional*, defaults to `None`):
            Cap on statements checked per response (cost guard); `None` = no cap.
        completeness_chunk_tokens (`int`, *optional*, defaults to `4096`):
            Chunk size of the per-chunk relevant-information extraction (the paper's).
        completeness_max_notes_tokens (`int` or `None`, *optional*, defaults to `16384`):
            Largest notes the scoring call is given (and at most half the judge's context window when it is known).
            Longer notes (a document far longer than the paper's, relevant everywhere) are condensed by running the
            extraction prompt again over groups of notes, so the call fits the judge's window; 0 or `None` never
            condenses (the paper). A deviation that applies only past the cap.

        > Parameters that control retrieval and chunking

        retriever (`str`, *optional*, defaults to `"embedding"`):
            `"embedding"` (sentence-transformers, the paper's), `"openai"` (an OpenAI-compatible `/v1/embeddings`
            endpoint) or `"bm25"` (lexical, no model).
        embedding_model (`str` or `None`, *optional*, defaults to `None`):
            Embedding model (path or name); `None`: the offline all-MiniLM-L6-v2 package.
        embedding_base_url (`str` or `None`, *optional*, defaults to `None`):
            Base URL of the `/v1/embeddings` endpoint (`retriever="openai"`).
        chunk_tokenizer (`str`, *optional*, defaults to `"auto"`):
            Tokenizer that counts chunk tokens: `"auto"` (the in-process judge's, else the embedding model's, else
            the regex tokenizer), `"regex"`, or a tokenizer path/name.

        > Parameters that control the data and the outputs

        context_column (`str`, *optional*, defaults to `"context"`) and question_column (`str`, *optional*, defaults
            to `"question"`):
            Dataset columns holding the long document and the question.
        prompt_separator (`str`, *optional*, defaults to `"\n\n"`):
            Without those columns, the prompt is split as context + separator + question (the paper's format).
        prompt_dir (`str` or `None`, *optional*, defaults to `None`):
            Directory with your own versions of the judge prompt files (a changed prompt changes the cache key).
        cache_path (`str` or `None`, *optional*, defaults to `None`):
            SQLite file of the persistent judge-call cache; `None` keeps the cache in memory only.
        show_progress (`bool` or `None`, *optional*, defaults to `None`):
            A progress bar while judging (responses judged, judge calls, ETA); `None`: only when the output is a
            terminal.
    """

    judge_backend: Literal["openai", "transformers", "vllm"] = field(
        default="openai",
        metadata={"help": "Judge backend: openai (any OpenAI-compatible endpoint), transformers, vllm."},
    )
    judge_model: str | None = field(
        default=None,
        metadata={"help": "Judge model name at the endpoint, or a local path/Hub id for in-process backends."},
    )
    # `list[str]` first: HfArgumentParser then reads the flag as one string (comma-separated for several replicas).
    judge_base_url: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Base URL of the OpenAI-compatible judge, e.g. http://127.0.0.1:8000/v1; several replicas of the "
            "same judge comma-separated (or a list), each call going to the least-loaded one."
        },
    )
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the judge API key (the key is never stored)."},
    )
    judge_max_concurrency: int = field(
        default=32,
        metadata={
            "help": "Budget of judge calls in flight at once per judge server (each judge_base_url replica), shared by "
            "all ranks of a training job (each rank gets its share, at least 1); in-process transformers: batch size "
            "per process."
        },
    )
    judge_endpoint_cooldown: float = field(
        default=30.0,
        metadata={"help": "Seconds a failed judge replica stays out of rotation before it is probed again."},
    )
    judge_timeout: float = field(default=300.0, metadata={"help": "Seconds before an HTTP judge call times out."})
    judge_max_retries: int = field(
        default=5, metadata={"help": "Transport retries with backoff on 429/5xx/timeouts/connection errors."}
    )
    judge_context_window: int | None = field(
        default=None,
        metadata={"help": "HTTP judge's context window in tokens, if known; completeness notes stay within half."},
    )
    judge_extra_body: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Extra JSON fields of every HTTP judge request, e.g. \'{"seed": 0, "top_k": 20}\' (part of the '
            "judge-call cache key)."
        },
    )
    judge_chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the judge's chat template on every backend, e.g. '{\"enable_thinking\": "
            "false}' (HTTP: the request's chat_template_kwargs; in process: apply_chat_template's)."
        },
    )
    judge_engine_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the in-process vLLM judge's engine (vllm.LLM), e.g. '{\"gpu_memory_utilization\": "
            '0.3, "max_model_len": 32768}\'.'
        },
    )
    judge_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Name of the judge's model state in judge-call cache keys; for an HTTP judge it replaces what the "
            "server reports in /v1/models."
        },
    )
    dimensions: list[str] = field(
        default_factory=lambda: list(DIMENSIONS), metadata={"help": "Dimensions to score (subset of the four)."}
    )
    dimension_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Weights of the mean over dimensions, e.g. '{\"faithfulness\": 2}' on the command line "
            "(faithfulness counts twice, the others once: an unnamed dimension weighs 1). Weights must be > 0 (to "
            "drop a dimension, remove it from --dimensions); default equal (the paper)."
        },
    )
    max_missing_dimensions: int = field(
        default=0, metadata={"help": "The reward is None when more dimensions than this failed."}
    )
    max_attempts: int = field(default=5, metadata={"help": "Tries per judge call whose answer does not parse."})
    first_temperature: float = field(default=0.0, metadata={"help": "Temperature of the first try of a judge call."})
    retry_temperature: float = field(default=0.95, metadata={"help": "Temperature of re-sampled tries."})
    verdict_parsing: Literal["strict", "lenient"] = field(
        default="strict",
        metadata={
            "help": "strict: only the paper's [[N]] / [[label]] / <statement> verdicts. lenient (a deviation, for weak "
            "judges): also 'Score: 7', '7/10', '[7]' at a line end, bare labels, numbered statement lists."
        },
    )
    verdict_followup: bool = field(
        default=False,
        metadata={
            "help": "A deviation for weak judges: continue an unparseable answer with the verdict cue of the prompt's "
            "examples ('Score: [[') for a few greedy tokens before re-sampling. Needs an in-process or vLLM judge."
        },
    )
    verdict_decoding: Literal["free", "structured"] = field(
        default="free",
        metadata={
            "help": "free (the paper): the judge's answer is parsed as written. structured (a deviation): the judge "
            "reasons freely but its answer must end in the protocol's verdict ([[N]], a support label); in-process "
            "transformers or vLLM judges, or vllm serve (structured_outputs)."
        },
    )
    score_max_tokens: int = field(default=512, metadata={"help": "Judge output budget of 0-10 scoring calls."})
    break_max_tokens: int = field(default=2048, metadata={"help": "Judge output budget of the statement breakdown."})
    check_max_tokens: int = field(default=512, metadata={"help": "Judge output budget of one statement check."})
    extract_max_tokens: int = field(default=1024, metadata={"help": "Judge output budget of a chunk's notes."})
    zero_statement_policy: Literal["exclude", "full", "zero"] = field(
        default="exclude",
        metadata={
            "help": "Faithfulness of a response with no factual statement: exclude (not applicable), full, zero."
        },
    )
    faithfulness_chunk_tokens: int = field(default=128, metadata={"help": "Retrieval chunk size in tokens."})
    faithfulness_top_k: int = field(default=5, metadata={"help": "Passages shown per statement check."})
    faithfulness_min_checked_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of statement checks that must parse for faithfulness to be scored (compared exactly: 7 of "
            "25 checks reach 0.28)."
        },
    )
    max_statements: int | None = field(default=None, metadata={"help": "Cap on statements checked per response."})
    completeness_chunk_tokens: int = field(default=4096, metadata={"help": "Chunk size of the notes extraction."})
    completeness_max_notes_tokens: int | None = field(
        default=16384,
        metadata={"help": "Notes longer than this are condensed before scoring completeness (0: never)."},
    )
    retriever: Literal["embedding", "openai", "bm25"] = field(
        default="embedding",
        metadata={"help": "embedding (sentence-transformers), openai (/v1/embeddings endpoint) or bm25 (lexical)."},
    )
    embedding_model: str | None = field(
        default=None,
        metadata={"help": "Embedding model (path or name); default: the offline all-MiniLM-L6-v2 package."},
    )
    embedding_base_url: str | None = field(
        default=None, metadata={"help": "Base URL of the /v1/embeddings endpoint (retriever=openai)."}
    )
    chunk_tokenizer: str = field(
        default="auto",
        metadata={
            "help": "Tokenizer that counts chunk tokens: auto (the in-process judge's, else the embedding model's, "
            "else regex), regex, or a tokenizer path/name."
        },
    )
    context_column: str = field(default="context", metadata={"help": "Dataset column holding the long document."})
    question_column: str = field(default="question", metadata={"help": "Dataset column holding the question."})
    prompt_separator: str = field(
        default="\n\n",
        metadata={"help": "Without context/question columns, the prompt is split as context + separator + question."},
    )
    prompt_dir: str | None = field(
        default=None, metadata={"help": "Directory with your own versions of the six judge prompt files."}
    )
    cache_path: str | None = field(
        default=None,
        metadata={"help": "SQLite file of the persistent judge-call cache; None keeps the cache in memory only."},
    )
    show_progress: bool | None = field(
        default=None,
        metadata={
            "help": "Progress bar while judging (responses judged, judge calls, ETA); default: when the output is a "
            "terminal."
        },
    )

    def __post_init__(self) -> None:
        self.judge_chat_template_kwargs = _json_object(
            self.judge_chat_template_kwargs, "judge_chat_template_kwargs", "'{\"enable_thinking\": false}'"
        )
        self.judge_extra_body = _json_object(self.judge_extra_body, "judge_extra_body", "'{\"seed\": 0}'")
        self.judge_engine_kwargs = _json_object(
            self.judge_engine_kwargs, "judge_engine_kwargs", '\'{"max_model_len": 8192, "enforce_eager": true}\''
        )
        if self.judge_engine_kwargs is not None:
            if not isinstance(self.judge_engine_kwargs, dict):
                raise ValueError(f"judge_engine_kwargs must be a JSON object, got {self.judge_engine_kwargs!r}.")
            if self.judge_backend != "vllm":
                raise ValueError(
                    f"judge_engine_kwargs is for judge_backend='vllm' (vllm.LLM's arguments), but judge_backend="
                    f"{self.judge_backend!r}: drop it, or set judge_backend='vllm'."
                )
        if isinstance(self.dimension_weights, str):  # from the command line, as TRL parses its dict fields
            import json

            try:
                self.dimension_weights = json.loads(self.dimension_weights)
            except ValueError as err:
                raise ValueError(
                    f"dimension_weights={self.dimension_weights!r} is not a JSON object, e.g. "
                    '\'{"helpfulness": 1, "faithfulness": 2}\'.'
                ) from err
        if self.dimension_weights is not None and not isinstance(self.dimension_weights, dict):
            raise ValueError(f"dimension_weights must map dimensions to weights, got {self.dimension_weights!r}.")
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown or not self.dimensions:
            raise ValueError(f"dimensions={self.dimensions!r}: choose one or more of {list(DIMENSIONS)}.")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions={self.dimensions!r} lists a dimension twice.")
        if self.dimension_weights is not None:
            self._check_dimension_weights(self.dimension_weights)
        if not 0 <= self.max_missing_dimensions < len(self.dimensions):
            raise ValueError(
                f"max_missing_dimensions={self.max_missing_dimensions} must be in [0, {len(self.dimensions) - 1}] "
                "(at least one dimension has to be scored)."
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}.")
        if self.verdict_parsing not in ("strict", "lenient"):
            raise ValueError(f"verdict_parsing={self.verdict_parsing!r}: use strict (the paper) or lenient.")
        if self.verdict_decoding not in ("free", "structured"):
            raise ValueError(
                f"verdict_decoding={self.verdict_decoding!r}: use free (the paper: the answer is parsed as written) or "
                "structured (the answer must end in the protocol's verdict)."
            )
        if self.zero_statement_policy not in ("exclude", "full", "zero"):
            raise ValueError(f"zero_statement_policy={self.zero_statement_policy!r}: use exclude, full or zero.")
        if not 0.0 < self.faithfulness_min_checked_fraction <= 1.0:
            raise ValueError("faithfulness_min_checked_fraction must be in (0, 1].")
        for name in (
            "faithfulness_chunk_tokens",
            "faithfulness_top_k",
            "completeness_chunk_tokens",
            "judge_max_concurrency",
            "score_max_tokens",
            "break_max_tokens",
            "check_max_tokens",
            "extract_max_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.judge_endpoint_cooldown < 0:
            raise ValueError(f"judge_endpoint_cooldown must be >= 0 seconds, got {self.judge_endpoint_cooldown}.")
        if self.judge_max_retries < 0:
            raise ValueError(f"judge_max_retries must be >= 0 (0 = no retry), got {self.judge_max_retries}.")
        if not self.judge_timeout > 0:
            raise ValueError(f"judge_timeout must be > 0 seconds, got {self.judge_timeout}.")
        for name in ("first_temperature", "retry_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.judge_context_window is not None and self.judge_context_window < 1:
            raise ValueError(f"judge_context_window must be >= 1 tokens, or None; got {self.judge_context_window}.")
        if self.completeness_max_notes_tokens is not None and self.completeness_max_notes_tokens < 0:
            raise ValueError(
                "completeness_max_notes_tokens must be >= 1, or 0 (or None) to never condense the notes; got "
                f"{self.completeness_max_notes_tokens}."
            )
        if self.max_statements is not None and self.max_statements < 1:
            raise ValueError(f"max_statements must be >= 1, or None for no cap; got {self.max_statements}.")
        parse_base_urls(self.judge_base_url, name="judge_base_url")  # a malformed URL fails here, not mid-training
        if self.judge_backend not in ("openai", "transformers", "vllm"):
            raise ValueError(f"judge_backend={self.judge_backend!r}: use openai, transformers or vllm.")
        if self.retriever not in ("embedding", "openai", "bm25"):
            raise ValueError(f"retriever={self.retriever!r}: use embedding, openai or bm25.")
        if self.retriever == "openai" and not (self.embedding_base_url and self.embedding_model):
            raise ValueError("retriever='openai' needs embedding_base_url and embedding_model.")

    def for_rank(self, world_size: int, rank: int) -> LongRewardConfig:
        """This config as rank `rank` of a `world_size`-rank job uses it: with the HTTP judge, `judge_max_concurrency`
        becomes the rank's share of the per-server budget (`scale_limits.per_rank_concurrency`); an in-process judge
        (one model per rank) keeps it whole. Returns `self` when nothing changes, else a new config."""
        from .scale_limits import per_rank_concurrency

        if self.judge_backend != "openai":
            return self
        share = per_rank_concurrency(self.judge_max_concurrency, world_size, rank)
        if share == self.judge_max_concurrency:
            return self
        import dataclasses

        return dataclasses.replace(self, judge_max_concurrency=share)

    def judge_call_worst_case_s(self) -> float | None:
        """Seconds one HTTP judge call can take at most when the judge stops answering (`judge_timeout`,
        `judge_max_retries` and the `judge_base_url` replicas, see `scale_limits`); None for an in-process judge."""
        if self.judge_backend != "openai":
            return None
        from .scale_limits import judge_call_worst_case_s

        return judge_call_worst_case_s(self.judge_timeout, self.judge_max_retries, max(len(self.judge_base_urls), 1))

    @property
    def judge_base_urls(self) -> list[str]:
        """The judge endpoint URLs (`judge_base_url` split into its replicas; empty when unset)."""
        return parse_base_urls(self.judge_base_url, name="judge_base_url")

    def document_columns(self) -> dict[str, str]:
        """Where rows hold the document and the question (`trl_longreward.documents`' keyword arguments)."""
        return {
            "context_column": self.context_column,
            "question_column": self.question_column,
            "separator": self.prompt_separator,
        }

    def _check_dimension_weights(self, weights: dict) -> None:
        """Every weight names a scored dimension and is a finite number > 0 (an unnamed dimension weighs 1.0)."""
        for name, weight in weights.items():
            if name not in DIMENSIONS:
                raise ValueError(
                    f"dimension_weights names {name!r}, which is not a dimension: use one of {list(DIMENSIONS)}."
                )
            if name not in self.dimensions:
                raise ValueError(
                    f"dimension_weights names {name!r}, which is not in dimensions={self.dimensions!r}: add it to "
                    "dimensions, or drop its weight."
                )
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"dimension_weights[{name!r}]={weight!r} must be a finite number > 0.")
            if weight < 0:
                raise ValueError(
                    f"dimension_weights[{name!r}]={weight!r} is negative: weights must be > 0 (a weight of 1, the "
                    "default of an unnamed dimension, counts it as in the paper's mean)."
                )
            if weight == 0:
                rest = [d for d in self.dimensions if d != name]
                raise ValueError(
                    f"dimension_weights[{name!r}]=0 would still pay for every {name} judge call and then ignore "
                    f"its score: remove {name!r} from dimensions instead"
                    + (f" (dimensions={rest!r})." if rest else ".")
                )

    def weight(self, dimension: str) -> float:
        """The weight of `dimension` in the reward's weighted mean: its `dimension_weights` entry, else 1.0."""
        return 1.0 if self.dimension_weights is None else float(self.dimension_weights.get(dimension, 1.0))


def _json_object(value: Any, name: str, example: str) -> Any:
    """A dict-valued field: a JSON string from the command line parsed, anything but a mapping (or None) refused."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{name}={value!r} is not a JSON object, e.g. {example}.") from err
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}.")
    return value
