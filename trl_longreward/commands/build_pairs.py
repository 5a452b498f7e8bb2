"""`trl-longreward build-pairs`: the paper's offline pipeline, from prompts to a DPO preference dataset.

    trl-longreward build-pairs --model PATH_TO_SFT_MODEL --input prompts.jsonl --output_dir pairs_out \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct

For each prompt (a `context` + `question` row, or a `prompt` written as context + separator + question): sample
`num_generations` responses from the policy, judge every one with LongReward against the FULL document, and keep the
best as chosen and the worst as rejected (docs/method.md section 3). Writes to `--output_dir`:

- `samples.jsonl`: one line per prompt (its k responses, their rewards and per-dimension scores, the selection);
- `judge_cache.sqlite`: every judge call, so nothing is paid for twice;
- `pairs/` (`datasets.Dataset.save_to_disk`) and `pairs.jsonl`: prompt, chosen, rejected, chosen_reward,
  rejected_reward, context, question, ready for `trl.DPOTrainer`.

Resumable: prompts already in `samples.jsonl` are skipped. Prompts are generated in fixed groups of `batch_size`
(by index) seeded with `seed + first index of the group`, so a resumed run with the same seed, batch_size and input
reproduces the same samples and gets every judge answer from the cache. With `--use_vllm` an in-process `vllm.LLM`
samples instead, prompt i seeded with `seed + i * num_generations` (other samples than the transformers path's),
each group still one batch and prefix caching off, so that reruns draw the same samples.

On N machines: `--shard_index I --num_shards N` builds the groups g with g % N == I (`trl_longreward.shards`) into
that shard's `--output_dir` (with `shard.json`), each shard resumable with its own judge cache;
`trl-longreward merge-shards --shards DIR_0 ... DIR_N-1 --output_dir OUT` then writes the pairs one machine would:

    trl-longreward build-pairs --model M --input prompts.jsonl --output_dir shard_$I --shard_index $I --num_shards 4 ...
    trl-longreward merge-shards --shards shard_0 shard_1 shard_2 shard_3 --output_dir pairs_out

Deviations from the reference: an optional minimum reward gap and a tie policy (the reference had neither: the
defaults 0 and skip reproduce it, as an all-tied prompt has no best-vs-worst pair anyway); long prompts are cut in
the middle of the document to fit `max_prompt_length` (head and tail kept, never the question).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..documents import check_prompt_columns, prompt_groups, row_document
from ..generation import (
    check_vllm_options,
    eos_token_ids,
    load_vllm_policy,
    sample_responses,
    sample_responses_vllm,
)
from ..models import load_causal_lm
from ..pairs import SKIP_REASONS, check_sampling_options, select_best_worst
from ..records import (
    check_judge_answered,
    judge_error_dimensions,
    load_rows,
    permanent_error_dimensions,
    read_jsonl,
    resume_jsonl,
)
from ..reward import LongRewardConfig, LongRewardFunction
from ..shards import (
    MergeShardsArguments,
    check_shard_options,
    documents_digest,
    judge_settings,
    read_shards,
    shard_prompts,
    write_manifest,
)

SAMPLES_FILE = "samples.jsonl"
PAIRS_DIR = "pairs"
PAIRS_JSONL = "pairs.jsonl"
JUDGE_CACHE_FILE = "judge_cache.sqlite"
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "context", "question")
_JUDGE_COUNTERS = ("judge_calls", "cache_hits", "parse_failures", "judge_errors")
# Arguments that say where a shard runs and writes, not what it builds: shards of one run may differ in them.
_PER_MACHINE = (
    "input",
    "output_dir",
    "shard_index",
    "num_shards",
    "device",
    "push_to_hub",
    "hub_dataset_id",
    "hub_private",
    "vllm_gpu_memory_utilization",
    "vllm_max_model_length",
    "vllm_tensor_parallel_size",
)


@dataclass
class BuildPairsArguments:
    """Arguments of `trl-longreward build-pairs` (the judge is configured by `LongRewardConfig`)."""

    model: str = field(metadata={"help": "Policy (SFT) model to sample from: a local directory or a Hub id."})
    input: str = field(
        metadata={"help": "JSONL/JSON/Parquet/CSV file or a datasets directory with context+question or prompt rows."}
    )
    output_dir: str = field(
        metadata={"help": "Directory for samples.jsonl (resumable), judge_cache.sqlite, pairs/ and pairs.jsonl."}
    )
    num_generations: int = field(default=10, metadata={"help": "Responses sampled per prompt (k; paper: 10)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top_p."})
    max_completion_length: int = field(default=512, metadata={"help": "Max tokens per sampled response."})
    max_prompt_length: int = field(
        default=8192, metadata={"help": "Prompt token budget; longer documents are cut in the middle."}
    )
    min_scored_samples: int | None = field(
        default=None,
        metadata={
            "help": "Scored samples a prompt needs for a pair; default ceil(num_generations / 2) (paper: 5 of 10)."
        },
    )
    min_reward_gap: float = field(
        default=0.0, metadata={"help": "Minimum chosen-rejected reward gap (the reference had none: 0)."}
    )
    tie_policy: Literal["skip", "first_last"] = field(
        default="skip", metadata={"help": "When all scored samples tie: skip (no pair) or first_last."}
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "Prompts per generate call (k samples each); they are judged together. Changing it "
            "changes which samples a seed gives."
        },
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed; each prompt group uses seed + its first index."})
    limit: int | None = field(default=None, metadata={"help": "Process only the first N prompts."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Policy dtype: auto (the checkpoint's), float32, bfloat16 or float16."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Policy device; default cuda when available, else cpu."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the pairs dataset to the Hub at the end."})
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository (user/name) for push_to_hub."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub dataset repository as private."})
    shard_index: int = field(
        default=0, metadata={"help": "This machine's shard, 0 <= shard_index < num_shards (see merge-shards)."}
    )
    num_shards: int = field(
        default=1,
        metadata={"help": "Machines sharing the input: shard I builds the prompt groups g with g %% N == I."},
    )
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample with an in-process vllm.LLM instead of transformers' generate."}
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
            "help": "vLLM prefix caching (use_vllm): prefills shared prompt heads once, but samples then depend on "
            "what the cache holds, so reruns and shards may draw other ones."
        },
    )

    def __post_init__(self) -> None:
        self.min_scored_samples = check_sampling_options(
            num_generations=self.num_generations,
            min_scored_samples=self.min_scored_samples,
            temperature=self.temperature,
            max_completion_length=self.max_completion_length,
            max_prompt_length=self.max_prompt_length,
            min_reward_gap=self.min_reward_gap,
            tie_policy=self.tie_policy,
        )
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub needs --hub_dataset_id user/name.")
        check_shard_options(self.shard_index, self.num_shards)
        if self.num_shards > 1 and self.push_to_hub:
            raise ValueError("--push_to_hub pushes one shard's pairs: push after merge-shards instead.")
        if self.use_vllm:
            check_vllm_options(
                gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                tensor_parallel_size=self.vllm_tensor_parallel_size,
                max_model_length=self.vllm_max_model_length,
                max_prompt_length=self.max_prompt_length,
                max_completion_length=self.max_completion_length,
            )


def build_pairs(args: BuildPairsArguments, reward_config: LongRewardConfig, *, llm: Any = None) -> dict[str, Any]:
    """Sample, judge and pair every prompt of `args.input` (of this shard: `shard_index`, `num_shards`), resumably;
    write the preference dataset; return a summary (prompts, pairs, skipped by reason, judge calls and cache hits of
    this run). `llm`: an already built `vllm.LLM` of `args.model` to sample with (`use_vllm`), e.g. to run several
    builds on one engine."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.input)
    check_prompt_columns(rows.column_names, **reward_config.document_columns())
    if len(rows) == 0:
        raise ValueError(f"--input {args.input!r} has no rows.")
    if reward_config.cache_path is None:  # a copy: the caller's config is left as it was
        reward_config = dataclasses.replace(reward_config, cache_path=str(out_dir / JUDGE_CACHE_FILE))
    samples_path = out_dir / SAMPLES_FILE
    done = resume_jsonl(samples_path)
    _check_same_input(samples_path, rows, reward_config)
    limit = len(rows) if args.limit is None else min(args.limit, len(rows))
    owned = shard_prompts(limit, args.batch_size, args.shard_index, args.num_shards)
    if args.num_shards > 1:
        _check_shard_output(args, reward_config, rows, limit, done, owned, out_dir)
    todo = [i for i in owned if i not in done]
    judge = dict.fromkeys(_JUDGE_COUNTERS, 0)
    if todo:  # a finished run only rebuilds the dataset: no model, no judge
        initial = len(owned) - len(todo)
        judge = _sample_and_judge(args, reward_config, rows, todo, samples_path, initial=initial, llm=llm)
    pairs, counts = _write_pairs(samples_path, rows, reward_config.document_columns(), out_dir)
    if args.push_to_hub:
        pairs.push_to_hub(args.hub_dataset_id, private=args.hub_private)
    return {
        **counts,
        "new_prompts": len(todo),
        **{key: judge[key] for key in _JUDGE_COUNTERS},
        "samples": str(samples_path),
        "pairs_dir": str(out_dir / PAIRS_DIR),
        "pairs_jsonl": str(out_dir / PAIRS_JSONL),
    }


def _check_shard_output(
    args: BuildPairsArguments,
    config: LongRewardConfig,
    rows: Any,
    limit: int,
    done: set[int],
    owned: list[int],
    out_dir: Path,
) -> None:
    """A shard's output holds only its own prompts, and `shard.json` says which run it belongs to."""
    foreign = sorted(done - set(owned))
    if foreign:
        raise ValueError(
            f"{out_dir / SAMPLES_FILE} holds prompt {foreign[0]}, which shard {args.shard_index} of {args.num_shards} "
            "does not build: it is the output of another shard or run. Use a new --output_dir for each shard."
        )
    write_manifest(out_dir, _manifest(args, config, rows, limit))


def _manifest(args: BuildPairsArguments, config: LongRewardConfig, rows: Any, limit: int) -> dict[str, Any]:
    """What `merge-shards` needs to check that shards fit together and to build the pairs from them."""
    columns = config.document_columns()
    documents = (row_document(rows[i], **columns, index=i) for i in range(limit))
    return {
        "command": "build-pairs",
        "shard_index": args.shard_index,
        "num_shards": args.num_shards,
        "num_prompts": limit,
        "input": str(Path(args.input).resolve()),
        "input_sha256": documents_digest(documents),
        "columns": columns,
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in _PER_MACHINE},
        "judge": judge_settings(config),
    }


def merge_pair_shards(args: MergeShardsArguments) -> dict[str, Any]:
    """The pairs of a run sharded over N machines, as one machine writes them: every shard's samples checked
    (finished, only its own prompts) and written to `args.output_dir` in prompt order, then the same `pairs/`,
    `pairs.jsonl` and summary counts."""
    shards = read_shards(args.shards)
    manifest = shards[0][1]
    num_prompts, columns = manifest["num_prompts"], manifest["columns"]
    input_path = args.input or manifest["input"]
    rows = load_rows(input_path)
    documents = (row_document(rows[i], **columns, index=i) for i in range(min(num_prompts, len(rows))))
    if len(rows) < num_prompts or documents_digest(documents) != manifest["input_sha256"]:
        raise ValueError(
            f"--input {input_path!r} is not the input the shards were built from (its prompts differ); give that "
            "file with --input."
        )
    records: dict[int, dict[str, Any]] = {}
    for directory, shard in shards:
        owned = shard_prompts(num_prompts, shard["settings"]["batch_size"], shard["shard_index"], shard["num_shards"])
        found = {r["index"]: r for r in read_jsonl(directory / SAMPLES_FILE) if not r.get("judge_errors")}
        _check_shard_complete(directory, shard, owned, found)
        records.update(found)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / SAMPLES_FILE
    tmp = out_dir / (SAMPLES_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as sink:
        for index in sorted(records):
            sink.write(json.dumps(records[index], ensure_ascii=False) + "\n")
    os.replace(tmp, samples_path)
    _, counts = _write_pairs(samples_path, rows, columns, out_dir)
    return {
        **counts,
        "shards": len(shards),
        "samples": str(samples_path),
        "pairs_dir": str(out_dir / PAIRS_DIR),
        "pairs_jsonl": str(out_dir / PAIRS_JSONL),
    }


def _check_shard_complete(directory: Path, shard: dict[str, Any], owned: list[int], found: dict[int, Any]) -> None:
    name = f"shard {shard['shard_index']} of {shard['num_shards']} ({str(directory)!r})"
    foreign = sorted(set(found) - set(owned))
    if foreign:
        raise ValueError(f"{name} holds prompt {foreign[0]}, which that shard does not build: not a shard's output.")
    missing = sorted(set(owned) - set(found))
    if missing:
        raise ValueError(
            f"{name} is not finished: {len(missing)} of its {len(owned)} prompts have no samples judged for good "
            f"(the first: prompt {missing[0]}). Rerun that shard with the same command (it resumes), then merge."
        )


def _context_digest(context: str) -> str:
    return hashlib.sha256(context.encode("utf-8")).hexdigest()


def _check_same_input(samples_path: Path, rows: Any, config: LongRewardConfig) -> None:
    """Resuming onto samples of another input would silently mix prompts: refuse it."""
    for record in read_jsonl(samples_path):
        index = record["index"]
        if index < len(rows):
            context, question = row_document(rows[index], **config.document_columns(), index=index)
            if record.get("question") == question and record.get("context_sha256") == _context_digest(context):
                continue
        raise ValueError(
            f"{samples_path} holds prompt {index}, which is not prompt {index} of --input: the samples were built "
            "from another input. Use a new --output_dir, or remove that samples.jsonl."
        )


def _policy_prompt(prompt: Any, tokenizer: Any) -> Any:
    """What the samples were generated from, as TRL's DPOTrainer will tokenize it again: a string prompt was sent
    through the chat template as a user message, so it is stored as that chat."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None) is not None:
        return [{"role": "user", "content": prompt}]
    return prompt


def _prompt_seed(args: BuildPairsArguments, group: list[int], index: int) -> int:
    """The seed a prompt's samples are drawn with: its group's (transformers) or its own, k apart (vLLM)."""
    return args.seed + index * args.num_generations if args.use_vllm else args.seed + group[0]


def _load_policy(args: BuildPairsArguments, llm: Any) -> dict[str, Any]:
    if not args.use_vllm:
        model, tokenizer = load_causal_lm(args.model, dtype=args.dtype, device=args.device, option="--model")
        return {"model": model, "tokenizer": tokenizer}
    if llm is None:
        llm, tokenizer = load_vllm_policy(
            args.model,
            dtype=args.dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_length=args.vllm_max_model_length,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            enforce_eager=args.vllm_enforce_eager,
            enable_prefix_caching=args.vllm_enable_prefix_caching,
        )
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    return {"llm": llm, "tokenizer": tokenizer, "eos": eos_token_ids(args.model, tokenizer)}


def _generate_group(
    policy: dict[str, Any], prompt_ids: list[list[int]], args: BuildPairsArguments, group: list[int]
) -> list[list[dict[str, Any]]]:
    """k samples for each prompt of `group` (`prompt_ids` in the same order): with transformers in one generate call
    seeded by the group's first index; with vLLM each prompt from its own seed."""
    if args.use_vllm:
        return sample_responses_vllm(
            policy["llm"],
            policy["tokenizer"],
            prompt_ids,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            seeds=[_prompt_seed(args, group, i) for i in group],
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_ids=policy["eos"],
        )
    import torch

    torch.manual_seed(args.seed + group[0])
    return sample_responses(
        policy["model"],
        policy["tokenizer"],
        prompt_ids,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=len(prompt_ids),
    )


def _sample_and_judge(
    args: BuildPairsArguments,
    config: LongRewardConfig,
    rows: Any,
    todo: list[int],
    samples_path: Path,
    *,
    initial: int,
    llm: Any = None,
) -> dict[str, int]:
    """Generate, judge and select for every group holding a prompt in `todo`; append one line per prompt."""
    from tqdm.auto import tqdm

    policy = _load_policy(args, llm)
    tokenizer = policy["tokenizer"]
    groups, prepared, position = prompt_groups(
        rows, todo, args.batch_size, tokenizer, max_prompt_length=args.max_prompt_length, **config.document_columns()
    )
    wanted = set(todo)
    reward = LongRewardFunction(config)
    counts: Counter = Counter()
    try:
        with (
            samples_path.open("a", encoding="utf-8") as sink,
            tqdm(total=initial + len(todo), initial=initial, desc="build-pairs", unit="prompt") as bar,
        ):
            for group in groups:
                prompts = [prepared[position[i]] for i in group]
                samples = _generate_group(policy, [p["prompt_ids"] for p in prompts], args, group)
                # Prompts of the group that are already done were regenerated only to keep what the group draws: the
                # seed's stream (transformers), the batch vLLM computes (its numerics depend on the batch).
                todo_here = [(i, prompts[j], samples[j]) for j, i in enumerate(group) if i in wanted]
                with reward.counting() as cost:
                    records, judgements = _judge_group(reward, config, args, tokenizer, rows, todo_here)
                check_judge_answered(
                    judgements, cost.totals(), rows=f"prompts {group[0]}-{group[-1]}", output=samples_path
                )
                for record in records:
                    record["seed"] = _prompt_seed(args, group, record["index"])
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts["pairs" if record["selection"]["skip_reason"] is None else "skipped"] += 1
                sink.flush()
                bar.update(len(records))
                bar.set_postfix({**counts, **reward.call_counts()})
        return reward.call_counts()
    finally:
        reward.close()


def _judge_group(
    reward: Any,
    config: LongRewardConfig,
    args: BuildPairsArguments,
    tokenizer: Any,
    rows: Any,
    todo: list[tuple[int, dict[str, Any], list[dict[str, Any]]]],
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Judge the k samples of each (index, prepared prompt, samples) in `todo`, all calls in flight together, and
    pick each prompt's pair; one samples.jsonl record per prompt, and the judgements."""
    k = args.num_generations
    documents = [row_document(rows[index], **config.document_columns(), index=index) for index, _, _ in todo]
    # The judge reads the FULL document, not the truncated policy prompt.
    judgements = reward.score(
        prompts=[prompt["prompt"] for _, prompt, _ in todo for _ in range(k)],
        completions=[sample["text"] for _, _, samples in todo for sample in samples],
        **{
            config.context_column: [context for context, _ in documents for _ in range(k)],
            config.question_column: [question for _, question in documents for _ in range(k)],
        },
    )
    records = []
    for n, (index, prompt, samples) in enumerate(todo):
        scored = judgements[n * k : (n + 1) * k]
        rewards = [j.reward for j in scored]
        selection = select_best_worst(
            rewards, min_scored=args.min_scored_samples, min_gap=args.min_reward_gap, ties=args.tie_policy
        )
        context, question = documents[n]
        records.append(
            {
                "index": index,
                "prompt": _policy_prompt(prompt["policy_prompt"], tokenizer),
                "truncated": prompt["truncated"],
                "question": question,
                "context_sha256": _context_digest(context),
                "responses": [sample["text"] for sample in samples],
                "rewards": rewards,
                "scores": [j.scores for j in scored],
                "status": [j.status for j in scored],
                "selection": asdict(selection),
                # dimensions whose judge call failed for some sample: the prompt is judged again on resume
                "judge_errors": sorted({d for j in scored for d in judge_error_dimensions(j.trace)}),
                # dimensions the judge refused for good for some sample: kept on resume (the refusal is cached)
                "permanent_judge_errors": sorted({d for j in scored for d in permanent_error_dimensions(j.trace)}),
            }
        )
    return records, judgements


def _completion(text: str, prompt: Any) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _write_pairs(samples_path: Path, rows: Any, columns: dict[str, str], out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Build the preference dataset from samples.jsonl (all runs) and write `pairs/` and `pairs.jsonl` atomically;
    `columns`: where rows hold the document (`LongRewardConfig.document_columns()`)."""
    import datasets

    pairs: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    prompts = truncated = 0
    for record in read_jsonl(samples_path):
        prompts += 1
        truncated += bool(record["truncated"])
        selection = record["selection"]
        if selection["skip_reason"] is not None:
            skipped[selection["skip_reason"]] += 1
            continue
        context, question = row_document(rows[record["index"]], **columns, index=record["index"])
        prompt = record["prompt"]
        pairs.append(
            {
                "index": record["index"],
                "prompt": prompt,
                "chosen": _completion(record["responses"][selection["chosen"]], prompt),
                "rejected": _completion(record["responses"][selection["rejected"]], prompt),
                "chosen_reward": selection["chosen_reward"],
                "rejected_reward": selection["rejected_reward"],
                "context": context,
                "question": question,
            }
        )
    pairs.sort(key=lambda pair: pair.pop("index"))  # a resumed run may have appended lines out of order
    if pairs:
        dataset = datasets.Dataset.from_list(pairs)
    else:
        dataset = datasets.Dataset.from_dict({column: [] for column in PAIR_COLUMNS})
    target, staging = out_dir / PAIRS_DIR, out_dir / (PAIRS_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    jsonl_tmp = out_dir / (PAIRS_JSONL + ".tmp")
    with jsonl_tmp.open("w", encoding="utf-8") as sink:
        for pair in pairs:
            sink.write(json.dumps(pair, ensure_ascii=False) + "\n")
    os.replace(jsonl_tmp, out_dir / PAIRS_JSONL)
    counts = {
        "prompts": prompts,
        "pairs": len(pairs),
        "skipped": {reason: skipped.get(reason, 0) for reason in SKIP_REASONS},
        "truncated_prompts": truncated,
    }
    return dataset, counts
