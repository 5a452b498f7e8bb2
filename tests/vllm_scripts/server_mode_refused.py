"""`vllm_mode="server"` on a machine without CUDA is refused up front, with the reason (TRL's weight transfer to the
server is NCCL-only). Run by tests/test_vllm_inprocess.py with the vLLM environment's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(out_dir: str) -> dict:
    import torch
    from tiny_models import prompts_dataset, small_dpo_config, tiny_llama

    from trl_longreward import LongContextDPOTrainer

    model_path = tiny_llama(Path(out_dir) / "policy", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    args = small_dpo_config(Path(out_dir) / "run", use_vllm=True, vllm_mode="server")
    try:
        LongContextDPOTrainer(model=model_path, args=args, train_dataset=prompts_dataset(), reward_funcs=[len])
    except ValueError as err:
        return {"refused": str(err), "cuda": torch.cuda.is_available()}
    return {"refused": None, "cuda": torch.cuda.is_available()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
