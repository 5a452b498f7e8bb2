"""`LongContextDPOTrainer`: online DPO on LongReward pairs, as a drop-in `trl.DPOTrainer` subclass.

Each training step, for the prompts of the batch:
1. sample `num_generations` responses per prompt from the current policy (`generation.py`),
2. score them with the reward functions (by default a `LongRewardFunction`; the judge sees the FULL document;
   `rewards.py`),
3. pair the best and the worst sample of each prompt (`trl_longreward.pairs`), from the policy's own tokens,
4. add offline pairs at `offline_ratio` (`offline.py`), and take a DPO step on the pairs (TRL's loss, unchanged;
   with `prompt_once`, each pair as one packed sequence, `prompt_once.py`).
Prompts without a valid pair are skipped and counted, so ranks hold different numbers of pairs: each rank's loss is
weighted by its share of the pairs of all ranks, so that the step is the step over the union of their pairs; a rank
without any pair trains a stand-in pair whose loss counts 0 and which enters no metric (its ranks never wait on each
other forever), and a step without any pair on any rank leaves the weights and the optimizer state as they are
(`ddp.py`).

With `async_judging`, judging (step 2) overlaps training: step t samples the prompts of step t+1 with the current
weights and judges them in a background thread while it trains on the pairs of step t (`async_judging.py`); the
pairs are one step stale (`pairs/staleness`).

Callbacks that define `on_step_judged(args, state, control, judged=JudgedStep)` receive each step's judged samples
and pairs, when the step that trains on them takes them (the HTML report's `JudgedStepRecorder` does).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from datasets import Dataset
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import get_callable_name

from ..documents import prepare_prompt_dataset
from ..pairs import SKIP_REASONS, PairSelection, select_best_worst
from .async_judging import BackgroundJudging, SampledBatch, rows_key
from .config import LongContextDPOConfig
from .ddp import (
    PairMetricsAccelerator,
    chosen_completion_tokens,
    drop_metrics_since,
    gather_pair_shares,
    metrics_snapshot,
    step_gate,
    union_loss_weights,
)
from .generation import PolicySampler
from .model_card import long_reward_card_section
from .offline import OfflinePairs, check_offline_columns
from .outage import JudgeUnavailableError, outage_message
from .pair_buffer import PairBuffer
from .prompt_once import pack_pairs, prompt_once_forward, unsupported_reason
from .rewards import describe_reward, score_samples

_PAIR_SHARES = "pair_shares"
PAIR_STATS_FILE = "long_reward_pair_stats.json"
PAIR_BUFFER_FILE = "long_reward_pair_buffer_{rank}.json"
SAMPLED_BATCHES_FILE = "long_reward_sampled_batches_{rank}.json"  # async_judging: sampled, not yet trained on
logger = logging.getLogger(__name__)


class PromptCollator:
    """Batches stay lists of prompt rows: the trainer generates from them and builds the tensors itself."""

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(rows)


@dataclass
class JudgedStep:
    """One micro-step's judged samples, as callbacks' `on_step_judged` receives them.

    `judgements`: the `Judgement`s of the first reward function that gives them (prompt-major, k per prompt; None
    otherwise); `rewards`: the trainer's combined rewards in the same order; `selections`: the `PairSelection` of
    each prompt; `rank`: the process that judged them; `step`: the optimizer step (from 1) that trains on them;
    `policy_step`: the number of optimizer steps the policy that sampled them had taken (`step - 1` in serial steps,
    `step - 2` with `async_judging`, except for the first step); `completions`: the sampled texts, prompt-major."""

    step: int
    rank: int
    num_generations: int
    rewards: list[float | None]
    selections: list[PairSelection]
    judgements: list[Any] | None
    policy_step: int = -1
    completions: list[str] | None = None


@dataclass
class _StepPairs:
    """What one micro-step trains on, and how it came about (see `training_step`)."""

    online: list[dict[str, Any]]
    selections: list[PairSelection]
    rewards: list[float | None]
    samples: list[list[dict[str, Any]]]
    metrics: dict[str, float]
    new: bool  # first use of these pairs (False: a num_iterations repeat)
    policy_step: int | None
    judging_s: float = 0.0  # time this step waited for the judge
    judging_background_s: float | None = None  # async_judging: the time the batch's judging took, in the background
    batch: SampledBatch | None = None


class LongContextDPOTrainer(DPOTrainer):
    """Online DPO with LongReward pairs.

    ```python
    trainer = LongContextDPOTrainer(
        model="my-long-context-sft",
        args=LongContextDPOConfig(output_dir="out", num_generations=4,
                                  long_reward={"judge_base_url": "http://127.0.0.1:8000/v1", "judge_model": "judge"}),
        train_dataset=dataset,  # columns: context + question (or prompt = context + "\\n\\n" + question)
    )
    trainer.train()
    ```

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
            callbacks, optimizers, quantization_config, peft_config: as in `trl.DPOTrainer`, in its order. With PEFT
            the reference is the model with its adapters disabled. `train_dataset` holds prompts, with `context` and
            `question` columns (names from `args.long_reward`) or a `prompt` column written as context + "\\n\\n" +
            question; other columns reach the reward functions. `data_collator` applies to the preference batches
            the trainer builds (default: TRL's `DataCollatorForPreference`). `eval_dataset`: preference rows
            (prompt/chosen/rejected) evaluated with TRL's DPO metrics.
        reward_funcs (keyword-only): reward functions (TRL protocol: `f(prompts, completions, completion_ids,
            **columns)`); default: one `LongRewardFunction` built from `args.long_reward`, caching at
            `args.judge_cache_path`.
        offline_dataset (keyword-only): preference rows (prompt/chosen/rejected) mixed in at `args.offline_ratio`.
    """

    _tag_names = ["trl", "dpo", "long-reward", "trl-longreward"]

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: LongContextDPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        offline_dataset: Dataset | None = None,
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
        fields = args.long_reward or {}
        self._document_columns = {
            "context_column": fields.get("context_column", "context"),
            "question_column": fields.get("question_column", "question"),
            "separator": fields.get("prompt_separator", "\n\n"),
        }
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=PromptCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self.processing_tokenizer = self._tokenizer
        self.preference_collator = data_collator or DataCollatorForPreference(
            pad_token_id=self.processing_tokenizer.pad_token_id, max_length=args.max_length
        )
        self._owns_reward = reward_funcs is None  # the default reward is built here, and closed after training
        self.reward_funcs = self._build_reward_funcs(reward_funcs)
        self.reward_func_names = [get_callable_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions."
            )
        self.reward_weights = [float(w) for w in weights]
        prepared_offline = None
        if offline_dataset is not None:
            check_offline_columns(offline_dataset)
            prepared_offline = DPOTrainer._prepare_dataset(
                self, offline_dataset, self.processing_class, args, "offline"
            )
        self.offline_pairs = OfflinePairs(prepared_offline, args.offline_ratio)
        self.pair_buffer = PairBuffer(args.num_iterations)
        self.sampler = PolicySampler(
            args,
            model=self.model,
            accelerator=self.accelerator,
            processing_class=self.processing_class,
            tokenizer=self.processing_tokenizer,
        )
        self.pair_stats: Counter = Counter()
        self._prompt_once_warned: set[str] = set()
        self._judge_outage_steps = 0
        self.judging: BackgroundJudging | None = None  # async_judging: made at the start of each train()
        self._window: list[list[dict[str, Any]]] = []  # the micro-batches of the current optimizer step
        self._next_window: list[list[dict[str, Any]]] = []  # and of the next one, read ahead (async_judging)
        self._window_iterator: Any = None
        self._window_planned = False
        self._prefetch: list[list[dict[str, Any]]] = []
        self._generation_s = 0.0
        #: async_judging: batches sampled and judged but never trained on (training stopped before them)
        self.untrained_batches: list[dict[str, Any]] = []
        # Trainer gave every rank the same seed, so all ranks would sample the same tokens; offset it by the rank,
        # as TRL's GRPOTrainer does. The data order must not follow: Accelerate's seedable sampler seeds itself
        # from `torch.initial_seed()` unless given a data seed, and a per-rank seed would give each rank its own
        # shuffle (prompts judged twice and never within one epoch). Every rank gets args.data_seed, else args.seed.
        self.accelerator.dataloader_config.data_seed = args.data_seed if args.data_seed is not None else args.seed
        set_seed(args.seed, device_specific=True)

    # ----- data -----

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if dataset_name != "train":  # evaluation data is ordinary preference data
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return prepare_prompt_dataset(
            dataset, self._tokenizer, max_prompt_length=args.max_prompt_length, **self._document_columns
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
        self._generation_s = 0.0
        step = self._async_pairs(rows) if self.judging is not None else self._serial_pairs(rows)
        judged = time.perf_counter()
        examples = list(step.online)
        num_online = len(examples)
        examples.extend(self.offline_pairs.draw(num_online, self.args.per_device_train_batch_size))
        num_offline = len(examples) - num_online
        outage = self._log_step(
            rows, step.selections, num_online, num_offline, step.rewards, step.metrics, new_pairs=step.new
        )
        self._judge_outage_steps = self._judge_outage_steps + 1 if outage else 0
        if self.args.max_judge_outage_steps and self._judge_outage_steps >= self.args.max_judge_outage_steps:
            self._stop_for_judge_outage(model, step.metrics)
        prefetch_started = time.perf_counter()
        self._sample_ahead()  # async_judging: the next step's batches, judged while this one trains
        prefetched = time.perf_counter()
        num_pairs = len(examples)
        if not examples:  # keep this rank in DDP's collectives: a stand-in pair, weighted 0 and in no metric
            first = step.samples[0][0]["completion_ids"]
            examples = [{"prompt_ids": rows[0]["prompt_ids"], "chosen_ids": first, "rejected_ids": first}]
        batch = self.preference_collator(examples)
        # every rank, every micro-step: the ranks' pair counts weight their losses (see compute_loss)
        shares = gather_pair_shares(self.accelerator, num_pairs, chosen_completion_tokens(batch) if num_pairs else 0)
        batch[_PAIR_SHARES] = shares
        loss = super().training_step(model, batch, num_items_in_batch)
        gate = step_gate(self.optimizer)
        if gate is not None:  # no pair on any rank in the whole accumulation window: the optimizer step is skipped
            gate.add(shares.total, sync=self.accelerator.sync_gradients)
        if step.batch is not None:
            self.judging.trained(step.batch)
        trained = time.perf_counter()
        metrics = self._metrics["train"]
        metrics["time/generation_s"].append(self._generation_s)
        metrics["time/judging_s"].append(step.judging_s)
        # sampling ahead counts as generation, not as training
        metrics["time/training_s"].append(trained - judged - (prefetched - prefetch_started))
        if step.judging_background_s is not None:
            metrics["time/judging_background_s"].append(step.judging_background_s)
        if step.policy_step is not None:
            metrics["pairs/staleness"].append(self.state.global_step - step.policy_step)
        return loss

    def _sample(self, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The policy's samples for `rows`, now (timed as generation)."""
        began = time.perf_counter()
        samples = self.sampler.sample(self.model_wrapped, rows, global_step=self.state.global_step)
        self._generation_s += time.perf_counter() - began
        return samples

    def _score(self, rows, samples, trainer_state) -> Any:
        return score_samples(
            self.reward_funcs,
            self.reward_weights,
            rows,
            samples,
            num_generations=self.args.num_generations,
            trainer_state=trainer_state,
        )

    def _judged_pairs(self, rows, samples, scored, policy_step) -> tuple[list, list]:
        """Pairs of the judged `samples`, remembered for num_iterations repeats, and told to the callbacks."""
        online, selections = self._select_pairs(rows, samples, scored.rewards)
        self.pair_buffer.remember(rows, (online, selections, scored.rewards, samples, policy_step))
        self._notify_step_judged(scored.rewards, selections, scored.judgements, samples, policy_step)
        return online, selections

    def _serial_pairs(self, rows) -> _StepPairs:
        """Sample, judge and pair now (or take the pairs of a num_iterations repeat from the buffer)."""
        reused = self.pair_buffer.reuse(rows)
        if reused is not None:  # the same prompts again (num_iterations > 1): train on the pairs generated for them
            online, selections, rewards, samples, policy_step = reused
            return _StepPairs(online, selections, rewards, samples, {}, False, policy_step)
        samples = self._sample(rows)
        policy_step = self.state.global_step
        began = time.perf_counter()
        scored = self._score(rows, samples, self.state)
        judging_s = time.perf_counter() - began
        online, selections = self._judged_pairs(rows, samples, scored, policy_step)
        return _StepPairs(online, selections, scored.rewards, samples, scored.metrics, True, policy_step, judging_s)

    def _async_pairs(self, rows) -> _StepPairs:
        """The pairs of `rows` judged in the background (sampled one step ago), waiting for their judging if it is
        still running; at the first micro-step of an optimizer step, the batches of this step that nobody sampled
        yet (the first step, a new epoch) are sampled and judged first, and the next step's batches are planned."""
        if not self._window_planned and self._window and rows is self._window[0]:
            self._plan_window()
        reused = self.pair_buffer.reuse(rows)
        if reused is not None:
            online, selections, rewards, samples, policy_step = reused
            return _StepPairs(online, selections, rewards, samples, {}, False, policy_step)
        assert self.judging is not None
        batch = self.judging.find(rows)
        if batch is None:  # a micro-step outside the trainer's own loop: judge it now
            batch = self._sample_and_submit(rows)
        self.judging.judge_restored(rows, copy.copy(self.state))
        scored, waited, busy = self.judging.take(batch)
        online, selections = self._judged_pairs(rows, batch.samples, scored, batch.policy_step)
        return _StepPairs(
            online, selections, scored.rewards, batch.samples, scored.metrics, True, batch.policy_step, waited, busy,
            batch,
        )  # fmt: skip

    def _sample_and_submit(self, rows) -> SampledBatch:
        assert self.judging is not None
        samples = self._sample(rows)
        # the reward sees the trainer's state as it was when the batch was sampled
        return self.judging.submit(
            rows, samples, policy_step=self.state.global_step, trainer_state=copy.copy(self.state)
        )

    def _plan_window(self) -> None:
        """Which micro-batches of this optimizer step and of the next one need new samples (not a num_iterations
        repeat of pairs already buffered or being judged); sample this step's now, the next step's after this
        micro-step's outage check (`_sample_ahead`). In the serial trainer's order, so that the same seed draws the
        same samples. Batches restored from a checkpoint are judged again now (the judge cache answers them)."""
        assert self.judging is not None
        self._window_planned = True
        window, ahead = self._window, self._next_window
        dropped = self.judging.drop_restored({rows_key(rows) for rows in (*window, *ahead)})
        if dropped:
            logger.warning(
                "async_judging: %d sampled batch(es) saved in the checkpoint are not the prompts this run serves now "
                "(the data order changed); they are sampled again.",
                dropped,
            )
        state = copy.copy(self.state)
        for rows in window:
            self.judging.judge_restored(rows, state)
        supply: Counter = Counter(self.pair_buffer.remaining())
        for batch in self.judging.untaken():
            supply[batch.key] += self.args.num_iterations
        now, later = [], []
        for position, rows in enumerate((*window, *ahead)):
            key = rows_key(rows)
            if supply[key] > 0:
                supply[key] -= 1
                continue
            supply[key] += self.args.num_iterations - 1
            (now if position < len(window) else later).append(rows)
        for rows in now:
            self._sample_and_submit(rows)
        self._prefetch = later

    def _sample_ahead(self) -> None:
        batches, self._prefetch = self._prefetch, []
        for rows in batches:
            self._sample_and_submit(rows)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Transformers' window of micro-batches for one optimizer step; with `async_judging`, the next step's
        window is read ahead (when that step will run: not past `max_steps`, not past the epoch's end), so that its
        prompts can be sampled and judged while this step trains."""
        if self.judging is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._next_window and self._window_iterator is epoch_iterator:
            window = self._next_window
        else:
            window, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._next_window = []
        if window and self.state.global_step + 1 < self.state.max_steps:
            steps = self.args.gradient_accumulation_steps
            self._next_window, _ = super().get_batch_samples(epoch_iterator, steps, device)
        self._window_iterator = epoch_iterator
        self._window, self._window_planned = list(window), False
        return window, None

    def _select_pairs(self, rows, samples, rewards):
        """Best-vs-worst pair of each prompt, from the policy's own tokens; prompts without a pair are skipped."""
        k = self.args.num_generations
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

    def _notify_step_judged(self, rewards, selections, judgements, samples, policy_step) -> None:
        judged = JudgedStep(
            step=self.state.global_step + 1,
            rank=self.accelerator.process_index,
            num_generations=self.args.num_generations,
            rewards=rewards,
            selections=selections,
            judgements=judgements,
            policy_step=policy_step,
            completions=[s["text"] for per_prompt in samples for s in per_prompt],
        )
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, "on_step_judged", None)
            if handler is not None:
                handler(self.args, self.state, self.control, judged=judged)

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
        """TRL's DPO loss; for a training batch (which carries the micro-step's `PairShares`) weighted by this rank's
        share of the pairs of all ranks, so that DDP's gradient average is the gradient over the union of their pairs.

        Transformers divides the result by the gradient accumulation steps (`num_items_in_batch` is None: the batches
        are prompt rows), so each micro-step counts as the mean over its pairs, as on one process. TRL's DPO metrics
        are gathered through `PairMetricsAccelerator`, which takes each rank's real pairs (a stand-in pair is in no
        metric, and ranks of any size gather together); a micro-step without any pair adds no DPO metric.
        """
        shares = inputs.pop(_PAIR_SHARES, None)
        if shares is None:  # evaluation: ordinary preference batches
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        scale, loss_weights = union_loss_weights(self.loss_types, self.loss_weights, shares)
        metrics = self._metrics["train"]
        before = metrics_snapshot(metrics)
        accelerator, base_weights = self.accelerator, self.loss_weights
        # TRL reads both from the trainer inside its loss; they are the trainer's again right after
        self.accelerator, self.loss_weights = PairMetricsAccelerator(accelerator, shares), loss_weights
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            self.accelerator, self.loss_weights = accelerator, base_weights
        if shares.total == 0:
            drop_metrics_since(metrics, before)
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
                self.processing_tokenizer.pad_token_id,
                pad_to_multiple_of=self.args.pad_to_multiple_of or 1,
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

    # ----- judge outages, checkpoints, the model card -----

    def _stop_for_judge_outage(self, model, reward_metrics: dict[str, float]) -> None:
        """Save a checkpoint (every rank takes part) and raise with what happened and how to go on."""
        self._save_checkpoint(model, trial=None)
        judges = [info.get("judge", {}) for info in map(describe_reward, self.reward_funcs)]
        caches = {str(p) for f in self.reward_funcs if (p := getattr(getattr(f, "config", None), "cache_path", None))}
        raise JudgeUnavailableError(
            outage_message(
                steps=self._judge_outage_steps,
                failed_calls=reward_metrics.get("long_reward/judge_errors", 0),
                endpoints=sorted(
                    {str(j.get("base_url") or j.get("base_urls") or j.get("model") or "?") for j in judges}
                ),
                checkpoint=os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}"),
                caches=sorted(caches),
            )
        )

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, plus the pair statistics and offline cursor (main process) and each rank's buffered
        pairs (`num_iterations > 1`; one file per rank, as transformers does with the RNG states)."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if not os.path.isdir(folder):
            return
        if self.is_world_process_zero():
            with open(os.path.join(folder, PAIR_STATS_FILE), "w", encoding="utf-8") as handle:
                json.dump({"pair_stats": dict(self.pair_stats), "offline_cursor": self.offline_pairs.cursor}, handle)
        if self.args.num_iterations > 1:
            path = os.path.join(folder, PAIR_BUFFER_FILE.format(rank=self.accelerator.process_index))
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(self.pair_buffer.state_dict(), handle)
        if self.judging is not None:  # the batches sampled by earlier weights: a resumed run cannot sample them again
            path = os.path.join(folder, SAMPLED_BATCHES_FILE.format(rank=self.accelerator.process_index))
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(self.judging.state_dict(), handle)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval=None):
        """`Trainer.train`; resuming also restores the pair statistics, the offline cursor and this rank's buffered
        pairs saved with the checkpoint (whatever the engine: DDP, FSDP or DeepSpeed), and with `async_judging` the
        batches sampled but not yet trained on (judged again, from the judge cache). The default reward (built from
        `args.long_reward`) is closed when training ends, also when it stops on an error. With `async_judging`,
        batches judged but never trained on (training stopped early) are reported (`untrained_batches`)."""
        self.judging = BackgroundJudging(self._score) if self.args.async_judging else None
        self._window, self._next_window, self._prefetch, self._window_planned = [], [], [], False
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer raises its own error
        if isinstance(checkpoint, str | os.PathLike):
            self._load_long_reward_state(str(checkpoint))
        if self._owns_reward and any(getattr(f, "closed", False) for f in self.reward_funcs):
            self.reward_funcs = self._build_reward_funcs(None)  # trained before: a fresh reward on the same cache
        try:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
            )
        finally:
            if self.judging is not None:
                self._report_untrained(self.judging.finish())
            if self._owns_reward:  # the reward this trainer built releases its judge and cache file
                for func in self.reward_funcs:
                    func.close()

    def _report_untrained(self, left: list) -> None:
        """Batches sampled and judged ahead that training stopped before: their cost is reported (a warning and
        `untrained_batches`), and their answers stay in the judge cache for a resumed run."""
        self.untrained_batches = [
            {
                "policy_step": batch.policy_step,
                "prompts": len(batch.key),
                "judge_calls": int(scored.metrics.get("long_reward/judge_calls", 0)) if scored is not None else 0,
            }
            for batch, scored in left
        ]
        judged = [e for e, (batch, _) in zip(self.untrained_batches, left, strict=True) if batch.future is not None]
        if judged:
            logger.warning(
                "async_judging: training stopped at step %d with %d batch(es) sampled and judged ahead but not trained "
                "on (%d judge calls). Their answers are in the judge cache: resuming from the last checkpoint reuses "
                "them.",
                self.state.global_step,
                len(judged),
                sum(entry["judge_calls"] for entry in judged),
            )

    def _load_long_reward_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, PAIR_STATS_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            self.pair_stats = Counter(saved.get("pair_stats", {}))
            self.offline_pairs.cursor = int(saved.get("offline_cursor", 0))
        buffer_path = os.path.join(checkpoint, PAIR_BUFFER_FILE.format(rank=self.accelerator.process_index))
        if os.path.exists(buffer_path):
            with open(buffer_path, encoding="utf-8") as handle:
                self.pair_buffer.load_state_dict(json.load(handle))
        sampled_path = os.path.join(checkpoint, SAMPLED_BATCHES_FILE.format(rank=self.accelerator.process_index))
        if self.judging is not None and os.path.exists(sampled_path):
            with open(sampled_path, encoding="utf-8") as handle:
                self.judging.load_state_dict(json.load(handle))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model and, when called for the final model (not from a checkpoint save), its model card
        (`README.md`) beside it, whatever the save strategy."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.is_world_process_zero():
            return
        target = Path(output_dir or self.args.output_dir)
        model_name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else target.name
        self.create_model_card(model_name=model_name)
        card = Path(self.args.output_dir) / "README.md"
        if card.exists() and card.resolve() != (target / "README.md").resolve():
            (target / "README.md").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, plus what makes this model a LongReward model: method, judge, dimensions, pair statistics."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if os.path.exists(path):
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(long_reward_card_section(self.args, self.reward_funcs, self.pair_stats))

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
