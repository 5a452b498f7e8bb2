from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.masking_utils import chunked_overlay, sliding_window_overlay

logger = logging.getLogger(__name__)

#: attention implementations that take a custom mask; flash-attention kernels take only causal/varlen masks.
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")
_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
_BODY, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, -1
FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


@dataclass(frozen=True)
class AttentionPattern:
    """What one kind of layer lets a query see besides causality: every earlier key (`FULL`), the last `size`
    positions (`SLIDING`, transformers' `sliding_window_overlay`), or its chunk of `size` positions (`CHUNKED`)."""

    kind: str = FULL
    size: int | None = None

    def overlay(self, batch_size: int, device: torch.device) -> Callable | None:
        """transformers' own window function for this pattern, to be called on position ids (None: no window)."""
        if self.kind == SLIDING:
            return sliding_window_overlay(self.size)
        if self.kind == CHUNKED:  # TRL's rows are right-padded: chunks start at position 0
            return chunked_overlay(self.size, torch.zeros(batch_size, dtype=torch.long, device=device))
        return None


#: How a layout maps to `attention_mask`: None keys one mask for every layer; layer-type keys make a dict of masks.
AttentionLayout = dict[str | None, AttentionPattern]


@dataclass(frozen=True)
class Family:
    """How a model family builds its attention masks in transformers 5.23 (read from its `modeling_*.py`).

    `by_layer_type`: its forward takes a dict of masks keyed by `config.layer_types` (it checks
    `isinstance(attention_mask, dict)`) and indexes it with each layer's type; otherwise it builds one mask that
    every layer uses. `sliding`: it applies `config.sliding_window` (to every layer, or to its "sliding_attention"
    layers). `chunked`: it applies `config.attention_chunk_size` to its "chunked_attention" layers.
    """

    by_layer_type: bool = False
    sliding: bool = False
    chunked: bool = False


#: Model types (`config.model_type` of the text model) whose packed forward is checked against TRL's two rows,
#: gradients included, in tests/test_prompt_once_matrix.py. Any other family runs TRL's two rows.
VERIFIED_FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "gemma": Family(),
    "olmo2": Family(),
    "cohere": Family(),
    "glm": Family(),
    "glm4": Family(),
    "mistral": Family(sliding=True),
    "mixtral": Family(sliding=True),
    "phi3": Family(sliding=True),
    "qwen3_moe": Family(sliding=True),
    "qwen2": Family(by_layer_type=True, sliding=True),
    "qwen3": Family(by_layer_type=True, sliding=True),
    "gemma2": Family(by_layer_type=True, sliding=True),
    "gemma3_text": Family(by_layer_type=True, sliding=True),
    "cohere2": Family(by_layer_type=True, sliding=True),
    "olmo3": Family(by_layer_type=True, sliding=True),
    "ministral": Family(by_layer_type=True, sliding=True),
    "smollm3": Family(by_layer_type=True, sliding=True),
}

#: RoPE types whose frequencies do not depend on the batch, and those that depend on the largest position id of the
#: batch (equal for the packed rows only when the two-row batch has no padding column beyond its longest row).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def text_config(model: Any) -> Any:
    """The config of the model's language model (the config itself for a causal LM), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def attention_layout(model: Any) -> tuple[AttentionLayout | None, str | None]:
    """The attention patterns the model's layers use, keyed as its forward reads its masks, or why it is unknown.

    Every config setting that changes which keys a query sees must be understood here; one that is not (a window
    on a family that does not read it, an unknown layer type, bidirectional attention, ...) gives a reason instead.
    """
    config = text_config(model)
    if config is None:
        return None, "the model has no config"
    model_type = getattr(config, "model_type", None)
    family = VERIFIED_FAMILIES.get(model_type)
    if family is None:
        return None, (
            f"model type {model_type!r} is not among the families verified for prompt-once "
            f"({', '.join(sorted(VERIFIED_FAMILIES))})"
        )
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        return None, f"{model_type} is configured for bidirectional attention"
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    for name, value, understood in (
        ("sliding_window", window, family.sliding),
        ("attention_chunk_size", chunk, family.chunked),
    ):
        if value is None:
            continue
        if not understood:
            return None, f"{name}={value!r} is set but {model_type} is not verified with it"
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return None, f"{name}={value!r} is not a positive number of tokens"
    layer_types = getattr(config, "layer_types", None)
    patterns = {FULL: AttentionPattern()}
    if window is not None:
        patterns[SLIDING] = AttentionPattern(SLIDING, window)
    if chunk is not None:
        patterns[CHUNKED] = AttentionPattern(CHUNKED, chunk)
    if family.by_layer_type:
        if not layer_types:
            return None, f"{model_type} has no config.layer_types"
        unknown = sorted(set(layer_types) - set(patterns))
        if unknown:
            return None, f"layer types {unknown} of {model_type} are unknown or have no window set"
        return {kind: patterns[kind] for kind in sorted(set(layer_types))}, None
    if window is not None and chunk is not None:
        return None, f"{model_type} sets both sliding_window and attention_chunk_size"
    single = patterns[SLIDING if window is not None else CHUNKED if chunk is not None else FULL]
    if layer_types is not None and set(layer_types) != {single.kind}:
        return None, (
            f"config.layer_types {sorted(set(layer_types))} of {model_type} differ from the attention its forward "
            f"applies to every layer ({single.kind})"
        )
    return {None: single}, None


def _rope_reason(config: Any, inputs: dict[str, Any]) -> str | None:
    """Why the packed row's rotary embeddings could differ from the two rows' (None when they cannot)."""
    parameters = getattr(config, "rope_parameters", None)
    if not isinstance(parameters, dict):
        return None
    nested = parameters and all(isinstance(value, dict) for value in parameters.values())
    for entry in parameters.values() if nested else [parameters]:
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type in _STATIC_ROPE:
            continue
        if rope_type in _LENGTH_DEPENDENT_ROPE or "dynamic" in str(rope_type):
            lengths = inputs["attention_mask"].sum(dim=1)
            if int(lengths.max()) != inputs["input_ids"].shape[1]:
                return (
                    f"rope_type {rope_type!r} depends on the padded length of the two-row batch, which is longer "
                    "than its longest row (pad_to_multiple_of in the collator?)"
                )
            continue
        return f"rope_type {rope_type!r} is not verified for prompt-once"
    return None


@dataclass
class PackedPairs:
    """A preference batch of `2B` rows packed into `B` rows, and the map back to the two-row layout."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    segments: torch.Tensor  # [B, L]: 0 shared body, 1 chosen branch, 2 rejected branch, -1 padding
    source_row: torch.Tensor  # [2B, T - 1]: packed row holding each shifted two-row position
    source_col: torch.Tensor  # [2B, T - 1]: packed shifted position (clamped where invalid)
    valid: torch.Tensor  # [2B, T - 1]: whether the two-row position has a packed counterpart
    #: per packed row: (body length p - 1, chosen branch length, rejected branch length); the row is laid out
    #: [body | chosen | rejected | padding], each branch starting at the prompt's last token (position p - 1)
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    attention: str = "split"  # how sdpa models get their mask: "split" (no L x L mask) or "dense"
    split_calls: int = 0  # split attention calls in the current forward (each layer must make one)
    sp: Any = None  # the `SequenceParallelGroup` whose ranks each hold a slice of the row (None: no SP)
    _masks: dict[tuple, Any] = field(default_factory=dict, repr=False)  # built masks, shared by policy and reference

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def pack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Two-row labels ([2B, T], -100 outside completions) in the packed layout ([B, L])."""
        packed = torch.full_like(self.input_ids, -100)
        shifted = labels[:, 1:]
        rows = self.source_row[self.valid]
        cols = self.source_col[self.valid] + 1  # shifted position j predicts the token at j + 1
        packed[rows, cols] = shifted[self.valid]
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """A packed per-token output ([B, L - 1], shifted) in the two-row layout ([2B, T - 1]), zero elsewhere."""
        gathered = packed[self.source_row, self.source_col]
        return torch.where(self.valid, gathered, torch.zeros((), dtype=packed.dtype, device=packed.device))

    def masks_for(self, layout: AttentionLayout, attn_implementation: str, dtype: torch.dtype) -> Any:
        """The `attention_mask` to give a model with this layout: one mask, or a dict keyed by layer type."""
        masks = {key: self.mask_for(attn_implementation, dtype, pattern) for key, pattern in layout.items()}
        return masks[None] if None in masks else masks

    def mask_for(
        self, attn_implementation: str, dtype: torch.dtype, pattern: AttentionPattern = AttentionPattern()
    ) -> Any:
        """The attention mask of one kind of layer for the given attention implementation."""
        key = (attn_implementation, dtype if attn_implementation == "eager" else None, pattern)
        if key not in self._masks:
            if attn_implementation == "flex_attention":
                mask = self._block_mask(pattern)
            elif attn_implementation == "sdpa" and self.attention == "split":
                mask = _split_marker(self, pattern)
            else:
                allowed = self._allowed(pattern)
                if attn_implementation == "sdpa":
                    mask = allowed
                else:
                    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
                    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            self._masks[key] = mask
        return self._masks[key]

    def _allowed(self, pattern: AttentionPattern = AttentionPattern()) -> torch.Tensor:
        """[B, 1, L, L] boolean: query q may attend key k."""
        seg, pos = self.segments, self.position_ids
        batch, length = seg.shape
        idx = torch.arange(length, device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        q_seg, k_seg = seg[:, :, None], seg[:, None, :]
        allowed = causal & (k_seg != _PAD) & (q_seg != _PAD) & ((k_seg == _BODY) | (k_seg == q_seg))
        overlay = pattern.overlay(batch, seg.device)
        if overlay is not None:  # the window, measured in position ids as in each two-row row
            rows = torch.arange(batch, device=seg.device)[:, None, None]
            allowed &= overlay(rows, None, pos[:, :, None], pos[:, None, :])
        # padding queries see themselves only: a fully masked row would give NaNs in SDPA
        allowed |= (q_seg == _PAD) & (idx[None, :, None] == idx[None, None, :])
        return allowed[:, None]

    def _block_mask(self, pattern: AttentionPattern = AttentionPattern()) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        seg, pos = self.segments, self.position_ids
        batch, length = seg.shape
        overlay = pattern.overlay(batch, seg.device)

        def mask_mod(b, h, q_idx, kv_idx):
            q_seg, k_seg = seg[b, q_idx], seg[b, kv_idx]
            same = (k_seg == _BODY) | (k_seg == q_seg)
            visible = (q_idx >= kv_idx) & (k_seg != _PAD) & (q_seg != _PAD) & same
            if overlay is not None:
                visible = visible & overlay(b, h, pos[b, q_idx], pos[b, kv_idx])
            return visible | (q_idx == kv_idx)

        return create_block_mask(mask_mod, batch, None, length, length, device=seg.device)


def pack_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    attention: str = "split",
    sp: Any = None,
) -> PackedPairs | None:
    """Pack a `DataCollatorForPreference` batch (chosen rows first, right-padded) into one row per pair.

    `pad_to_multiple_of` pads the packed rows to a multiple of it. The trainer passes `args.pad_to_multiple_of` (1 when
    it is None), which TRL resolves: `"auto"` is 128 on Neuron and None elsewhere, CUDA included. Set it yourself
    (e.g. 64) to pad on GPUs, where masked attention kernels may run faster on aligned lengths.

    `attention` is how an sdpa model attends the packed row: `"split"` (per segment, no L x L mask; see
    `split_attention`) or `"dense"` (one [B, 1, L, L] boolean mask).

    Returns None when the batch does not have that structure (a pair whose rows do not share the exact same prompt,
    an empty prompt, or left padding): the caller then runs TRL's two-row forward.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] % 2:
        return None
    num_pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(dim=1).tolist()
    has_completion = completion_mask.any(dim=1).tolist()
    first = completion_mask.int().argmax(dim=1).tolist()
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    maps: list[tuple[int, int, int, int]] = []  # (prompt length, chosen length, rejected length)
    spans: list[tuple[int, int, int]] = []
    for i in range(num_pairs):
        c_row, r_row = i, num_pairs + i
        c_len, r_len = int(lengths[c_row]), int(lengths[r_row])
        if not (has_completion[c_row] and has_completion[r_row]):
            return None
        p = int(first[c_row])
        if p < 1 or int(first[r_row]) != p:
            return None
        if not bool(attention_mask[c_row, :c_len].all()) or not bool(attention_mask[r_row, :r_len].all()):
            return None  # not right-padded
        if not torch.equal(input_ids[c_row, :p], input_ids[r_row, :p]):
            return None
        chosen, rejected = c_len - p, r_len - p
        ids = torch.cat([input_ids[c_row, : p + chosen], input_ids[r_row, p - 1 : p + rejected]])
        positions = torch.cat([torch.arange(p + chosen), torch.arange(p - 1, p + rejected)])
        segments = torch.cat(
            [
                torch.full((p - 1,), _BODY),
                torch.full((chosen + 1,), _CHOSEN),
                torch.full((rejected + 1,), _REJECTED),
            ]
        )
        rows.append((ids, positions, segments))
        maps.append((p, chosen, rejected, c_len))
        spans.append((p - 1, chosen + 1, rejected + 1))

    length = max(ids.shape[0] for ids, _, _ in rows)
    if sp is not None:  # every rank of the group holds an equal slice
        pad_to_multiple_of = math.lcm(pad_to_multiple_of, sp.size)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    device = input_ids.device
    packed_ids = torch.full((num_pairs, length), pad_token_id, dtype=input_ids.dtype)
    packed_pos = torch.zeros((num_pairs, length), dtype=torch.long)
    packed_seg = torch.full((num_pairs, length), _PAD, dtype=torch.long)
    for i, (ids, positions, segments) in enumerate(rows):
        packed_ids[i, : ids.shape[0]] = ids
        packed_pos[i, : ids.shape[0]] = positions
        packed_seg[i, : ids.shape[0]] = segments

    width = input_ids.shape[1] - 1
    source_row = torch.zeros((2 * num_pairs, width), dtype=torch.long)
    source_col = torch.zeros((2 * num_pairs, width), dtype=torch.long)
    valid = torch.zeros((2 * num_pairs, width), dtype=torch.bool)
    cols = torch.arange(width)
    for i, (p, chosen, rejected, _) in enumerate(maps):
        # chosen row: token t < p + chosen sits at packed t, so shifted position j maps to j
        source_row[i] = i
        source_col[i] = cols.clamp(max=length - 2)
        valid[i] = cols < p + chosen - 1
        # rejected row: token t >= p sits at packed t + chosen + 1; only completion tokens are mapped
        source_row[num_pairs + i] = i
        source_col[num_pairs + i] = (cols + chosen + 1).clamp(max=length - 2)
        valid[num_pairs + i] = (cols >= p - 1) & (cols < p + rejected - 1)
    return PackedPairs(
        input_ids=packed_ids.to(device),
        position_ids=packed_pos.to(device),
        segments=packed_seg.to(device),
        source_row=source_row.to(device),
        source_col=source_col.to(device),
        valid=valid.to(device),
        spans=spans,
        attention=attention,
        sp=sp,
    )


def attention_implementation(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def unsupported_reason(model: Any, inputs: dict[str, Any], trainer: Any) -> str | None:
    """Why prompt-once cannot run for this model/batch (None when it can)."""
    attn = attention_implementation(model)
    if attn not in SUPPORTED_ATTENTION:
        return f"attention implementation {attn!r} takes no custom mask (use one of {', '.join(SUPPORTED_ATTENTION)})"
    if getattr(trainer, "aux_loss_enabled", False):
        coef = getattr(trainer, "router_aux_loss_coef", None)
        return (
            f"the MoE router load-balancing loss (router_aux_loss_coef={coef}) counts every token of TRL's two rows "
            "(set router_aux_loss_coef=0.0 to train without it, prompt-once)"
        )
    extra = set(inputs) - {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    if extra:
        return f"the batch has extra model inputs {sorted(extra)} (vision or custom inputs)"
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "prompt-learning PEFT adds virtual tokens"
    layout, reason = attention_layout(model)
    if layout is None:
        return reason
    return _rope_reason(text_config(model), inputs)


def _check_split_calls(module: torch.nn.Module, packed: PackedPairs) -> None:
    """Raise unless every attention layer of a forward given split markers attended through `split_attention`: a
    marker that reached another attention function would have computed something else, silently."""
    if packed.attention != "split" or attention_implementation(module) != "sdpa":
        return
    layers = getattr(text_config(module), "num_hidden_layers", None)
    if layers is not None and packed.split_calls != layers:
        raise RuntimeError(
            f"prompt_once: {packed.split_calls} of the model's {layers} attention layers ran the split attention; "
            "the others did not use transformers' registered sdpa function (a model-local attention override?). "
            "Set prompt_once_attention='dense' to train this model prompt-once with a dense mask."
        )


@contextlib.contextmanager
def prompt_once_forward(modules: list[torch.nn.Module], packed: PackedPairs, dtype: torch.dtype) -> Iterator[None]:
    """While active, fused-head forwards of `modules` with the two-row batch run packed, and answer in two rows.

    Calls without `fused_lm_head=True` (e.g. generation), and models without a known attention layout, pass through
    untouched.
    """
    active: list[bool] = []

    def pre_hook(module, args, kwargs):
        if args or not kwargs.get("fused_lm_head") or kwargs.get("labels") is None:
            active.append(False)
            return args, kwargs
        layout, _ = attention_layout(module)
        if layout is None or kwargs["input_ids"].shape[0] != 2 * packed.input_ids.shape[0]:
            active.append(False)
            return args, kwargs
        kwargs = dict(kwargs)
        labels = packed.pack_labels(kwargs["labels"])
        if packed.sp is None:
            kwargs["labels"] = labels
            kwargs["input_ids"] = packed.input_ids
            kwargs["position_ids"] = packed.position_ids
        else:  # this rank's slice, with the labels shifted over the whole row (TRL's fused head takes them so)
            from .sequence_parallel import local_slice

            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
            kwargs["labels"] = None
            kwargs["shift_labels"] = local_slice(shifted, packed.sp)
            kwargs["input_ids"] = local_slice(packed.input_ids, packed.sp)
            kwargs["position_ids"] = local_slice(packed.position_ids, packed.sp)
        kwargs["attention_mask"] = packed.masks_for(layout, attention_implementation(module), dtype)
        packed.split_calls = 0
        if getattr(text_config(module), "output_router_logits", False) and "output_router_logits" not in kwargs:
            # a config asking for router logits would compute the (unused) load-balancing loss from a 2-D mask
            kwargs["output_router_logits"] = False
        active.append(True)
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        if not active.pop():
            return output
        _check_split_calls(module, packed)
        for name in _PER_TOKEN_FIELDS:
            value = getattr(output, name, None)
            if value is not None:
                if packed.sp is not None:  # the slices' scores of the shifted row -> the row's [B, L - 1]
                    from .sequence_parallel import gather_sequence

                    value = gather_sequence(value, packed.sp)[:, :-1]
                output[name] = packed.unpack(value)
        return output

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----- split attention: the packed row attended segment by segment, without an L x L mask -----


@dataclass(frozen=True)
class _SplitSpec:
    packed: PackedPairs
    pattern: AttentionPattern


_MARKER_ATTRIBUTE = "_prompt_once_split"


def _split_marker(packed: PackedPairs, pattern: AttentionPattern) -> torch.Tensor:
    """The `attention_mask` handed to an sdpa model for split attention: an all-False [B, 1, L, L] view of ONE
    element (no L x L memory) that carries the packed layout. Models pass 4-D masks through untouched to their
    attention function, where the installed sdpa dispatcher recognizes it. Were it ever to reach a plain SDPA, every
    query would be masked (NaN outputs), and `prompt_once_forward` checks that each layer made a split call."""
    _install_split_dispatch()
    batch, length = packed.input_ids.shape
    marker = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=packed.input_ids.device).expand(
        batch, 1, length, length
    )
    setattr(marker, _MARKER_ATTRIBUTE, _SplitSpec(packed, pattern))
    return marker


_ORIGINAL_SDPA: list[Callable] = []


def _install_split_dispatch() -> None:
    """Register, once, an "sdpa" attention function that runs `split_attention` for a prompt-once marker mask and
    transformers' own sdpa function, unchanged, for every other call."""
    from transformers.modeling_utils import AttentionInterface

    if _ORIGINAL_SDPA:
        return
    original = AttentionInterface._global_mapping["sdpa"]
    _ORIGINAL_SDPA.append(original)

    def sdpa_or_split(module, query, key, value, attention_mask, *args, **kwargs):
        spec = getattr(attention_mask, _MARKER_ATTRIBUTE, None)
        if spec is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if spec.packed.sp is not None:
            return _ulysses_attention(module, query, key, value, spec, *args, **kwargs)
        return split_attention(module, query, key, value, spec, *args, **kwargs)

    AttentionInterface.register("sdpa", sdpa_or_split)


def _visible(pattern: AttentionPattern, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[Q, K] boolean: causality and the layer's window, on position ids (the rules of `PackedPairs._allowed` for
    queries and keys of one branch and the body, whose positions increase with their index)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    overlay = pattern.overlay(1, q_pos.device)
    if overlay is not None:
        batch = torch.zeros((), dtype=torch.long, device=q_pos.device)
        allowed &= overlay(batch, None, q_pos[:, None], k_pos[None, :])
    return allowed


def _window_start(pattern: AttentionPattern, position: int) -> int:
    """The smallest position a query at `position` (or later) can see under the layer's window."""
    if pattern.kind == SLIDING:
        return max(0, position - pattern.size + 1)
    if pattern.kind == CHUNKED:
        return position // pattern.size * pattern.size
    return 0


def split_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: _SplitSpec,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of packed prompt-once rows with memory linear in the length, equal to the dense branch mask.

    Per row [body | chosen | rejected | padding] (query/key/value [B, H, L, D]):
    - the body attends itself causally (`is_causal=True`, no mask: the fused kernels); a sliding window runs in
      query blocks of the window's size against their window's keys, a chunked layer chunk by chunk;
    - each branch attends [body; branch] keys with a mask of branch x (window of the body + branch) only (the chosen
      branch follows the body in memory; the rejected one is concatenated to it);
    - a padding position sees itself only, as in the dense mask (its output is its value).
    The largest mask is (branch length) x (prompt length): linear in the prompt for a given completion length.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("`sdpa` attention does not support `softcap`: use eager or flex_attention")
    if kwargs.get("position_bias") is not None:
        raise ValueError("prompt-once split attention does not take a position bias")
    packed, pattern = spec.packed, spec.pattern
    packed.split_calls += 1
    groups = kwargs.pop("groups", None) or getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    device = query.device

    def attend(q, k, v, mask=None, causal=False):
        return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal)

    rows = []
    for row, (body, chosen, rejected) in enumerate(packed.spans):
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        parts = []
        # the body: causal, windowed
        block = pattern.size if pattern.kind in (SLIDING, CHUNKED) and pattern.size < body else body
        for start in range(0, body, max(block, 1)):
            end = min(start + block, body)
            low = start if pattern.kind == CHUNKED else _window_start(pattern, start)
            if low == start:  # the block sees no key before itself: causal within it
                parts.append(attend(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], causal=True))
            else:
                positions = torch.arange(low, end, device=device)
                mask = _visible(pattern, positions[start - low :], positions)
                parts.append(attend(q[:, :, start:end], k[:, :, low:end], v[:, :, low:end], mask=mask))
        # the branches: [visible body; branch] keys
        low = _window_start(pattern, body)
        for first, length in ((body, chosen), (body + chosen, rejected)):
            if first == body:
                keys, values = k[:, :, low : body + length], v[:, :, low : body + length]
            else:
                keys = torch.cat([k[:, :, low:body], k[:, :, first : first + length]], dim=2)
                values = torch.cat([v[:, :, low:body], v[:, :, first : first + length]], dim=2)
            q_pos = torch.arange(body, body + length, device=device)
            k_pos = torch.arange(low, body + length, device=device)
            parts.append(attend(q[:, :, first : first + length], keys, values, mask=_visible(pattern, q_pos, k_pos)))
        end = body + chosen + rejected
        if end < packed.length:
            parts.append(v[:, :, end:])  # padding queries see themselves only
        rows.append(torch.cat(parts, dim=2))
    output = torch.cat(rows, dim=0)
    return output.transpose(1, 2).contiguous(), None


def _ulysses_attention(module, query, key, value, spec: _SplitSpec, *args, **kwargs) -> tuple[torch.Tensor, None]:
    """Split attention under sequence parallelism: q/k/v of this rank's sequence slice ([B, H, L/S, D]) become its
    head slice over the whole row (all-to-all), attend with the row's global layout, and return to the slice."""
    from .sequence_parallel import heads_to_seq, seq_to_heads

    sp = spec.packed.sp
    groups = getattr(module, "num_key_value_groups", 1)
    if key.shape[1] % sp.size:  # fewer key/value heads than ranks: every rank takes its query heads' copies
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value, groups = repeat_kv(key, groups), repeat_kv(value, groups), 1
    query, key, value = (seq_to_heads(t, sp) for t in (query, key, value))
    output, _ = split_attention(module, query, key, value, spec, *args, groups=groups, **kwargs)
    output = heads_to_seq(output.transpose(1, 2).contiguous(), sp)  # [B, H, L/S, D]
    return output.transpose(1, 2).contiguous(), None
