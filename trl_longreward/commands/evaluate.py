"""`trl-longreward evaluate`: answer a long-context QA set with one or more models and score the answers.

    trl-longreward evaluate --model SFT_MODEL DPO_MODEL --output_dir eval_out \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct

Every model writes one answer per prompt of `--input` (default: the bundled held-out split,
`trl_longreward.data.load_long_qa("eval")`), greedily unless `--do_sample true`; a document longer than
`--max_prompt_length` is cut in the middle for the model, while the judge always reads the FULL document. Every answer
is scored with LongReward (per-dimension scores and their mean). Printed: the mean of every dimension and of the reward
per model, and with two or more models each model's per-prompt win rate against the first (ties and unscored prompts
counted apart). With `--reference_column answer`, each answer is also rated 1-10 against that column's reference
answer by the same judge, LongBench-Chat style (`trl_longreward.reward.reference`); `--long_reward false` keeps only
that rating.

Written to `--output_dir`:
- `answers.jsonl`: one line per (model, prompt): the answer and the generation settings;
- `judged.jsonl`: one line per (model, prompt): reward, scores, statuses and the judge's traces (and the rating);
- `results.json`: the table, the win rates and the configuration;
- `judge_cache.sqlite`: every judge call.

Resumable: answers already in `answers.jsonl` are not generated again and answers already in `judged.jsonl` are not
judged again, so a finished evaluation reruns without loading a model or calling the judge; a judged line that is lost,
or one with a failed judge call (`judge_errors`), is judged again, its answered calls from the cache (a call the
judge refused for good, `permanent_judge_errors`, is not: the refusal is cached). A judge that
answers no call of a batch stops the run before anything is written for it. Resuming with other generation settings or
another input is refused.

`--use_vllm` answers with an in-process `vllm.LLM` per model (sampled answers seeded per prompt, `seed + index`).
On N machines, `--shard_index I --num_shards N` answers and judges the prompt groups g (of `batch_size` prompts) with
g % N == I into that shard's `--output_dir`; `trl-longreward merge-shards --shards DIR_0 ... --output_dir OUT` then
writes the answers, judgements and `results.json` one machine would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..documents import check_prompt_columns, prompt_groups, row_document
from ..generation import check_vllm_options, eos_token_ids, generate_answers, load_vllm_policy, sample_responses_vllm
from ..models import load_causal_lm
from ..pairs import check_length_options
from ..records import check_judge_answered, judge_error_dimensions, load_jsonl, load_rows, permanent_error_dimensions
from ..reward import LongRewardConfig, LongRewardFunction
from ..reward.reference import ReferenceRater
from ..shards import (
    MergeShardsArguments,
    check_shard_options,
    documents_digest,
    judge_settings,
    read_shards,
    shard_prompts,
    write_manifest,
)
from ..summaries import REFERENCE_SCORE, flat_scores, mean_scores, win_rate

ANSWERS_FILE = "answers.jsonl"
JUDGED_FILE = "judged.jsonl"
RESULTS_FILE = "results.json"
JUDGE_CACHE_FILE = "judge_cache.sqlite"

Key = tuple[str, int]


@dataclass
class EvaluateArguments:
    """Arguments of `trl-longreward evaluate` (the judge is configured by `LongRewardConfig`)."""

    model: list[str] = field(
        metadata={"help": "Models to evaluate (local directories or Hub ids); the first is the win-rate baseline."}
    )
    output_dir: str = field(metadata={"help": "Directory for answers.jsonl, judged.jsonl, results.json, the cache."})
    input: str | None = field(
        default=None,
        metadata={"help": "JSONL/JSON/Parquet/CSV file or datasets directory; default: the bundled eval split."},
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N prompts."})
    max_completion_length: int = field(default=512, metadata={"help": "Max tokens per answer."})
    max_prompt_length: int = field(
        default=8192, metadata={"help": "Prompt token budget; longer documents are cut in the middle."}
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample the answers instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top_p (with do_sample)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; each batch uses seed + its first prompt index."})
    batch_size: int = field(default=4, metadata={"help": "Prompts per generate call."})
    judge_batch_size: int = field(
        default=32, metadata={"help": "Answers judged together (all their calls in flight)."}
    )
    reference_column: str | None = field(
        default=None, metadata={"help": "Column with reference answers: also rate each answer 1-10 against it."}
    )
    long_reward: bool = field(
        default=True, metadata={"help": "Score with LongReward; false keeps only the reference rating."}
    )
    tie_margin: float = field(default=0.0, metadata={"help": "Reward differences up to this count as ties."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Model dtype: auto (the checkpoint's), float32, bfloat16 or float16."}
    )
    device: str | None = field(default=None, metadata={"help": "Model device; default cuda when available, else cpu."})
    shard_index: int = field(
        default=0, metadata={"help": "This machine's shard, 0 <= shard_index < num_shards (see merge-shards)."}
    )
    num_shards: int = field(
        default=1,
        metadata={"help": "Machines sharing the input: shard I answers the prompt groups g with g %% N == I."},
    )
    use_vllm: bool = field(
        default=False, metadata={"help": "Answer with an in-process vllm.LLM instead of transformers' generate."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Share of GPU memory the vLLM engine may take (use_vllm)."}
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={"help": "vLLM context length (use_vllm); default the model's. Needs >= prompt + completion."},
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs the vLLM engine shards the model over."})
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "Run vLLM without CUDA graphs or compilation (use_vllm; faster start)."}
    )
    vllm_enable_prefix_caching: bool = field(
        default=False,
        metadata={
            "help": "vLLM prefix caching (use_vllm): prefills shared prompt heads once, but answers then depend on "
            "what the cache holds, so reruns and shards may give other ones."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        if not self.model:
            raise ValueError("--model needs at least one model.")
        if len(set(self.model)) != len(self.model):
            raise ValueError(f"--model lists a model twice: {self.model}.")
        check_length_options(
            max_completion_length=self.max_completion_length, max_prompt_length=self.max_prompt_length
        )
        if self.batch_size < 1 or self.judge_batch_size < 1:
            raise ValueError("batch_size and judge_batch_size must be >= 1.")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 with do_sample (use do_sample false for greedy answers).")
        if not self.long_reward and not self.reference_column:
            raise ValueError("--long_reward false leaves nothing to score: add --reference_column COLUMN.")
        if self.tie_margin < 0:
            raise ValueError("tie_margin must be >= 0.")
        check_shard_options(self.shard_index, self.num_shards)
        if self.use_vllm:
            check_vllm_options(
                gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                tensor_parallel_size=self.vllm_tensor_parallel_size,
                max_model_length=self.vllm_max_model_length,
                max_prompt_length=self.max_prompt_length,
                max_completion_length=self.max_completion_length,
            )

    def generation_settings(self) -> dict[str, Any]:
        """What decides an answer: resuming with other settings would mix answers of two protocols."""
        settings: dict[str, Any] = {
            "max_completion_length": self.max_completion_length,
            "max_prompt_length": self.max_prompt_length,
            "do_sample": self.do_sample,
        }
        if self.do_sample:  # greedy answers do not depend on these
            settings.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed, batch_size=self.batch_size)
        if self.use_vllm:  # another engine: other numerics, and other random streams
            settings.update(
                use_vllm=True,
                vllm_enforce_eager=self.vllm_enforce_eager,
                vllm_enable_prefix_caching=self.vllm_enable_prefix_caching,
            )
        return settings


def format_results(results: dict[str, Any]) -> str:
    """The per-model table, with the win/tie/loss counts against the first model, as aligned plain text."""
    table: dict[str, dict[str, Any]] = results["table"]
    columns = list(results["columns"])
    baseline = results["config"]["models"][0]
    header = ["model", *columns, "scored", f"win/tie/loss vs {baseline}" if len(table) > 1 else ""]
    lines = [header]
    for model, row in table.items():
        cells = [
            model,
            *("-" if row[c] is None else f"{row[c]:.2f}" for c in columns),
            f"{row['scored']}/{row['prompts']}",
        ]
        wins = results["win_rates"].get(model)
        if wins is not None:
            rate = "-" if wins["win_rate"] is None else f"{wins['win_rate']:.0%}"
            cells.append(f"{wins['wins']}/{wins['ties']}/{wins['losses']} (win rate {rate})")
        else:
            cells.append("")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


# ----- the command -----


def evaluate_models(
    args: EvaluateArguments, config: LongRewardConfig, *, llms: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Generate the missing answers, judge the unjudged ones (of this shard: `shard_index`, `num_shards`), write
    `results.json`; return the results and what this run did (new answers, new judgements, judge calls and cache
    hits). `llms`: already built `vllm.LLM`s by model name to answer with (`use_vllm`), e.g. to reuse an engine."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _load_input(args, config)
    documents = [row_document(rows[i], **config.document_columns(), index=i) for i in range(len(rows))]
    references = [rows[i][args.reference_column] for i in range(len(rows))] if args.reference_column else None
    if config.cache_path is None:  # a copy: the caller's config is left as it was
        config = dataclasses.replace(config, cache_path=str(out / JUDGE_CACHE_FILE))
    owned = shard_prompts(len(rows), args.batch_size, args.shard_index, args.num_shards)
    spec = _results_spec(args, config)

    answers = _read_records(out / ANSWERS_FILE)
    _check_answers(answers, args, documents)
    if args.num_shards > 1:
        _check_shard_output(args, config, documents, owned, answers, out)
    new_answers = 0
    for name in args.model:
        todo = [i for i in owned if (name, i) not in answers]
        if todo:
            llm = (llms or {}).get(name)
            new_answers += _answer(name, args, config, rows, documents, todo, answers, out / ANSWERS_FILE, llm=llm)

    judged = _read_records(out / JUDGED_FILE)
    pending = [
        (name, i)
        for name in args.model
        for i in owned
        if _needs_judging(judged.get((name, i)), answers[(name, i)], spec)
    ]
    judge_stats = {"judge_calls": 0, "cache_hits": 0, "parse_failures": 0, "judge_errors": 0}
    if pending:
        judge_stats = _judge(pending, args, config, documents, references, answers, judged, out / JUDGED_FILE)

    results = _results(spec, judged, owned)
    if args.num_shards > 1:
        results["config"]["shard"] = {"shard_index": args.shard_index, "num_shards": args.num_shards}
    _write_results(out, results)
    return {**results, "run": {"new_answers": new_answers, "new_judgements": len(pending), **judge_stats}}


def _write_results(out: Path, results: dict[str, Any]) -> None:
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / RESULTS_FILE)


# ----- shards -----

# Arguments that say where a shard runs and writes, not what it evaluates: shards of one run may differ in them.
_PER_MACHINE = (
    "input",
    "output_dir",
    "shard_index",
    "num_shards",
    "device",
    "judge_batch_size",
    "vllm_gpu_memory_utilization",
    "vllm_max_model_length",
    "vllm_tensor_parallel_size",
)


def _check_shard_output(
    args: EvaluateArguments,
    config: LongRewardConfig,
    documents: list,
    owned: list[int],
    answers: dict[Key, dict[str, Any]],
    out: Path,
) -> None:
    """A shard's output holds only its own prompts, and `shard.json` says which run it belongs to."""
    foreign = sorted(i for name, i in answers if name in args.model and i not in set(owned))
    if foreign:
        raise ValueError(
            f"{out / ANSWERS_FILE} holds prompt {foreign[0]}, which shard {args.shard_index} of {args.num_shards} does "
            "not answer: it is the output of another shard or run. Use a new --output_dir for each shard."
        )
    manifest = {
        "command": "evaluate",
        "shard_index": args.shard_index,
        "num_shards": args.num_shards,
        "num_prompts": len(documents),
        "input": None if args.input is None else str(Path(args.input).resolve()),
        "input_sha256": documents_digest(documents),
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in _PER_MACHINE},
        "judge": judge_settings(config),
        "results": _results_spec(args, config),
    }
    write_manifest(out, manifest)


def merge_evaluation_shards(args: MergeShardsArguments) -> dict[str, Any]:
    """The evaluation of a run sharded over N machines, as one machine writes it: every shard checked (each of its
    prompts answered and judged by every model) and `answers.jsonl`, `judged.jsonl` (in one machine's order) and
    `results.json` written to `args.output_dir`."""
    shards = read_shards(args.shards)
    manifest = shards[0][1]
    spec, num_prompts = manifest["results"], manifest["num_prompts"]
    answers: dict[Key, dict[str, Any]] = {}
    judged: dict[Key, dict[str, Any]] = {}
    for directory, shard in shards:
        owned = shard_prompts(num_prompts, shard["settings"]["batch_size"], shard["shard_index"], shard["num_shards"])
        name = f"shard {shard['shard_index']} of {shard['num_shards']} ({str(directory)!r})"
        shard_answers = _read_records(directory / ANSWERS_FILE)
        shard_judged = _read_records(directory / JUDGED_FILE)
        for model in spec["models"]:
            for index in owned:
                answer, record = shard_answers.get((model, index)), shard_judged.get((model, index))
                if answer is None or _needs_judging(record, answer, spec):
                    raise ValueError(
                        f"{name} is not finished: {model} has no judged answer to prompt {index}. Rerun that shard "
                        "with the same command (it resumes), then merge."
                    )
                answers[(model, index)], judged[(model, index)] = answer, record
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [(model, index) for model in spec["models"] for index in range(num_prompts)]
    for filename, records in ((ANSWERS_FILE, answers), (JUDGED_FILE, judged)):
        tmp = out / (filename + ".tmp")
        with tmp.open("w", encoding="utf-8") as sink:
            sink.writelines(json.dumps(records[key], ensure_ascii=False) + "\n" for key in order)
        os.replace(tmp, out / filename)
    results = _results(spec, judged, list(range(num_prompts)))
    _write_results(out, results)
    return results


def _load_input(args: EvaluateArguments, config: LongRewardConfig) -> Any:
    if args.input is None:
        from ..data import load_long_qa

        rows = load_long_qa("eval")
    else:
        rows = load_rows(args.input)
    check_prompt_columns(rows.column_names, **config.document_columns())
    if args.reference_column and args.reference_column not in rows.column_names:
        raise ValueError(
            f"--reference_column {args.reference_column!r} is not a column of the input (columns: "
            f"{sorted(rows.column_names)})."
        )
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    if len(rows) == 0:
        raise ValueError("The input has no rows to evaluate.")
    return rows


def prompt_digest(context: str, question: str) -> str:
    """What identifies a prompt in `answers.jsonl`: a hash of its document and question."""
    return hashlib.sha256(f"{context}\x00{question}".encode()).hexdigest()


def _read_records(path: Path) -> dict[Key, dict[str, Any]]:
    """The records of a (model, index)-keyed JSONL file (`load_jsonl`), the last line of a key winning."""

    def keyed(record: dict[str, Any]) -> bool:
        return isinstance(record.get("model"), str) and isinstance(record.get("index"), int)

    return {(record["model"], record["index"]): record for record in load_jsonl(path, keep=keyed)}


def _check_answers(answers: dict[Key, dict[str, Any]], args: EvaluateArguments, documents: list) -> None:
    """Resuming onto answers of another input or of other generation settings would mix them silently: refuse."""
    settings = args.generation_settings()
    for (name, index), record in answers.items():
        if name not in args.model or index >= len(documents):
            continue
        if record.get("prompt_sha256") != prompt_digest(*documents[index]):
            raise ValueError(
                f"{ANSWERS_FILE} holds an answer of {name} to prompt {index}, which is not prompt {index} of the "
                "input: it was made from another input. Use a new --output_dir."
            )
        if record.get("generation") != settings:
            raise ValueError(
                f"{ANSWERS_FILE} holds answers of {name} generated with {record.get('generation')}, not with this "
                f"run's {settings}. Use a new --output_dir, or the same settings."
            )


def _answer(
    name: str,
    args: EvaluateArguments,
    config: LongRewardConfig,
    rows: Any,
    documents: list,
    todo: list[int],
    answers: dict[Key, dict[str, Any]],
    path: Path,
    *,
    llm: Any = None,
) -> int:
    """Generate `name`'s missing answers in fixed, seeded groups of `batch_size` prompts; append them to `path`."""
    from tqdm.auto import tqdm

    generate, tokenizer = _answerer(name, args, llm)
    wanted = set(todo)
    # Groups never depend on what is done already, so a resumed sampled run draws the same answers.
    groups, prepared, position = prompt_groups(
        rows, todo, args.batch_size, tokenizer, max_prompt_length=args.max_prompt_length, **config.document_columns()
    )
    settings = args.generation_settings()
    written = 0
    try:
        with (
            path.open("a", encoding="utf-8") as sink,
            tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"generate {name}", unit="prompt") as bar,
        ):
            for group in groups:
                # the whole group, done prompts too: its seed's stream (transformers) or its batch (vLLM) is kept
                outputs = generate([prepared[position[i]]["prompt_ids"] for i in group], group)
                for index, output in zip(group, outputs, strict=True):
                    if index not in wanted:  # generated only to keep the group's random stream
                        continue
                    record = {
                        "model": name,
                        "index": index,
                        "question": documents[index][1],
                        "prompt_sha256": prompt_digest(*documents[index]),
                        "answer": output["text"],
                        "completion_tokens": len(output["completion_ids"]),
                        "truncated": prepared[position[index]]["truncated"],
                        "generation": settings,
                    }
                    answers[(name, index)] = record
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
                sink.flush()
                bar.update(sum(1 for i in group if i in wanted))
    finally:
        del generate
    return written


def _answerer(name: str, args: EvaluateArguments, llm: Any) -> tuple[Any, Any]:
    """`generate(prompt_ids, indices) -> answers` for model `name`, and its tokenizer: transformers' generate seeded
    by the group's first index, or vLLM (`llm`, else a new engine) seeded by each prompt's index."""
    if args.use_vllm:
        if llm is None:
            llm, tokenizer = load_vllm_policy(
                name,
                dtype=args.dtype,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                max_model_length=args.vllm_max_model_length,
                tensor_parallel_size=args.vllm_tensor_parallel_size,
                enforce_eager=args.vllm_enforce_eager,
                enable_prefix_caching=args.vllm_enable_prefix_caching,
            )
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
        eos = eos_token_ids(name, tokenizer)

        def generate(prompt_ids: list[list[int]], indices: list[int]) -> list[dict[str, Any]]:
            samples = sample_responses_vllm(
                llm,
                tokenizer,
                prompt_ids,
                num_generations=1,
                max_completion_length=args.max_completion_length,
                seeds=[args.seed + i for i in indices],
                do_sample=args.do_sample,
                temperature=args.temperature,
                top_p=args.top_p,
                eos_token_ids=eos,
            )
            return [{**per_prompt[0], "text": per_prompt[0]["text"].strip()} for per_prompt in samples]

        return generate, tokenizer
    import torch

    model, tokenizer = load_causal_lm(name, dtype=args.dtype, device=args.device, option="--model")

    def generate(prompt_ids: list[list[int]], indices: list[int]) -> list[dict[str, Any]]:  # noqa: F811
        torch.manual_seed(args.seed + indices[0])
        return generate_answers(
            model,
            tokenizer,
            prompt_ids,
            max_completion_length=args.max_completion_length,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=len(prompt_ids),
        )

    return generate, tokenizer


def _judge_identity(args: EvaluateArguments, config: LongRewardConfig) -> dict[str, Any]:
    """Who judged and on what: a judged line of another judge or other dimensions is judged again."""
    dimensions = list(config.dimensions) if args.long_reward else []
    return {"backend": config.judge_backend, "model": config.judge_model, "dimensions": dimensions}


def _results_spec(args: EvaluateArguments, config: LongRewardConfig) -> dict[str, Any]:
    """What decides whether an answer is judged and what `results.json` shows (kept in a shard's manifest, so the
    merge needs neither the models nor the judge)."""
    return {
        "models": list(args.model),
        "input": args.input,
        "generation": args.generation_settings(),
        "judge": _judge_identity(args, config),
        "long_reward": args.long_reward,
        "reference_column": args.reference_column,
        "tie_margin": args.tie_margin,
    }


def _needs_judging(record: dict[str, Any] | None, answer: dict[str, Any], spec: dict[str, Any]) -> bool:
    if record is None or record.get("answer") != answer["answer"]:
        return True
    if record.get("judge") != spec["judge"]:
        return True
    if spec["long_reward"] and ("reward" not in record or record.get("judge_errors")):
        return True  # never judged, or a judge call failed (the answered calls come from the cache)
    column = spec["reference_column"]
    return bool(column) and (record.get("reference") or {}).get("column") != column


def _judge(
    pending: list[Key],
    args: EvaluateArguments,
    config: LongRewardConfig,
    documents: list,
    references: list[str] | None,
    answers: dict[Key, dict[str, Any]],
    judged: dict[Key, dict[str, Any]],
    path: Path,
) -> dict[str, int]:
    """Judge the pending answers in batches, appending one judged.jsonl line per answer; return this run's cost."""
    from tqdm.auto import tqdm

    reward = LongRewardFunction(config)
    rater = ReferenceRater(reward) if args.reference_column else None
    identity = _judge_identity(args, config)
    try:
        with path.open("a", encoding="utf-8") as sink, tqdm(total=len(pending), desc="judge", unit="answer") as bar:
            for start in range(0, len(pending), args.judge_batch_size):
                batch = pending[start : start + args.judge_batch_size]
                texts = [answers[key]["answer"] for key in batch]
                contexts = [documents[i][0] for _, i in batch]
                questions = [documents[i][1] for _, i in batch]
                records = [
                    {"model": m, "index": i, "question": questions[n], "answer": texts[n], "judge": identity}
                    for n, (m, i) in enumerate(batch)
                ]
                if args.long_reward:
                    with reward.counting() as cost:
                        judgements = reward.score(
                            completions=texts, **{config.context_column: contexts, config.question_column: questions}
                        )
                    # a judge that answered no call at all: stop before writing lines that would look judged
                    check_judge_answered(judgements, cost.totals(), rows=f"{len(batch)} answers", output=path)
                    for record, judgement in zip(records, judgements, strict=True):
                        data = judgement.to_dict()
                        record.update({k: data[k] for k in ("reward", "scores", "status", "trace")})
                        record["judge_errors"] = judge_error_dimensions(judgement.trace)
                        record["permanent_judge_errors"] = permanent_error_dimensions(judgement.trace)
                if rater is not None and references is not None:
                    refs = [references[i] for _, i in batch]
                    for record, ref, rating in zip(records, refs, rater.rate(questions, refs, texts), strict=True):
                        record["reference"] = {"column": args.reference_column, "reference_answer": ref, **rating}
                for key, record in zip(batch, records, strict=True):
                    judged[key] = record
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(len(batch))
                bar.set_postfix(_cost(reward, rater))
        return _cost(reward, rater)
    finally:
        reward.close()


def _cost(reward: Any, rater: Any) -> dict[str, int]:
    """Judge calls, cache hits, parse failures and judge errors of this run (LongReward's and the ratings')."""
    totals = reward.call_counts()
    if rater is not None:
        totals = {key: value + rater.stats()[key] for key, value in totals.items()}
    return totals


def _results(spec: dict[str, Any], judged: dict, indices: list[int]) -> dict[str, Any]:
    """The table (means per model over the prompts `indices`), the win rates against the first model, and the
    configuration (`spec`: `_results_spec`)."""
    models, long_reward, reference_column = spec["models"], spec["long_reward"], spec["reference_column"]
    columns = [*spec["judge"]["dimensions"], "reward"] if long_reward else []
    if reference_column:
        columns.append(REFERENCE_SCORE)
    per_model = {name: [flat_scores(judged[(name, i)]) for i in indices] for name in models}
    # The win rate compares the reward; in reference-only mode, the reference rating.
    key = "reward" if long_reward else REFERENCE_SCORE
    table, wins, reference_wins = {}, {}, {}
    baseline = per_model[models[0]]
    for name, rows in per_model.items():
        scored = sum(1 for row in rows if row.get(key) is not None)
        table[name] = {**mean_scores(rows, columns), "scored": scored, "prompts": len(indices)}
        if name == models[0]:
            continue
        wins[name] = win_rate(
            [r.get(key) for r in rows], [b.get(key) for b in baseline], tie_margin=spec["tie_margin"]
        )
        if reference_column and long_reward:
            reference_wins[name] = win_rate(
                [r.get(REFERENCE_SCORE) for r in rows], [b.get(REFERENCE_SCORE) for b in baseline]
            )
    results: dict[str, Any] = {"columns": columns, "table": table, "win_rates": wins, "win_rate_on": key}
    if reference_wins:
        results["reference_win_rates"] = reference_wins
    results["config"] = {
        "models": list(models),
        "input": spec["input"] or "bundled long-context QA, eval split",
        "prompts": len(indices),
        "generation": spec["generation"],
        "judge": spec["judge"],
        "reference_column": reference_column,
        "tie_margin": spec["tie_margin"],
    }
    return results
