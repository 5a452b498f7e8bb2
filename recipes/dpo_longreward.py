#!/usr/bin/env python
"""LongReward online DPO, as a script for launchers: `accelerate launch recipes/dpo_longreward.py [ARGS]`.

The same job as `trl-longreward dpo [ARGS]`; everything lives in `trl_longreward.commands.dpo` (its docstring lists
the launch commands, the configs in `recipes/configs/` and how the embedded CPU demo applies). With no arguments it
runs the demo: SmolLM2-135M-Instruct as policy and judge, on the bundled long-context QA set, on a CPU.

    accelerate launch recipes/dpo_longreward.py                                   # the CPU demo
    accelerate launch recipes/dpo_longreward.py --config recipes/configs/cpu_demo.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        recipes/dpo_longreward.py --config recipes/configs/llama31_8b_zero3_8gpu.yaml --dataset_name my_long_qa.jsonl
"""

from trl_longreward.commands.dpo import run

if __name__ == "__main__":
    raise SystemExit(run())
