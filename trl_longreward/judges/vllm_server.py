"""Start and stop a vLLM OpenAI-compatible server on loopback, for a judge (tests, benchmarks, the demo).

```python
from trl_longreward.judges.vllm_server import VLLMServer

with VLLMServer.start("path/to/judge", python=".venv-vllm/bin/python") as server:
    reward = LongRewardFunction(judge_base_url=server.base_url, judge_model=server.model_name, ...)
```

`VLLMServer.launch` returns at once (the URL is known before the engine has loaded) and `wait_until_healthy` waits:
`trl-longreward dpo --judge_server vllm` builds the trainer while its judge server starts.

The server is `python -m vllm.entrypoints.openai.api_server` run by `python` (a vLLM environment's interpreter: vLLM
may live in an environment of its own), in its own process group, stopped with everything it spawned. The module
entry point is used rather than `vllm serve` because the CPU build's console script looks its version up under the
distribution name `vllm`, which that build does not have. `enforce_eager` defaults to True: compiled mode recompiles at
every start and its greedy answers vary slightly between starts, so eager is the mode whose judge answers (and cache
entries) are reproducible. On a machine without CUDA the server gets the CPU settings of `trl_longreward.vllm_support`
unless told otherwise: every core of a small machine for its worker, float32 on CPUs without native bfloat16.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trl_longreward.vllm_support import cpu_engine_dtype, cpu_thread_env

__all__ = ["VLLMServer", "parse_prometheus", "stop_process_group"]

_ENTRY_POINT = "vllm.entrypoints.openai.api_server"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None


class VLLMServer:
    """A running vLLM OpenAI-compatible server process (see the module docstring). Build it with `VLLMServer.start`.

    Attributes:
        process: the server's `subprocess.Popen` (its own process group).
        base_url: the OpenAI base URL, `http://HOST:PORT/v1`.
        model_name: the name requests must use (`--served-model-name`).
        log_path: the server's combined stdout/stderr.
    """

    def __init__(self, process: subprocess.Popen, *, host: str, port: int, model_name: str, log_path: Path) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.model_name = model_name
        self.log_path = log_path
        self.base_url = f"http://{host}:{port}/v1"
        self.command: list[str] = []  # the command line that started it (`launch` fills it in)

    @classmethod
    def launch(
        cls,
        model: str | os.PathLike[str],
        *,
        python: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str | None = None,
        max_model_len: int | None = 8192,
        dtype: str | None = None,
        enforce_eager: bool = True,
        seed: int | None = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> VLLMServer:
        """Launch the server and return at once, before it can answer: `wait_until_healthy` waits for it. Its URL
        (`base_url`) is known from here on, so a trainer and its judge client can be built while the engine loads.

        Args:
            model: the model directory (or Hub id) to serve.
            python: the interpreter of the environment vLLM is installed in; defaults to this one.
            host, port: where to listen; `port=None` takes a free port.
            served_model_name: the model name requests use; defaults to `model`.
            max_model_len, dtype, enforce_eager, seed: the engine settings of the same names; `dtype=None` is
                bfloat16, except float32 on an x86 CPU without native bfloat16 (`vllm_support.cpu_engine_dtype`).
            extra_args: more command-line arguments for the server.
            env: environment variables added to this process's (e.g. `VLLM_CPU_KVCACHE_SPACE`); without
                `VLLM_CPU_OMP_THREADS_BIND` here or in this process's, a small CPU machine's cores all go to the
                worker (`vllm_support.cpu_thread_env`).
        """
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host={host!r}: VLLMServer serves on loopback only (127.0.0.1, localhost or ::1).")
        port = port or _free_port(host)
        name = served_model_name or str(model)
        dtype = cpu_engine_dtype(dtype) or "bfloat16"
        command = [str(python or sys.executable), "-m", _ENTRY_POINT, "--model", str(model)]
        command += ["--host", host, "--port", str(port), "--served-model-name", name, "--dtype", dtype]
        if max_model_len is not None:
            command += ["--max-model-len", str(max_model_len)]
        if enforce_eager:
            command.append("--enforce-eager")
        if seed is not None:
            command += ["--seed", str(seed)]
        command += list(extra_args)
        log_dir = Path(tempfile.mkdtemp(prefix="vllm-server-"))
        log_path = log_dir / "server.log"
        cache_root = log_dir / "cache"
        cache_root.mkdir()
        process_env = {
            **os.environ,
            "VLLM_HOST_IP": "127.0.0.1" if host != "::1" else "::1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_CACHE_ROOT": str(cache_root),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            **cpu_thread_env({**os.environ, **(env or {})}),
            **(env or {}),
        }
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=process_env,
                start_new_session=True,
            )
        server = cls(process, host=host, port=port, model_name=name, log_path=log_path)
        server.command = command
        return server

    @classmethod
    def start(cls, model: str | os.PathLike[str], *, timeout: float = 300.0, **kwargs: Any) -> VLLMServer:
        """Launch the server (`launch`, same arguments) and wait until `/health` answers 200 (`wait_until_healthy`).

        Raises:
            RuntimeError: the server exited or was not healthy within `timeout` seconds; the message ends with its log.
        """
        server = cls.launch(model, **kwargs)
        server.wait_until_healthy(timeout)
        return server

    def wait_until_healthy(self, timeout: float = 300.0) -> None:
        """Wait until `/health` answers 200.

        Raises:
            RuntimeError: the server exited or was not healthy in time (it is stopped); the message ends with its log.
        """
        deadline = time.monotonic() + timeout
        command = " ".join(self.command) or "the vLLM server"
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"`{command}` exited with code {self.process.returncode}:\n{tail}")
            answer = _get(f"http://{self.host}:{self.port}/health")
            if answer is not None and answer[0] == 200:
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"`{command}` was not healthy after {timeout:.0f} s:\n{tail}")
            time.sleep(0.5)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, num_chars: int = 4000) -> str:
        """The end of the server's log (empty when it cannot be read)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-num_chars:]
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus `/metrics`, as `{name{labels}: value}` (see `parse_prometheus`)."""
        answer = _get(f"http://{self.host}:{self.port}/metrics", timeout=10)
        if answer is None or answer[0] != 200:
            raise RuntimeError(f"{self.host}:{self.port}/metrics did not answer")
        return parse_prometheus(answer[1])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and everything it spawned (`stop_process_group`); removes its log directory. Safe to call
        twice."""
        stop_process_group(self.process, timeout)
        # Engine workers can outlive a parent that died first: they share its process group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with `start_new_session=True` and everything it spawned: SIGTERM to its process group,
    SIGKILL after `timeout` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=timeout)


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format to `{metric{labels}: value}` (comments and unparsable lines left out)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            continue
    return values
