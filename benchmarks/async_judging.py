"""Asynchronous judging: wall time per online DPO step, serial vs `async_judging=True`, same model, same data.

A config-built Llama policy trains `--steps` online DPO steps against the scripted LongReward judge server (a real
OpenAI-compatible HTTP server on loopback, in a process of its own, as a remote judge is) whose every call takes at
least `latency` seconds, the stand-in for a remote `vllm serve` judge. The latency is calibrated first so that one step's judging takes `ratio` x its training
(0.5, 1 and 2 by default). For each ratio, a serial run and an async run (same seed, each with a fresh judge cache,
so neither reuses the other's answers) are timed in this process, `--repeats` times interleaved; the fastest run of
each mode is kept (a shared machine only ever slows a run down). Printed and written per ratio: wall seconds per
step of each, their ratio serial / async, the limit (G + J + T) / (G + max(J, T)) from the serial run's mean
generation G, judging J and training T per step, and the overlap fraction of the async run: 1 - (time the steps waited
for the judge) / (time the judging took in the background), over the steps after the first (the first step's batch
is judged before it trains).

    python benchmarks/async_judging.py                       # CPU, ~5 minutes
    python benchmarks/async_judging.py --ratios 1 --steps 12 --json benchmarks/results/async_judging_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

DOCUMENT = (
    "The harbour town of Kessel built a flood barrier in 1998 after two winters of storms. The barrier cost 40 million "
    "pounds and was paid for by the council and a national fund. Its engineer, Mara Holt, designed twelve steel gates "
    "that close in nine minutes. Fishing boats still pass through a lock on the north side. "
)
QUESTION = "Who designed the flood barrier, and how long do its gates take to close?"


def helpfulness(question: str, response: str) -> float:
    return float(len(response) % 11)  # responses of different lengths get different rewards: every prompt pairs


def serve_judge(latency: float) -> None:
    """`--serve-judge`: the scripted judge server until SIGTERM; prints its base URL first."""
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer
    from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=helpfulness), latency_s=latency) as server:
        print(server.base_url, flush=True)
        done.wait()


class JudgeProcess:
    """The scripted judge server in a child process (its Python work must not share this process's interpreter)."""

    def __init__(self, latency: float) -> None:
        command = [sys.executable, __file__, "--serve-judge", "--latency", str(latency)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError("the judge server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def build_policy(folder: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trl_longreward.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def prompts(count: int, repeats: int) -> Dataset:
    return Dataset.from_list(
        [{"context": f"Record {i}. " + DOCUMENT * repeats, "question": QUESTION} for i in range(count)]
    )


def train_once(model: str, folder: Path, server, *, async_judging: bool, cli: argparse.Namespace) -> dict:
    """One training run; its wall time per step and the per-step means of the trainer's timing metrics."""
    from trl_longreward import LongContextDPOConfig, LongContextDPOTrainer, LongRewardFunction, OpenAIJudge

    reward = LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
        retriever="bm25",
        chunk_tokenizer="regex",
        cache_path=str(folder / "judge_cache.sqlite"),  # a fresh cache per run: no answer is shared
        show_progress=False,
    )
    args = LongContextDPOConfig(
        output_dir=str(folder / "out"),
        use_cpu=True,
        per_device_train_batch_size=cli.batch_size,
        max_steps=cli.steps,
        num_generations=cli.num_generations,
        max_completion_length=cli.max_completion_length,
        max_prompt_length=1024,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        learning_rate=1e-4,
        seed=0,
        async_judging=async_judging,
        activation_checkpointing=False,
        disable_tqdm=True,
        log_level="warning",
    )
    trainer = LongContextDPOTrainer(
        model=model,
        args=args,
        train_dataset=prompts(cli.batch_size * cli.steps, cli.document_repeats),
        reward_funcs=[reward],
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    calls = reward.stats()["judge_calls"]
    reward.close()
    logs = [log for log in trainer.state.log_history if "loss" in log]

    def mean(key: str, rows=logs) -> float:
        values = [log[key] for log in rows if key in log]
        return statistics.fmean(values) if values else 0.0

    later = logs[1:]  # the first step's batch is judged before it trains, in both modes
    waited = sum(log["time/judging_s"] for log in later)
    busy = sum(log.get("time/judging_background_s", 0.0) for log in later)
    return {
        "wall_s_per_step": wall / len(logs),
        "generation_s": mean("time/generation_s"),
        "judging_s": mean("time/judging_s"),
        "training_s": mean("time/training_s"),
        "judging_background_s": mean("time/judging_background_s") if async_judging else None,
        "overlap_fraction": (1.0 - waited / busy) if async_judging and busy > 0 else None,
        "staleness": [log["pairs/staleness"] for log in logs],
        "pairs_online_mean": mean("pairs/online"),
        "judge_calls": calls,
        "untrained_batches": len(trainer.untrained_batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 2.0], help="judging / training time")
    parser.add_argument("--repeats", type=int, default=2, help="serial/async pairs per ratio (the fastest is kept)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--document-repeats", type=int, default=2, help="document length, in repeats of one paragraph")
    parser.add_argument("--probe-latency", type=float, default=1.0, help="seconds per judge call for calibration")
    parser.add_argument("--json", default="benchmarks/results/async_judging_cpu.json")
    parser.add_argument("--serve-judge", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.serve_judge:
        serve_judge(cli.latency)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_policy(root / "policy")
        runs = iter(range(10_000))

        def run(latency: float, async_judging: bool) -> dict:
            server = JudgeProcess(latency)
            try:
                return train_once(model, root / f"run{next(runs)}", server, async_judging=async_judging, cli=cli)
            finally:
                server.stop()

        # Calibration: judging time grows linearly with the per-call latency (chains of dependent calls).
        steps, cli.steps = cli.steps, min(cli.steps, 3)
        fast = run(0.0, False)
        probe = run(cli.probe_latency, False)
        cli.steps = steps
        per_latency = (probe["judging_s"] - fast["judging_s"]) / cli.probe_latency
        train_s = statistics.fmean([fast["training_s"], probe["training_s"]])
        print(f"training {train_s:.2f} s/step; judging {fast['judging_s']:.2f} s + {per_latency:.2f} x latency")
        for ratio in cli.ratios:
            latency = max(0.0, (ratio * train_s - fast["judging_s"]) / per_latency)
            repeats = [(run(latency, False), run(latency, True)) for _ in range(cli.repeats)]  # interleaved
            serial = min((pair[0] for pair in repeats), key=lambda r: r["wall_s_per_step"])
            overlapped = min((pair[1] for pair in repeats), key=lambda r: r["wall_s_per_step"])
            g, j, t = serial["generation_s"], serial["judging_s"], serial["training_s"]
            row = {
                "target_judging_over_training": ratio,
                "latency_s_per_call": latency,
                "measured_judging_over_training": j / t,
                "serial": serial,
                "async": overlapped,
                "wall_s_per_step_all_repeats": {
                    "serial": [pair[0]["wall_s_per_step"] for pair in repeats],
                    "async": [pair[1]["wall_s_per_step"] for pair in repeats],
                },
                "speedup_serial_over_async": serial["wall_s_per_step"] / overlapped["wall_s_per_step"],
                "speedup_limit": (g + j + t) / (g + max(j, t)),
            }
            results.append(row)
            print(
                f"judging/training {j / t:.2f} (latency {latency * 1000:.0f} ms): serial "
                f"{serial['wall_s_per_step']:.2f} s/step, async {overlapped['wall_s_per_step']:.2f} s/step, "
                f"speed-up {row['speedup_serial_over_async']:.2f} (limit {row['speedup_limit']:.2f}), overlap "
                f"{overlapped['overlap_fraction']:.2f}",
                flush=True,
            )
    payload = {
        "config": {
            "device": f"cpu x{os.cpu_count()}",
            "platform": platform.platform(),
            "torch": torch.__version__,
            "policy": "config-built Llama, hidden 128, 2 layers",
            "steps": cli.steps,
            "per_device_train_batch_size": cli.batch_size,
            "num_generations": cli.num_generations,
            "max_completion_length": cli.max_completion_length,
            "judge": "ScriptedOpenAIServer(ScriptedLongRewardJudge) on loopback, own process, fixed latency per call",
            "calibration": {
                "training_s": train_s,
                "judging_s_at_0": fast["judging_s"],
                "judging_s_per_latency_s": per_latency,
            },
        },
        "results": results,
    }
    Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {cli.json}")


if __name__ == "__main__":
    main()
