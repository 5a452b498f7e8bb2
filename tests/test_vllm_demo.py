"""The CPU demo as the README's first command runs it: `trl-longreward dpo` with no model named, its judge served by
a vLLM server (the CPU build, from the vLLM environment) that the job starts while the policy loads and stops at the
end. Here k = 2, and only the two dimensions that need no document calls are judged (the demo judges all four; the
four pipelines against the vLLM server are `tests/test_vllm_server.py`'s); its own module, so no other vLLM server
competes for the cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from vllm_env import REPO_ROOT, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_the_demo_judges_through_its_own_vllm_server_and_stops_it(tmp_path: Path) -> None:
    from trl_longreward.commands.dpo import demo_defaults

    out = tmp_path / "run"
    # --long_reward replaces the whole mapping: the demo's, with two dimensions
    judge = {
        **demo_defaults()["long_reward"],
        "dimensions": ["helpfulness", "logicality"],
        "max_missing_dimensions": 1,
    }
    command = [
        sys.executable, "-m", "trl_longreward.commands", "dpo", "--output_dir", str(out),
        "--max_steps", "1", "--num_generations", "2", "--max_completion_length", "16", "--long_reward", json.dumps(judge),
    ]  # fmt: skip
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_LONGREWARD_VLLM_PYTHON=vllm_python()
    )
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    started = re.search(r"judge_server: starting vLLM \(.*\) for (\S+) at (http://127\.0\.0\.1:\d+/v1)\.", done.stdout)
    assert started, done.stdout[-3000:]
    served, base_url = started.groups()
    assert served == "smollm2-135m-instruct"  # the public name, never the local path
    assert "Judge: vLLM server" in done.stdout
    with pytest.raises((urllib.error.URLError, OSError)):  # stopped with the job
        urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5)

    for name in ("model.safetensors", "README.md", "report.html", "judged_samples.jsonl"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "judged_samples.jsonl").read_text().splitlines()]
    samples = [sample for record in records for sample in record["samples"]]
    assert len(samples) == 2 and all(set(s["scores"]) == {"helpfulness", "logicality"} for s in samples)
    assert any(sample["reward"] is not None for sample in samples), [s["trace"] for s in samples]
    card = (out / "README.md").read_text()
    assert "smollm2-135m-instruct" in card and "/root" not in card and str(REPO_ROOT) not in card
