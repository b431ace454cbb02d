"""The recipe's wall-clock budget: stage lengths shrink by one fraction to fit the machine's measured step times,
never past the profile's lengths; the decoders are refitted to the time the stages before them really took; a
budget the evaluation alone would overrun is refused (the recipe's own use of a plan is tested in
test_default_recipe.py)."""
import json

import pytest

from train import budget

CPU_FULL = dict(pretrain_steps=6600, warmup_steps=350, decoder_steps=500, num_decoders=2)


def test_a_machine_fast_enough_keeps_the_full_lengths():
    timings = {"pretrain_step_s": 0.42, "decoder_step_s": 1.55, "timing_s": 40.0}  # the native-bf16 CPU run
    plan = budget.plan_lengths(90 * 60, timings, **CPU_FULL)
    assert plan["fraction"] == 1.0
    assert (plan["pretrain_steps"], plan["pretrain_warmup_steps"], plan["decoder_steps"]) == (6600, 350, 500)


def test_a_slower_machine_gets_every_stage_shortened_by_one_fraction_to_fit():
    timings = {"pretrain_step_s": 1.08, "decoder_step_s": 4.2, "timing_s": 60.0}  # the AVX2-only CPU, fp32
    plan = budget.plan_lengths(90 * 60, timings, **CPU_FULL)
    assert 0.3 < plan["fraction"] < 0.5
    assert plan["pretrain_steps"] == pytest.approx(6600 * plan["fraction"], abs=10)
    assert plan["decoder_steps"] == pytest.approx(500 * plan["fraction"], abs=1)
    assert plan["pretrain_warmup_steps"] == pytest.approx(350 * plan["fraction"], abs=1)
    assert plan["expected_s"] + timings["timing_s"] <= 90 * 60 * (1 - budget.MARGIN) + 20
    assert plan["expected_s"] + timings["timing_s"] >= 90 * 60 * (1 - budget.MARGIN) - 60  # and uses the budget


def test_short_stages_stop_at_their_floors_and_a_hopeless_budget_is_refused():
    short = dict(pretrain_steps=400, warmup_steps=20, decoder_steps=40, num_decoders=2)
    timings = {"pretrain_step_s": 1.0, "decoder_step_s": 4.0}  # reserves 936 s for the evaluation stages
    plan = budget.plan_lengths(1380, timings, **short)
    assert plan["fraction"] == pytest.approx(0.463, abs=0.001)
    assert (plan["pretrain_steps"], plan["pretrain_warmup_steps"], plan["decoder_steps"]) == (190, 10, 20)
    with pytest.raises(ValueError, match="budget of 5 minutes is too small on this machine") as refused:
        budget.plan_lengths(5 * 60, timings, **CPU_FULL)
    needed = int(str(refused.value).split("shortest run needs ~")[1].split(" minutes")[0])
    budget.plan_lengths(needed * 60 + 60, timings, **CPU_FULL)  # the budget the message asks for is enough
    with pytest.raises(ValueError, match=r"a budget of 3 s is too small .* needs ~\d+ minutes \(evaluation stages ~"):
        budget.plan_lengths(3, timings, **CPU_FULL)  # not "a 0-minute budget ... need ~0 minutes"


def test_step_times_come_from_the_training_log_after_the_warm_up(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss,elapsed_s\n3,0.5,9.0\n6,0.4,12.0\n9,0.3,15.6\n")
    assert budget.seconds_per_step(log, 3) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="no rows after step 9"):
        budget.seconds_per_step(log, 9)


def test_timing_waits_out_the_workers_first_batches_and_spans_two_more_rounds():
    """14 workers (the GPU profile) deliver their first 14 batches together: a fast GPU timed on those measured
    itself, not the rate the workers keep up, and the plan kept every step."""
    assert budget.timing_lengths(6, 3, num_workers=1) == (12, 4)  # the CPU recipe: one worker
    steps, skip = budget.timing_lengths(6, 3, num_workers=14)
    assert skip > 14 and steps - skip >= 2 * 14 and (steps - skip) % skip == 0
    assert budget.timing_lengths(3, 2, num_workers=0) == (6, 3)  # data made in the training process


def test_decoders_are_refitted_to_the_time_the_stages_before_them_really_took(tmp_path):
    timings = {"pretrain_step_s": 0.67, "decoder_step_s": 2.33, "timing_s": 35.0}  # the Intel AMX CPU's timing
    plan = budget.plan_lengths(90 * 60, timings, **CPU_FULL)
    decoders_s = (2 * plan["decoder_steps"] + budget.EVAL_DECODER_STEPS) * 2.33
    on_plan = plan["expected_s"] - decoders_s  # what pretraining, evaluation and the bank were expected to take
    limit = 90 * 60 * (1 - budget.MARGIN) - timings["timing_s"]

    slower = budget.refit_decoders(tmp_path, plan, on_plan + 600, full_steps=500, num_decoders=2)
    assert slower["decoder_steps"] == pytest.approx(plan["decoder_steps"] - 600 / (2 * 2.33), abs=2)
    assert limit - 5 <= slower["expected_s"] <= limit
    assert slower["planned_decoder_steps"] == plan["decoder_steps"]
    assert slower == json.loads((tmp_path / budget.PLAN_NAME).read_text())  # a resumed call keeps these lengths

    faster = budget.refit_decoders(tmp_path, slower, on_plan - 2000, full_steps=500, num_decoders=2)
    assert faster["decoder_steps"] == 500  # grown back to the profile's length, never past it
    assert faster["planned_decoder_steps"] == plan["decoder_steps"]
    overrun = budget.refit_decoders(tmp_path, plan, 90 * 60, full_steps=500, num_decoders=2)
    assert overrun["decoder_steps"] == budget.MIN_DECODER_STEPS
