#!/usr/bin/env python
"""Wall time of the no-argument demo (`trl-longreward dpo`) per judge path, on this machine.

Runs the demo as a user does (a subprocess of `trl-longreward dpo`, nothing else changed), once per judge path:
`--judge_server auto` (a vLLM server on loopback from ./.venv-vllm, started and stopped by the job) and
`--judge_server none` (SmolLM2 in process); same data, same seeds, same budgets. Reports each run's wall time (Python
start to exit, the install excluded), the per-step generation / judging / training seconds the trainer logs, the
judge calls and parse failures, checks the outputs (model, model card, report.html, judged_samples.jsonl), and prints
the ratio in-process / vLLM.

    .venv/bin/python benchmarks/demo_time.py --json benchmarks/results/demo_time_cpu_epyc_avx2.json
    .venv/bin/python benchmarks/demo_time.py --paths auto          # the default path only
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("model.safetensors", "README.md", "report.html", "judged_samples.jsonl")


def run_demo(judge_server: str, output_dir: Path) -> dict:
    command = [sys.executable, "-m", "trl_longreward.commands", "dpo", "--judge_server", judge_server]
    command += ["--output_dir", str(output_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    logs = []
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        for found in re.findall(r"\{'[^{}]*\}", line):
            try:
                logs.append(ast.literal_eval(found))
            except (ValueError, SyntaxError):
                continue
    steps = [log for log in logs if "time/judging_s" in log]
    judge = [line for line in done.stdout.splitlines() if line.startswith(("Judge:", "judge_server:"))]

    def column(key: str) -> list[float]:
        return [round(float(step[key]), 2) for step in steps if key in step]

    return {
        "seconds": round(seconds, 1),
        "judge": judge,
        "steps": len(steps),
        "generation_s": column("time/generation_s"),
        "judging_s": column("time/judging_s"),
        "training_s": column("time/training_s"),
        "judge_calls": sum(int(float(step.get("long_reward/judge_calls", 0))) for step in steps),
        "parse_failures": sum(int(float(step.get("long_reward/parse_failures", 0))) for step in steps),
        "pairs": sum(int(float(step.get("pairs/online", 0))) for step in steps),
        "outputs_complete": all((output_dir / name).exists() for name in OUTPUTS),
    }


def machine() -> dict:
    sys.path.insert(0, str(REPO))
    from trl_longreward.vllm_support import cpu_flags

    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    flags = cpu_flags()
    return {
        "cpu": name or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", default=["auto", "none"], choices=["auto", "vllm", "none"])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    results: dict = {
        "what": "no-argument demo (trl-longreward dpo), wall time from Python start to exit, install excluded",
        "machine": machine(),
        "runs": {},
    }
    for path in args.paths:
        out = Path(tempfile.mkdtemp(prefix=f"demo-{path}-"))
        try:
            results["runs"][path] = run_demo(path, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(path, json.dumps(results["runs"][path]), flush=True)
    if "auto" in results["runs"] and "none" in results["runs"]:
        ratio = results["runs"]["none"]["seconds"] / results["runs"]["auto"]["seconds"]
        results["ratio_in_process_over_vllm_server"] = round(ratio, 2)
        print(f"ratio in-process / vLLM server: {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
