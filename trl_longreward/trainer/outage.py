"""Stopping training when the judge is down, with a checkpoint and the way to go on."""

from __future__ import annotations


class JudgeUnavailableError(RuntimeError):
    """Training stopped because the judge failed every call for several consecutive steps.

    A checkpoint was saved first and the judge cache is intact: bring the judge back and resume from the checkpoint.
    """


def outage_message(
    *, steps: int, failed_calls: float, endpoints: list[str], checkpoint: str, caches: list[str]
) -> str:
    """What happened, what was kept, and how to go on."""
    return (
        f"The judge failed every call for {steps} consecutive steps ({failed_calls:.0f} failed calls in the last "
        f"step); judge: {', '.join(endpoints)}. Training stopped after saving {checkpoint}"
        + (f"; judge results so far are kept in {', '.join(caches)}" if caches else "")
        + ". Bring the judge back (check the URL, the server's log, the API key variable), then resume with "
        "trainer.train(resume_from_checkpoint=True) or the recipe's --resume_from_checkpoint last. "
        "max_judge_outage_steps=0 disables this stop."
    )
