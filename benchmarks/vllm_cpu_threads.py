#!/usr/bin/env python
"""CPU vLLM server settings: threads and dtype, measured on the machine at hand.

The CPU build of vLLM binds its engine worker's OpenMP threads itself. By default (`VLLM_CPU_OMP_THREADS_BIND=auto`)
it reserves one core per worker for the scheduler/front-end process, so on a 2-core machine the model runs on ONE
core while the other idles. This script starts the vLLM server (bundled SmolLM2-135M-Instruct, eager mode) once per
setting and sends it the same fixed work: `--requests` chat completions of a ~`--prompt_tokens`-token document
prompt, `--max_tokens` tokens each (`ignore_eos`, so every setting generates the same number of tokens), all in
flight at once, then one request alone (latency). Printed and written: per setting the start-up time, the batch's
wall time, one request's wall time, and each batch time's ratio to the first setting's (vLLM's default).

    python benchmarks/vllm_cpu_threads.py --vllm_python .venv-vllm/bin/python
    python benchmarks/vllm_cpu_threads.py --json benchmarks/results/vllm_cpu_threads_avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = Path(__file__).resolve().parent.parent / "trl_longreward" / "data" / "demo_score.jsonl"


def _settings(num_cores: int) -> dict[str, dict]:
    every_core = f"0-{num_cores - 1}"
    return {
        "vllm default (auto bind: one core reserved), bfloat16": {"env": {}, "dtype": "bfloat16"},
        f"every core ({every_core}), bfloat16": {
            "env": {"VLLM_CPU_OMP_THREADS_BIND": every_core},
            "dtype": "bfloat16",
        },
        "vllm default (auto bind: one core reserved), float32": {"env": {}, "dtype": "float32"},
        f"every core ({every_core}), float32": {"env": {"VLLM_CPU_OMP_THREADS_BIND": every_core}, "dtype": "float32"},
    }


def _cpu_facts() -> dict:
    from trl_longreward.vllm_support import cpu_flags

    flags = cpu_flags()
    model = platform.processor()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "avx2": "avx2" in flags,
    }


def _prompt(tokenizer, num_tokens: int) -> str:
    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "\n\n".join(row["context"] for row in rows)
    ids = tokenizer(text)["input_ids"][:num_tokens]
    return tokenizer.decode(ids)


def _measure(server, prompt: str, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=1800)

    def ask(index: int) -> int:
        completion = client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": f"{prompt}\n\nQuestion {index}: summarise the document."}],
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        return completion.usage.completion_tokens

    ask(-1)  # warm-up: first-call costs out of the measurement
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=requests) as pool:
        tokens = sum(pool.map(ask, range(requests)))
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    ask(requests)
    single_s = time.perf_counter() - start
    client.close()
    return {
        "batch_seconds": round(batch_s, 2),
        "completion_tokens": tokens,
        "single_request_seconds": round(single_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm_python", default=".venv-vllm/bin/python", help="the vLLM environment's interpreter")
    parser.add_argument("--requests", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--prompt_tokens", type=int, default=1000)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--only", default=None, help="run only the settings whose name contains this text")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from trl_longreward.judges.vllm_server import VLLMServer
    from trl_longreward.models import default_model_path

    model = str(default_model_path())
    prompt = _prompt(AutoTokenizer.from_pretrained(model), args.prompt_tokens)
    results: dict = {
        "machine": _cpu_facts(),
        "model": "SmolLM2-135M-Instruct (bundled), --enforce-eager",
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens},
        "settings": {},
    }
    baseline = None
    for name, setting in _settings(os.cpu_count() or 1).items():
        if args.only and args.only not in name:
            continue
        start = time.perf_counter()
        with VLLMServer.start(
            model, python=args.vllm_python, served_model_name="bench", dtype=setting["dtype"], env=setting["env"]
        ) as server:
            started = time.perf_counter() - start
            measured = _measure(server, prompt, args.requests, args.max_tokens)
        measured["start_seconds"] = round(started, 1)
        measured["env"] = setting["env"]
        baseline = baseline or measured["batch_seconds"]
        measured["batch_ratio_to_first"] = round(baseline / measured["batch_seconds"], 2)
        results["settings"][name] = measured
        print(f"{name}: {json.dumps(measured)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
