"""Stopping training when no pair forms: the judge is down, or every sample stays unscored or tied."""

from __future__ import annotations

from collections.abc import Mapping


class JudgeUnavailableError(RuntimeError):
    """Training stopped because no prompt formed a pair for several consecutive optimizer steps (the judge failed
    every call, or no sample could be scored or ranked).

    A checkpoint was saved first and the judge cache is intact: fix the cause and resume from the checkpoint.
    """


def outage_message(
    *, steps: int, failed_calls: float, endpoints: list[str], checkpoint: str, caches: list[str]
) -> str:
    """What happened when the judge failed every call, what was kept, and how to go on."""
    return (
        f"The judge failed every call for {steps} consecutive steps ({failed_calls:.0f} failed calls in the last "
        f"step); judge: {', '.join(endpoints)}. Training stopped after saving {checkpoint}"
        + (f"; judge results so far are kept in {', '.join(caches)}" if caches else "")
        + ". Bring the judge back (check the URL, the server's log, the API key variable), then resume with "
        "trainer.train(resume_from_checkpoint=True) or the recipe's --resume_from_checkpoint last. "
        "max_judge_outage_steps=0 disables this stop."
    )


def no_pairs_message(
    *, steps: int, counts: Mapping[str, float], endpoints: list[str], checkpoint: str, caches: list[str]
) -> str:
    """Why `steps` optimizer steps in a row had no online pair on any rank (from the last step's counts over all
    ranks), what was kept, and how to go on."""
    samples, unscored = int(counts.get("samples", 0)), int(counts.get("unscored", 0))
    errors = int(counts.get("long_reward/judge_errors", 0))
    if errors and unscored == samples:
        return outage_message(
            steps=steps, failed_calls=errors, endpoints=endpoints, checkpoint=checkpoint, caches=caches
        )
    prompts = int(counts.get("prompts", 0))
    few, ties = int(counts.get("skipped_too_few_scored", 0)), int(counts.get("skipped_tie", 0))
    gap = int(counts.get("skipped_gap_below_minimum", 0))
    causes = []
    if few:
        causes.append(
            f"{few} had too few scored samples ({unscored} of {samples} samples unscored, {errors} failed judge "
            "calls: a reward function or a judge dimension gave no value; check max_missing_dimensions, the "
            "reward functions' errors in the log, and min_scored_samples)"
        )
    if ties:
        causes.append(f"{ties} had all their best and worst samples tied (tie_policy, num_generations, temperature)")
    if gap:
        causes.append(f"{gap} had a reward gap below min_reward_gap")
    return (
        f"No prompt formed a preference pair for {steps} consecutive optimizer steps: of the last step's {prompts} "
        f"prompts (all ranks), {'; '.join(causes) or 'none was judged'}. Training stopped after saving {checkpoint}"
        + (f"; judge results so far are kept in {', '.join(caches)}" if caches else "")
        + f"; judge: {', '.join(endpoints)}. Fix the cause, then resume with trainer.train(resume_from_checkpoint="
        "True) or the recipe's --resume_from_checkpoint last. max_judge_outage_steps=0 disables this stop."
    )
