"""`LongContextDPOConfig`: TRL's `DPOConfig` with the paper's defaults and the online-sampling knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import DPOConfig


@dataclass
class LongContextDPOConfig(DPOConfig):
    r"""
    Configuration of [`LongContextDPOTrainer`]. All `trl.DPOConfig` fields apply; defaults follow the paper.

    Parameters:
        > DPO (paper defaults)

        beta: 0.15. loss_type / loss_weights: `["sigmoid", "sft"]` / `[1.0, 0.1]` (DPO + 0.1 x NLL of the chosen
        response). learning_rate: 1e-6.

        > Online sampling

        num_samples (`int`, defaults to 4): Responses sampled per prompt from the current policy (k; the paper used
            10). Must be >= 2.
        temperature / top_p (`float`): Sampling settings (paper: temperature 1.0).
        max_new_tokens (`int`): Length budget of each sampled response.
        max_prompt_length (`int`): Token budget of the policy's prompt; longer documents are cut in the MIDDLE (head
            and tail kept, never the question). The judge always sees the full document.
        generation_backend (`str`): `"transformers"` (generate inside the training process), `"vllm_colocate"`
            (a vLLM engine inside each training process, sharing its GPU) or `"vllm_server"` (a `trl vllm-serve`
            server on other GPUs; weights pushed after every optimizer step), both through `trl.generation`.
        vllm_server_base_url / vllm_server_host / vllm_server_port / vllm_group_port / vllm_server_timeout: where the
            `vllm_server` backend finds the server (as in TRL's GRPOConfig).
        vllm_gpu_memory_utilization / vllm_tensor_parallel_size / vllm_max_model_length / vllm_enable_sleep_mode:
            the `vllm_colocate` engine's settings.
        generation_batch_size (`int` or `None`): Prompts per `generate` call; None = the whole per-device batch.

        > Pairs

        num_iterations (`int`, defaults to 1): How often new pairs are generated: each batch of prompts is served
            `num_iterations` times in a row (TRL's `RepeatSampler`, as GRPO does) and the pairs generated and judged
            for it the first time are trained on every time. 1 = fresh pairs from the current policy every step.
        min_scored_samples (`int` or `None`): Samples of a prompt that must be scored for a pair; None = half of
            `num_samples`, rounded up, at least 2 (the reference: 5 of 10).
        min_reward_gap (`float`): Minimum chosen-rejected reward difference (the reference had none: 0).
        tie_policy (`str`): `"skip"`: no pair when every scored sample has the same reward.

        > Reward

        long_reward (`dict` or `None`): `LongRewardConfig` fields for the default reward when `reward_funcs` is not
            passed to the trainer (e.g. `{"judge_base_url": ..., "judge_model": ...}`).
        reward_weights (`list[float]` or `None`): Weights of several reward functions; default equal.
        judge_cache_path (`str` or `None`): Judge-call cache of the default reward; None =
            `<output_dir>/judge_cache.sqlite`, so a resumed run never pays for a judge call twice.

        > Offline pairs

        offline_ratio (`float`): Share of each batch's pairs taken from `offline_dataset` (prompt/chosen/rejected, e.g.
            ordinary short-context DPO data). 0 = online pairs only.

        > Reliability

        max_judge_outage_steps (`int`, defaults to 3): When every sample of a step is unscored because the judge
            failed (errors, not malformed answers) for this many consecutive steps on all ranks, the trainer saves a
            checkpoint and raises `JudgeUnavailableError` naming the endpoint and the resume command. 0: never stop.

        > Speed

        shared_prefill (`bool`, defaults to True): The k samples of a prompt share one prefill of the long prompt (its
            KV cache is repeated k times) instead of k prefills (`generate(num_return_sequences=k)`).
        prompt_once (`bool`, defaults to True): Run each pair as ONE sequence [prompt, chosen, rejected] (branches
            masked from each other, positions restarting after the prompt) instead of TRL's two rows, for both the
            policy and the reference: a long prompt is processed once per model, not twice. Same log-probs, loss and
            gradients. Needs an attention implementation that takes a custom mask (sdpa, eager, flex_attention); with
            flash-attention, MoE auxiliary loss, vision inputs or prompt-learning PEFT the step falls back to TRL's
            two rows (with a warning).
    """

    beta: float = field(default=0.15, metadata={"help": "DPO beta (paper: 0.15)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Learning rate (paper: 1e-6)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid", "sft"],
        metadata={"help": "DPO losses; paper: sigmoid + sft (NLL of the chosen response)."},
    )
    loss_weights: list[float] | None = field(
        default_factory=lambda: [1.0, 0.1], metadata={"help": "Weights of loss_type; paper: [1.0, 0.1]."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Cap on prompt+response tokens; None: prompts are fitted by max_prompt_length instead."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the reward needs context and question."}
    )
    num_samples: int = field(default=4, metadata={"help": "Responses sampled per prompt (k; paper: 10)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top_p."})
    max_new_tokens: int = field(default=256, metadata={"help": "Max tokens per sampled response."})
    max_prompt_length: int = field(
        default=2048, metadata={"help": "Prompt token budget; longer documents are cut in the middle."}
    )
    generation_backend: Literal["transformers", "vllm_colocate", "vllm_server"] = field(
        default="transformers",
        metadata={
            "help": "How responses are sampled: transformers (generate in process), vllm_colocate (vLLM in each "
            "training process) or vllm_server (a `trl vllm-serve` server on other GPUs)."
        },
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "vllm_server: base URL of the server (overrides host and port)."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vllm_server: host of the server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vllm_server: port of the server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "vllm_server: port of the weight-update group."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "vllm_server: seconds to wait for the server to come up."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm_colocate: share of the GPU memory the vLLM engine may take."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vllm_colocate: tensor parallel size."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vllm_colocate: context length of the engine; default: the model's."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "vllm_colocate: offload the engine's memory during the DPO step."}
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generate call; default: the whole per-device batch."}
    )
    min_scored_samples: int | None = field(
        default=None, metadata={"help": "Scored samples needed for a pair; default ceil(num_samples / 2), >= 2."}
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "How often new pairs are generated: every num_iterations steps. Each batch of prompts comes "
            "num_iterations times in a row and its pairs (generated and judged once) are trained on each time "
            "(GRPO's mu). 1 = new pairs every step."
        },
    )
    min_reward_gap: float = field(default=0.0, metadata={"help": "Minimum chosen-rejected reward gap."})
    tie_policy: Literal["skip", "first_last"] = field(
        default="skip", metadata={"help": "When all scored samples tie: skip (no pair) or first_last."}
    )
    long_reward: dict[str, Any] | None = field(
        default=None, metadata={"help": "LongRewardConfig fields for the default reward (judge endpoint etc.)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions; default equal."}
    )
    judge_cache_path: str | None = field(
        default=None, metadata={"help": "Judge-call cache file; default <output_dir>/judge_cache.sqlite."}
    )
    offline_ratio: float = field(
        default=0.0, metadata={"help": "Share of each batch's pairs drawn from offline_dataset."}
    )

    max_judge_outage_steps: int = field(
        default=3,
        metadata={
            "help": "Stop (saving a checkpoint) when every judge call failed for this many consecutive steps; "
            "0: never stop."
        },
    )
    shared_prefill: bool = field(
        default=True,
        metadata={
            "help": "Prefill each prompt once for its num_samples samples (KV cache repeated per sample) instead of "
            "once per sample as generate(num_return_sequences=k) does."
        },
    )
    prompt_once: bool = field(
        default=True,
        metadata={
            "help": "Process each pair's prompt once: one sequence [prompt, chosen, rejected] with a branch mask "
            "(sdpa/eager/flex attention), equal to TRL's two-row DPO; False = TRL's two rows."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(
                f"num_samples={self.num_samples}: best-vs-worst pairs need at least 2 samples per prompt "
                "(the paper used 10)."
            )
        if self.min_scored_samples is None:
            self.min_scored_samples = max(2, math.ceil(self.num_samples / 2))
        if not 2 <= self.min_scored_samples <= self.num_samples:
            raise ValueError(f"min_scored_samples must be in [2, num_samples={self.num_samples}].")
        if self.generation_backend not in ("transformers", "vllm_colocate", "vllm_server"):
            raise ValueError(
                f"generation_backend={self.generation_backend!r}: use transformers, vllm_colocate or vllm_server."
            )
        if self.generation_backend != "transformers":
            from trl.import_utils import is_vllm_available

            if not is_vllm_available():
                raise ValueError(
                    f"generation_backend={self.generation_backend!r} needs vLLM: pip install 'trl-longreward[vllm]' "
                    "(or use generation_backend='transformers')."
                )
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1 (1: new pairs every step), got {self.num_iterations}.")
        if self.max_judge_outage_steps < 0:
            raise ValueError("max_judge_outage_steps must be >= 0 (0: never stop).")
        if not 0.0 <= self.offline_ratio < 1.0:
            raise ValueError(f"offline_ratio must be in [0, 1), got {self.offline_ratio}.")
        if self.min_reward_gap < 0:
            raise ValueError("min_reward_gap must be >= 0.")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: pairs need diverse samples.")
        if self.max_new_tokens < 1 or self.max_prompt_length < 16:
            raise ValueError("max_new_tokens must be >= 1 and max_prompt_length >= 16.")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True cannot apply: the pairs are generated during training. Set it to False."
            )
