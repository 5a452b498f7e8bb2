"""The trainer's sampler: k responses per prompt from the current policy.

With transformers `generate` (TRL's `unwrap_model_for_generation` handles DDP/DeepSpeed/FSDP; the generation itself
is the package's one helper, `trl_longreward.generation.sample_responses`), or with TRL's `VLLMGeneration`
(`use_vllm=True`, `vllm_mode` colocate or server), to which the policy's weights are pushed once per optimizer step
(`sync_vllm_weights`: TRL's sync, or vLLM's own in-place reload where TRL's cannot load into the backend).
"""

from __future__ import annotations

from typing import Any

from trl.models.utils import unwrap_model_for_generation

from ..generation import sample_responses
from ..models import truncate_at_eos


class PolicySampler:
    """Samples `args.num_generations` responses per prompt row (`prompt_ids`) from the policy.

    Each response is `{"completion_ids": [...], "text": ...}`, the ids up to and including the first EOS.
    `vllm_generation` is TRL's `VLLMGeneration` when `args.use_vllm`, else None.
    """

    def __init__(self, args: Any, *, model: Any, accelerator: Any, processing_class: Any, tokenizer: Any) -> None:
        self.args = args
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        if args.use_vllm and args.vllm_mode == "server":
            check_server_mode_weight_transfer()
        self.vllm_generation = (
            build_vllm_generation(args, model=model, accelerator=accelerator, processing_class=processing_class)
            if args.use_vllm
            else None
        )
        self._synced_step: int | None = None

    def sample(
        self, model_wrapped: Any, rows: list[dict[str, Any]], *, global_step: int
    ) -> list[list[dict[str, Any]]]:
        if self.vllm_generation is not None:
            return self._vllm_samples(model_wrapped, rows, global_step=global_step)
        args = self.args
        with unwrap_model_for_generation(
            model_wrapped, self.accelerator, gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
        ) as model:
            return sample_responses(
                model,
                self.tokenizer,
                [r["prompt_ids"] for r in rows],
                num_generations=args.num_generations,
                max_completion_length=args.max_completion_length,
                temperature=args.temperature,
                top_p=args.top_p,
                batch_size=args.generation_micro_batch_size,
                device=self.accelerator.device,
                shared_prefill=args.shared_prefill,
            )

    def _vllm_samples(self, model_wrapped: Any, rows: list[dict[str, Any]], *, global_step: int):
        """Prompts are passed repeated k times consecutively, as `VLLMGeneration.generate` expects; the weights are
        pushed before the first generation after each optimizer step."""
        k = self.args.num_generations
        if self._synced_step != global_step:
            sync_vllm_weights(self.vllm_generation)
            self._synced_step = global_step
        prompts = [row["prompt_ids"] for row in rows for _ in range(k)]
        _, completion_ids, _, _ = self.vllm_generation.generate(prompts=prompts, images=None, num_generations=k)
        if len(completion_ids) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(completion_ids)} completions for {len(prompts)} requested.")
        model = self.accelerator.unwrap_model(model_wrapped)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        out = []
        for i in range(len(rows)):
            per_prompt = []
            for ids in completion_ids[i * k : (i + 1) * k]:
                ids = truncate_at_eos(list(ids), eos_ids)
                per_prompt.append(
                    {"completion_ids": ids, "text": self.tokenizer.decode(ids, skip_special_tokens=True)}
                )
            out.append(per_prompt)
        return out


def sync_vllm_weights(vllm_generation: Any) -> str:
    """Push the policy's current weights into vLLM; returns how ("trl" or "reload").

    TRL's colocate sync loads each tensor with the model's `load_weights`, through each parameter's `weight_loader`.
    vLLM's CPU backend repacks linear weights into its kernels' layout after loading, and the repacked parameters have
    no `weight_loader` any more, so that sync fails there (`'Parameter' object has no attribute 'weight_loader'`).
    On that backend the weights go through vLLM's own in-place reload instead (`model_runner.reload_weights`, which
    restores the checkpoint layout, loads every tensor and repacks again), fed by TRL's own parameter walk
    (`VLLMGeneration._iter_named_params`: the DeepSpeed/FSDP gathers, and with PEFT the adapters merged into the base
    weights and unmerged after), so what vLLM receives is exactly what TRL would push. Server mode and colocate on
    other backends keep TRL's sync.
    """
    if vllm_generation.mode != "colocate" or not _vllm_repacks_weights():
        vllm_generation.sync_weights()
        return "trl"
    if getattr(vllm_generation, "enable_sleep_mode", False):
        raise ValueError(
            "vllm_enable_sleep_mode=True is not supported on vLLM's CPU backend (its weights are reloaded in place "
            "each step): set vllm_enable_sleep_mode=False."
        )
    llm = vllm_generation.llm
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=vllm_generation._iter_named_params(), is_checkpoint_format=True)
    llm.reset_prefix_cache()
    return "reload"


def check_server_mode_weight_transfer() -> None:
    """TRL's server mode pushes the policy's weights to the vLLM server over NCCL (`VLLMClient.init_communicator`), which
    needs CUDA GPUs on both sides: refuse it up front on a machine without one, instead of failing inside the first
    weight transfer."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            "use_vllm=True with vllm_mode='server' needs CUDA GPUs: TRL sends the policy's weights to the vLLM server "
            "over NCCL after every optimizer step, and this machine has no CUDA device. Use vllm_mode='colocate' "
            "(in-process vLLM, also on the CPU build), or use_vllm=False."
        )


def _vllm_repacks_weights() -> bool:
    """Whether vLLM runs on its CPU backend, whose linear layers repack their weights after loading."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def build_vllm_generation(args: Any, *, model: Any, accelerator: Any, processing_class: Any) -> Any:
    """TRL's `VLLMGeneration` with the config's `vllm_*` settings (GRPO's names)."""
    import vllm
    from trl.generation.vllm_generation import VLLMGeneration

    from ..vllm_support import check_vllm_version

    check_vllm_version(vllm)

    return VLLMGeneration(
        model=model,
        accelerator=accelerator,
        processing_class=processing_class,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        group_port=args.vllm_group_port,
        server_timeout=args.vllm_server_timeout,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.num_generations * args.vllm_tensor_parallel_size,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        max_completion_length=args.max_completion_length,
        logprobs=0,
    )
