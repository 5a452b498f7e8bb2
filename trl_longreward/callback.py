"""`LongRewardCallback`: watch LongReward on held-out long-context prompts while a trainer trains.

Every `eval_steps` optimizer steps, and once more when training ends, the callback answers a fixed set of evaluation
prompts with the current policy (greedy by default), scores the answers with a `LongRewardFunction` and logs the mean
of every dimension and of the reward through the trainer's logging, so `report_to` backends receive them:
`eval_long_reward/<dimension>`, `eval_long_reward/reward`, `eval_long_reward/missing_rate`, ... (wandb shows them as
`eval/long_reward/...`). With wandb or trackio in `report_to`, it also logs a completions table with the judge's
reasons. It works with `LongContextDPOTrainer` and with TRL's `DPOTrainer`, `SFTTrainer` and `GRPOTrainer`.

```python
callback = LongRewardCallback(eval_prompts, reward=reward, eval_steps=50)  # context + question rows
trainer.add_callback(callback.attach(trainer))
```
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from .documents import prepare_prompt_dataset
from .generation import generate_answers
from .reward import LongRewardConfig, LongRewardFunction
from .summaries import flat_scores, mean_scores

METRIC_PREFIX = "eval_long_reward"
COMPLETIONS_FILE = "long_reward_eval.jsonl"
TABLE_KEY = f"{METRIC_PREFIX}/completions"
_REASON_CHARS = 600


class LongRewardCallback(TrainerCallback):
    """Periodic LongReward evaluation of the policy on fixed prompts.

    Args:
        eval_dataset: the evaluation prompts, like `LongContextDPOTrainer`'s train data: `context` and `question`
            columns (names from the reward's config), or a `prompt` column written as context + "\\n\\n" + question.
            The policy sees the document cut in the middle to `max_prompt_length` tokens; the judge reads all of it.
        reward: a `LongRewardFunction`; or a `LongRewardConfig` (or a dict of its fields) to build one, which the
            callback then owns and closes when training ends; None: the trainer's own `LongRewardFunction` (the
            default reward of `LongContextDPOTrainer`, or one in a GRPO trainer's `reward_funcs`).
        trainer: the trainer to evaluate and log through; callbacks are not given their trainer, so pass it here or
            call `attach(trainer)`.
        eval_steps: evaluate every N optimizer steps; None: the trainer's `eval_steps` (`state.eval_steps`, which
            transformers leaves at 500 when `eval_steps` is not set).
        eval_on_start: also evaluate before the first step, the baseline point of the curve.
        num_prompts: use only the first N prompts of `eval_dataset`.
        max_prompt_length / max_completion_length: prompt and answer token budgets; None: the trainer's
            `max_prompt_length` / `max_completion_length` when its config has them, else 2048 / 256.
        do_sample, temperature, top_p: sampling instead of greedy answers. Generation runs on a forked random state
            seeded with `seed` (default: the trainer's seed), so it never changes the training run's randomness.
        batch_size: prompts per `generate` call.
        log_completions: log a completions table (question, answer, reward, scores, the judge's reasons) to wandb /
            trackio when they are in `report_to` (skipped when the package is not installed).
        completions_file: file under `output_dir` to which the main process appends one JSON line per prompt and
            evaluation, with the judge's full traces; None writes nothing.

    Under several processes the prompts are split across the ranks (each rank answers and judges its share), the
    results are gathered, and only the main process logs. The policy generates with transformers' `generate` (also
    when the trainer itself samples with vLLM), in eval mode with the KV cache on; every module's train/eval mode,
    `use_cache`, gradient checkpointing and PEFT adapters are as before afterwards.

    Attributes:
        history: one `{"step", "metrics"}` per evaluation, in order.
        last_records: the latest evaluation's per-prompt records (answer, reward, scores, statuses, traces).
    """

    def __init__(
        self,
        eval_dataset: Any,
        reward: LongRewardFunction | LongRewardConfig | dict[str, Any] | None = None,
        *,
        trainer: Any = None,
        eval_steps: int | None = None,
        eval_on_start: bool = False,
        num_prompts: int | None = None,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        seed: int | None = None,
        log_completions: bool = True,
        completions_file: str | None = COMPLETIONS_FILE,
    ) -> None:
        if eval_dataset is None or len(eval_dataset) == 0:
            raise ValueError("LongRewardCallback needs evaluation prompts (context + question rows); got none.")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}.")
        if batch_size < 1 or (max_completion_length is not None and max_completion_length < 1):
            raise ValueError("batch_size and max_completion_length must be >= 1.")
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 with do_sample (do_sample=False gives greedy answers).")
        if reward is not None and not isinstance(reward, LongRewardFunction | LongRewardConfig | dict):
            raise TypeError(f"reward must be a LongRewardFunction, a LongRewardConfig or a dict, not {type(reward)}.")
        if num_prompts is not None:
            eval_dataset = eval_dataset.select(range(min(num_prompts, len(eval_dataset))))
        self.eval_dataset = eval_dataset
        self.trainer = trainer
        self.eval_steps = eval_steps
        self.eval_on_start = eval_on_start
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.batch_size = batch_size
        self.seed = seed
        self.log_completions = log_completions
        self.completions_file = completions_file
        self.history: list[dict[str, Any]] = []
        self.last_records: list[dict[str, Any]] = []
        self._reward_spec = reward
        self._reward: LongRewardFunction | None = reward if isinstance(reward, LongRewardFunction) else None
        self._owns_reward = False
        self._rows: list[dict[str, Any]] | None = None
        self._last_step: int | None = None

    @classmethod
    def from_long_qa(cls, trainer: Any = None, *, split: str = "eval", **kwargs: Any) -> LongRewardCallback:
        """The callback on the bundled long-context QA set's held-out split (documents the train split never shows;
        see `trl_longreward.data.load_long_qa`). Keyword arguments are the constructor's."""
        from .data import load_long_qa

        return cls(load_long_qa(split), trainer=trainer, **kwargs)

    @property
    def reward(self) -> LongRewardFunction | None:
        """The reward function that judges the evaluations (None until the first one resolves the trainer's)."""
        return self._reward

    def attach(self, trainer: Any) -> LongRewardCallback:
        """Remember the trainer to evaluate and log through; returns the callback (for `trainer.add_callback`)."""
        self.trainer = trainer
        return self

    # ----- trainer events -----

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.eval_on_start:
            self._maybe_evaluate(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        every = self.eval_steps or state.eval_steps
        if every and state.global_step % every == 0:
            self._maybe_evaluate(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            self._maybe_evaluate(state)
        finally:
            if self._owns_reward and self._reward is not None:
                self._reward.close()
                self._reward, self._owns_reward = None, False

    def _maybe_evaluate(self, state: Any) -> None:
        if state.global_step != self._last_step:  # at most once per step (the last step may also be an eval step)
            self.evaluate()

    # ----- evaluation -----

    def evaluate(self) -> dict[str, float]:
        """Answer, judge and log now (every process must call it); returns the logged metrics."""
        trainer = self._require_trainer()
        accelerator = trainer.accelerator
        reward = self._resolve_reward(trainer)
        rows = self._prepared_rows(trainer, reward.config)
        with accelerator.split_between_processes(list(range(len(rows)))) as mine:
            local = self._answer_and_judge(trainer, reward, [rows[i] for i in mine])
        from accelerate.utils import gather_object

        parts = gather_object([local])
        records = [record for part in parts for record in part["records"]]
        step = trainer.state.global_step
        for record in records:
            record["step"] = step
        metrics = self._metrics(records, parts, list(reward.config.dimensions))
        self.history.append({"step": step, "metrics": metrics})
        self.last_records = records
        self._last_step = step
        if accelerator.is_main_process:
            # `Trainer.log`, not the trainer's own `log`: TRL trainers' `log` would fold their pending training
            # metrics into this entry and clear them. Logging also clears `should_log`, which would cancel the
            # step's own log (this runs between the step and its log): keep the flag as it was.
            should_log = trainer.control.should_log
            Trainer.log(trainer, dict(metrics))
            trainer.control.should_log = should_log
            self._log_table(trainer.args, step, records, list(reward.config.dimensions))
            self._append_records(trainer.args, records)
        return metrics

    def _require_trainer(self) -> Any:
        if self.trainer is None:
            raise RuntimeError(
                "LongRewardCallback has no trainer: build it with trainer=... or call callback.attach(trainer) "
                "(callbacks are not given their trainer)."
            )
        return self.trainer

    def _resolve_reward(self, trainer: Any) -> LongRewardFunction:
        if self._reward is not None:
            return self._reward
        spec = self._reward_spec
        if isinstance(spec, LongRewardConfig | dict):
            self._reward = LongRewardFunction(spec if isinstance(spec, LongRewardConfig) else LongRewardConfig(**spec))
            self._owns_reward = True
            return self._reward
        found = [f for f in getattr(trainer, "reward_funcs", None) or [] if isinstance(f, LongRewardFunction)]
        if not found:
            raise ValueError(
                f"LongRewardCallback needs a reward: {type(trainer).__name__} has no LongRewardFunction among its "
                "reward functions. Pass reward=LongRewardFunction(...) or reward=LongRewardConfig(judge_base_url=..., "
                "judge_model=...)."
            )
        self._reward = found[0]
        return self._reward

    def _prepared_rows(self, trainer: Any, config: LongRewardConfig) -> list[dict[str, Any]]:
        """The prompts fitted and tokenized for the policy, once (the tokenizer does not change during training)."""
        if self._rows is None:
            prepared = prepare_prompt_dataset(
                self.eval_dataset,
                _tokenizer(trainer),
                max_prompt_length=self._budget(trainer, "max_prompt_length"),
                what="LongRewardCallback's eval_dataset",
                chat_template_kwargs=getattr(trainer.args, "chat_template_kwargs", None),
                **config.document_columns(),
            )
            self._rows = [prepared[i] for i in range(len(prepared))]
        return self._rows

    def _budget(self, trainer: Any, name: str) -> int:
        if getattr(self, name) is not None:
            return getattr(self, name)
        args = trainer.args
        if name == "max_prompt_length":
            return getattr(args, "max_prompt_length", None) or 2048
        return getattr(args, "max_completion_length", None) or 256

    def _answer_and_judge(self, trainer: Any, reward: LongRewardFunction, rows: list[dict[str, Any]]) -> dict:
        import torch
        from trl.models.utils import unwrap_model_for_generation

        accelerator, args = trainer.accelerator, trainer.args
        started = time.perf_counter()
        devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
        # Every rank enters the unwrap (ZeRO-3 gathers the weights collectively), even one without prompts.
        with (
            torch.random.fork_rng(devices=devices),
            unwrap_model_for_generation(
                trainer.model_wrapped, accelerator, gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
            ) as model,
        ):
            torch.manual_seed(self.seed if self.seed is not None else args.seed)
            answers = generate_answers(
                model,
                _tokenizer(trainer),
                [row["prompt_ids"] for row in rows],
                max_completion_length=self._budget(trainer, "max_completion_length"),
                do_sample=self.do_sample,
                temperature=self.temperature,
                top_p=self.top_p,
                batch_size=self.batch_size,
                device=accelerator.device,
            )
        generated = time.perf_counter()
        # This evaluation's own judge calls, exact while a trainer judges with the same reward in another thread.
        with reward.counting() as cost:
            judgements = self._judge(reward, rows, [a["text"] for a in answers]) if rows else []
        records = []
        for row, answer, judgement in zip(rows, answers, judgements, strict=True):
            data = judgement.to_dict()
            records.append(
                {
                    "question": data["question"],
                    "completion": answer["text"],
                    "completion_tokens": len(answer["completion_ids"]),
                    "truncated": row["truncated"],
                    **{key: data[key] for key in ("reward", "scores", "status", "trace")},
                }
            )
        return {
            "records": records,
            "generation_s": generated - started,
            "judging_s": time.perf_counter() - generated,
            "cost": cost.totals(),
        }

    @staticmethod
    def _judge(reward: LongRewardFunction, rows: list[dict[str, Any]], answers: list[str]) -> list:
        config = reward.config
        columns = {
            name: [row[name] for row in rows]
            for name in (config.context_column, config.question_column)
            if name in rows[0]
        }
        # The judge reads the FULL document (`prompt`), not the policy's cut copy.
        return reward.score(prompts=[row["prompt"] for row in rows], completions=answers, **columns)

    @staticmethod
    def _metrics(records: list[dict[str, Any]], parts: list[dict], dimensions: list[str]) -> dict[str, float]:
        prefix = METRIC_PREFIX
        means = mean_scores([flat_scores(r) for r in records], [*dimensions, "reward"])
        metrics = {f"{prefix}/{name}": value for name, value in means.items() if value is not None}
        metrics[f"{prefix}/missing_rate"] = sum(r["reward"] is None for r in records) / len(records)
        metrics[f"{prefix}/completion_tokens"] = sum(r["completion_tokens"] for r in records) / len(records)
        for key in ("judge_calls", "cache_hits"):
            metrics[f"{prefix}/{key}"] = float(sum(part["cost"].get(key, 0) for part in parts))
        for key in ("generation_s", "judging_s"):  # the slowest rank is what the training run waited for
            metrics[f"{prefix}/{key}"] = max(part[key] for part in parts)
        return metrics

    # ----- outputs -----

    def _log_table(self, args: Any, step: int, records: list[dict[str, Any]], dimensions: list[str]) -> None:
        if not self.log_completions:
            return
        report_to = args.report_to or []
        backends = []
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None and wandb.run is not None:
                backends.append(wandb)
        if "trackio" in report_to:
            try:
                import trackio
            except ImportError:
                trackio = None
            if trackio is not None:
                backends.append(trackio)
        if not backends:
            return
        import pandas as pd

        frame = pd.DataFrame(completions_table(records, dimensions, step=step))
        for backend in backends:
            backend.log({TABLE_KEY: backend.Table(dataframe=frame)})

    def _append_records(self, args: Any, records: list[dict[str, Any]]) -> None:
        if self.completions_file is None:
            return
        path = Path(args.output_dir) / self.completions_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as sink:
            for record in records:
                sink.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def completions_table(records: list[dict[str, Any]], dimensions: list[str], *, step: int) -> dict[str, list[Any]]:
    """Columns of the completions table: step, question, completion, reward, each dimension, the judge's reasons."""
    table: dict[str, list[Any]] = {"step": [], "question": [], "completion": [], "reward": []}
    table.update({name: [] for name in dimensions})
    table["reasons"] = []
    for record in records:
        table["step"].append(step)
        table["question"].append(record["question"])
        table["completion"].append(record["completion"])
        table["reward"].append(record["reward"])
        for name in dimensions:
            table[name].append(record["scores"].get(name))
        table["reasons"].append(judge_reasons(record["trace"], dimensions))
    return table


def judge_reasons(trace: dict[str, Any], dimensions: list[str]) -> str:
    """The judge's reasons for each dimension as plain text (per-chunk notes extraction left out: it is shared by
    every answer to a document and long)."""
    from .report import dimension_reasons

    lines = []
    for name in dimensions:
        for label, text, _ in dimension_reasons(trace.get(name, {})):
            if label.startswith("notes extraction"):
                continue
            text = " ".join(str(text).split())
            clipped = text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + " …"
            lines.append(f"[{name}] {label}: {clipped}")
    return "\n".join(lines)


def _tokenizer(trainer: Any) -> Any:
    processing_class = trainer.processing_class
    return getattr(processing_class, "tokenizer", processing_class)
