"""`async_judging`: the judge scores step t+1's samples while step t trains, and every guarantee of the serial trainer
holds: the same pairs for the same seed (one step later), resume with no judge call twice, outage stop and resume,
`num_iterations`, gradient accumulation, offline mixing, the callback and the HTML report, and no batch judged and
then silently thrown away. Overlap is shown by the order of events (a judge call that waits until a training step
has started), never by a stopwatch.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tiny_models import JudgedSteps, prompts_dataset, small_dpo_config, tiny_llama
from transformers import TrainerCallback

from trl_longreward import JudgeUnavailableError, LongContextDPOTrainer, LongRewardFunction, OpenAIJudge
from trl_longreward.report import JudgedStepRecorder, write_report
from trl_longreward.testing.openai_server import ScriptedOpenAIServer
from trl_longreward.testing.scripted_judge import ScriptedLongRewardJudge
from trl_longreward.trainer.trainer import SAMPLED_BATCHES_FILE

HANG_GUARD_S = 120.0


def length_helpfulness(question: str, response: str) -> float:
    return float(len(response) % 11)  # samples of different lengths get different rewards: pairs exist


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def judge_server():
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
        yield server


def _reward(server, cache_path: Path) -> LongRewardFunction:
    return LongRewardFunction(
        judge=OpenAIJudge("scripted-judge", server.base_url, max_retries=0),
        retriever="bm25",
        chunk_tokenizer="regex",
        cache_path=str(cache_path),
    )


def _trainer(model_path, out: Path, server, *, dataset=None, callbacks=(), reward=None, **config):
    judged = JudgedSteps()
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=small_dpo_config(out, **config),
        train_dataset=dataset if dataset is not None else prompts_dataset(6),
        callbacks=[judged, *callbacks],
        reward_funcs=[reward or _reward(server, out / "judge_cache.sqlite")],
    )
    trainer.judged_steps = judged
    return trainer


def _pairs(step) -> list:
    """A judged micro-step's samples, rewards and chosen/rejected texts."""
    k = step.num_generations
    pairs = [
        [step.completions[i * k + s.chosen], step.completions[i * k + s.rejected]] if s.ok else s.skip_reason
        for i, s in enumerate(step.selections)
    ]
    return [step.completions, step.rewards, pairs]


def _logs(trainer) -> list[dict[str, Any]]:
    return [log for log in trainer.state.log_history if "loss" in log]


# ----- the same pairs as the serial trainer, one step later -----


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, marks=pytest.mark.slow, id="plain"),
        pytest.param(
            {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 1},
            marks=pytest.mark.slow,
            id="accumulation",
        ),
        pytest.param({"num_iterations": 2}, id="num_iterations"),
    ],
)
def test_the_same_seed_gives_the_serial_trainers_pairs_sampled_one_step_earlier(model_path, tmp_path, options):
    """With a learning rate of 0 the policy is the same at every step, so sampling a batch one step earlier draws
    the same tokens: the async run trains on exactly the serial run's pairs, pays the same judge calls (none for a
    batch it never trains on), and records that each pair was sampled one step before the step that trains it."""
    runs = {}
    for mode in (False, True):
        with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:
            trainer = _trainer(
                model_path,
                tmp_path / str(mode),
                server,
                dataset=prompts_dataset(8),  # one epoch: an epoch's first step is judged before it trains
                async_judging=mode,
                learning_rate=0.0,
                max_steps=4,
                **options,
            )
            trainer.train()
            runs[mode] = (trainer, server.num_chat_requests)
    (serial, serial_calls), (overlapped, async_calls) = runs[False], runs[True]
    assert [_pairs(s) for s in overlapped.judged_steps.steps] == [_pairs(s) for s in serial.judged_steps.steps]
    assert any(isinstance(p, list) for s in overlapped.judged_steps.steps for p in _pairs(s)[2])
    assert async_calls == serial_calls > 0 and overlapped.untrained_batches == []
    assert [s.step for s in overlapped.judged_steps.steps] == [s.step for s in serial.judged_steps.steps]
    per_step = options.get("gradient_accumulation_steps", 1)
    serial_policy = [s.policy_step for s in serial.judged_steps.steps]
    assert serial_policy == [s.step - 1 for s in serial.judged_steps.steps]
    async_policy = [s.policy_step for s in overlapped.judged_steps.steps]
    if options.get("num_iterations") == 2:  # steps 1-2 share batch 0, steps 3-4 batch 1 (sampled at step 2)
        assert async_policy == [0, 1] and serial_policy == [0, 2]
    else:  # the first step is judged before it trains; every later batch was sampled one step earlier
        assert async_policy == [0] * per_step + [s.step - 2 for s in overlapped.judged_steps.steps[per_step:]]
    staleness = [log["pairs/staleness"] for log in _logs(overlapped)]
    assert staleness == ([0, 1, 1, 2] if options.get("num_iterations") == 2 else [0, 1, 1, 1])
    assert [log["pairs/staleness"] for log in _logs(serial)] == (
        [0, 1, 0, 1] if "num_iterations" in options else [0] * 4
    )
    for key in ("long_reward/chosen_mean", "pairs/online", "long_reward/reward/mean", "loss"):
        assert [log.get(key) for log in _logs(overlapped)] == pytest.approx([log.get(key) for log in _logs(serial)])


class StepEvents(TrainerCallback):
    """Records (event, step) in order: the DPO loss of each step (through the trainer) and each judge call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def add(self, event: str, step: int) -> None:
        with self.changed:
            self.events.append((event, step))
            self.changed.notify_all()

    def wait_for(self, event: tuple[str, int]) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: event in self.events, timeout=HANG_GUARD_S)


def test_the_next_batch_is_judged_while_this_step_trains(model_path, tmp_path, judge_server, monkeypatch):
    """The judge call for the batch of step t+1 does not return until step t's DPO loss has been computed: a serial
    trainer would wait forever (the hang guard would fail the test); the async one trains meanwhile."""
    events = StepEvents()
    reward = _reward(judge_server, tmp_path / "cache.sqlite")

    def blocking_reward(prompts, completions, trainer_state, **kwargs):
        sampled_at = trainer_state.global_step  # the policy step that sampled this batch
        events.add("judge_start", sampled_at)
        if sampled_at > 0 or events.events.count(("judge_start", 0)) > 1:  # every batch after the first
            assert events.wait_for(("loss", sampled_at + 1)), "the judge waited for a training step that never ran"
        values = reward(prompts=prompts, completions=completions, **kwargs)
        events.add("judge_end", sampled_at)
        return values

    blocking_reward.__name__ = "long_reward"
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=small_dpo_config(tmp_path / "out", async_judging=True, max_steps=3),
        train_dataset=prompts_dataset(6),
        reward_funcs=[blocking_reward],
    )
    real_loss = type(trainer).compute_loss

    def recording_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "pair_shares" in inputs:
            events.add("loss", self.state.global_step + 1)
        return real_loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(type(trainer), "compute_loss", recording_loss)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    reward.close()
    ends = [i for i, e in enumerate(events.events) if e[0] == "judge_end"]
    starts = [e for e in events.events if e[0] == "judge_start"]
    assert starts == [("judge_start", 0), ("judge_start", 0), ("judge_start", 1)]  # nothing sampled past the end
    loss = {step: events.events.index(("loss", step)) for step in (1, 2, 3)}
    # step 1's batch is judged before step 1 trains; the batch of step t+1 is in flight while step t trains (its
    # judge call returns only after step t's loss) and is judged before step t+1 trains on it
    assert ends[0] < loss[1] < ends[1] < loss[2] < ends[2] < loss[3]
    logs = _logs(trainer)
    assert [log["pairs/staleness"] for log in logs] == [0, 1, 1] and all(log["pairs/online"] > 0 for log in logs)
    assert all("time/judging_background_s" in log for log in logs)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


# ----- checkpoints and resume -----


def test_a_resume_judges_the_batch_in_flight_from_the_cache_and_makes_the_same_pairs(
    model_path, tmp_path, judge_server
):
    """The checkpoint after step 1 holds the batch sampled for step 2 (its judging was in flight): a run resumed there
    judges those samples again, all from the judge cache (0 requests), and trains steps 2-3 on the same pairs."""
    out = tmp_path / "out"
    full = _trainer(
        model_path, out, judge_server, async_judging=True, max_steps=3, save_strategy="steps", save_steps=1
    )
    full.train()
    assert (out / "checkpoint-1" / SAMPLED_BATCHES_FILE.format(rank=0)).is_file()
    sent = judge_server.num_chat_requests
    resumed = _trainer(model_path, out, judge_server, async_judging=True, max_steps=3)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert judge_server.num_chat_requests == sent  # every call of steps 2-3 answered from the cache
    assert [_pairs(s) for s in resumed.judged_steps.steps] == [_pairs(s) for s in full.judged_steps.steps[1:]]
    assert [s.policy_step for s in resumed.judged_steps.steps] == [0, 1]  # step 2's batch: sampled before the save
    assert [log["long_reward/judge_calls"] for log in _logs(resumed) if log["step"] > 1] == [0, 0]
    assert resumed.pair_stats == full.pair_stats


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_batch_judged_ahead_and_never_trained_on_is_reported(model_path, tmp_path, judge_server, caplog):
    """A callback stops training after step 1, when step 2's batch is already judged: its cost is reported (a warning
    and `untrained_batches`), not silently thrown away; at max_steps nothing is sampled past the last step."""
    trainer = _trainer(model_path, tmp_path / "out", judge_server, async_judging=True, callbacks=[StopAfter(1)])
    with caplog.at_level(logging.WARNING, logger="trl_longreward.trainer.trainer"):
        trainer.train()
    assert trainer.state.global_step == 1
    (left,) = trainer.untrained_batches
    assert left["policy_step"] == 0 and left["prompts"] == 2 and left["judge_calls"] > 0
    assert "1 batch(es) sampled and judged ahead but not trained on" in caplog.text
    assert f"({left['judge_calls']} judge calls)" in caplog.text


def test_a_judge_outage_stops_with_a_checkpoint_and_the_resumed_run_goes_on(model_path, tmp_path):
    """The judge goes down after step 1: after max_judge_outage_steps failed steps the run saves a checkpoint (with the
    batches sampled but not trained on) and raises; with the judge back, the resumed run judges them and trains."""
    out = tmp_path / "out"
    with ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)) as server:

        class GoDown(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    server.set_down(True)

        trainer = _trainer(
            model_path, out, server, dataset=prompts_dataset(12), async_judging=True, max_steps=6,
            max_judge_outage_steps=2, callbacks=[GoDown()],
        )  # fmt: skip
        with pytest.raises(JudgeUnavailableError, match="resume_from_checkpoint"):
            trainer.train()
        # step 2's batch was judged during step 1, before the outage: steps 3 and 4 fail, the second stops the run
        (checkpoint,) = out.glob("checkpoint-*")
        assert checkpoint.name == "checkpoint-3"
        assert (checkpoint / SAMPLED_BATCHES_FILE.format(rank=0)).is_file()
        assert [log["pairs/online"] for log in _logs(trainer)][:2] != [0, 0]
        server.set_down(False)
        resumed = _trainer(model_path, out, server, dataset=prompts_dataset(12), async_judging=True, max_steps=5)
        resumed.train(resume_from_checkpoint=str(checkpoint))
    logs = [log for log in _logs(resumed) if log["step"] > 3]
    assert [log["step"] for log in logs] == [4, 5] and all(log["pairs/online"] > 0 for log in logs)


# ----- the trainer's other options -----


def test_num_iterations_samples_each_batch_once_one_step_ahead(model_path, tmp_path, judge_server, monkeypatch):
    from trl_longreward.trainer.generation import PolicySampler

    sampled = []
    real = PolicySampler.sample

    def counting(self, model_wrapped, rows, *, global_step):
        sampled.append((global_step, [tuple(r["prompt_ids"]) for r in rows]))
        return real(self, model_wrapped, rows, global_step=global_step)

    monkeypatch.setattr(PolicySampler, "sample", counting)
    trainer = _trainer(model_path, tmp_path / "out", judge_server, async_judging=True, max_steps=4, num_iterations=2)
    trainer.train()
    steps = trainer.judged_steps.steps
    assert [s.step for s in steps] == [1, 3]  # judged pairs taken at steps 1 and 3, trained on at 1-2 and 3-4
    # batch 1 is sampled at step 1 (global step 0), batch 2 at step 2 (global step 1), while step 2 trains batch 1
    assert [step for step, _ in sampled] == [0, 1] and sampled[0][1] != sampled[1][1]
    assert trainer.pair_stats["prompts"] == 4


@pytest.mark.parametrize(("ratio", "offline_per_online"), [(0.5, 1.0)])
def test_offline_pairs_are_mixed_at_the_configured_ratio(
    model_path, tmp_path, judge_server, ratio, offline_per_online
):
    offline = Dataset.from_list(
        [{"prompt": f"Short question {i}?", "chosen": " A good answer.", "rejected": " Bad."} for i in range(5)]
    )
    trainer = LongContextDPOTrainer(
        model=model_path,
        args=small_dpo_config(tmp_path / "out", async_judging=True, max_steps=2, offline_ratio=ratio),
        train_dataset=prompts_dataset(6),
        reward_funcs=[_reward(judge_server, tmp_path / "cache.sqlite")],
        offline_dataset=offline,
    )
    trainer.train()
    logs = _logs(trainer)
    assert len(logs) == 2
    for log in logs:
        assert log["pairs/online"] > 0 and log["pairs/offline"] == max(
            1, round(log["pairs/online"] * offline_per_online)
        )
    assert trainer.offline_pairs.cursor == sum(log["pairs/offline"] for log in logs)


def test_the_report_shows_the_steps_that_trained_on_each_batch(model_path, tmp_path, judge_server):
    recorder = JudgedStepRecorder()
    trainer = _trainer(model_path, tmp_path / "out", judge_server, async_judging=True, callbacks=[recorder])
    trainer.train()
    assert sorted({record["step"] for record in recorder.steps}) == [1, 2, 3]
    report = write_report(tmp_path / "report", trainer.state.log_history, recorder.steps, title="async judging")
    assert report.is_file() and "async judging" in report.read_text(encoding="utf-8")
    lines = (tmp_path / "report" / "judged_samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 * 2  # every trained step's prompts, each once


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"async_judging": True, "max_staleness": 2}, "only 1 is supported"),
        ({"max_staleness": 0}, "only 1 is supported"),
        ({"async_judging": True, "auto_find_batch_size": True}, "cannot be combined with auto_find_batch_size"),
    ],
)
def test_combinations_async_judging_cannot_make_exact_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_dpo_config(tmp_path / "out", **overrides)


# ----- kill -9 mid-step, and two ranks -----

CHILD = Path(__file__).resolve().parent / "distributed" / "async_judging_child.py"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_mid_step_then_resume_repeats_no_judge_call_and_makes_the_same_pairs(model_path, tmp_path):
    """An async child (checkpoint every step) is killed with SIGKILL inside step 2, while it waits for the judging of
    step 2's batch (sampled and saved in checkpoint-1; 5 of its calls answered after the save, the rest held). Resumed
    from checkpoint-1 it judges that batch again from the cache and makes exactly the pairs of an uninterrupted run;
    no judge call answered before the kill is asked again, and none twice."""
    import os
    import signal
    import sys

    from test_reliability import KillSwitch, fingerprint, finish, kill_group, read_jsonl, start, wait_for

    run_dir, ref_dir = tmp_path / "run", tmp_path / "reference"
    switch = KillSwitch(ScriptedLongRewardJudge(helpfulness=length_helpfulness), run_dir / "checkpoint-1", 5)
    reference_server = ScriptedOpenAIServer(ScriptedLongRewardJudge(helpfulness=length_helpfulness)).start()
    server = ScriptedOpenAIServer(switch).start()

    def train(output_dir: Path, url: str, record: str, *resume: Any) -> list[Any]:
        options = [
            "--model",
            model_path,
            "--judge_url",
            url,
            "--output_dir",
            output_dir,
            "--record",
            output_dir / record,
        ]
        return [sys.executable, CHILD, "train", *options, "--max_steps", 3, *resume]

    children = []
    try:
        reference = start(train(ref_dir, reference_server.base_url, "steps.jsonl"), tmp_path / "reference.log")
        crashed = start(train(run_dir, server.base_url, "steps.jsonl"), tmp_path / "crashed.log")
        children += [reference, crashed]
        wait_for(
            lambda: switch.quiet(run_dir / "judge_cache.sqlite"),
            process=crashed,
            log=tmp_path / "crashed.log",
            what="requests held after checkpoint-1",
        )
        os.killpg(crashed.pid, signal.SIGKILL)
        crashed.wait()
        with switch.lock:
            switch.passthrough = True
            answered = {fingerprint(body) for body in switch.answered}
            held = {fingerprint(body) for body in switch.held}
        switch.release.set()
        resume_from = len(server.requests)
        resumed = start(
            train(run_dir, server.base_url, "resumed.jsonl", "--resume_from_checkpoint", run_dir / "checkpoint-1"),
            tmp_path / "resumed.log",
        )
        children.append(resumed)
        tails = {
            name: finish(p, tmp_path / f"{name}.log") for name, p in (("reference", reference), ("resumed", resumed))
        }
        resumed_bodies = [fingerprint(body) for body in server.requests[resume_from:]]
        reference_bodies = [fingerprint(body) for body in reference_server.requests]
    finally:
        for child in children:
            kill_group(child)
        server.stop()
        reference_server.stop()
    assert crashed.returncode == -signal.SIGKILL
    assert reference.returncode == 0 and resumed.returncode == 0, tails
    expected = read_jsonl(ref_dir / "steps.jsonl")
    assert [r["step"] for r in expected] == [1, 2, 3] and [r["policy_step"] for r in expected] == [0, 0, 1]
    assert read_jsonl(run_dir / "steps.jsonl") == expected[:1]  # killed inside step 2
    assert read_jsonl(run_dir / "resumed.jsonl") == expected[1:]  # the same samples, rewards and pairs
    assert answered and held and not answered & set(resumed_bodies)  # nothing answered before the kill asked again
    assert len(resumed_bodies) == len(set(resumed_bodies))
    assert set(resumed_bodies) == set(reference_bodies) - answered  # exactly the calls not answered before
    assert held & set(reference_bodies) <= set(resumed_bodies)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_each_judge_ahead_and_take_the_serial_one_process_steps(tmp_path):
    """Two gloo ranks with async judging (each rank judges its own prompts in the background; rank 1 has no pair in
    step 1, no rank has one in step 3) end every step with the parameters of the serial one-process run on the union
    of their prompts: samples that do not depend on the weights make async and serial the same pairs."""
    import importlib.util
    import json
    import sys

    from test_distributed import flags, free_port, run_torchrun

    launcher = {"--nproc_per_node": 2, "--master_addr": "127.0.0.1", "--master_port": free_port()}
    options = ["ranks", "--output_dir", str(tmp_path / "ranks"), "--async_judging"]
    code, output, _ = run_torchrun([*flags(launcher), str(CHILD), *options], 300)
    assert code == 0, output[-8000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    spec = importlib.util.spec_from_file_location("async_judging_child", CHILD)
    child = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = child
    spec.loader.exec_module(child)
    child.run_ranks(
        type(
            "Cli", (), {"output_dir": str(tmp_path / "ref"), "per_device_train_batch_size": 4, "async_judging": False}
        )
    )
    reference = json.loads((tmp_path / "ref" / "rank0.json").read_text())
    assert [m["pairs"] for m in ranks[1]["micro_steps"]] == [0, 2, 0]
    assert [m["pairs"] for m in reference["micro_steps"]] == [2, 4, 0]
    for step in range(3):
        assert ranks[0]["steps"][step]["params_sha256"] == ranks[1]["steps"][step]["params_sha256"]
    for step in (1, 2):
        ours = torch.load(tmp_path / "ranks" / "rank0" / f"params-step{step}.pt", weights_only=True)
        theirs = torch.load(tmp_path / "ref" / "rank0" / f"params-step{step}.pt", weights_only=True)
        assert max((ours[n] - theirs[n]).abs().max().item() for n in theirs) < 1e-5, step
    logs = [e for e in ranks[0]["log_history"] if "loss" in e]
    assert [e["pairs/staleness"] for e in logs] == [0, 1, 1] and [e["pairs/online"] for e in logs] == [2, 4, 0]
