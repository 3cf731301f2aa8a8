"""Recomputation as its own op (R): IR, validation, simulation, CSV, tables, costs and executor parity.

A schedule with R (`jpipe.schedules.recompute.with_recompute`) keeps only each forward's input (F),
rebuilds the residuals in R and runs B/I/W from them; the executor's result must be the sequential
model's loss and every gradient (float32, 1e-5), alone, with the I/W split, with cost-balanced ticks
(R pulled into ticks with room) and with hidden sends.
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import assert_trees_close, loss_fn, make_problem, reference_value_and_grad, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline.options import PipelineOptions
from jpipe.pipeline.program import RECOMPUTE, compile_program
from jpipe.schedules import Action, Cost, Op, ScheduleError
from jpipe.schedules.csv_io import from_csv, to_csv
from jpipe.schedules.deps import dependencies
from jpipe.schedules.fused_ticks import balance_ticks
from jpipe.schedules.ir import flatten
from jpipe.schedules.recompute import has_recompute, with_recompute


def _actions(schedule):
    return [action for row in schedule.actions for action in flatten(row)]


@pytest.mark.parametrize("name", ["1f1b", "zb_h1", "zbv", "interleaved_1f1b", "dualpipev", "stp"])
def test_every_backward_gets_its_r_right_before_it(name):
    schedule = schedules.build(name, 4, 12)
    recomputing = with_recompute(schedule)
    schedules.validate(recomputing)
    assert has_recompute(recomputing) and not has_recompute(schedule)
    for row in recomputing.actions:
        flat = flatten(row)
        for index, action in enumerate(flat):
            if action.op in (Op.I, Op.B):
                assert Action(action.stage, Op.R, action.microbatch) in flat[:index]
    deps = dependencies(recomputing)
    backward = next(a for a in _actions(recomputing) if a.op in (Op.I, Op.B))
    assert Action(backward.stage, Op.R, backward.microbatch) in deps[backward]
    with pytest.raises(ScheduleError, match="already"):
        with_recompute(recomputing)


def test_validation_names_a_missing_or_misplaced_r():
    recomputing = with_recompute(schedules.build("1f1b", 2, 2))
    rows = [list(row) for row in recomputing.actions]
    missing = next(a for a in rows[0] if a.op is Op.R)
    rows[0].remove(missing)
    with pytest.raises(ScheduleError, match=f"missing action {missing}"):
        schedules.validate(dataclasses.replace(recomputing, actions=tuple(map(tuple, rows))))
    rows = [list(row) for row in recomputing.actions]
    r = next(a for a in rows[1] if a.op is Op.R)
    rows[1].remove(r)
    rows[1].insert(0, r)  # before its own F
    with pytest.raises(ScheduleError, match=str(r)):
        schedules.validate(dataclasses.replace(recomputing, actions=tuple(map(tuple, rows))))


def test_simulated_time_and_memory_count_r():
    schedule = with_recompute(schedules.build("1f1b", 4, 8))
    cheap = schedules.simulate(schedule, Cost(r=0.0), "async").makespan
    costly = schedules.simulate(schedule, Cost(r=1.0), "async").makespan
    assert costly > cheap
    # One R's residuals live from R to B: 1f1b with B right after R holds one at a time.
    plain = max(schedules.peak_memory(schedule))
    assert max(schedules.peak_memory(schedule, recomputed=10.0)) == pytest.approx(plain + 10.0)


def test_csv_and_rendering_carry_r():
    schedule = with_recompute(schedules.build("zb_h1", 2, 3))
    back = from_csv(to_csv(schedule), name=schedule.name)
    assert back.actions == schedule.actions
    assert "R recompute" in schedules.render(schedule)


def test_program_reads_the_stash_only_in_r_and_allots_recompute_slots():
    schedule = schedules.build("zb_h1", 4, 8)
    plain = compile_program(schedule)
    recomputing = compile_program(with_recompute(schedule))
    assert recomputing.recompute and not plain.recompute
    assert (recomputing.lanes[0].op == RECOMPUTE).sum() == 4 * 8
    # The stash (the input) lives from F to R, not to W: never more slots than without R.
    assert recomputing.num_stash_slots <= plain.num_stash_slots
    assert 1 <= recomputing.num_recompute_slots <= plain.num_stash_slots


def test_recompute_needs_remat_full():
    with pytest.raises(ValueError, match="remat='full'"):
        PipelineOptions(recompute=True)
    plan = PipelineOptions(remat="full", recompute=True).plan(schedules.build("1f1b", 2, 4))
    assert has_recompute(plan.schedule)


def test_measured_r_is_the_recomputation_that_i_carried():
    stage = jpipe.layered(stage_fn)
    params, _, inputs, _ = make_problem(1, 1, layers=2)
    params = jax.tree.map(lambda a: a[0], params)
    x = jax.tree.map(lambda a: a[0], inputs)
    full = jpipe.measure_costs(stage, params, x, remat="full")
    none = jpipe.measure_costs(stage, params, x, remat="none")
    split = jpipe.measure_costs(stage, params, x, remat="full", recompute=True)
    # R is remat "none"'s forward (with its residuals); B, I, W are remat "none"'s; F keeps only x.
    assert split.flops["r"] == none.flops["f"] and split.flops["f"] == full.flops["f"]
    assert all(split.flops[op] == none.flops[op] for op in ("b", "i", "w"))
    assert split.flops["i"] + split.flops["r"] == pytest.approx(full.flops["i"], rel=0.05)
    assert split.stash_bytes < full.stash_bytes
    assert split.recomputed_bytes == none.stash_bytes
    cost = split.cost()
    assert (
        cost.r == split.flops["r"] / split.flops["f"] and cost.recomputed == split.recomputed_bytes / split.stash_bytes
    )


def test_balanced_ticks_pair_r_with_lighter_ops():
    # Remat full at 4096 tokens (F 1, I 2.2, W 0.6): without R, I outweighs F + W; with R (about F)
    # and I' = 1.2, the ticks even out.
    cost = Cost(f=1.0, b=2.8, i=2.2, w=0.59)
    r_cost = Cost(f=1.0, b=1.8, i=1.2, w=0.59, r=1.0)
    schedule = schedules.build("zb_h1", 4, 16)
    without = balance_ticks(schedule, cost).makespan
    recomputing = balance_ticks(with_recompute(schedule), r_cost)
    assert recomputing.fused and recomputing.makespan < without


PARITY = {
    "1f1b-whole-plain": ("1f1b", "plain", {"split_backward": False}),
    "zb_h1-layered": ("zb_h1", "layered", {}),
    "zbv-layered-balanced-sends": ("zbv", "layered", {"balance_ticks": True, "overlap_sends": True}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_recompute_matches_sequential(case):
    name, kind, options = PARITY[case]
    schedule = schedules.build(name, 4, 8)
    mesh = make_mesh_or_skip((4,), ("stage",))
    layered = kind == "layered"
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 8, layers=2 if layered else None)
    stage = jpipe.layered(stage_fn) if layered else stage_fn
    cost = Cost(f=1.0, b=1.8, i=1.2, w=0.6, r=1.0)
    step = jpipe.value_and_grad(
        stage, loss_fn, schedule=schedule, mesh=mesh, remat="full", recompute=True, cost=cost, **options
    )
    assert step.program.recompute
    loss, grads = jax.jit(step)(stage_params, loss_params, inputs, targets)
    ref_loss, ref_grads = reference_value_and_grad(stage_params, loss_params, inputs, targets, stage)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


def test_training_config_refuses_recompute_without_remat_full():
    from jpipe.train.config import ConfigError, ParallelConfig

    with pytest.raises(ConfigError, match="needs --remat full"):
        ParallelConfig(recompute=True)
    assert ParallelConfig(remat="full", recompute=True).pipeline_options().recompute
