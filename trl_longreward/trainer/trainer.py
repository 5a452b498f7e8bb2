"""`LongContextDPOTrainer`: online DPO on LongReward pairs, as a drop-in `trl.DPOTrainer` subclass.

Each training step, for the prompts of the batch:
1. sample `num_generations` responses per prompt from the current policy (`generation.py`),
2. score them with the reward functions (by default a `LongRewardFunction`; the judge sees the FULL document;
   `rewards.py`),
3. pair the best and the worst sample of each prompt (`trl_longreward.pairs`), from the policy's own tokens,
4. add offline pairs at `offline_ratio` (`offline.py`), and take a DPO step on the pairs (TRL's loss, unchanged;
   with `prompt_once`, each pair as one packed sequence, `prompt_once.py`).
The unit is the optimizer step: its accumulation window (`gradient_accumulation_steps` micro-batches on every rank)
is sampled, judged and paired before its first micro-step trains (`_online_step`, the one method that holds the
online step). Prompts without a valid pair are skipped and counted, so micro-steps and ranks hold different numbers
of pairs: each micro-step's loss is weighted by its share of the window's pairs over all ranks, so that the step is
the step one process would take on the union of the window's pairs; a rank without any pair in a micro-step trains
a stand-in pair whose loss counts 0 and which enters no metric (its ranks never wait on each other forever), and a
step without any pair on any rank leaves the weights and the optimizer state as they are (`ddp.py`). Every logged
number is the step's, over all ranks (`window_metrics.py`); offline rows are dealt to the ranks without repeats
(`offline.py`); `num_iterations` repeats are known by the step's position (`pair_buffer.py`).

With `async_judging`, judging (step 2) overlaps training: step t samples the window of step t+1 with the current
weights and judges it in a background thread while it trains on the pairs of step t (`async_judging.py`); the
pairs are one step stale (`pairs/staleness`).

Callbacks that define `on_step_judged(args, state, control, judged=JudgedStep)` receive each step's judged samples
and pairs, when the step that trains on them takes them (the HTML report's `JudgedStepRecorder` does).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType, gather_object, set_seed
from datasets import Dataset
from transformers.distributed.fsdp import is_fsdp_managed_module
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import get_callable_name

from ..documents import prepare_prompt_dataset
from ..pairs import SKIP_REASONS, PairSelection, select_best_worst
from .async_judging import BackgroundJudging, SampledBatch, rows_key
from .config import LongContextDPOConfig
from .ddp import (
    RUNNING_TOTALS,
    PairMetricsAccelerator,
    PairShares,
    chosen_completion_tokens,
    drop_metrics_since,
    gather_window_shares,
    merge_micro_step_metrics,
    metrics_added_since,
    metrics_snapshot,
    rejected_completion_tokens,
    step_gate,
    union_loss_weights,
)
from .generation import PolicySampler
from .model_card import long_reward_card_section, public_name
from .offline import OfflinePairs, check_offline_columns
from .outage import JudgeUnavailableError, no_pairs_message
from .pair_buffer import PairBuffer
from .prompt_once import (
    attention_implementation,
    attention_layout,
    pack_pairs,
    prompt_once_forward,
    text_config,
    unsupported_reason,
)
from .rewards import check_reward_weights, describe_reward, score_samples
from .sequence_parallel import build_groups, exchange_within_group, head_divisibility_reason
from .window_metrics import merge_payloads, window_payload

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
    """What one micro-step trains on, and how it came about (see `_online_step`)."""

    rows: list[dict[str, Any]]
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
    judgements: list[Any] | None = None


@dataclass
class _Window:
    """One optimizer step's accumulation window on this rank, prepared by `_online_step`: per micro-step its pairs,
    its preference batches and their shares of the step's pairs (one batch; under sequence parallelism one per
    rank of the group, trained by the group in turn); and what its micro-steps add as they train."""

    steps: list[_StepPairs]
    batches: list[list[dict[str, Any]]]
    shares: list[list[PairShares]]
    generation_s: float = 0.0
    training_s: float = 0.0
    loss_metrics: list[tuple[PairShares, dict[str, list]]] = field(default_factory=list)


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
    # `compute_loss` weights each micro-step by its share of the pairs of the whole accumulation window over all
    # ranks: Transformers must not divide it by the accumulation steps again.
    loss_is_scaled_for_ga = True

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
        self._model_source = os.fspath(model) if isinstance(model, str | os.PathLike) else None
        self.card_dataset_name: str | None = None  # the training data's name on the model card, when known
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
        self.preference_collator = data_collator or DataCollatorForPreference(  # as TRL's DPOTrainer makes it
            pad_token_id=self.processing_tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )
        self._owns_reward = reward_funcs is None  # the default reward is built here, and closed after training
        self.reward_funcs = self._build_reward_funcs(reward_funcs)
        self.reward_func_names = [get_callable_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        check_reward_weights(self.reward_funcs, weights)  # at construction, not at the first step
        # a judge call that can outlast ddp_timeout would let the watchdog kill the job without a checkpoint
        args.check_judge_wait_fits(
            self.accelerator.num_processes, judges=[getattr(f, "judge", None) for f in self.reward_funcs]
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
        self._no_pair_steps = 0  # optimizer steps in a row without any online pair on any rank
        self.judging: BackgroundJudging | None = None  # async_judging: made at the start of each train()
        self._window: list[list[dict[str, Any]]] = []  # the micro-batches of the current optimizer step
        self._prepared: _Window | None = None  # and what its online step prepared for them
        self._next_window: list[list[dict[str, Any]]] = []  # and of the next one, read ahead (async_judging)
        self._window_iterator: Any = None
        self._generation_s = 0.0
        #: async_judging: batches sampled and judged but never trained on (training stopped before them)
        self.untrained_batches: list[dict[str, Any]] = []
        # Trainer gave every rank the same seed, so all ranks would sample the same tokens; offset it by the rank,
        # as TRL's GRPOTrainer does. The data order must not follow: Accelerate's seedable sampler seeds itself
        # from `torch.initial_seed()` unless given a data seed, and a per-rank seed would give each rank its own
        # shuffle (prompts judged twice and never within one epoch). Every rank gets args.data_seed, else args.seed.
        self.accelerator.dataloader_config.data_seed = args.data_seed if args.data_seed is not None else args.seed
        set_seed(args.seed, device_specific=True)
        self.sp = self._sequence_parallel_group(args)

    def _sequence_parallel_group(self, args: LongContextDPOConfig) -> Any:
        """This rank's sequence-parallel group (`sequence_parallel.py`), after checking that the model can run it."""
        if args.sp_size <= 1:
            return None
        models = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        reasons = []
        if not args.prompt_once or args.prompt_once_attention != "auto":
            reasons.append("it runs prompt-once split attention (prompt_once=True, prompt_once_attention='auto')")
        for model in models:
            attn = attention_implementation(model)
            if attn != "sdpa":
                reasons.append(f"the attention implementation is sdpa (this model has {attn!r})")
            layout, reason = attention_layout(model)
            if layout is None:
                reasons.append(f"the attention layout is known ({reason})")
            reason = head_divisibility_reason(text_config(model), args.sp_size)
            if reason is not None:
                reasons.append(f"the heads split over the ranks ({reason})")
        if getattr(self, "aux_loss_enabled", False):
            reasons.append("no MoE router auxiliary loss is on (set router_aux_loss_coef=0.0)")
        if reasons:
            raise ValueError(
                f"sp_size={args.sp_size} (Ulysses sequence parallelism) needs that "
                + "; that ".join(dict.fromkeys(reasons))
                + "."
            )
        return build_groups(args.sp_size)

    # ----- data -----

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if dataset_name != "train":  # evaluation data is ordinary preference data
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return prepare_prompt_dataset(
            dataset,
            self._tokenizer,
            max_prompt_length=args.max_prompt_length,
            chat_template_kwargs=args.chat_template_kwargs,
            **self._document_columns,
        )

    def _build_reward_funcs(self, reward_funcs) -> list[Callable]:
        if reward_funcs is None:
            from ..reward import LongRewardConfig, LongRewardFunction

            fields = dict(self.args.long_reward or {})
            fields.setdefault(
                "cache_path", self.args.judge_cache_path or os.path.join(self.args.output_dir, "judge_cache.sqlite")
            )
            # judge_max_concurrency is the budget of the job: this rank's share of it
            config = LongRewardConfig(**fields).for_rank(
                self.accelerator.num_processes, self.accelerator.process_index
            )
            return [LongRewardFunction(config)]
        funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
        for func in funcs:
            if not callable(func):
                raise TypeError(f"reward_funcs must be callables (TRL reward functions), got {type(func).__name__}.")
        return funcs

    # ----- the online step -----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Transformers' window of micro-batches for one optimizer step. The online step runs for the whole window
        before its first micro-step trains (`_online_step`). With `async_judging`, the next step's window is read
        ahead (when that step will run: not past `max_steps`, not past the epoch's end), so that its prompts can be
        sampled and judged while this step trains."""
        if self.judging is not None and self._next_window and self._window_iterator is epoch_iterator:
            window = self._next_window
        else:
            window, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._next_window = []
        if self.judging is not None and window and self.state.global_step + 1 < self.state.max_steps:
            steps = self.args.gradient_accumulation_steps
            self._next_window, _ = super().get_batch_samples(epoch_iterator, steps, device)
        self._window_iterator = epoch_iterator
        self._window, self._prepared = list(window), None
        return window, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-step: the first one of an optimizer step's window runs the window's online step
        (`_online_step`), then each trains on its own pairs, its loss weighted by its share of the window's pairs."""
        rows: list[dict[str, Any]] = inputs
        position = next((i for i, micro in enumerate(self._window) if micro is rows), None)
        if position is None:  # a micro-step outside the trainer's own loop: a window of its own
            self._window, self._prepared, position = [rows], None, 0
        if self._prepared is None:
            self._prepared = self._online_step(model, self._window)
        window = self._prepared
        began = time.perf_counter()
        parts = list(zip(window.batches[position], window.shares[position], strict=True))
        losses = []
        for index, (part, shares) in enumerate(parts):
            with self._deferred_sync(model, defer=index < len(parts) - 1):
                losses.append(self._train_part(model, part, shares, num_items_in_batch, window))
        loss = losses[0] if len(losses) == 1 else sum(losses[1:], losses[0])
        if self.sp is not None:
            # each rank of a group backpropagated the group's losses at their pair weights (its slice's part of the
            # gradient); the logged loss, an average over all ranks, counts each group once
            loss = loss / self.sp.size
        step = window.steps[position]
        if step.batch is not None:
            self.judging.trained(step.batch)
        window.training_s += time.perf_counter() - began
        if position == len(window.steps) - 1:
            self._log_window_end(window)
        return loss

    def _train_part(self, model, part, shares: PairShares, num_items_in_batch, window: _Window):
        """Forward and backward of one preference batch, its loss weighted by its share of the window's pairs."""
        batch = dict(part)
        batch[_PAIR_SHARES] = shares
        metrics = self._metrics["train"]
        before = metrics_snapshot(metrics)
        loss = super().training_step(model, batch, num_items_in_batch)
        # TRL's DPO metrics of this batch: merged over the window, weighted by pairs, at its end
        window.loss_metrics.append((shares, metrics_added_since(metrics, before)))
        drop_metrics_since(metrics, before)
        gate = step_gate(self.optimizer)
        if gate is not None:  # no pair on any rank in the whole window: the optimizer step is skipped
            gate.add(shares.total, sync=self.accelerator.sync_gradients)
        return loss

    @contextlib.contextmanager
    def _deferred_sync(self, model, *, defer: bool):
        """Around a batch that is not the micro-step's last: no gradient reduction and no optimizer step yet (the
        training loop's own `no_sync` for DDP / FSDP, Accelerate's sync flag for DeepSpeed's boundary)."""
        if not defer:
            yield
            return
        gradient_state = self.accelerator.gradient_state
        sync = gradient_state.sync_gradients
        gradient_state._set_sync_gradients(False)
        try:
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                yield
            elif self.is_distributed_loading_by_transformers and is_fsdp_managed_module(self.model):
                with self._defer_fsdp_gradient_reduction():
                    yield
            else:
                with self.accelerator.no_sync(model):
                    yield
        finally:
            gradient_state._set_sync_gradients(sync)

    def _online_step(self, model, window: list[list[dict[str, Any]]]) -> _Window:
        """The online part of one optimizer step, for its whole accumulation window on this rank, before any of its
        micro-steps trains. Every rank runs it once per optimizer step.

        1. The pairs of each micro-batch: on a `num_iterations` repeat, those buffered for this window; otherwise
           its prompts sampled by the current policy and judged now (serial), or sampled by the previous step's
           policy and judged in the background (`async_judging`), then best vs worst of each prompt.
        2. The step's numbers over all ranks (one gather, `window_metrics`). A run without any online pair for
           `max_judge_outage_steps` optimizer steps stops here, before anything of this step is kept, so the
           checkpoint it writes holds the last completed step.
        3. Offline pairs at `offline_ratio` of the step's pairs, rows disjoint across ranks (`offline.py`).
        4. Every micro-step's share of the step's pairs (one all-gather, `ddp.py`), which weights its loss.
        5. Kept: the pair statistics, the buffer for repeats, the step's metrics; callbacks get the judged samples.
        6. `async_judging`: the next step's window is sampled, and its judging starts.
        """
        step_index = self.state.global_step
        self._generation_s = 0.0
        repeat = self.pair_buffer.is_repeat(step_index)
        if repeat:  # the same prompts again (num_iterations > 1): train on the pairs generated for them
            steps = [
                _StepPairs(rows, examples, selections, rewards, samples, {}, False, policy_step)
                for rows, (examples, selections, rewards, samples, policy_step) in zip(
                    window, self.pair_buffer.peek(window, step_index), strict=True
                )
            ]
        elif self.judging is not None:
            steps = self._async_pairs(window)
        else:
            steps = [self._serial_pairs(rows) for rows in window]
        # 2. the step's numbers over all ranks, and the stop for a run without pairs
        payloads = gather_object([window_payload(steps)])
        counts, reward_metrics = merge_payloads(payloads)
        self._no_pair_steps = 0 if counts["online"] else self._no_pair_steps + 1
        limit = self.args.max_judge_outage_steps
        if limit and self._no_pair_steps >= limit:
            self._stop_without_pairs(model, counts)
        # 3. offline pairs; 4. the micro-steps' shares of the step's pairs
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        num_offline = self.offline_pairs.window_count(counts["online"], counts["prompts"])
        offline = self.offline_pairs.draw_window(
            counts["online"], counts["prompts"], world_size=world, rank=rank, micro_steps=len(window)
        )
        batches, local = [], []
        for rows, step, extra in zip(window, steps, offline, strict=True):
            examples = step.online + extra
            stand_in = None
            if not examples:  # keep this rank in DDP's collectives: a stand-in pair, weighted 0 and in no metric
                first = step.samples[0][0]["completion_ids"]
                stand_in = {"prompt_ids": rows[0]["prompt_ids"], "chosen_ids": first, "rejected_ids": first}
            # under sequence parallelism the group trains each of its ranks' pairs in turn, every rank a slice
            parts = [(examples, stand_in)] if self.sp is None else exchange_within_group(self.sp, (examples, stand_in))
            batches.append([])
            for pairs, fallback in parts:
                batch = self.preference_collator(pairs or [fallback])
                batches[-1].append(batch)
                tokens = (chosen_completion_tokens(batch), rejected_completion_tokens(batch)) if pairs else (0, 0)
                local.append((len(pairs), *tokens))
        per_part = gather_window_shares(self.accelerator, local, sp_size=self.args.sp_size)
        shares, taken = [], 0
        for parts in batches:
            shares.append(per_part[taken : taken + len(parts)])
            taken += len(parts)
        # 5. kept
        if repeat:
            self.pair_buffer.advance()
        else:
            entries = [(s.online, s.selections, s.rewards, s.samples, s.policy_step) for s in steps]
            self.pair_buffer.remember(window, entries)
            for step in steps:
                self._notify_step_judged(
                    step.rewards, step.selections, step.judgements, step.samples, step.policy_step
                )
        self._log_window(counts, reward_metrics, num_offline, new_pairs=not repeat)
        # 6. async_judging: the next window, sampled now and judged while this one trains
        if self.judging is not None and self._next_window and not self.pair_buffer.is_repeat(step_index + 1):
            for rows in self._next_window:
                self._sample_and_submit(rows)
        return _Window(steps=steps, batches=batches, shares=shares, generation_s=self._generation_s)

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

    def _serial_pairs(self, rows) -> _StepPairs:
        """Sample, judge and pair now."""
        samples = self._sample(rows)
        policy_step = self.state.global_step
        began = time.perf_counter()
        scored = self._score(rows, samples, self.state)
        judging_s = time.perf_counter() - began
        online, selections = self._select_pairs(rows, samples, scored.rewards)
        return _StepPairs(
            rows, online, selections, scored.rewards, samples, scored.metrics, True, policy_step, judging_s,
            judgements=scored.judgements,
        )  # fmt: skip

    def _async_pairs(self, window) -> list[_StepPairs]:
        """The pairs of the window's micro-batches, judged in the background (sampled one step ago), waiting for
        their judging if it is still running. Micro-batches nobody sampled yet (the first step, a new epoch) are
        sampled and judged now; batches restored from a checkpoint are judged again (the judge cache answers)."""
        assert self.judging is not None
        keep = {rows_key(rows) for rows in (*window, *self._next_window)}
        dropped = self.judging.drop_restored(keep)
        if dropped:
            logger.warning(
                "async_judging: %d sampled batch(es) saved in the checkpoint are not the prompts this run serves now "
                "(the data order changed); they are sampled again.",
                dropped,
            )
        state = copy.copy(self.state)
        claimed = []
        for rows in window:
            batch = self.judging.find(rows)
            if batch is None:
                batch = self._sample_and_submit(rows)
            elif batch.future is None:
                self.judging.judge_again(batch, rows, state)
            batch.taken = True  # claimed: a second micro-batch of the same prompts gets its own batch
            claimed.append(batch)
        steps = []
        for rows, batch in zip(window, claimed, strict=True):
            scored, waited, busy = self.judging.take(batch)
            online, selections = self._select_pairs(rows, batch.samples, scored.rewards)
            steps.append(
                _StepPairs(
                    rows,
                    online,
                    selections,
                    scored.rewards,
                    batch.samples,
                    scored.metrics,
                    True,
                    batch.policy_step,
                    waited,
                    busy,
                    batch,
                    judgements=scored.judgements,
                )  # fmt: skip
            )
        return steps

    def _sample_and_submit(self, rows) -> SampledBatch:
        assert self.judging is not None
        samples = self._sample(rows)
        # the reward sees the trainer's state as it was when the batch was sampled
        return self.judging.submit(
            rows, samples, policy_step=self.state.global_step, trainer_state=copy.copy(self.state)
        )

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
        """TRL's DPO loss; for a training batch (which carries the micro-step's `PairShares`) weighted by this
        micro-step's share of the pairs of its whole accumulation window over all ranks (`world_size * pairs /
        window pairs`; TRL's "sft" term by chosen tokens), so that DDP's average of the gradients accumulated over
        the window is the gradient over the union of the window's pairs, as one process with one micro-step would
        take it (`loss_is_scaled_for_ga`: Transformers does not divide it by the accumulation steps).

        TRL's DPO metrics are gathered through `PairMetricsAccelerator`, which takes each rank's real pairs (a
        stand-in pair is in no metric, and ranks of any size gather together); a micro-step without any pair adds
        no DPO metric, and the window's micro-steps are merged into one value, weighted by their pairs.
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
                attention="dense" if self.args.prompt_once_attention == "dense" else "split",
                # evaluation batches are each rank's own (not exchanged within the group): no sequence parallelism
                sp=self.sp if model.training else None,
            )
            reason = None if packed is not None else "the rows of a pair do not share the same prompt"
        if packed is None and self.sp is not None and model.training:
            # every rank of the group holds the same batch: TRL's two rows on each would count it sp_size times
            raise RuntimeError(f"sp_size={self.args.sp_size}: this batch cannot run prompt-once because {reason}.")
        if packed is None:
            if reason not in self._prompt_once_warned:
                self._prompt_once_warned.add(reason)
                logger.warning("prompt_once: running TRL's two-row DPO forward because %s.", reason)
            return super()._compute_loss(model, inputs, return_outputs)
        dtype = next(modules[0].parameters()).dtype
        with prompt_once_forward(modules, packed, dtype):
            return super()._compute_loss(model, inputs, return_outputs)

    # ----- judge outages, checkpoints, the model card -----

    def _stop_without_pairs(self, model, counts: Counter) -> None:
        """Save a checkpoint (every rank takes part; it holds the last completed optimizer step) and raise with what
        happened and how to go on."""
        self._save_checkpoint(model, trial=None)
        judges = [info.get("judge", {}) for info in map(describe_reward, self.reward_funcs)]
        caches = {str(p) for f in self.reward_funcs if (p := getattr(getattr(f, "config", None), "cache_path", None))}
        raise JudgeUnavailableError(
            no_pairs_message(
                steps=self._no_pair_steps,
                counts=counts,
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
        self._window, self._next_window, self._prepared, self._no_pair_steps = [], [], None, 0
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
        """TRL's card, plus what makes this model a LongReward model: method, judge, dimensions, pair statistics.

        Unlike TRL's, the card names the base model also when it was loaded from a local folder (by the folder's
        name, unlinked), and its quick start loads the Hub repo or, without one, the saved model's folder.
        `dataset_name` (default: `card_dataset_name`) is linked when it is a Hub id; no local path is written."""
        if not self.is_world_process_zero():
            return
        from transformers import is_wandb_available
        from trl.trainer.utils import generate_model_card, get_comet_experiment_url, get_trackio_space_url

        base_model, base_on_hub = self.card_base_model()
        model_name = model_name or Path(self.args.output_dir).name
        dataset, dataset_on_hub = public_name(dataset_name or self.card_dataset_name)
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags.update(self._tag_names)
        if hasattr(getattr(self.model, "config", None), "unsloth_version"):
            tags.add("unsloth")
        if "JOB_ID" in os.environ:
            tags.add("hf_jobs")
        trackio_url = get_trackio_space_url()
        if trackio_url is not None:
            tags = {t for t in tags if not t.startswith("trackio:")} | {f"trackio:{trackio_url}"}
        wandb_url = None
        if is_wandb_available():
            import wandb

            wandb_url = wandb.run.url if wandb.run is not None else None
        card = generate_model_card(
            base_model=base_model,
            model_name=model_name,
            hub_model_id=getattr(self, "hub_model_id", None) or model_name,
            dataset_name=dataset if dataset_on_hub else None,
            tags=sorted(tags),
            wandb_url=wandb_url,
            trackio_url=trackio_url,
            comet_url=get_comet_experiment_url(),
            trainer_name=self._name,
            trainer_citation=self._paper.get("citation"),
            template_file=self._template_file,
            paper_title=self._paper.get("title"),
            paper_id=self._paper.get("id"),
        )
        if base_model is None:  # nothing known: no link to a missing repo
            card.text = card.text.replace("a fine-tuned version of [None](https://huggingface.co/None)", "fine-tuned")
        elif not base_on_hub:  # a local folder: named, neither linked nor in the metadata (the Hub checks it)
            card.data.base_model = None
            card.text = card.text.replace(f"[{base_model}](https://huggingface.co/{base_model})", f"`{base_model}`")
        card.text += long_reward_card_section(
            self.args, self.reward_funcs, self.pair_stats, dataset_name=None if dataset_on_hub else dataset
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def card_base_model(self) -> tuple[str | None, bool]:
        """The base model as the card names it (`model_card.public_name`), and whether it is a Hub id: the `model`
        string the trainer was given, else the model's `config._name_or_path`, else its `name_or_path`."""
        model = self.model
        candidates = [self._model_source, getattr(getattr(model, "config", None), "_name_or_path", None)]
        candidates.append(getattr(model, "name_or_path", None))
        for candidate in candidates:
            name, on_hub = public_name(candidate)
            if name:
                return name, on_hub
        return None, False

    # ----- logging -----

    def _log_window(
        self, counts: Counter, reward_metrics: dict[str, float], num_offline: int, new_pairs: bool
    ) -> None:
        """The step's pair and judge numbers, over all ranks and the whole window (`window_metrics`)."""
        metrics = self._metrics["train"]
        prompts, online = counts["prompts"], counts["online"]
        metrics["pairs/valid_pair_rate"].append(online / prompts if prompts else 0.0)
        metrics["pairs/online"].append(online)
        metrics["pairs/offline"].append(num_offline)
        metrics["pairs/unscored_sample_rate"].append(
            counts["unscored"] / counts["samples"] if counts["samples"] else 0.0
        )
        metrics["prompts/truncated_rate"].append(counts["truncated"] / prompts if prompts else 0.0)
        for reason in SKIP_REASONS:
            metrics[f"pairs/skipped_{reason}"].append(counts[f"skipped_{reason}"])
        if online:
            metrics["long_reward/chosen_mean"].append(counts["chosen_sum"] / online)
            metrics["long_reward/rejected_mean"].append(counts["rejected_sum"] / online)
            metrics["long_reward/gap_mean"].append((counts["chosen_sum"] - counts["rejected_sum"]) / online)
        for name, value in reward_metrics.items():
            metrics[name].append(value)
        if new_pairs:  # pairs trained on again (num_iterations > 1) are not counted twice
            self.pair_stats.update({"prompts": int(prompts), "pairs": int(online), "offline_pairs": int(num_offline)})
            self.pair_stats.update({f"skipped_{r}": int(counts[f"skipped_{r}"]) for r in SKIP_REASONS})

    def _log_window_end(self, window: _Window) -> None:
        """After the window's last micro-step: TRL's DPO metrics of its micro-steps merged into one value per step,
        weighted by the micro-steps' pairs or tokens over all ranks (`merge_micro_step_metrics`; a micro-step without
        any pair added none), and the step's times. A number of the step is thus the number of its pairs, whatever
        their split over micro-steps and ranks."""
        metrics = self._metrics["train"]
        for key, value in merge_micro_step_metrics(window.loss_metrics).items():
            if key in RUNNING_TOTALS:
                metrics[key] = [value]
            else:
                metrics[key].append(value)
        steps = window.steps
        metrics["time/generation_s"].append(window.generation_s)
        metrics["time/judging_s"].append(sum(s.judging_s for s in steps))
        metrics["time/training_s"].append(window.training_s)
        background = [s.judging_background_s for s in steps if s.judging_background_s is not None]
        if background:
            metrics["time/judging_background_s"].append(sum(background))
        policy_steps = [s.policy_step for s in steps if s.policy_step is not None]
        if policy_steps:
            metrics["pairs/staleness"].append(self.state.global_step - sum(policy_steps) / len(policy_steps))
