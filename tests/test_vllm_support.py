"""CPU vLLM settings (`trl_longreward.vllm_support`): every core of a small machine for the engine's worker, float32 on
x86 CPUs without native bfloat16, the user's own settings kept; and the tested-version window. These run without vLLM:
the settings are plain environment variables and arguments, checked here where they are made and where the server
command is built."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import trl_longreward.vllm_support as support
from trl_longreward.judges.vllm_server import VLLMServer


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "_has_cuda", lambda: False)


@pytest.mark.parametrize(("cores", "expected"), [({0, 1}, "0,1"), ({0, 1, 2, 3}, "0,1,2,3"), ({2, 5}, "2,5")])
def test_a_small_cpu_machine_gives_every_usable_core_to_the_worker(monkeypatch, no_cuda, cores, expected) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert support.cpu_thread_env({}) == {"VLLM_CPU_OMP_THREADS_BIND": expected}


@pytest.mark.parametrize("cores", [{0}, set(range(8)), set(range(64))])
def test_one_core_or_a_larger_machine_keeps_vllms_own_binding(monkeypatch, no_cuda, cores) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert support.cpu_thread_env({}) == {}


@pytest.mark.parametrize("variable", ["VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"])
def test_the_users_thread_settings_win(monkeypatch, no_cuda, variable) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert support.cpu_thread_env({variable: "1"}) == {}


def test_a_cuda_machine_gets_no_cpu_thread_settings(monkeypatch) -> None:
    monkeypatch.setattr(support, "_has_cuda", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert support.cpu_thread_env({}) == {}


def test_thread_settings_are_set_while_an_engine_starts_then_restored(monkeypatch, no_cuda) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    with support.cpu_thread_settings() as settings:
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1" == settings["VLLM_CPU_OMP_THREADS_BIND"]
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


@pytest.mark.parametrize(
    ("machine", "flags", "requested", "expected"),
    [
        ("x86_64", {"avx2", "fma"}, None, "float32"),  # AVX2 only: float32
        ("x86_64", {"avx2", "fma"}, "auto", "float32"),
        ("x86_64", {"avx2", "avx512f"}, "auto", "float32"),  # AVX-512 without its bfloat16 instructions
        ("x86_64", {"avx2", "avx512f", "avx512_bf16"}, "auto", "auto"),  # native bfloat16: vLLM's choice
        ("x86_64", {"avx2", "amx_bf16"}, None, None),
        ("x86_64", {"avx2"}, "bfloat16", "bfloat16"),  # the user's dtype is kept
        ("aarch64", set(), "auto", "auto"),  # not x86: vLLM's choice
    ],
)
def test_engine_dtype_is_float32_on_x86_cpus_without_native_bfloat16(
    monkeypatch, no_cuda, machine, flags, requested, expected
) -> None:
    monkeypatch.setattr(support.platform, "machine", lambda: machine)
    monkeypatch.setattr(support, "cpu_flags", lambda: flags)
    assert support.cpu_engine_dtype(requested) == expected


def test_engine_dtype_on_a_cuda_machine_is_vllms_choice(monkeypatch) -> None:
    monkeypatch.setattr(support, "_has_cuda", lambda: True)
    monkeypatch.setattr(support, "cpu_flags", lambda: {"avx2"})
    assert support.cpu_engine_dtype("auto") == "auto"


def test_this_machines_cpu_flags_are_read() -> None:
    flags = support.cpu_flags()
    if Path("/proc/cpuinfo").exists() and support.platform.machine() == "x86_64":
        assert {"sse2"} <= flags


FAKE_SERVER = """
import json, os, sys
with open(os.environ["FAKE_SERVER_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}, f)
sys.exit(3)
"""


def _start_fake(tmp_path: Path, monkeypatch, **kwargs) -> dict:
    """`VLLMServer.start` with an interpreter that records the command and environment it was given, then exits."""
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    python.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_SERVER_RECORD", str(record))
    with pytest.raises(RuntimeError, match="exited with code 3"):
        VLLMServer.start("some/model", python=str(python), timeout=30, **kwargs)
    return json.loads(record.read_text())


def test_the_server_gets_the_cpu_settings(tmp_path, monkeypatch, no_cuda) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(support, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(support.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    seen = _start_fake(tmp_path, monkeypatch)
    assert seen["argv"][seen["argv"].index("--dtype") + 1] == "float32"
    assert seen["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    # The caller's choices win: an explicit dtype, its own binding.
    seen = _start_fake(tmp_path, monkeypatch, dtype="bfloat16", env={"VLLM_CPU_OMP_THREADS_BIND": "1"})
    assert seen["argv"][seen["argv"].index("--dtype") + 1] == "bfloat16"
    assert seen["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_the_server_on_a_cpu_with_native_bfloat16_runs_in_bfloat16(tmp_path, monkeypatch, no_cuda) -> None:
    monkeypatch.setattr(support, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    seen = _start_fake(tmp_path, monkeypatch)
    assert seen["argv"][seen["argv"].index("--dtype") + 1] == "bfloat16"


@pytest.mark.parametrize(
    ("version", "inside"),
    [("0.22.0", True), ("0.31.0", True), ("0.32.0+cpu", True), ("0.21.9", False), ("0.33.0", False)],
)
def test_the_tested_vllm_window(version: str, inside: bool) -> None:
    problem = support.vllm_version_problem(version)
    assert (problem is None) == inside
    if not inside:
        assert version in problem and "0.22.0 to 0.32.0" in problem
