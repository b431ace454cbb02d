"""Fit the default recipe's training stages to a wall-clock budget on the machine that runs it.

The CPU recipe's full lengths (train/configs/emoji_cpu.yaml and two 500-step decoders) take 78 of its 90 minutes on
a 2-core CPU with native bf16, but about three hours on one of the same kind without it (bench/RESULTS.md, "Default
model on a CPU without native bf16"). Rather than guess which machine it is on, the recipe times a few real steps of
each training stage (`time_steps`), then shortens every stage by one fraction so the whole run fits (`plan_lengths`).
The plan is saved in the run folder and reused by later calls, so a resumed run keeps its lengths. A few steps
time the machine only roughly and its pace drifts (25-step windows of one run ranged from 79 to 200 img/s), so once
pretraining, evaluation and the bank have run, the decoders, the last stage that trains, are refitted to the time
those stages really left (`refit_decoders`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

from train.runtime import elapsed_by_step, write_json_atomic

logger = logging.getLogger("train.budget")

PLAN_NAME = "plan.json"
# The stages that train nothing (evaluation, reference bank, decoder evaluation), in units of this machine's own
# step times: on the recipe's native-bf16 CPU run they took 168 s = 400 pretraining steps (0.42 s each) and
# 208 s = 134 decoder steps (1.55 s each) (bench/RESULTS.md).
EVAL_PRETRAIN_STEPS = 400
EVAL_DECODER_STEPS = 134
MARGIN = 0.08  # of the budget, for a machine that slows down mid-run (25-step windows vary by +-20 % here)
MIN_PRETRAIN_STEPS, MIN_DECODER_STEPS = 100, 20
# Calibration lengths: the first steps (workers starting, allocator warming up) are not timed.
PRETRAIN_STEPS, PRETRAIN_SKIP = 6, 3
DECODER_STEPS, DECODER_SKIP = 3, 2


def timing_lengths(timed: int, skip: int, num_workers: int) -> tuple[int, int]:
    """(total steps, untimed first steps) of a timing run whose data comes from ``num_workers`` DataLoader workers.
    Each worker builds whole batches, so their first batches arrive together: a GPU that outruns them would take
    those in a burst and time itself, not the rate the workers keep up (the step time of the long run). So the
    first round is not timed, and the timed steps span two more rounds. The timed steps are a whole number of
    ``skip``-step log windows."""
    skip = max(skip, num_workers + 3)
    timed = max(timed, 2 * num_workers)
    return skip + -(-timed // skip) * skip, skip


def duration(seconds: float) -> str:
    """"45 s" below two minutes, else "12 minutes": a sub-minute budget is not written "0 minutes"."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} minutes"


def usable_seconds(budget_s: float, timing_s: float) -> float:
    """What a budget leaves for the stages once the margin and the timing itself are taken off."""
    return budget_s * (1 - MARGIN) - timing_s


def expected_minutes(plan: dict) -> float:
    """The whole run a plan expects, timing included (``expected_s`` counts the stages only)."""
    return (plan["expected_s"] + plan.get("timing_s", 0.0)) / 60


def seconds_per_step(log_csv: Path, after_step: int) -> float:
    """Mean seconds per step after ``after_step`` in a training CSV log (columns step, ..., elapsed_s)."""
    times = elapsed_by_step(log_csv)
    last = max(times, default=after_step)
    if after_step not in times or last <= after_step:
        raise ValueError(f"{log_csv} has no rows after step {after_step} to time")
    return (times[last] - times[after_step]) / (last - after_step)


def time_steps(pretrain_config, decoder_config: Callable[[Path, Path], object], work: Path) -> dict:
    """Seconds per step of this machine's real pretraining and decoder training, from short runs in ``work``.

    ``pretrain_config`` is the recipe's pretraining config; ``decoder_config(model_dir, run_dir)`` builds the
    recipe's decoder config on a given model. The short runs use them unchanged apart from their length, logging
    and folders (same model, batch, data, precision and workers), then ``work`` is deleted."""
    from train import decoder as decoder_training
    from train import pretrain

    start = time.perf_counter()
    if work.exists():
        shutil.rmtree(work)  # left by a call killed while timing
    pre_steps, pre_skip = timing_lengths(PRETRAIN_STEPS, PRETRAIN_SKIP, pretrain_config.num_workers)
    pre = dataclasses.replace(pretrain_config, out_dir=str(work / "pretrain"), steps=pre_steps,
                              warmup_steps=1, log_every=pre_skip, ckpt_every=10**9, resume=False,
                              compile=False, knn_every=0)
    dec = decoder_config(work / "pretrain" / "model", work / "decoder")
    dec_steps, dec_skip = timing_lengths(DECODER_STEPS, DECODER_SKIP, dec.num_workers)
    dec = dataclasses.replace(dec, steps=dec_steps, log_every=1, sample_every=10**9, ckpt_every=10**9, resume=False)
    logger.info("timing %d pretraining and %d decoder steps on this machine to fit the budget", pre_steps, dec_steps)
    pretrain.train(pre)
    decoder_training.train(dec)
    timings = {"pretrain_step_s": seconds_per_step(work / "pretrain" / "log.csv", pre_skip),
               "decoder_step_s": seconds_per_step(work / "decoder" / "log.csv", dec_skip)}
    shutil.rmtree(work)
    timings["timing_s"] = time.perf_counter() - start
    return timings


def plan_lengths(budget_s: float, timings: dict, pretrain_steps: int, warmup_steps: int, decoder_steps: int,
                 num_decoders: int) -> dict:
    """The profile's stage lengths, all shortened by one fraction (at most 1) so that the run fits ``budget_s``.

    Raises ValueError when even the stages that train nothing would not fit."""
    t_pre, t_dec = timings["pretrain_step_s"], timings["decoder_step_s"]
    reserved = EVAL_PRETRAIN_STEPS * t_pre + EVAL_DECODER_STEPS * t_dec
    timing_s = timings.get("timing_s", 0.0)
    available = usable_seconds(budget_s, timing_s) - reserved
    full = pretrain_steps * t_pre + num_decoders * decoder_steps * t_dec
    shortest = (min(pretrain_steps, MIN_PRETRAIN_STEPS) * t_pre
                + num_decoders * min(decoder_steps, MIN_DECODER_STEPS) * t_dec)
    if available < shortest:
        needed = (shortest + reserved + timing_s) / (1 - MARGIN)  # the smallest budget that fits
        raise ValueError(
            f"a budget of {duration(budget_s)} is too small on this machine: the shortest run needs "
            f"~{duration(needed)} (evaluation stages ~{duration(reserved)}, the shortest training "
            f"~{duration(shortest)}, the timing {duration(timing_s)} and a {MARGIN:.0%} margin; pretraining step "
            f"{t_pre:.2f} s, decoder step {t_dec:.2f} s); give a larger --budget-minutes, or 0 for the profile's full "
            "lengths")
    fraction = min(1.0, available / full)
    plan = {"budget_s": budget_s, **timings, "full_training_s": round(full, 1), "fraction": round(fraction, 4),
            "pretrain_steps": pretrain_steps, "pretrain_warmup_steps": warmup_steps, "decoder_steps": decoder_steps}
    if fraction < 1.0:
        def shorten(steps: int, floor: int, digits: int = 0) -> int:
            return min(steps, max(floor, int(round(steps * fraction, digits))))

        plan.update(pretrain_steps=shorten(pretrain_steps, MIN_PRETRAIN_STEPS, digits=-1),
                    pretrain_warmup_steps=max(1, math.ceil(warmup_steps * fraction)),
                    decoder_steps=shorten(decoder_steps, MIN_DECODER_STEPS))
    plan["expected_s"] = round(reserved + plan["pretrain_steps"] * t_pre
                               + num_decoders * plan["decoder_steps"] * t_dec, 1)
    return plan


def load_or_make_plan(out: Path, budget_minutes: float | None, make: Callable[[float], dict]) -> dict:
    """The plan saved in ``out`` by an earlier call (its lengths must not change mid-run; ``budget_minutes`` None
    accepts it whatever its budget), else ``make(budget_s)``, saved before any stage starts."""
    path = out / PLAN_NAME
    if path.exists():
        plan = json.loads(path.read_text())
        if budget_minutes is not None and plan["budget_s"] != budget_minutes * 60:
            raise ValueError(f"{out} was planned for a {plan['budget_s'] / 60:g}-minute budget, not "
                             f"{budget_minutes:g}: choose another --out-dir, or delete {out} to plan again")
        return plan
    plan = make(budget_minutes * 60)
    write_json_atomic(path, plan)
    logger.info("budget %.0f min: training stages at %.0f %% of the profile's length (pretraining %d steps, "
                "decoders %d steps each); expected %.0f min in all", budget_minutes, 100 * plan["fraction"],
                plan["pretrain_steps"], plan["decoder_steps"], expected_minutes(plan))
    return plan


def refit_decoders(out: Path, plan: dict, spent_s: float, full_steps: int, num_decoders: int) -> dict:
    """The plan with its decoder length refitted to the budget left after ``spent_s`` seconds of the stages before
    them, saved in ``out``; call it before any decoder starts (their lengths are fixed from then on).

    Same margin and reserve as ``plan_lengths``; the decoders may grow back to the profile's ``full_steps``, never
    past it, and never below the floor."""
    t_dec = plan["decoder_step_s"]
    available = usable_seconds(plan["budget_s"], plan.get("timing_s", 0.0)) - spent_s - EVAL_DECODER_STEPS * t_dec
    steps = min(full_steps, max(MIN_DECODER_STEPS, int(available / (num_decoders * t_dec))))
    if steps * num_decoders * t_dec > available:
        logger.warning("the stages before the decoders took %.0f s, so even %d decoder steps each overrun the "
                       "%.0f-minute budget", spent_s, steps, plan["budget_s"] / 60)
    planned = plan.get("planned_decoder_steps", plan["decoder_steps"])
    plan = {**plan, "decoder_steps": steps, "planned_decoder_steps": planned, "spent_before_decoders_s":
            round(spent_s, 1), "expected_s": round(spent_s + (num_decoders * steps + EVAL_DECODER_STEPS) * t_dec, 1)}
    write_json_atomic(out / PLAN_NAME, plan)
    logger.info("%.0f s spent before the decoders: %d decoder steps each (planned %d); expected %.0f min in all",
                spent_s, steps, planned, expected_minutes(plan))
    return plan
