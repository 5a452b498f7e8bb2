"""Prompt-once DPO: one packed row per pair gives TRL's two-row log-probs, loss, metrics and gradients."""

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny_models import tiny_llama

from trl_longreward import LongContextDPOConfig, LongContextDPOTrainer
from trl_longreward.trainer.prompt_once import pack_pairs

METRICS = (
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, seed=3)


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


def _trainer(model_path, tmp_path, *, attn="sdpa", peft=False, **config):
    config.setdefault("use_cpu", True)
    args = LongContextDPOConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        bf16=False,
        per_device_train_batch_size=3,
        model_init_kwargs={"attn_implementation": attn, "dtype": torch.float32},
        **config,
    )
    dataset = Dataset.from_list([{"context": "A document.", "question": "What?"}])
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]) if peft else None
    return LongContextDPOTrainer(
        model=model_path, args=args, train_dataset=dataset, reward_funcs=[constant_reward], peft_config=peft_config
    )


def _pairs(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pairs with different prompt lengths and chosen/rejected lengths (so every row is padded differently)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    return [
        {"prompt_ids": ids(37), "chosen_ids": ids(9), "rejected_ids": ids(14)},
        {"prompt_ids": ids(61), "chosen_ids": ids(12), "rejected_ids": ids(3)},
        {"prompt_ids": ids(18), "chosen_ids": ids(1), "rejected_ids": ids(7)},
    ]


def _loss_metrics_grads(trainer, batch, prompt_once: bool):
    trainer.args.prompt_once = prompt_once
    trainer._metrics["train"].clear()
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, dict(batch), return_outputs=False)
    loss.backward()
    metrics = {name: trainer._metrics["train"][name][-1] for name in METRICS}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads


def _assert_equivalent(trainer, pairs=None):
    pairs = pairs or _pairs(trainer.model.config.vocab_size)
    batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.preference_collator(pairs).items()}
    loss_a, metrics_a, grads_a = _loss_metrics_grads(trainer, batch, prompt_once=False)
    loss_b, metrics_b, grads_b = _loss_metrics_grads(trainer, batch, prompt_once=True)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5)
    for name in METRICS:
        assert metrics_b[name] == pytest.approx(metrics_a[name], rel=1e-5, abs=1e-5), name
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the rewards are not trivially equal: the policy differs from its reference only through training, so check
    # the log-probs themselves are real numbers of completion tokens
    assert metrics_a["logps/chosen"] < 0 and metrics_a["logps/rejected"] < 0
    return loss_a


def test_pack_pairs_layout():
    prompt, chosen, rejected = [11, 12, 13, 14], [21, 22], [31, 32, 33]
    pad = 0
    input_ids = torch.tensor([prompt + chosen + [pad], prompt + rejected])
    attention = torch.tensor([[1] * 6 + [0], [1] * 7])
    completion = torch.tensor([[0] * 4 + [1] * 2 + [0], [0] * 4 + [1] * 3])
    packed = pack_pairs(input_ids, attention, completion, pad, attention="dense")
    assert packed.input_ids.tolist() == [[11, 12, 13, 14, 21, 22, 14, 31, 32, 33]]
    assert packed.spans == [(3, 3, 4)]  # body (prompt - 1), chosen + 1, rejected + 1
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 5, 6]]
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2]]
    padded = pack_pairs(input_ids, attention, completion, pad, pad_to_multiple_of=8, attention="dense")
    assert padded.segments.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2] + [-1] * 6]
    assert padded.mask_for("sdpa", torch.float32)[0, 0, 10:].sum().item() == 6  # padding sees itself only
    allowed = packed.mask_for("sdpa", torch.float32)[0, 0]
    assert allowed[7, :3].all() and allowed[7, 6:8].all()  # rejected token sees the body and its branch
    assert not allowed[7, 3:6].any()  # ... never the chosen branch
    assert not allowed[4, 6:].any() and allowed[4, :5].all()
    labels = input_ids.masked_fill(completion == 0, -100)
    assert packed.pack_labels(labels).tolist() == [[-100, -100, -100, -100, 21, 22, -100, 31, 32, 33]]
    # mismatched prompts, or a pair with an empty completion, are not packed
    other = input_ids.clone()
    other[1, 0] = 99
    assert pack_pairs(other, attention, completion, pad) is None
    assert pack_pairs(input_ids, attention, torch.zeros_like(completion), pad) is None


def test_equal_to_two_row_dpo_with_a_reference_model(model_path, tmp_path):
    trainer = _trainer(model_path, tmp_path)
    assert trainer.ref_model is not None
    # make the policy differ from the reference so that the DPO term has a gradient
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    _assert_equivalent(trainer)


def test_equal_with_eager_attention_and_length_desensitization(model_path, tmp_path):
    trainer = _trainer(
        model_path,
        tmp_path,
        attn="eager",
        ld_alpha=0.5,
        loss_type=["sigmoid", "sft", "ipo"],
        loss_weights=[1.0, 0.1, 0.5],
    )
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    _assert_equivalent(trainer)


def test_equal_with_lora_reference_by_disabled_adapters(model_path, tmp_path):
    trainer = _trainer(model_path, tmp_path, peft=True)
    assert trainer.ref_model is None
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    _assert_equivalent(trainer)


def test_falls_back_to_two_rows_with_a_warning(model_path, tmp_path, caplog):
    trainer = _trainer(model_path, tmp_path)
    vocab = trainer.model.config.vocab_size
    pairs = _pairs(vocab)
    batch = trainer.preference_collator(pairs)
    batch["input_ids"][3, 0] += 1  # the rejected row of pair 0 no longer shares the prompt: cannot pack
    calls = []
    handle = trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    with caplog.at_level(logging.WARNING):
        trainer._compute_loss(trainer.model, dict(batch), return_outputs=False)
    handle.remove()
    assert calls == [6]  # TRL's two rows, not 3 packed rows
    assert "two-row" in caplog.text and "share the same prompt" in caplog.text


def test_packed_forward_processes_fewer_tokens(model_path, tmp_path):
    trainer = _trainer(model_path, tmp_path)
    pairs = _pairs(trainer.model.config.vocab_size)
    batch = trainer.preference_collator(pairs)
    shapes = []
    # the models' forward runs after the packing hook rewrote the batch
    trainer.args.prompt_once = True
    models = [trainer.model, trainer.ref_model]
    originals = [m.forward for m in models]

    def spy(original):
        def forward(*args, **kwargs):
            shapes.append(tuple(kwargs["input_ids"].shape))
            return original(*args, **kwargs)

        return forward

    for model, original in zip(models, originals, strict=True):
        model.forward = spy(original)
    try:
        trainer._compute_loss(trainer.model, dict(batch), return_outputs=False)
    finally:
        for model, original in zip(models, originals, strict=True):
            model.forward = original
    longest = max(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) + 1 for p in pairs)
    assert shapes == [(3, longest), (3, longest)]  # policy and reference: one row per pair
    two_row_tokens = batch["input_ids"].numel()
    assert 3 * longest < two_row_tokens
