"""`LongContextDPOTrainer`: online DPO on LongReward pairs, as a drop-in `trl.DPOTrainer` subclass.

Each training step, for the prompts of the batch:
1. sample `num_samples` responses per prompt from the current policy (`generation.py`),
2. score them with the reward functions (by default a `LongRewardFunction`; the judge sees the FULL document),
3. pair the best and the worst sample of each prompt (`pairs.py`), from the policy's own tokens,
4. add offline pairs at `offline_ratio`, and take a DPO step on the pairs (TRL's loss, unchanged).
Prompts without a valid pair are skipped and counted. A rank without any pair still runs a forward/backward with its
loss scaled to 0, so distributed ranks never wait on each other forever.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import set_seed
from datasets import Dataset
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import get_callable_name

from ..judges.base import JudgeUnavailableError
from .config import LongContextDPOConfig
from .generation import generate_samples
from .pairs import SKIP_REASONS, select_best_worst
from .prompt_once import pack_pairs, prompt_once_forward, unsupported_reason
from .prompts import PromptCollator, prepare_prompt_dataset

_LOSS_SCALE = "loss_scale"
PAIR_STATS_FILE = "long_reward_pair_stats.json"
logger = logging.getLogger(__name__)


class LongContextDPOTrainer(DPOTrainer):
    """Online DPO with LongReward pairs.

    ```python
    trainer = LongContextDPOTrainer(
        model="my-long-context-sft",
        args=LongContextDPOConfig(output_dir="out", num_samples=4,
                                  long_reward={"judge_base_url": "http://127.0.0.1:8000/v1", "judge_model": "judge"}),
        train_dataset=dataset,  # columns: context + question (or prompt = context + "\\n\\n" + question)
    )
    trainer.train()
    ```

    Args:
        model, ref_model, processing_class, peft_config, callbacks, optimizers, quantization_config: as in
            `trl.DPOTrainer`. With PEFT the reference is the model with its adapters disabled.
        train_dataset: prompts, with `context` and `question` columns (names from `long_reward`) or a `prompt`
            column written as context + "\\n\\n" + question; other columns reach the reward functions.
        reward_funcs: reward functions (TRL protocol: `f(prompts, completions, completion_ids, **columns)`);
            default: one `LongRewardFunction` built from `args.long_reward`, caching at `args.judge_cache_path`.
        offline_dataset: preference rows (prompt/chosen/rejected) mixed in at `args.offline_ratio`.
        eval_dataset: preference rows (prompt/chosen/rejected) evaluated with TRL's DPO metrics.
    """

    _tag_names = ["trl", "dpo", "long-reward", "trl-longreward"]

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: LongContextDPOConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        offline_dataset: Dataset | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            args = LongContextDPOConfig(output_dir="long-context-dpo")
        if not isinstance(args, LongContextDPOConfig):
            raise TypeError(f"args must be a LongContextDPOConfig, got {type(args).__name__}.")
        if isinstance(model, str | os.PathLike):
            from ..models import check_model_source

            check_model_source(model, option="model")
        if train_dataset is None:
            raise ValueError("train_dataset is required: prompts with context and question columns.")
        if args.offline_ratio > 0 and offline_dataset is None:
            raise ValueError(
                f"offline_ratio={args.offline_ratio} needs offline_dataset (prompt/chosen/rejected rows)."
            )
        self._long_reward_columns = _reward_columns(args)
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=PromptCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self.preference_collator = DataCollatorForPreference(
            pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length
        )
        self.reward_funcs = self._build_reward_funcs(reward_funcs)
        self.reward_func_names = [get_callable_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions."
            )
        self.reward_weights = [float(w) for w in weights]
        self.offline_dataset = None
        if offline_dataset is not None:
            _check_offline_columns(offline_dataset)
            self.offline_dataset = DPOTrainer._prepare_dataset(
                self, offline_dataset, self.processing_class, args, "offline"
            )
        self._offline_cursor = 0
        self._prompt_once_warned: set[str] = set()
        self._judge_outage_steps = 0
        self._pair_buffer: dict[tuple, list] = {}
        self.vllm_generation = self._build_vllm_generation()
        self._vllm_synced_step: int | None = None
        self.pair_stats: Counter = Counter()
        self.last_selections: list = []  # the latest step's pair selections and rewards, for inspection
        self.last_rewards: list[float | None] = []
        # Trainer gave every rank the same seed, so all ranks would sample the same tokens; offset it by the rank,
        # as TRL's GRPOTrainer does. Data sharding is unaffected: the samplers have their own seeded generators.
        set_seed(args.seed, device_specific=True)

    # ----- data -----

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if dataset_name != "train":  # evaluation data is ordinary preference data
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return prepare_prompt_dataset(
            dataset,
            self._tokenizer,
            max_prompt_length=args.max_prompt_length,
            context_column=self._long_reward_columns[0],
            question_column=self._long_reward_columns[1],
        )

    def _build_reward_funcs(self, reward_funcs) -> list[Callable]:
        if reward_funcs is None:
            from ..reward import LongRewardConfig, LongRewardFunction

            fields = dict(self.args.long_reward or {})
            fields.setdefault(
                "cache_path", self.args.judge_cache_path or os.path.join(self.args.output_dir, "judge_cache.sqlite")
            )
            return [LongRewardFunction(LongRewardConfig(**fields))]
        funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
        for func in funcs:
            if not callable(func):
                raise TypeError(f"reward_funcs must be callables (TRL reward functions), got {type(func).__name__}.")
        return funcs

    # ----- the online step -----

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows: list[dict[str, Any]] = inputs
        started = time.perf_counter()
        reused = self._reuse_pairs(rows)
        if reused is None:
            samples = generate_samples(self, rows)
            generated = time.perf_counter()
            rewards, reward_metrics = self._score(rows, samples)
            judged = time.perf_counter()
            online, selections = self._select_pairs(rows, samples, rewards)
            self._remember_pairs(rows, online, selections, rewards, samples)
        else:  # the same prompts again (num_iterations > 1): train on the pairs generated for them
            online, selections, rewards, samples = reused
            reward_metrics = {}
            generated = judged = time.perf_counter()
        examples = list(online)
        num_online = len(examples)
        examples.extend(self._offline_examples(num_online))
        num_offline = len(examples) - num_online
        outage = self._log_step(
            rows, selections, num_online, num_offline, rewards, reward_metrics, new_pairs=reused is None
        )
        self._judge_outage_steps = self._judge_outage_steps + 1 if outage else 0
        if self.args.max_judge_outage_steps and self._judge_outage_steps >= self.args.max_judge_outage_steps:
            self._stop_for_judge_outage(model, reward_metrics)
        loss_scale = 1.0
        if not examples:  # keep this rank in step with the others: a real forward/backward whose loss counts 0
            first = samples[0][0]["completion_ids"]
            examples = [{"prompt_ids": rows[0]["prompt_ids"], "chosen_ids": first, "rejected_ids": first}]
            loss_scale = 0.0
        batch = self.preference_collator(examples)
        batch[_LOSS_SCALE] = torch.tensor(loss_scale)
        loss = super().training_step(model, batch, num_items_in_batch)
        trained = time.perf_counter()

        self.last_selections = selections
        self.last_rewards = rewards
        for name, seconds in (
            ("generation", generated - started),
            ("judging", judged - generated),
            ("training", trained - judged),
        ):
            self._metrics["train"][f"time/{name}_s"].append(seconds)
        return loss

    def _select_pairs(self, rows, samples, rewards):
        """Best-vs-worst pair of each prompt, from the policy's own tokens; prompts without a pair are skipped."""
        k = self.args.num_samples
        examples, selections = [], []
        for i, row in enumerate(rows):
            selection = select_best_worst(
                rewards[i * k : (i + 1) * k],
                min_scored=self.args.min_scored_samples,
                min_gap=self.args.min_reward_gap,
                ties=self.args.tie_policy,
            )
            selections.append(selection)
            if selection.ok:
                examples.append(
                    {
                        "prompt_ids": row["prompt_ids"],
                        "chosen_ids": samples[i][selection.chosen]["completion_ids"],
                        "rejected_ids": samples[i][selection.rejected]["completion_ids"],
                    }
                )
        return examples, selections

    @staticmethod
    def _rows_key(rows) -> tuple:
        return tuple(tuple(row["prompt_ids"]) for row in rows)

    def _remember_pairs(self, rows, examples, selections, rewards, samples) -> None:
        if self.args.num_iterations > 1:
            self._pair_buffer[self._rows_key(rows)] = [1, (examples, selections, rewards, samples)]

    def _reuse_pairs(self, rows):
        """The pairs generated for exactly these prompts, while they have been used fewer than num_iterations times."""
        entry = self._pair_buffer.get(self._rows_key(rows)) if self.args.num_iterations > 1 else None
        if entry is None:
            return None
        entry[0] += 1
        if entry[0] >= self.args.num_iterations:
            del self._pair_buffer[self._rows_key(rows)]
        return entry[1]

    def _get_train_sampler(self, train_dataset=None):
        """With num_iterations > 1, each global batch of prompts comes num_iterations times in a row (TRL's
        RepeatSampler, as GRPO does), so its pairs are generated once and trained on num_iterations times."""
        if self.args.num_iterations <= 1:
            return super()._get_train_sampler(train_dataset)
        from trl.trainer.utils import RepeatSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=1,
            batch_size=args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
            repeat_count=args.num_iterations,
            shuffle=True,
            seed=args.seed,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scale = inputs.pop(_LOSS_SCALE, None)
        # Ranks hold different numbers of pairs (prompts without a pair are skipped), but TRL's DPO metrics gather
        # per-pair tensors as if every rank had the same batch size; gather them padded and trim the padding.
        self.accelerator.gather = self._gather_uneven
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            del self.accelerator.gather  # back to the Accelerator's own method
        if scale is None:
            return result
        if return_outputs:
            return result[0] * scale, result[1]
        return result * scale

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's DPO loss; with `prompt_once`, each pair's forward runs as one packed row (see `prompt_once.py`)."""
        if not self.args.prompt_once:
            return super()._compute_loss(model, inputs, return_outputs)
        modules = [self.accelerator.unwrap_model(model)]
        if self.ref_model is not None:
            modules.append(self.accelerator.unwrap_model(self.ref_model))
        reason = next(filter(None, (unsupported_reason(m, inputs, self) for m in modules)), None)
        packed = None
        if reason is None:
            packed = pack_pairs(
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["completion_mask"],
                self._tokenizer.pad_token_id,
                pad_to_multiple_of=64 if inputs["input_ids"].device.type == "cuda" else 1,
            )
            reason = None if packed is not None else "the rows of a pair do not share the same prompt"
        if packed is None:
            if reason not in self._prompt_once_warned:
                self._prompt_once_warned.add(reason)
                logger.warning("prompt_once: running TRL's two-row DPO forward because %s.", reason)
            return super()._compute_loss(model, inputs, return_outputs)
        dtype = next(modules[0].parameters()).dtype
        with prompt_once_forward(modules, packed, dtype):
            return super()._compute_loss(model, inputs, return_outputs)

    def _gather_uneven(self, tensor):
        accelerator = self.accelerator
        gather = type(accelerator).gather.__get__(accelerator)
        if accelerator.num_processes == 1 or not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            return gather(tensor)
        sizes = gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
        padded = accelerator.pad_across_processes(tensor, dim=0)
        pieces = gather(padded).split(padded.shape[0])
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    def _score(self, rows: list[dict[str, Any]], samples: list[list[dict[str, Any]]]):
        """Rewards of every sample (prompt-major, k per prompt) and the metrics the reward functions logged."""
        k = self.args.num_samples
        prompts = [row["prompt"] for row in rows for _ in range(k)]
        conversational = isinstance(rows[0]["prompt"], list)
        completions = [
            [{"role": "assistant", "content": s["text"]}] if conversational else s["text"]
            for per_prompt in samples
            for s in per_prompt
        ]
        completion_ids = [s["completion_ids"] for per_prompt in samples for s in per_prompt]
        columns = {
            key: [row[key] for row in rows for _ in range(k)]
            for key in rows[0]
            if key not in ("prompt", "prompt_ids", "policy_prompt", "truncated")
        }
        logged: dict[str, list[float]] = {}

        def log_metric(name: str, value: float) -> None:
            logged.setdefault(name, []).append(float(value))

        totals = [0.0] * len(prompts)
        present = [False] * len(prompts)
        for func, weight in zip(self.reward_funcs, self.reward_weights, strict=True):
            values = func(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                trainer_state=self.state,
                log_metric=log_metric,
                **columns,
            )
            if len(values) != len(prompts):
                raise ValueError(
                    f"Reward function {get_callable_name(func)} returned {len(values)} values for {len(prompts)}."
                )
            for j, value in enumerate(values):
                if value is not None and not math.isnan(value):
                    totals[j] += weight * float(value)
                    present[j] = True
        rewards = [t if p else None for t, p in zip(totals, present, strict=True)]
        return rewards, {name: sum(v) / len(v) for name, v in logged.items()}

    def _offline_examples(self, num_online: int) -> list[dict[str, Any]]:
        """Offline pairs so that they make up `offline_ratio` of the step's pairs (drawn in order, cycling).

        With no online pair this step, the count is taken relative to the per-device batch size, so the step still
        trains on offline data.
        """
        ratio = self.args.offline_ratio
        if self.offline_dataset is None or ratio <= 0:
            return []
        base = num_online or self.args.per_device_train_batch_size
        count = max(1, round(base * ratio / (1.0 - ratio)))
        out = []
        for _ in range(count):
            row = self.offline_dataset[self._offline_cursor % len(self.offline_dataset)]
            self._offline_cursor += 1
            out.append({key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")})
        return out

    # ----- judge outages, checkpoints -----

    def _stop_for_judge_outage(self, model, reward_metrics: dict[str, float]) -> None:
        """Save a checkpoint (every rank takes part) and raise with what happened and how to go on."""
        self._save_checkpoint(model, trial=None)
        checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        judges = [info.get("judge", {}) for info in map(_describe_reward, self.reward_funcs)]
        endpoints = sorted({str(j.get("base_url") or j.get("base_urls") or j.get("model") or "?") for j in judges})
        caches = sorted(
            {str(p) for f in self.reward_funcs if (p := getattr(getattr(f, "config", None), "cache_path", None))}
        )
        raise JudgeUnavailableError(
            f"The judge failed every call for {self._judge_outage_steps} consecutive steps "
            f"({reward_metrics.get('long_reward/judge_errors', 0):.0f} failed calls in the last step); judge: "
            f"{', '.join(endpoints)}. Training stopped after saving {checkpoint}"
            + (f"; judge results so far are kept in {', '.join(caches)}" if caches else "")
            + ". Bring the judge back (check the URL, the server's log, the API key variable), then resume with "
            "trainer.train(resume_from_checkpoint=True) or the recipe's --resume_from_checkpoint last. "
            "max_judge_outage_steps=0 disables this stop."
        )

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}", PAIR_STATS_FILE)
            if os.path.isdir(os.path.dirname(path)):
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump({"pair_stats": dict(self.pair_stats), "offline_cursor": self._offline_cursor}, handle)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PAIR_STATS_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            self.pair_stats = Counter(saved.get("pair_stats", {}))
            self._offline_cursor = int(saved.get("offline_cursor", 0))

    # ----- vLLM generation -----

    def _build_vllm_generation(self):
        """TRL's `VLLMGeneration` for the vllm_colocate / vllm_server backends (None for transformers)."""
        args = self.args
        if args.generation_backend == "transformers":
            return None
        from trl.generation.vllm_generation import VLLMGeneration

        return VLLMGeneration(
            model=self.model,
            accelerator=self.accelerator,
            processing_class=self.processing_class,
            mode="server" if args.generation_backend == "vllm_server" else "colocate",
            server_base_url=args.vllm_server_base_url,
            server_host=args.vllm_server_host,
            server_port=args.vllm_server_port,
            group_port=args.vllm_group_port,
            server_timeout=args.vllm_server_timeout,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_length=args.vllm_max_model_length,
            max_num_seqs=args.per_device_train_batch_size * args.num_samples * args.vllm_tensor_parallel_size,
            enable_sleep_mode=args.vllm_enable_sleep_mode,
            trust_remote_code=getattr(args, "trust_remote_code", False),
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            max_completion_length=args.max_new_tokens,
            logprobs=0,
        )

    # ----- model card -----

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, plus what makes this model a LongReward model: method, judge, dimensions, pair statistics."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if not os.path.exists(path):
            return
        lines = [
            "",
            "",
            "## LongReward online DPO",
            "",
            "Trained with trl-longreward's `LongContextDPOTrainer` ([LongReward](https://arxiv.org/abs/2410.21252)): "
            "each step, "
            f"{self.args.num_samples} responses per prompt were sampled from the policy (temperature "
            f"{self.args.temperature}), scored by an LLM judge, and the best and worst formed a DPO pair "
            f"(beta {self.args.beta}, losses {self.args.loss_type} weighted {self.args.loss_weights}).",
            "",
        ]
        for info in map(_describe_reward, self.reward_funcs):
            judge = info.get("judge", {})
            judge_text = ", ".join(f"{k}: {v}" for k, v in judge.items()) if judge else "n/a"
            lines.append(f"- Reward `{info['name']}`; judge: {judge_text}")
            if "dimensions" in info:
                lines.append(f"  - dimensions: {', '.join(info['dimensions'])} (weights: {info['weights']})")
        stats = self.pair_stats
        if stats.get("prompts"):
            lines.append(
                f"- Pairs: {stats['pairs']} online pairs from {stats['prompts']} prompts "
                f"({stats['pairs'] / stats['prompts']:.0%}), {stats.get('offline_pairs', 0)} offline pairs; skipped: "
                + ", ".join(f"{reason} {stats.get(f'skipped_{reason}', 0)}" for reason in SKIP_REASONS)
            )
        lines.append(
            f"- Prompt budget {self.args.max_prompt_length} tokens (documents cut in the middle), "
            f"responses up to {self.args.max_new_tokens} tokens."
        )
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")

    # ----- logging -----

    def _log_step(self, rows, selections, num_online, num_offline, rewards, reward_metrics, new_pairs=True) -> bool:
        metrics = self._metrics["train"]
        stats = torch.tensor(
            [
                len(rows),
                num_online,
                num_offline,
                sum(s.chosen_reward for s in selections if s.ok),
                sum(s.rejected_reward for s in selections if s.ok),
                sum(1 for r in rewards if r is None),
                len(rewards),
                sum(1 for row in rows if row.get("truncated")),
                reward_metrics.get("long_reward/judge_errors", 0.0),
                *(sum(1 for s in selections if s.skip_reason == reason) for reason in SKIP_REASONS),
            ],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        stats = self.accelerator.reduce(stats, reduction="sum")  # every rank calls this once per step
        prompts, online, offline, chosen, rejected, unscored, scored_total, truncated, judge_errors = stats[
            :9
        ].tolist()
        skipped = dict(zip(SKIP_REASONS, stats[9:].tolist(), strict=True))
        metrics["pairs/valid_pair_rate"].append(online / prompts)
        metrics["pairs/online"].append(online)
        metrics["pairs/offline"].append(offline)
        metrics["pairs/unscored_sample_rate"].append(unscored / scored_total)
        metrics["prompts/truncated_rate"].append(truncated / prompts)
        for reason, count in skipped.items():
            metrics[f"pairs/skipped_{reason}"].append(count)
        if online:
            metrics["rewards/chosen_mean"].append(chosen / online)
            metrics["rewards/rejected_mean"].append(rejected / online)
            metrics["rewards/gap_mean"].append((chosen - rejected) / online)
        for name, value in reward_metrics.items():
            metrics[name].append(value)
        if new_pairs:  # pairs trained on again (num_iterations > 1) are not counted twice
            self.pair_stats.update({"prompts": int(prompts), "pairs": int(online), "offline_pairs": int(offline)})
            self.pair_stats.update({f"skipped_{k}": int(v) for k, v in skipped.items()})
        # an outage: no sample of any rank was scored, and the judge failed (errors, not malformed answers)
        return unscored == scored_total and judge_errors > 0


def _describe_reward(func: Callable) -> dict[str, Any]:
    """What the model card says about a reward function: never its secrets (the judge's describe() holds none)."""
    info: dict[str, Any] = {"name": get_callable_name(func)}
    config = getattr(func, "config", None)
    judge = getattr(func, "judge", None)
    if judge is not None and hasattr(judge, "describe"):
        info["judge"] = judge.describe()
    if config is not None and hasattr(config, "dimensions"):
        info["dimensions"] = list(config.dimensions)
        info["weights"] = config.dimension_weights or "equal"
    return info


def _reward_columns(args: LongContextDPOConfig) -> tuple[str, str]:
    fields = args.long_reward or {}
    return fields.get("context_column", "context"), fields.get("question_column", "question")


def _check_offline_columns(dataset: Dataset) -> None:
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"offline_dataset lacks columns {sorted(missing)} (has {dataset.column_names}): it must be preference data "
            "with prompt, chosen and rejected columns, e.g. an ordinary DPO dataset."
        )
