"""The tick machine driven directly (no `value_and_grad`): a 2-device program, tick by tick."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh_or_skip
from jax import lax
from jax.sharding import PartitionSpec as P
from pipeline_cases import assert_trees_close, loss_fn, make_problem, sequential_loss, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline import kernels
from jpipe.pipeline.arrays import take, varying, zeros_like
from jpipe.pipeline.end_slots import EndSlots
from jpipe.pipeline.lockstep import run_alone
from jpipe.pipeline.program import FORWARD, OpCode, compile_program
from jpipe.pipeline.stage import stage_ops
from jpipe.pipeline.state import Buffer, Carry, TickRow
from jpipe.pipeline.tick import TickMachine
from jpipe.schedules.recompute import with_recompute

AXES = ("stage",)


def _machine(program, local_params, loss_params, inputs, targets) -> TickMachine:
    """One device's tick machine for the generic (delivered inputs, no prologue) training program."""
    local_params = varying(jax.tree.map(lambda a: a[0], local_params), AXES)
    loss_params = varying(loss_params, AXES)
    context = kernels.TickContext(
        local_params=local_params,
        loss_params=loss_params,
        prologue_params=None,
        inputs=inputs,
        targets=targets,
        loss_fn=loss_fn,
        prologue=None,
        x_like=varying(zeros_like(take(inputs, 0)), AXES),
        scale=1.0 / program.schedule.num_microbatches,
        end_slots=EndSlots.of(program, loss_params, None),
        manual_axes=AXES,
        recompute=program.recompute,
    )
    return TickMachine(program, context, kernels.TRAINING, stage_ops(stage_fn, "none"))


def _run_ticks(program, problem, num_ticks: int) -> Carry:
    """Each device's carry after the first `num_ticks` ticks, leaves `[p, ...]`."""
    stage_params, loss_params, inputs, targets = problem
    mesh = make_mesh_or_skip((program.schedule.num_devices,), AXES)

    def body(local_params, inputs):
        machine = _machine(program, local_params, loss_params, inputs, targets)
        rows = TickRow.of(program, lax.axis_index("stage"))
        rows = jax.tree.map(lambda a: a[:num_ticks], rows)
        state = machine.run(machine.initial_carry(rows), rows)
        return jax.tree.map(lambda a: a[None], state)

    run = jax.shard_map(body, mesh=mesh, in_specs=(P("stage"), P("stage")), out_specs=P("stage"))
    state = jax.jit(run)(*_over_stages(mesh, program.placement.split_devices(stage_params), inputs))
    return jax.tree.map(np.asarray, state)


def _over_stages(mesh, *trees):
    """The trees with their leading axis sharded over the stage axis (what shard_map's specs ask)."""
    return jax.device_put(trees, jax.sharding.NamedSharding(mesh, P("stage")))


@pytest.fixture(scope="module")
def program_and_problem():
    schedule = schedules.build("1f1b", 2, 2)
    return compile_program(schedule, deliver=True), make_problem(2, 2)


def test_a_forward_message_lands_in_the_next_devices_inbox_at_the_end_of_its_tick(program_and_problem):
    program, problem = program_and_problem
    (lane,) = program.lanes
    tick = int(np.flatnonzero((lane.op[:, 0] == FORWARD) & (lane.microbatch[:, 0] == 0))[0])
    state = _run_ticks(program, problem, tick + 1)
    slot = lane.recv_slot[tick, 1, lane.channels.index(1)]
    assert slot < program.num_inbox_slots
    stage_params, _, inputs, _ = problem
    expected = stage_fn(jax.tree.map(lambda a: a[0], stage_params), jax.tree.map(lambda a: a[0], inputs))
    assert_trees_close(jax.tree.map(lambda a: a[1, slot], state.inbox), expected)
    assert float(state.loss.sum()) == 0.0  # no last hop has run yet


def test_all_ticks_accumulate_the_sequential_loss_and_stage_gradients(program_and_problem):
    program, problem = program_and_problem
    state = _run_ticks(program, problem, program.num_ticks)
    stage_params, loss_params, inputs, targets = problem
    loss, grads = jax.value_and_grad(sequential_loss)(stage_params, loss_params, inputs, targets)
    assert_trees_close(state.loss.sum(), loss)
    # [p, v, ...] float32 accumulators in device order; 1f1b's device order is the logical one.
    assert_trees_close(jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), state.grads), grads)


@pytest.mark.parametrize("kernel", kernels.TRAINING, ids=lambda k: k.code.name)
def test_a_kernel_writes_only_the_buffers_it_declares(kernel):
    """The executor runs a kernel on its declared buffers only (in place); writing another fails loudly."""
    schedule = schedules.build("1f1b", 2, 2)
    if kernel.code is OpCode.RECOMPUTE:  # R runs in programs whose forwards keep only their input
        schedule = with_recompute(schedule)
    program = compile_program(schedule, deliver=True)
    stage_params, loss_params, inputs, targets = make_problem(2, 2)
    mesh = make_mesh_or_skip((2,), AXES)
    written = {}

    def body(local_params, inputs):
        machine = _machine(program, local_params, loss_params, inputs, targets)
        rows = jax.tree.map(lambda a: a[0], TickRow.of(program, lax.axis_index("stage")))
        state = machine.initial_carry(TickRow.of(program, lax.axis_index("stage")))
        lane_row = dataclasses.replace(rows.lanes[0], op=jnp.int32(kernel.code))
        part = state.select(kernel.buffers(machine.context))
        generator = kernel.run(machine.context, machine.ops, part, lane_row, state.view())
        new_part, _ = run_alone(generator)(part)
        written.update({b: getattr(new_part, b.value) is not getattr(part, b.value) for b in Buffer})
        return jnp.zeros((1,))

    run = jax.shard_map(body, mesh=mesh, in_specs=(P("stage"), P("stage")), out_specs=P("stage"))
    jax.eval_shape(run, *_over_stages(mesh, program.placement.split_devices(stage_params), inputs))  # traces only
    declared = set(kernel.buffers(kernels.TickContext(*([None] * 11))))
    assert {b for b, changed in written.items() if changed} <= declared
    assert {b for b, changed in written.items() if changed}, "the kernel wrote nothing"


def _mlp_stage(params, x):
    """`[R, D] -> [R, D]`: a residual MLP whose residuals (activations) outweigh its parameters."""
    return x + jnp.tanh(x @ params["w1"]) @ params["w2"]


def _mlp_loss(head, y, target):
    return jnp.mean((y @ head - target) ** 2)


def test_the_stash_is_updated_in_place_not_copied_every_tick():
    """Compiled temporary memory holds the stash once: a tick whose conditionals copied a buffer they
    read and write (one `lax.switch` over the op kinds does) would need a second stash."""
    schedule = schedules.build("gpipe", 4, 8)  # 8 stash slots per device: the stash dominates
    mesh = make_mesh_or_skip((4,), AXES)
    rows, width, hidden, m = 256, 64, 128, 8
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(keys[0], (4, width, hidden)) / width**0.5,
        "w2": jax.random.normal(keys[1], (4, hidden, width)) / hidden**0.5,
    }
    head = jax.random.normal(keys[2], (width, 1))
    inputs = jax.random.normal(keys[3], (m, rows, width))
    targets = jnp.zeros((m, rows, 1))
    step = jpipe.value_and_grad(_mlp_stage, _mlp_loss, schedule=schedule, mesh=mesh)
    temp = jax.jit(step).lower(params, head, inputs, targets).compile().memory_analysis().temp_size_in_bytes
    one_stage = jax.tree.map(lambda a: a[0], params)
    residuals = jax.eval_shape(lambda: stage_ops(_mlp_stage, "none").forward(one_stage, inputs[0])[1])
    stash = step.program.num_stash_slots * sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(residuals))
    assert stash < temp < 2 * stash, (temp, stash)
