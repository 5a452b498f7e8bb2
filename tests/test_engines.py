"""`LongContextDPOTrainer` under FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 on two CPU ranks (gloo), launched with
`accelerate launch --config_file accelerate_configs/<engine>_cpu.yaml tests/distributed/engine_step.py`, judged over
HTTP by the scripted judge. docs/engines.md says what is tested where.

Per engine and mode (full fine-tuning, LoRA): two online steps (generation through TRL's
`unwrap_model_for_generation`, prompt-once on, a checkpoint after each step), then (full fine-tuning on every engine,
LoRA under ZeRO-3) a second job that resumes from the first checkpoint. Checked: the engine really ran; every step generated; every DPO forward of the policy was one packed
row per pair; the parameters changed and are the same on both ranks; the checkpoint holds the gathered parameters;
the resumed step made no judge call and ended at the same parameters; and every engine trains the parameters DDP
trains (same samples, same pairs, same updates, to float rounding). QLoRA: one step, against DDP.

DeepSpeed comes with the dev extra (`trl-longreward[deepspeed]`): without it its tests fail, saying how to install it.
`benchmarks/gpu_engine_check.sh` runs the GPU configs on GPUs (`test_engines_on_gpus`, marked `gpu`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from servers import run_in_process_group

from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "distributed" / "engine_step.py"
CONFIGS = REPO_ROOT / "accelerate_configs"
CPU_CONFIGS = {
    "ddp": "multi_cpu.yaml",
    "fsdp2": "fsdp2_cpu.yaml",
    "zero2": "deepspeed_zero2_cpu.yaml",
    "zero3": "deepspeed_zero3_cpu.yaml",
}
GPU_CONFIGS = {"fsdp2": "fsdp2.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
NUM_RANKS = 2
MAX_STEPS = 2
MAX_COMPLETION_LENGTH = 8  # engine_step.py's default
MODE_ARGS = {"full": [], "lora": [], "qlora": ["--hidden_size", "64"]}  # bitsandbytes' 4-bit layers want >= 64
TIMEOUT_S = 420
DEEPSPEED_HINT = (
    "pip install deepspeed (0.19.8 checked; CPU ranks use its CPU accelerator and gloo), see docs/engines.md"
)


def digest_score(question: str, response: str) -> float:
    """A deterministic, response-dependent helpfulness (0-10), so samples of one prompt get different rewards."""
    return int(hashlib.sha256(response.encode("utf-8")).hexdigest(), 16) % 101 / 10


def require_deepspeed() -> None:
    """Fail, saying why and how to install it, when `import deepspeed` fails: the dev extra installs it, so a
    missing DeepSpeed is a broken environment, not a reason to skip."""
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means DeepSpeed cannot run here
        pytest.fail(f"`import deepspeed` failed ({type(err).__name__}: {err}); {DEEPSPEED_HINT}")


def launch(
    config: Path, out: Path, judge_url: str, *args: str, launcher: tuple[str, ...] = ()
) -> tuple[int | None, str, float]:
    """`accelerate launch` engine_step.py with `config` in its own process group; (exit code or None on timeout,
    combined output, seconds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *launcher,
        str(SCRIPT), "--judge_url", judge_url, "--output_dir", str(out), *args,
    ]  # fmt: skip
    return run_in_process_group(command, env=env, cwd=REPO_ROOT, timeout_s=TIMEOUT_S)


def check_finished(code: int | None, output: str, what: str) -> None:
    log = f"output (last 8000 chars):\n{output[-8000:]}"
    assert code is not None, f"{what} did not finish within {TIMEOUT_S} s (deadlock?)\n{log}"
    assert code == 0, f"{what} exited with {code}\n{log}"


def records(out: Path, tag: str, num_ranks: int = NUM_RANKS) -> list[dict[str, Any]]:
    """The per-rank records engine_step.py wrote for run `tag`."""
    found = []
    for rank in range(num_ranks):
        path = out / f"{tag}-rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no record for {tag}"
        found.append(json.loads(path.read_text(encoding="utf-8")))
    return found


def parameters(out: Path, tag: str) -> dict[str, torch.Tensor]:
    """The gathered (trainable) parameters rank 0 saved after run `tag`."""
    from safetensors.torch import load_file

    return load_file(out / f"{tag}-params.safetensors")


def max_difference(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference over all tensors, and the parameter it is in."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))[:5]
    diffs = {name: float((actual[name] - expected[name]).abs().max()) for name in expected}
    worst = max(diffs, key=diffs.__getitem__)
    return diffs[worst], worst


def check_run(runs: list[dict[str, Any]], engine: str, mode: str, steps: int, generations: int | None = None) -> None:
    """What every rank of one job must have seen: the engine, generation (`generations` calls, default one per
    step), prompt-once rows, synced parameters."""
    for record in runs:
        assert record["engine"] == engine and record["num_processes"] == NUM_RANKS, record
        assert record["backend"] == "gloo" and record["mode"] == mode, record
        assert record["global_step"] == MAX_STEPS, record
        # generation went through TRL's unwrap_model_for_generation, once per step, on the engine's model
        seen_calls = record["generations"]
        assert len(seen_calls) == (steps if generations is None else generations), seen_calls
        for seen in seen_calls:
            if engine == "fsdp2":  # the FSDP2-managed policy itself: its layers are gathered one by one
                assert seen["dtensor_params"] > 0, seen
            if engine == "zero3":  # ZeRO-3 partitions gathered for `generate`
                assert seen["zero3_params"] > 0 and seen["empty_params"] == 0, seen
            if engine.startswith("zero"):
                assert seen["wrapped"] == "DeepSpeedEngine" and seen["unwrapped"] != "DeepSpeedEngine", seen
        # prompt-once: each DPO forward of the policy ran one packed row per pair (1 prompt per rank and step) with
        # the 4-D branch mask; with adapters the reference is the same model, adapters off: 2 forwards per step
        forwards = record["dpo_forwards"]
        assert len(forwards) == steps * (1 if mode == "full" else 2), forwards
        assert all(f["input_ids"][0] == 1 and f["mask_dim"] == 4 for f in forwards), forwards
    first, second = runs
    assert first["before"] == second["before"] != first["after"], "training did not change the parameters"
    assert first["after"] == second["after"], "the ranks ended with different parameters"
    if first["reference"] is not None:  # a separate reference model: prepared by the engine, never trained
        assert first["reference"] == second["reference"] == first["before"], (first["reference"], first["before"])


def check_checkpoint(record: dict[str, Any], num_parameters: int) -> None:
    """The last checkpoint holds exactly the gathered parameters (rank 0 compared them)."""
    saved = record["saved_matches"]
    assert saved is not None, f"no model or adapter weights in {record['checkpoint']}: {record['checkpoint_files']}"
    assert saved["compared"] == num_parameters and not saved["missing"], saved
    assert saved["max_abs_diff"] == 0.0, saved


@pytest.fixture(scope="module")
def ddp_parameters(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], dict[str, torch.Tensor]]:
    """DDP's parameters after `steps` steps in `mode` (the same job under accelerate_configs/multi_cpu.yaml), run
    once per module and mode."""
    from trl_longreward.models import default_model_path

    default_model_path()  # the tokenizer is converted once here, before ranks would wait on the same lock
    cache: dict[tuple[str, int, bool], dict[str, torch.Tensor]] = {}

    def get(mode: str, steps: int, asynchronous: bool = False) -> dict[str, torch.Tensor]:
        if (mode, steps, asynchronous) not in cache:
            out = tmp_path_factory.mktemp(f"ddp-{mode}")
            with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=digest_score)) as server:
                args = ["--mode", mode, "--max_steps", str(steps), "--tag", "ddp", *MODE_ARGS[mode]]
                args += ["--async_judging"] if asynchronous else []
                code, output, _ = launch(CONFIGS / CPU_CONFIGS["ddp"], out, server.base_url, *args)
            check_finished(code, output, f"the DDP reference ({mode})")
            assert all(r["engine"] == "ddp" for r in records(out, "ddp")), records(out, "ddp")
            cache[mode, steps, asynchronous] = parameters(out, "ddp")
        return cache[mode, steps, asynchronous]

    return get


# Every engine x mode trains and checkpoints; a resume (a second job from the first checkpoint, one launch more) is
# run for full fine-tuning on every engine and for LoRA under ZeRO-3 (partitioned parameters and adapter checkpoints
# together): the launches are what these tests cost (about 25 s each on 2 CPU cores). LoRA under FSDP2 and ZeRO-3
# runs with async_judging (under ZeRO-3 resumed too: the sampled batches saved per rank are judged again from the
# cache), against DDP with async_judging.
ENGINE_RUNS = [
    ("fsdp2", "full", True, False),
    ("zero2", "full", True, False),
    ("zero3", "full", True, False),
    ("fsdp2", "lora", False, True),
    ("zero2", "lora", False, False),
    ("zero3", "lora", True, True),
]


@pytest.mark.parametrize(
    ("engine", "mode", "resume", "asynchronous"),
    ENGINE_RUNS,
    ids=[f"{e}-{m}{'-async' if a else ''}" for e, m, _, a in ENGINE_RUNS],
)
def test_engine_trains_checkpoints_and_resumes(
    engine: str,
    mode: str,
    resume: bool,
    asynchronous: bool,
    tmp_path: Path,
    ddp_parameters: Callable[..., dict[str, torch.Tensor]],
) -> None:
    """Two steps with a checkpoint after each, (where `resume`) resumed from the first: 0 repeated judge calls, the
    same result; the same parameters as DDP. With `async_judging`, step 1 samples both steps' prompts (the second
    in the background), and a resumed job samples nothing: it judges the saved samples again (the cache answers)."""
    extra = ["--async_judging"] if asynchronous else []
    if engine != "fsdp2":
        require_deepspeed()
    config = CONFIGS / CPU_CONFIGS[engine]
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=digest_score)) as server:
        code, output, _ = launch(config, tmp_path, server.base_url, "--mode", mode, "--tag", "first", *extra)
        check_finished(code, output, f"{engine} ({mode})")
        sent = server.num_chat_requests
        if resume:
            checkpoint = ["--resume_from_checkpoint", str(tmp_path / "trainer" / "checkpoint-1")]
            code, output, _ = launch(
                config, tmp_path, server.base_url, "--mode", mode, "--tag", "resumed", *checkpoint, *extra
            )
            check_finished(code, output, f"{engine} ({mode}), resumed")
        resent = server.num_chat_requests - sent

    first = records(tmp_path, "first")
    check_run(first, engine, mode, steps=MAX_STEPS)
    trained = parameters(tmp_path, "first")
    check_checkpoint(first[0], len(trained))
    if resume:
        resumed = records(tmp_path, "resumed")
        # the resumed job runs step 2 only (with async_judging on the samples saved in the checkpoint)
        check_run(resumed, engine, mode, steps=MAX_STEPS - 1, generations=0 if asynchronous else None)
        check_checkpoint(resumed[0], len(trained))
        # The judge-call cache (OUT/trainer/judge_cache.sqlite) made the resumed step free; it trained the same way.
        assert sent > 0 and resent == 0, (sent, resent)
        assert all(record["judge_calls"][-1] == 0 for record in resumed), [r["judge_calls"] for r in resumed]
        difference, name = max_difference(parameters(tmp_path, "resumed"), trained)
        assert difference <= 1e-6, f"resumed run ended {difference} away from the uninterrupted one ({name})"

    # The same samples, pairs and updates as under DDP (the engines only reorder float sums).
    difference, name = max_difference(trained, ddp_parameters(mode, MAX_STEPS, asynchronous))
    assert difference <= 1e-5, f"{engine} ended {difference} away from DDP ({name})"


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_engine_trains_qlora_like_ddp(
    engine: str, tmp_path: Path, ddp_parameters: Callable[[str, int], dict[str, torch.Tensor]]
) -> None:
    """QLoRA (bitsandbytes 4-bit base, packed in uint8: FSDP2 leaves those weights unsharded): one step, as DDP."""
    if engine != "fsdp2":
        require_deepspeed()
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the `quantization` extra)")
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=digest_score)) as server:
        args = ["--mode", "qlora", "--max_steps", "1", "--tag", "qlora", *MODE_ARGS["qlora"]]
        code, output, _ = launch(CONFIGS / CPU_CONFIGS[engine], tmp_path, server.base_url, *args)
    check_finished(code, output, f"{engine} (qlora)")
    runs = records(tmp_path, "qlora")
    for record in runs:
        assert record["engine"] == engine and record["global_step"] == 1, record
        assert len(record["generations"]) == 1 and len(record["dpo_forwards"]) == 2, record
        assert all(f["input_ids"][0] == 1 and f["mask_dim"] == 4 for f in record["dpo_forwards"]), record
    assert runs[0]["before"] != runs[0]["after"] == runs[1]["after"]
    trained = parameters(tmp_path, "qlora")
    check_checkpoint(runs[0], len(trained))
    difference, name = max_difference(trained, ddp_parameters("qlora", 1))
    assert difference <= 1e-5, f"{engine} (qlora) ended {difference} away from DDP ({name})"


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_sequence_parallelism_under_the_engine_trains_like_ddp(
    engine: str, tmp_path: Path, ddp_parameters: Callable[..., dict[str, torch.Tensor]]
) -> None:
    """`sp_size=2` on the 2 ranks (one group) under the engine: each rank samples its own prompt and has it judged
    over HTTP, the group trains both ranks' pairs one after the other, each rank holding half of every packed row;
    the parameters after two steps are DDP's without sequence parallelism (itself one process's step on the union,
    tests/test_ddp_uneven.py)."""
    if engine != "fsdp2":
        require_deepspeed()
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=digest_score)) as server:
        args = ["--mode", "full", "--tag", "sp", "--sp_size", "2", "--max_steps", str(MAX_STEPS)]
        code, output, _ = launch(CONFIGS / CPU_CONFIGS[engine], tmp_path, server.base_url, *args)
    check_finished(code, output, f"{engine} with sp_size=2")
    runs = records(tmp_path, "sp")
    for record in runs:
        assert record["engine"] == engine and record["sp_size"] == 2 and record["global_step"] == MAX_STEPS, record
        assert len(record["generations"]) == MAX_STEPS, record["generations"]  # each rank sampled its own prompt
        # per step, one forward of the policy per rank of the group, each on ONE packed row cut in half
        forwards = record["dpo_forwards"]
        assert len(forwards) == 2 * MAX_STEPS and all(f["mask_dim"] == 4 for f in forwards), forwards
    assert runs[0]["dpo_forwards"] == runs[1]["dpo_forwards"]  # the same slices' shapes on both ranks
    assert runs[0]["before"] != runs[0]["after"] == runs[1]["after"]
    difference, name = max_difference(parameters(tmp_path, "sp"), ddp_parameters("full", MAX_STEPS))
    assert difference <= 1e-5, f"{engine} with sp_size=2 ended {difference} away from DDP ({name})"


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_ranks_with_different_lengths_and_pairs_stay_in_step(engine: str, tmp_path: Path) -> None:
    """Rank 0's responses all end after 1 token while rank 1's run to the limit (so the ranks' `generate` calls run
    different numbers of sharded forwards), and rank 1 has no pair (its zero-weighted stand-in step): the job ends,
    and the ranks stay in sync."""
    if engine != "fsdp2":
        require_deepspeed()
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=digest_score)) as server:
        args = ["--max_steps", "1", "--tag", "uneven", "--early_eos_rank", "0", "--pairless_rank", "1"]
        code, output, _ = launch(
            CONFIGS / CPU_CONFIGS[engine], tmp_path, server.base_url, *args, "--ddp_timeout", "120"
        )
    check_finished(code, output, f"{engine} with uneven ranks")
    early, late = records(tmp_path, "uneven")
    assert early["engine"] == late["engine"] == engine
    assert all(length == 1 for length in early["completion_lengths"][0]), early["completion_lengths"]
    assert max(late["completion_lengths"][0]) > 1, late["completion_lengths"]
    assert early["local_pairs"] == [1] and late["local_pairs"] == [0], (early["local_pairs"], late["local_pairs"])
    assert early["online_pairs"] == late["online_pairs"] == [1.0]
    assert early["before"] == late["before"] != early["after"] == late["after"]


# ----- GPUs: the shipped configs (benchmarks/gpu_engine_check.sh runs the same check) -----


def first_error(output: str) -> str:
    """The first exception line a worker printed (`ValueError: ...`), else the last lines of the output."""
    lines = [line.removeprefix("[rank0]: ").strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        name = line.split(":", 1)[0]
        if name.endswith(("Error", "Exception")) and " " not in name and "ChildFailedError" not in name:
            return line
    return " | ".join(lines[-3:])


def gpu_check(engine: str, mode: str, out: Path, num_processes: int) -> tuple[bool, str]:
    """One bf16 step (and a checkpoint) of `engine` with its GPU config on `num_processes` GPUs; (passed, one line)."""
    if engine != "fsdp2":
        try:
            import deepspeed  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return False, f"{engine:5} {mode:5}: SKIPPED (import deepspeed failed: {type(err).__name__}: {err})"
    launcher = ("--num_processes", str(num_processes), "--main_process_port", "0")
    args = ["--mode", mode, "--max_steps", "1", "--tag", "gpu", "--bf16", "--hidden_size", "64"]
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=digest_score)) as server:
        config = CONFIGS / GPU_CONFIGS[engine]
        code, output, seconds = launch(config, out, server.base_url, *args, "--ddp_timeout", "300", launcher=launcher)
        judge_requests = server.num_chat_requests
    (out / "launch.log").write_text(output, encoding="utf-8")
    head = f"{engine:5} {mode:5}: "
    if code != 0:
        return False, head + f"FAILED (exit {code}, {seconds:.0f} s; log {out / 'launch.log'}): {first_error(output)}"
    try:
        runs = records(out, "gpu", num_processes)
        for record in runs:
            assert record["engine"] == engine and record["global_step"] == 1, "wrong engine or no step"
            assert record["device"].startswith("cuda"), f"ran on {record['device']}"
            assert len(record["generations"]) == 1, "no generation"
            assert record["dpo_forwards"] and all(f["mask_dim"] == 4 for f in record["dpo_forwards"]), "not packed"
            assert record["after"] == runs[0]["after"] != record["before"], "parameters unchanged or out of sync"
        saved = runs[0]["saved_matches"]
        assert saved is not None and not saved["missing"], f"checkpoint: {runs[0]['checkpoint_files']}"
        assert saved["max_abs_diff"] <= 1e-2, f"checkpoint differs by {saved['max_abs_diff']}"
    except AssertionError as err:
        return False, head + f"FAILED ({seconds:.0f} s): {err}"
    first = runs[0]
    return True, head + (
        f"OK {seconds:.0f} s, {num_processes} GPU(s), loss {first['losses'][-1]:.4f}, "
        f"pairs {first['online_pairs'][-1]:.0f}, judge requests {judge_requests}, "
        f"prompt-once rows {first['dpo_forwards'][0]['input_ids']}, "
        f"checkpoint = gathered (max diff {saved['max_abs_diff']:.1e})"
    )


def gpu_check_main(engines: list[str], modes: list[str], out: Path, num_processes: int) -> int:
    """Every engine x mode on the GPUs, one printed line each; 0 when all passed (skipped DeepSpeed counts as failed)."""
    ok = True
    for engine in engines:
        for mode in modes:
            passed, line = gpu_check(engine, mode, out / f"{engine}-{mode}", num_processes)
            print(line, flush=True)
            ok &= passed
    return 0 if ok else 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_engines_on_gpus(engine: str, tmp_path: Path) -> None:
    """The shipped GPU configs, one bf16 step each on all GPUs (at most 8), full fine-tuning."""
    if engine != "fsdp2":
        require_deepspeed()
    passed, line = gpu_check(engine, "full", tmp_path, min(torch.cuda.device_count(), 8))
    assert passed, line
