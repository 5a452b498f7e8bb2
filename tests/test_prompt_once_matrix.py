"""Prompt-once against TRL's two rows, family by family: every family prompt-once runs packed (`VERIFIED_FAMILIES`),
crossed with the attention implementations and training options, gives TRL's loss, DPO metrics and gradients; every
setting it does not reproduce falls back to TRL's two rows with a warning naming the reason.

Prompts (18-61 tokens) are longer than the sliding windows (16 tokens), so a window the packed row did not apply
would show (`test_an_ignored_window_is_caught` checks that it does). flex_attention has no backward on CPU (torch:
"FlexAttention does not support backward on CPU"): there its cells compare loss and metrics only, under `no_grad`, and
take a compile per shape (marked slow); on CUDA they compare gradients too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_prompt_once import METRICS, _loss_metrics_grads, _pairs, _trainer
from tiny_models import tiny_causal_lm
from transformers import AutoConfig, AutoModelForCausalLM

from trl_longreward import LongContextDPOConfig, LongContextDPOTrainer
from trl_longreward.trainer import prompt_once
from trl_longreward.trainer.prompt_once import (
    CHUNKED,
    FULL,
    SLIDING,
    VERIFIED_FAMILIES,
    AttentionPattern,
    PackedPairs,
    attention_layout,
    pack_pairs,
    unsupported_reason,
)

WINDOW = 16
HYBRID = ["sliding_attention", "full_attention"]
EXPERTS = {"num_experts_per_tok": 2, "router_jitter_noise": 0.0}
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Case:
    """A family configuration: its tiny config, DPO options, and the fallback reason expected (None: runs packed)."""

    name: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None  # a part of the reason the trainer must warn with
    attention: tuple[str, ...] = ATTENTION


CASES = [
    Case("llama", "llama"),
    Case(
        "llama-dynamic-rope",
        "llama",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32},
    ),
    Case("gemma", "gemma"),
    Case("olmo2", "olmo2"),
    Case("cohere", "cohere"),
    Case("glm", "glm", {"partial_rotary_factor": 0.5}),
    Case("glm4", "glm4", {"partial_rotary_factor": 0.5}),
    Case("qwen2", "qwen2"),
    Case("qwen2-sliding", "qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0}),
    Case(  # layers 1 and 2 slide, layer 0 does not
        "qwen2-max-window-layers",
        "qwen2",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "num_hidden_layers": 3},
    ),
    Case("qwen3", "qwen3"),
    Case(
        "qwen3-max-window-layers",
        "qwen3",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    Case(  # config asks for router logits, the DPO loss does not use them
        "qwen3-moe-sliding-no-aux-loss",
        "qwen3_moe",
        {
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "output_router_logits": True,
            **EXPERTS,
        },
        {"router_aux_loss_coef": 0.0},
    ),
    Case("mistral-sliding", "mistral", {"sliding_window": WINDOW}),
    Case(
        "mixtral-sliding-no-aux-loss",
        "mixtral",
        {"num_local_experts": 4, "sliding_window": WINDOW, **EXPERTS},
        {"router_aux_loss_coef": 0.0},
    ),
    Case("phi3-sliding", "phi3", {"sliding_window": WINDOW}),
    Case(
        "phi3-longrope",
        "phi3",
        {
            "original_max_position_embeddings": 64,  # the batch (73 tokens) takes the long factors
            "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
        },
    ),
    # Gemma-2 has no SDPA support in transformers (it raises at load time)
    Case(
        "gemma2-hybrid",
        "gemma2",
        {"sliding_window": WINDOW, "layer_types": HYBRID, "query_pre_attn_scalar": 16},
        attention=("eager",),
    ),
    Case(
        "gemma3-hybrid", "gemma3_text", {"sliding_window": WINDOW, "layer_types": HYBRID, "query_pre_attn_scalar": 16}
    ),
    Case("cohere2-hybrid", "cohere2", {"sliding_window": WINDOW, "layer_types": HYBRID}),
    Case("olmo3-hybrid", "olmo3", {"sliding_window": WINDOW, "layer_types": HYBRID}),
    Case("ministral-hybrid", "ministral", {"sliding_window": WINDOW, "layer_types": HYBRID}),
    Case(
        "smollm3-sliding-nope",
        "smollm3",
        {"use_sliding_window": True, "sliding_window": WINDOW, "no_rope_layers": [1, 0]},
    ),
    # settings prompt-once does not reproduce: TRL's two rows, with the reason (the attention implementation is moot)
    Case(
        "qwen3-moe-aux-loss",
        "qwen3_moe",
        {"num_experts": 4, "moe_intermediate_size": 32, **EXPERTS},
        fallback="router load-balancing loss (router_aux_loss_coef=0.001)",
        attention=("sdpa",),
    ),
    Case(
        "mixtral-aux-loss",
        "mixtral",
        {"num_local_experts": 4, "sliding_window": WINDOW, **EXPERTS},
        fallback="router load-balancing loss",
        attention=("sdpa",),
    ),
    Case("gpt-neox", "gpt_neox", fallback="model type 'gpt_neox' is not among", attention=("sdpa",)),
    Case(
        "llama-with-sliding-window",
        "llama",
        {"sliding_window": WINDOW},
        fallback="sliding_window=16 is set but llama",
        attention=("sdpa",),
    ),
    Case(
        "llama-with-chunks",
        "llama",
        {"attention_chunk_size": WINDOW},
        fallback="attention_chunk_size=16 is set",
        attention=("sdpa",),
    ),
    Case(
        "gemma3-bidirectional",
        "gemma3_text",
        {
            "sliding_window": WINDOW,
            "layer_types": HYBRID,
            "query_pre_attn_scalar": 16,
            "use_bidirectional_attention": True,
        },
        fallback="bidirectional attention",
        attention=("sdpa",),
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}
CELLS = [pytest.param(case, attn, id=f"{case.name}-{attn}") for case in CASES for attn in case.attention]

#: the largest differences seen in the exact cells (|loss|, |metric|, |gradient|), reported by the last test
MAX_DIFF = {"loss": 0.0, "metrics": 0.0, "grad": 0.0}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The tiny model of a case, built once per module."""
    built: dict[str, str] = {}

    def model_path(case: Case) -> str:
        if case.name not in built:
            path = tmp_path_factory.mktemp(case.name) / "model"
            built[case.name] = tiny_causal_lm(path, case.model_type, seed=1, **case.config)
        return built[case.name]

    return model_path


def _perturb(model: torch.nn.Module, only: str | None = None, scale: float = 0.02) -> None:
    """Move the policy away from its reference, so that the DPO loss and its gradient are not degenerate."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only is None or only in name:
                param.add_(torch.randn_like(param) * scale)


@contextlib.contextmanager
def _rows_seen(trainer) -> Iterator[list[int]]:
    """The batch size each model forward gets, after the packing hook rewrote it (6 two-row rows or 3 packed)."""
    seen: list[int] = []
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    originals = [model.forward for model in models]

    def spy(original):
        def forward(*args, **kwargs):
            seen.append(kwargs["input_ids"].shape[0])
            return original(*args, **kwargs)

        return forward

    for model, original in zip(models, originals, strict=True):
        model.forward = spy(original)
    try:
        yield seen
    finally:
        for model, original in zip(models, originals, strict=True):
            model.forward = original


def _loss_metrics(trainer, batch, prompt_once: bool):
    trainer.args.prompt_once = prompt_once
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, dict(batch), return_outputs=False)
    return loss, {name: trainer._metrics["train"][name][-1] for name in METRICS}, {}


def _check(trainer, case: Case, caplog, *, grads: bool = True) -> None:
    """TRL's two rows, then prompt-once: equal loss, metrics and gradients; packed rows, or the expected fallback."""
    pairs = _pairs(trainer.model.config.vocab_size)
    batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.preference_collator(pairs).items()}
    run = _loss_metrics_grads if grads else _loss_metrics
    loss_a, metrics_a, grads_a = run(trainer, batch, prompt_once=False)
    with caplog.at_level(logging.WARNING, logger="trl_longreward.trainer.trainer"), _rows_seen(trainer) as seen:
        loss_b, metrics_b, grads_b = run(trainer, batch, prompt_once=True)
    if case.fallback is None:
        assert seen == [3, 3], seen  # policy and reference: one row per pair
        assert not trainer._prompt_once_warned
    else:
        assert seen == [6, 6], seen  # TRL's two rows
        assert "two-row" in caplog.text and case.fallback in caplog.text, caplog.text
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5)
    for name in METRICS:
        assert metrics_b[name] == pytest.approx(metrics_a[name], rel=1e-5, abs=1e-5), name
    assert grads_a.keys() == grads_b.keys() and (grads_a or not grads)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert metrics_a["logps/chosen"] < 0 and metrics_a["logps/rejected"] < 0
    if case.fallback is None:
        MAX_DIFF["loss"] = max(MAX_DIFF["loss"], abs(loss_a.item() - loss_b.item()))
        MAX_DIFF["metrics"] = max(MAX_DIFF["metrics"], *(abs(metrics_a[m] - metrics_b[m]) for m in METRICS))
        for name, grad in grads_a.items():
            MAX_DIFF["grad"] = max(MAX_DIFF["grad"], float((grads_b[name] - grad).abs().max()))


@pytest.mark.parametrize(("case", "attn"), CELLS)
def test_family_matrix(case: Case, attn: str, build, tmp_path, caplog):
    trainer = _trainer(build(case), tmp_path, attn=attn, **case.dpo)
    assert trainer.ref_model is not None  # a separate reference model
    _perturb(trainer.model)
    _check(trainer, case, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["gemma3-hybrid", "mistral-sliding"])
def test_flex_attention(case_name: str, build, tmp_path, caplog):
    """flex_attention's BlockMasks: loss and metrics on CPU (it has no backward there), gradients too on CUDA."""
    case = CASES_BY_NAME[case_name]
    cuda = torch.cuda.is_available()
    trainer = _trainer(build(case), tmp_path, attn="flex_attention", use_cpu=not cuda)
    _perturb(trainer.model)
    torch._dynamo.reset()
    # torch.compile's dynamic-shape recompile of flex attention fails to build on CPU (inductor C++ codegen error)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        _check(trainer, case, caplog, grads=cuda)


OPTION_CASES = ["mistral-sliding", "gemma3-hybrid", "qwen2-max-window-layers"]


@pytest.mark.parametrize("case_name", OPTION_CASES)
def test_gradient_checkpointing(case_name: str, build, tmp_path, caplog):
    case = CASES_BY_NAME[case_name]
    trainer = _trainer(build(case), tmp_path, gradient_checkpointing=True)
    # Trainer turns it on in train(), which this test does not run
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _perturb(trainer.model)
    _check(trainer, case, caplog)


@pytest.mark.parametrize("case_name", OPTION_CASES)
def test_lora_reference_by_disabled_adapters(case_name: str, build, tmp_path, caplog):
    case = CASES_BY_NAME[case_name]
    trainer = _trainer(build(case), tmp_path, peft=True)
    assert trainer.ref_model is None
    _perturb(trainer.model, only="lora_B", scale=0.05)
    _check(trainer, case, caplog)


@pytest.mark.parametrize("case_name", ["mistral-sliding", "gemma3-hybrid"])
def test_lora_reference_adapter(case_name: str, build, tmp_path, caplog):
    """A PEFT model with a trained adapter: TRL copies it to a "ref" adapter, the reference of the DPO loss."""
    case = CASES_BY_NAME[case_name]
    base = AutoModelForCausalLM.from_pretrained(build(case), attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _perturb(model, only="lora_B", scale=0.05)  # a trained adapter
    args = LongContextDPOConfig(
        output_dir=str(tmp_path / "out"), report_to="none", bf16=False, use_cpu=True, per_device_train_batch_size=3
    )
    trainer = LongContextDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"context": "A document.", "question": "What?"}]),
        reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
    )
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    _perturb(trainer.model, only="lora_B.default", scale=0.05)  # training moved the policy's adapter
    _check(trainer, case, caplog)


@pytest.mark.parametrize("case_name", ["mistral-sliding", "gemma3-hybrid", "qwen2-max-window-layers"])
def test_an_ignored_window_is_caught(case_name: str, build, tmp_path, caplog, monkeypatch):
    """With the windows left out of the packed masks, the same check fails: the matrix detects a window not applied."""
    layout = prompt_once.attention_layout

    def without_windows(model):
        found, reason = layout(model)
        return ({key: AttentionPattern() for key in found} if found else found), reason

    monkeypatch.setattr(prompt_once, "attention_layout", without_windows)
    trainer = _trainer(build(CASES_BY_NAME[case_name]), tmp_path)
    _perturb(trainer.model)
    with pytest.raises(AssertionError):
        _check(trainer, CASES_BY_NAME[case_name], caplog)


def test_every_verified_family_is_in_the_matrix():
    exact = {case.model_type for case in CASES if case.fallback is None}
    assert set(VERIFIED_FAMILIES) <= exact, sorted(set(VERIFIED_FAMILIES) - exact)


class _Model(torch.nn.Module):
    """A stand-in with a config, for layout decisions that need no weights."""

    def __init__(self, model_type: str, **config: Any) -> None:
        super().__init__()
        self.config = AutoConfig.for_model(model_type, num_hidden_layers=2, **config)
        self.config._attn_implementation = "sdpa"


@pytest.mark.parametrize(
    ("model_type", "config", "expected"),
    [
        ("llama", {}, {None: AttentionPattern()}),
        ("mistral", {"sliding_window": 7}, {None: AttentionPattern(SLIDING, 7)}),
        ("mistral", {"sliding_window": None}, {None: AttentionPattern()}),
        ("qwen2", {"use_sliding_window": False, "sliding_window": 7}, {FULL: AttentionPattern()}),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1},
            {FULL: AttentionPattern(), SLIDING: AttentionPattern(SLIDING, 7)},
        ),
        (
            "gemma3_text",
            {"sliding_window": 5, "layer_types": ["sliding_attention"] * 2},
            {SLIDING: AttentionPattern(SLIDING, 5)},
        ),
    ],
)
def test_attention_layout(model_type, config, expected):
    assert attention_layout(_Model(model_type, **config)) == (expected, None)


@pytest.mark.parametrize(
    ("model_type", "config", "reason"),
    [
        ("qwen2", {"layer_types": ["full_attention", "linear_attention"]}, "layer types ['linear_attention']"),
        ("gemma2", {"layer_types": HYBRID, "sliding_window": None}, "layer types ['sliding_attention']"),
        ("mistral", {"layer_types": HYBRID, "sliding_window": 8}, "differ from the attention its forward applies"),
        ("mistral", {"sliding_window": 0}, "sliding_window=0 is not a positive number"),
        ("qwen3_moe", {"attention_chunk_size": 8}, "attention_chunk_size=8 is set"),
        ("llama4_text", {}, "'llama4_text' is not among"),
        ("gpt_oss", {}, "'gpt_oss' is not among"),
        ("qwen3_next", {}, "'qwen3_next' is not among"),
    ],
)
def test_attention_settings_not_reproduced_are_refused(model_type, config, reason):
    model = _Model(model_type, **config)
    if "layer_types" in config:  # some configs validate layer_types against their own rules: set it afterwards
        model.config.layer_types = config["layer_types"]
    assert attention_layout(model)[0] is None
    assert reason in unsupported_reason(
        model, {"input_ids": torch.zeros(2, 4), "attention_mask": torch.ones(2, 4)}, None
    )


def test_length_dependent_rope_falls_back_when_the_batch_has_extra_padding():
    model = _Model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    tight = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
    }
    assert unsupported_reason(model, tight, None) is None
    padded = {
        "input_ids": torch.zeros(2, 8, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 5 + [0] * 3] * 2),
    }
    assert "rope_type 'dynamic' depends on the padded length" in unsupported_reason(model, padded, None)
    model.config.rope_parameters = {"rope_type": "my_rope"}
    assert "rope_type 'my_rope' is not verified" in unsupported_reason(model, tight, None)


def _two_row_mask(mask_function, row: torch.Tensor) -> torch.Tensor:
    """transformers' own mask for one right-padded two-row row, from its mask function."""
    length = row.shape[0]
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return mask_function(torch.zeros((), dtype=torch.long), None, q, k) & row.bool()[None, :]


@pytest.mark.parametrize(
    "pattern",
    [AttentionPattern(), AttentionPattern(SLIDING, 1), AttentionPattern(SLIDING, 3), AttentionPattern(CHUNKED, 3)],
)
def test_packed_mask_is_each_rows_mask(pattern: AttentionPattern):
    """Every branch token sees in the packed row exactly the keys its two-row row shows it, by transformers' masks."""
    from transformers.masking_utils import (
        causal_mask_function,
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    mask_function = {
        FULL: causal_mask_function,
        SLIDING: sliding_window_causal_mask_function(pattern.size or 1),
        CHUNKED: chunked_causal_mask_function(pattern.size or 1, torch.zeros(1, dtype=torch.long)),
    }[pattern.kind]
    prompt, chosen, rejected = [11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34]
    input_ids = torch.tensor([prompt + chosen + [0, 0], prompt + rejected])
    attention = torch.tensor([[1] * 7 + [0] * 2, [1] * 9])
    completion = torch.tensor([[0] * 5 + [1] * 2 + [0] * 2, [0] * 5 + [1] * 4])
    packed: PackedPairs = pack_pairs(input_ids, attention, completion, 0, pad_to_multiple_of=16, attention="dense")
    allowed = packed.mask_for("sdpa", torch.float32, pattern)[0, 0]
    chosen_mask = _two_row_mask(mask_function, attention[0])
    rejected_mask = _two_row_mask(mask_function, attention[1])
    # packed index of two-row token t: chosen row t -> t; rejected row t >= 4 -> t + len(chosen) + 1, body t < 4 -> t
    to_packed = [list(range(7)), [t if t < 4 else t + 3 for t in range(9)]]
    for row, two_row in ((0, chosen_mask), (1, rejected_mask)):
        cols = to_packed[row]
        for q in range(4, 7 if row == 0 else 9):  # branch queries
            expected = torch.zeros(packed.length, dtype=torch.bool)
            expected[[cols[k] for k in range(len(cols)) if two_row[q, k]]] = True
            assert torch.equal(allowed[cols[q]], expected), (row, q)
    eager = packed.mask_for("eager", torch.float32, pattern)[0, 0]
    assert torch.equal(eager == 0, allowed)


def test_report_largest_differences():
    """Runs last in this module: the largest differences of the exact cells above (printed with -s)."""
    print(f"\nprompt-once matrix, largest |differences| of the exact cells: {MAX_DIFF}")
