#!/usr/bin/env bash
# Long prompts on ONE GPU, in one go (about 8 minutes on an H100): for a config-built model of Llama-3.1-8B's shape
# (random weights, bf16, LoRA r 16 on every linear layer, gradient checkpointing), the peak memory and tokens/s of one
# DPO training step per prompt length and per mode - TRL's two rows, prompt-once with the dense L x L mask,
# prompt-once with split attention - each mode stopping at its first out-of-memory length (the longest prompt that
# fits is the last length it ran); then flex_attention's BlockMask against TRL's two rows, gradients included
# (tests/test_prompt_once_matrix.py::test_flex_attention compares gradients on CUDA).
#
#   benchmarks/gpu_long_context.sh                        # results in benchmarks/results/long_context_gpu.json
#   LENGTHS="16384 32768" benchmarks/gpu_long_context.sh    # quicker
#
# Needs a CUDA build of torch and the package with its dev extras (see gpu_engine_check.sh). PYTHON: the interpreter
# (default: `python`). Never run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
LENGTHS="${LENGTHS:-16384 32768 65536 98304 131072}"
RESULT="${RESULT:-benchmarks/results/long_context_gpu.json}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_long_context: no CUDA GPU')"
# shellcheck disable=SC2086  # LENGTHS is a list
"$PYTHON" benchmarks/long_context_memory.py --device cuda --model 8b --lora --gradient-checkpointing \
    --modes two_rows dense split --lengths $LENGTHS --dense-max 1000000 --longest --sp-size 0 \
    --response-tokens 512 --json "$RESULT"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_prompt_once_matrix.py -k flex_attention
