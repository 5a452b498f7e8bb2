"""`LongContextDPOConfig`: TRL's `DPOConfig` with the paper's defaults and the online-sampling options, named as in
TRL's `GRPOConfig` where GRPO has the same option."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import DPOConfig

from ..pairs import check_sampling_options

#: The share of `ddp_timeout` one HTTP judge call's worst-case wait may take in a distributed job; the rest is left
#: for generation and the training step (`LongContextDPOConfig.check_judge_wait_fits`).
JUDGE_WAIT_SHARE = 0.8


@dataclass
class LongContextDPOConfig(DPOConfig):
    r"""
    Configuration class for [`LongContextDPOTrainer`]. All `trl.DPOConfig` fields apply; the defaults below follow
    the paper (arXiv 2410.21252, docs/method.md section 4).

    Parameters:
        > Parameters whose default values are overridden from DPOConfig

        beta (`float`, *optional*, defaults to `0.15`):
            DPO beta (paper: 0.15).
        learning_rate (`float`, *optional*, defaults to `1e-6`):
            Learning rate (paper: 1e-6).
        loss_type (`list[str]`, *optional*, defaults to `["sigmoid", "sft"]`) and loss_weights (`list[float]`,
            *optional*, defaults to `[1.0, 0.1]`):
            DPO + 0.1 x NLL of the chosen response, the paper's loss.
        max_length (`int` or `None`, *optional*, defaults to `None`):
            Cap on prompt+response tokens; `None`: prompts are fitted by `max_prompt_length` instead.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Keep dataset columns: the reward needs the context and the question.
        activation_checkpointing (`bool`, *optional*, defaults to `True`):
            TRL's default (set through transformers' current name; `gradient_checkpointing`, its deprecated alias,
            is honoured when given).
        ddp_timeout (`int`, *optional*, defaults to `3600`):
            Seconds a collective waits for the other ranks before the NCCL/gloo watchdog kills the job (transformers:
            1800). A rank judging its samples keeps the others waiting: the default leaves room for the default
            HTTP judge's worst-case wait for one call (2400 s with openai 3.x, see `check_judge_wait_fits`).

        > Parameters that control the generation (as in GRPOConfig)

        num_generations (`int`, *optional*, defaults to `4`):
            Responses sampled per prompt from the current policy (k; the paper used 10). Must be >= 2.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature (paper: 1.0). Must be > 0.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling top_p.
        max_completion_length (`int`, *optional*, defaults to `256`):
            Maximum tokens of each sampled response.
        max_prompt_length (`int`, *optional*, defaults to `2048`):
            Token budget of the policy's prompt; longer documents are cut in the MIDDLE (head and tail kept, never the
            question). The judge always reads the full document.
        chat_template_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments of the policy's chat template when prompts are tokenized (as `GRPOConfig`'s), e.g.
            `{"enable_thinking": False}` for Qwen3. The judge's are `long_reward`'s `judge_chat_template_kwargs`.
        generation_micro_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Prompts per transformers `generate` call (each with its k samples); `None`: the whole per-device batch.
            (GRPO's `generation_batch_size` counts completions per generation round, a different thing, hence the
            different name.)
        shared_prefill (`bool`, *optional*, defaults to `True`):
            The k samples of a prompt share one prefill of the long prompt (its KV cache repeated k times) instead of
            k prefills (`generate(num_return_sequences=k)`).

        > Parameters that control generation with vLLM (GRPOConfig's names and meanings)

        use_vllm (`bool`, *optional*, defaults to `False`):
            Sample with vLLM through `trl.generation.VLLMGeneration` instead of transformers `generate`. Needs
            `pip install "trl-longreward[vllm]"`.
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: a vLLM engine inside each training process, sharing its GPU; `"server"`: a `trl vllm-serve`
            server on other GPUs, the policy's weights pushed after every optimizer step.
        vllm_server_base_url (`str` or `None`, *optional*, defaults to `None`):
            Base URL of the vLLM server (server mode); overrides `vllm_server_host` and `vllm_server_port`.
        vllm_server_host (`str`, *optional*, defaults to `"0.0.0.0"`) and vllm_server_port (`int`, *optional*,
            defaults to `8000`):
            Where the vLLM server listens (server mode).
        vllm_group_port (`int`, *optional*, defaults to `51216`):
            Port of the weight-update group (server mode).
        vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds to wait for the server to come up (server mode).
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`), vllm_tensor_parallel_size (`int`,
            *optional*, defaults to `1`), vllm_max_model_length (`int` or `None`, *optional*, defaults to `None`),
            vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            The colocated engine's settings.

        > Parameters that control the pairs

        num_iterations (`int`, *optional*, defaults to `1`):
            How often new pairs are generated: each batch of prompts is served `num_iterations` times in a row (TRL's
            `RepeatSampler`, as GRPO does) and the pairs generated and judged for it the first time are trained on
            every time. 1 = fresh pairs from the current policy every step.
        min_scored_samples (`int` or `None`, *optional*, defaults to `None`):
            Samples of a prompt that must be scored for a pair; `None` = half of `num_generations`, rounded up, at
            least 2 (the reference: 5 of 10).
        min_reward_gap (`float`, *optional*, defaults to `0.0`):
            Minimum chosen-rejected reward difference (the reference had none).
        tie_policy (`str`, *optional*, defaults to `"skip"`):
            When every scored sample has the same reward: `"skip"` (no pair) or `"first_last"`.

        > Parameters that control the reward

        long_reward (`dict`, `str` or `None`, *optional*, defaults to `None`):
            `LongRewardConfig` fields of the default reward, used when `reward_funcs` is not passed to the trainer
            (e.g. `{"judge_base_url": "http://127.0.0.1:8000/v1", "judge_model": "judge"}`); on the command line a
            JSON object string, parsed as TRL parses its dict-valued fields. Its `judge_max_concurrency` is the
            budget per judge server shared by all ranks. In a distributed job, the HTTP judge's worst-case wait for
            one call must fit in `ddp_timeout` (`check_judge_wait_fits`), else the config is refused.
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of several reward functions; `None`: equal.
        judge_cache_path (`str` or `None`, *optional*, defaults to `None`):
            Judge-call cache of the default reward; `None` = `<output_dir>/judge_cache.sqlite`, so a resumed run
            never pays for a judge call twice.

        > Parameters that control offline pairs

        offline_ratio (`float`, *optional*, defaults to `0.0`):
            Share of each batch's pairs taken from `offline_dataset` (prompt/chosen/rejected rows, e.g. ordinary
            short-context DPO data). 0 = online pairs only.

        > Parameters that control asynchronous judging

        async_judging (`bool`, *optional*, defaults to `False`):
            Judge the next step's samples while this step trains: at step t the policy samples the prompts of step
            t+1 with its current weights, a background thread judges them, and step t trains on the pairs of step t
            (judged while step t-1 trained). The pairs are then one step stale (`pairs/staleness`); with a remote
            judge the step takes about max(judging, training) instead of their sum. Off by default: serial steps.
        max_staleness (`int`, *optional*, defaults to `1`):
            With `async_judging`, how many optimizer steps ahead of training the judging runs: pairs are first trained
            on this many steps after the policy that sampled them. Only 1 is supported.

        > Parameters that control reliability

        max_judge_outage_steps (`int`, *optional*, defaults to `3`):
            When no prompt of any rank forms an online pair for this many consecutive optimizer steps, whatever the
            cause (the judge failed every call; samples unscored, e.g. by `max_missing_dimensions`; every prompt
            tied), the trainer saves a checkpoint of the last completed step and raises `JudgeUnavailableError`
            naming the cause, the endpoint and the resume command. A `num_iterations` repeat of a step without
            pairs counts too. 0: never stop.

        > Parameters that control the DPO forward

        prompt_once (`bool`, *optional*, defaults to `True`):
            Run each pair as ONE sequence [prompt, chosen, rejected] (branches masked from each other, positions
            restarting after the prompt) instead of TRL's two rows, for the policy and the reference: a long prompt
            is processed once per model, not twice. Same log-probs, loss and gradients. Needs an attention
            implementation that takes a custom mask (sdpa, eager, flex_attention); with flash-attention, MoE
            auxiliary loss, vision inputs or prompt-learning PEFT the step falls back to TRL's two rows (with a
            warning). The packed rows are padded to a multiple of `pad_to_multiple_of` (TRL's option, resolved as
            TRL resolves it: `"auto"` pads to 128 on Neuron and not at all elsewhere, CUDA included); set it, e.g.
            to 64, to pad them on GPUs.
        prompt_once_attention (`str`, *optional*, defaults to `"auto"`):
            How the packed row's attention is masked. `"auto"`: an sdpa model attends segment by segment (the body
            causally through SDPA's fused kernels, each branch against [prompt; branch] keys with a branch x prompt
            mask: memory linear in the prompt length); a flex_attention model gets a FlexAttention `BlockMask`
            (no L x L tensor either); an eager model, which computes L x L scores anyway, a dense mask.
            `"dense"`: one [B, 1, L, L] boolean mask for sdpa too (quadratic memory: 4 GiB at 64k tokens).
        sp_size (`int`, *optional*, defaults to `1`):
            Sequence parallelism (Ulysses; Accelerate's name for its size): groups of `sp_size` consecutive ranks
            train the same pairs, each rank holding 1/sp_size of every packed row; all-to-alls give each rank a
            share of the attention heads over the whole row. The ranks of a group exchange the pairs they sampled
            and judged (each prompt is generated and judged once), the loss and metrics count each pair once, and
            DDP / ZeRO / FSDP average over the groups. Needs prompt-once with sdpa attention, attention heads
            divisible by `sp_size`, and `world_size` divisible by it; see `trainer/sequence_parallel.py`.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["long_reward", "chat_template_kwargs"]

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of activation_checkpointing (on by default, as in TRL)."},
    )

    ddp_timeout: int = field(
        default=3600,
        metadata={
            "help": "Seconds a collective waits for the other ranks (transformers: 1800); must leave room for the "
            "HTTP judge's worst-case wait in a distributed job."
        },
    )
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
    num_generations: int = field(default=4, metadata={"help": "Responses sampled per prompt (k; paper: 10)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top_p."})
    max_completion_length: int = field(default=256, metadata={"help": "Max tokens per sampled response."})
    max_prompt_length: int = field(
        default=2048, metadata={"help": "Prompt token budget; longer documents are cut in the middle."}
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the policy's chat template (GRPOConfig's option), e.g. "
            "'{\"enable_thinking\": false}' for Qwen3; the judge's are long_reward.judge_chat_template_kwargs."
        },
    )
    use_vllm: bool = field(
        default=False,
        metadata={"help": "Sample with vLLM (trl.generation.VLLMGeneration) instead of transformers generate."},
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "vLLM mode: colocate (an engine in each training process) or server (a `trl vllm-serve` "
            "server on other GPUs)."
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
    generation_micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per transformers generate call (k samples each); default: the per-device batch."},
    )
    min_scored_samples: int | None = field(
        default=None, metadata={"help": "Scored samples needed for a pair; default ceil(num_generations / 2), >= 2."}
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
    long_reward: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "LongRewardConfig fields for the default reward (judge endpoint etc.); on the command line a JSON "
            'object, e.g. \'{"judge_base_url": "http://127.0.0.1:8000/v1", "judge_model": "judge"}\'.'
        },
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

    async_judging: bool = field(
        default=False,
        metadata={
            "help": "Judge step t+1's samples (drawn with the current weights) in the background while step t trains "
            "on the pairs judged during step t-1: pairs one step stale, steps of max(judging, training)."
        },
    )
    max_staleness: int = field(
        default=1,
        metadata={"help": "async_judging: optimizer steps between sampling a batch and training on it; only 1."},
    )

    max_judge_outage_steps: int = field(
        default=3,
        metadata={
            "help": "Stop (saving a checkpoint) when no prompt forms a pair (the judge failed, samples unscored or "
            "tied) for this many consecutive optimizer steps; 0: never stop."
        },
    )
    shared_prefill: bool = field(
        default=True,
        metadata={
            "help": "Prefill each prompt once for its num_generations samples (KV cache repeated per sample) instead of "
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

    prompt_once_attention: str = field(
        default="auto",
        metadata={
            "help": "How the packed row is masked: auto (sdpa: split attention without an L x L mask; flex_attention: "
            "a BlockMask; eager: a dense mask) or dense (an [B, 1, L, L] mask for sdpa too).",
            "choices": ["auto", "dense"],
        },
    )

    sp_size: int = field(
        default=1,
        metadata={
            "help": "Sequence parallelism: ranks per group that share each packed row (Ulysses all-to-all over the "
            "attention heads); 1 = off."
        },
    )

    def check_judge_wait_fits(self, world_size: int, judges: Iterable[Any] = ()) -> None:
        """Raise `ValueError` when one HTTP judge call can outlast the job's collective timeout.

        In a job of `world_size` > 1 processes, a rank whose judge stops answering waits up to

            W = n x ((1 + judge_max_retries) x judge_timeout + judge_max_retries x B)

        seconds for one call (n: the `judge_base_url` replicas, each tried once; B: the longest wait before a retry,
        120 s with openai 3.x, which honours a server's `Retry-After` up to that; see
        `trl_longreward.reward.scale_limits`), while the other ranks wait for it at their next collective. When that
        exceeds `ddp_timeout`, the NCCL/gloo watchdog kills the whole job: no checkpoint, and no judge-outage error
        (`max_judge_outage_steps` needs the step to end). W must fit in `JUDGE_WAIT_SHARE` (80%) of `ddp_timeout`;
        the rest is left for generation and the training step. With one process nothing waits on a collective, so
        nothing is checked.

        The bound covers one call in flight when the judge stops answering: the samples and the four dimensions are
        judged concurrently, and a pipeline stops at its first failed call, so a judge outage costs about one W. It
        does not cover calls queued behind `judge_max_concurrency` (a step with more calls than the rank's share of
        the slots fails them in waves, each up to W) nor a judge that answers just before each timeout (then the
        sequential calls of a sample add up: faithfulness 2, completeness up to 5, each re-sampled up to
        `max_attempts` times); size `ddp_timeout` for those yourself.

        Called at construction with `self.world_size` (the process group is up by then under `accelerate launch` or
        `torchrun`). The trainer may call it again with its accelerator's `num_processes`, and with the judges of the
        `reward_funcs` it was given (any object with a `worst_case_call_s()` method, e.g. an `OpenAIJudge`:
        `reward.judge` of a `LongRewardFunction`): `long_reward` only describes the default reward.
        """
        if world_size <= 1:
            return
        from ..reward.config import LongRewardConfig
        from ..reward.scale_limits import largest_timeout_that_fits, retry_wait_cap_s

        budget = JUDGE_WAIT_SHARE * self.ddp_timeout
        # (where, W, timeout, retries, endpoints, the option names of timeout and retries there)
        found: list[tuple[str, float, float, int, int, tuple[str, str]]] = []
        if self.long_reward is not None:
            config = LongRewardConfig(**self.long_reward)
            worst = config.judge_call_worst_case_s()
            if worst is not None:
                endpoints = max(len(config.judge_base_urls), 1)
                names = ("judge_timeout", "judge_max_retries")
                found.append(("long_reward", worst, config.judge_timeout, config.judge_max_retries, endpoints, names))
        for judge in judges:
            worst_case = getattr(judge, "worst_case_call_s", None)
            if callable(worst_case):
                endpoints = len(getattr(judge, "base_urls", None) or [None])
                where = f"the judge {getattr(judge, 'model_id', type(judge).__name__)!r}"
                found.append(
                    (where, worst_case(), judge.timeout, judge.max_retries, endpoints, ("timeout", "max_retries"))
                )
        for where, worst, timeout, retries, endpoints, (timeout_name, retries_name) in found:
            if worst <= budget:
                continue
            need = math.ceil(worst / JUDGE_WAIT_SHARE)
            replicas = f" on each of {endpoints} replicas" if endpoints > 1 else ""
            fits = largest_timeout_that_fits(budget, retries, endpoints)
            if fits is not None:
                lower = f"lower {timeout_name} to {fits:g} s or less (with {retries_name}={retries}) or {retries_name}"
            elif retries:
                lower = f"lower {retries_name} below {retries} and {timeout_name}"
            else:
                lower = f"lower {timeout_name}"
            waits = f", and up to {retry_wait_cap_s():.0f} s before each retry" if retries else ""
            raise ValueError(
                f"{where}: one judge call can keep a rank waiting up to {worst:.0f} s ({timeout_name}={timeout:g} s x "
                f"(1 + {retries_name}={retries}) requests{replicas}{waits}), more than {JUDGE_WAIT_SHARE:.0%} of "
                f"ddp_timeout={self.ddp_timeout} s. With {world_size} processes the other ranks' collectives would "
                "give up first: the NCCL/gloo watchdog would kill the job with no checkpoint and no judge-outage "
                f"error. Raise ddp_timeout to at least {need} s, or {lower}."
            )

    def __getstate__(self) -> dict[str, Any]:
        """A pickled config never holds the Hub token: transformers saves the config as `training_args.bin` beside
        the model and in checkpoints, and `push_to_hub` uploads that file with them."""
        return {**self.__dict__, "hub_token": None}

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16 and not self.use_cpu:
            from transformers.utils import is_torch_bf16_gpu_available

            if not is_torch_bf16_gpu_available():
                # TRL's default is bf16, which transformers refuses without a bf16 GPU: on such a machine (a laptop, a
                # CPU runner) the default is float32 instead, so the same script runs there. Set bf16 to choose.
                self.bf16 = False
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            # TRL's default (on), under transformers' current name: the deprecated alias would warn on every run
            self.activation_checkpointing = True
        super().__post_init__()  # parses a JSON string given for long_reward (TRL's dict fields)
        if not isinstance(self.sp_size, int) or self.sp_size < 1:
            raise ValueError(f"sp_size must be a positive integer, got {self.sp_size!r}.")
        parallelism = getattr(self, "parallelism_config", None)
        if parallelism is not None and max(parallelism.sp_size or 1, parallelism.cp_size or 1) > 1:
            raise ValueError(
                "parallelism_config's sp_size / cp_size are not supported by LongContextDPOTrainer (their attention "
                "wrappers drop the prompt-once mask): set LongContextDPOConfig.sp_size instead."
            )
        if self.prompt_once_attention not in ("auto", "dense"):
            raise ValueError(f"prompt_once_attention must be 'auto' or 'dense', got {self.prompt_once_attention!r}.")
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(
                f"chat_template_kwargs must be a mapping (a JSON object), got {self.chat_template_kwargs!r}."
            )
        if self.long_reward is not None:
            if not isinstance(self.long_reward, dict):
                raise ValueError(
                    f"long_reward must be a mapping of LongRewardConfig fields (a JSON object on the command line), "
                    f"got {self.long_reward!r}."
                )
            from ..reward.config import LongRewardConfig

            # A bad judge setting fails here, before any model loads.
            try:
                LongRewardConfig(**self.long_reward)
            except TypeError as err:
                raise ValueError(f"long_reward: {err} (the keys are LongRewardConfig fields).") from err
            except ValueError as err:
                raise ValueError(f"long_reward: {err}") from err
        # The process group is set up by now (TrainingArguments.__post_init__ asks for the device).
        self.check_judge_wait_fits(self.world_size)
        self.min_scored_samples = check_sampling_options(
            num_generations=self.num_generations,
            min_scored_samples=self.min_scored_samples,
            temperature=self.temperature,
            max_completion_length=self.max_completion_length,
            max_prompt_length=self.max_prompt_length,
            min_reward_gap=self.min_reward_gap,
            tie_policy=self.tie_policy,
        )
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode={self.vllm_mode!r}: use colocate or server.")
        if self.use_vllm:
            from trl.import_utils import is_vllm_available

            if not is_vllm_available():
                from ..vllm_support import VLLM_INSTALL_HINT

                raise ValueError(
                    f"use_vllm=True needs vLLM: {VLLM_INSTALL_HINT} (or leave use_vllm=False to sample with "
                    "transformers generate)."
                )
        if self.generation_micro_batch_size is not None and self.generation_micro_batch_size < 1:
            raise ValueError(
                f"generation_micro_batch_size={self.generation_micro_batch_size}: must be >= 1 (or None: the whole "
                "per-device batch)."
            )
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1 (1: new pairs every step), got {self.num_iterations}.")
        if self.max_staleness != 1:
            raise ValueError(
                f"max_staleness={self.max_staleness}: only 1 is supported (async_judging judges one step ahead)."
            )
        if self.async_judging and self.auto_find_batch_size:
            raise ValueError(
                "async_judging=True cannot be combined with auto_find_batch_size=True: a retry with a smaller batch "
                "would train on batches sampled and judged at the old size. Set the batch size yourself, or turn "
                "async_judging off."
            )
        if self.max_judge_outage_steps < 0:
            raise ValueError("max_judge_outage_steps must be >= 0 (0: never stop).")
        if not 0.0 <= self.offline_ratio < 1.0:
            raise ValueError(f"offline_ratio must be in [0, 1), got {self.offline_ratio}.")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True cannot apply: the pairs are generated during training. Set it to False."
            )
