"""Cost-balanced ticks (`jpipe.schedules.fused_ticks`): packing properties and executor parity.

Packing: a fused schedule is valid, holds exactly the split schedule's actions, keeps every device's
order apart from W's pulled forward, never needs more memory than the split schedule, and
`balance_ticks` never returns something slower than the schedule as given (lockstep simulator).
Parity: the executor runs fused schedules (pairs braided in one tick) to the sequential model's loss
and every gradient, float32 1e-5, with remat none, full and dots, a layered and a plain stage, and
hidden sends.
"""

from __future__ import annotations

import jax
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import assert_trees_close, loss_fn, make_problem, reference_value_and_grad, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline.options import PipelineOptions
from jpipe.schedules import Composite, Cost, Op
from jpipe.schedules.fused_ticks import balance_ticks, fuse_ticks, targets
from jpipe.schedules.ir import flatten
from jpipe.schedules.ticks import split_backward

# Measured shapes of the ops (F = 1) of 2 GPT blocks: remat full at 128 tokens, none at 4096.
REMAT_FULL = Cost(f=1.0, b=2.68, i=1.70, w=0.98, weight_residuals=0.5)
LONG_SEQUENCE = Cost(f=1.0, b=1.99, i=1.40, w=0.59, weight_residuals=0.5)
NAMED = [
    "1f1b",
    "gpipe",
    "interleaved_1f1b",
    "zb_h1",
    "zb_h2",
    "zbv",
    "v_half",
    "v_min",
    "dualpipev",
    "stp",
    "dualpipe",
]


def _build(name: str, p: int = 4, m: int = 12) -> schedules.Schedule:
    return schedules.build(name, p, m)


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("cost", [REMAT_FULL, LONG_SEQUENCE], ids=["remat-full", "seq-4096"])
def test_balanced_is_valid_keeps_the_actions_and_is_never_slower(name, cost):
    schedule = _build(name)
    split = split_backward(schedule)
    for latency in (0, 1):
        result = balance_ticks(schedule, cost, send_latency=latency)
        schedules.validate(result.schedule)
        assert result.makespan <= result.baseline
        simulated = schedules.simulate(result.schedule, cost, "lockstep", send_latency=latency).makespan
        if result.fused:
            assert result.makespan == pytest.approx(simulated)
            assert sorted(map(str, _actions(result.schedule))) == sorted(map(str, _actions(split)))
        else:
            assert result.schedule is schedule


@pytest.mark.parametrize("name", ["1f1b", "zb_h1", "zbv", "interleaved_1f1b"])
def test_remat_costs_fuse_and_beat_one_op_per_tick(name):
    schedule = _build(name, 4, 16)
    result = balance_ticks(schedule, REMAT_FULL)
    assert result.fused and result.makespan < 0.9 * result.baseline
    assert any(isinstance(cell, Composite) for row in result.schedule.actions for cell in row)


def test_alike_ops_are_not_fused():
    result = balance_ticks(_build("1f1b"), Cost())
    assert not result.fused and result.target is None


@pytest.mark.parametrize("name", ["1f1b", "zb_h1", "zbv", "interleaved_1f1b"])
@pytest.mark.parametrize("target", [0.0, 2.0, 2.7])
def test_fused_rows_keep_the_order_but_for_pulled_ws_and_use_no_more_memory(name, target):
    schedule = _build(name)
    split = split_backward(schedule)
    fused = fuse_ticks(schedule, REMAT_FULL, target)
    for before, after in zip(split.actions, fused.actions):
        assert [a for a in flatten(before) if a.op is not Op.W] == [a for a in flatten(after) if a.op is not Op.W]
        for cell in after:
            if isinstance(cell, Composite):
                assert cell.first.microbatch != cell.second.microbatch
    assert max(schedules.peak_memory(fused, 0.5)) <= max(schedules.peak_memory(split, 0.5))


def test_targets_are_the_op_times_and_their_pairwise_sums():
    assert targets(_build("1f1b"), Cost(f=1.0, b=3.0, i=2.0, w=0.5)) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]


def test_balance_ticks_needs_braid():
    with pytest.raises(ValueError, match="braid"):
        PipelineOptions(balance_ticks=True, braid=False)
    with pytest.raises(ValueError, match="balance_ticks"):
        PipelineOptions(balance_ticks="yes")


def _actions(schedule):
    return [a for row in schedule.actions for a in flatten(row)]


PARITY = {
    "1f1b-remat-none-layered": ("1f1b", 4, 8, "none", True, False),
    "zbv-remat-full-layered-sends": ("zbv", 4, 8, "full", True, True),
    "interleaved-remat-dots-layered": ("interleaved_1f1b", 2, 4, "dots", True, False),
    "zb_h1-remat-full-plain": ("zb_h1", 4, 8, "full", False, False),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_fused_ticks_match_sequential(case):
    name, p, m, remat, layered, sends = PARITY[case]
    schedule = schedules.build(name, p, m)
    mesh = make_mesh_or_skip((p,), ("stage",))
    layers = 2 if layered else None
    stage_params, loss_params, inputs, targets_ = make_problem(schedule.num_stages, m, layers=layers)
    stage = jpipe.layered(stage_fn) if layered else stage_fn
    step = jpipe.value_and_grad(
        stage,
        loss_fn,
        schedule=schedule,
        mesh=mesh,
        remat=remat,
        cost=REMAT_FULL,
        overlap_sends=sends,
        balance_ticks=True,
    )
    assert step.plan.balanced and step.program.braided
    loss, grads = jax.jit(step)(stage_params, loss_params, inputs, targets_)
    ref_loss, ref_grads = reference_value_and_grad(stage_params, loss_params, inputs, targets_, stage)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


def test_auto_balances_only_within_the_memory_limit():
    # Remat full at 4096 tokens: a weight residual is 24 stashes. 1f1b runs B whole (4 stashes);
    # balancing splits it and holds one microbatch's residuals: 7x the memory, so "auto" keeps B
    # whole. zb_h1 already splits; balancing pulls its W's forward, which lowers its memory.
    cost = Cost(f=1.0, b=2.80, i=2.20, w=0.59, weight_residuals=24.0)
    whole = PipelineOptions(cost=cost, balance_ticks="auto").plan(_build("1f1b", 4, 16))
    assert not whole.balanced and whole.schedule.name == "1f1b"
    assert PipelineOptions(cost=cost, balance_ticks=True).plan(_build("1f1b", 4, 16)).balanced
    zero_bubble = PipelineOptions(cost=cost, balance_ticks="auto").plan(_build("zb_h1", 4, 16))
    assert zero_bubble.balanced and "cost-balanced (auto)" in zero_bubble.describe()
