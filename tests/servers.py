"""Start and stop real OpenAI-compatible servers (`transformers serve`) as subprocesses for integration tests.

```python
@pytest.fixture(scope="module")
def serve() -> Iterator[str]:
    process, base_url = start_transformers_serve(default_model_path())
    try:
        yield base_url
    finally:
        stop_process(process)
```

`transformers serve MODEL_DIR` pins the server to that model: requests must name it exactly as it was given on the
command line (`str(model_dir)`), any other `model` is answered 400.
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
from pathlib import Path

from trl_longreward.judges.vllm_server import stop_process_group

__all__ = ["ServerProcess", "free_port", "start_transformers_serve", "stop_process"]


class ServerProcess(subprocess.Popen):
    """A server subprocess in its own process group, with its combined stdout/stderr in `log_path`."""

    log_path: Path

    def log_tail(self, num_chars: int = 4000) -> str:
        """The end of the server's log (empty when it cannot be read)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-num_chars:]
        except OSError:
            return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_in_process_group(command: list[str], *, env: dict[str, str], cwd: Path, timeout_s: float):
    """Run `command` in its own process group; (exit code or None on timeout, combined output, seconds). On timeout
    the whole group is killed: a launcher and its workers must not outlive the test."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return process.returncode, output, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output, time.perf_counter() - start


def _transformers_cli() -> list[str]:
    """The `transformers` console script of this interpreter's environment, else the one on PATH."""
    local = Path(sys.executable).with_name("transformers")
    if local.exists():
        return [str(local)]
    found = shutil.which("transformers")
    if found is None:
        raise FileNotFoundError('The `transformers` CLI was not found: pip install "transformers[serving]".')
    return [found]


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_transformers_serve(
    model_dir: str | Path, port: int | None = None, timeout: float = 180.0, host: str = "127.0.0.1"
) -> tuple[ServerProcess, str]:
    """Launch `transformers serve MODEL_DIR --device cpu` offline and wait until `/health` answers.

    Returns the process and the OpenAI base URL (`http://HOST:PORT/v1`). Raises `RuntimeError` with the end of the
    server's log if the process exits early or is not healthy within `timeout` seconds.
    """
    port = port or free_port(host)
    log_dir = Path(tempfile.mkdtemp(prefix="transformers-serve-"))
    log_path = log_dir / "serve.log"
    command = [
        *_transformers_cli(),
        "serve",
        str(model_dir),
        "--device",
        "cpu",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "info",
    ]
    # Unbuffered, so the log (uvicorn's access lines go to stdout) is current while the server runs.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "wb") as log:
        process = ServerProcess(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    process.log_path = log_path
    health_url = f"http://{host}:{port}/health"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = process.log_tail()
            stop_process(process)
            raise RuntimeError(f"`{' '.join(command)}` exited with code {process.returncode}:\n{tail}")
        if _is_healthy(health_url):
            return process, f"http://{host}:{port}/v1"
        if time.monotonic() > deadline:
            tail = process.log_tail()
            stop_process(process)
            raise RuntimeError(f"`{' '.join(command)}` was not healthy after {timeout:.0f} s:\n{tail}")
        time.sleep(0.5)


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with `start_new_session=True` and everything it spawned (SIGTERM to its process group,
    SIGKILL after `timeout` seconds). Removes the log directory of a `ServerProcess`."""
    stop_process_group(process, timeout)
    log_path = getattr(process, "log_path", None)
    if log_path is not None:
        shutil.rmtree(Path(log_path).parent, ignore_errors=True)
