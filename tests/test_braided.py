"""Braided ticks: the executor runs a composite's two ops in one tick (`braid=True`, the default).

Tables: the second member of each composite is the tick's second op, its message travels on the
second channels. Parity: STP, DualPipeV's overlapped pairs, the overlapped 1F1B and torch's DualPipeV CSV (its
`OVERLAP_F_B` cells read as composites) give the sequential model's loss and every gradient, braided
and flattened, with a layered stage (whose layers braided ticks unroll), hidden sends, the I/W split
and a prologue (whose first/last-hop work braided ticks trace without a nested conditional).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import WIDTH, assert_trees_close, loss_fn, make_problem, sequential_outputs, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline.program import IDLE, OP_CODES, compile_program
from jpipe.schedules import Composite
from jpipe.schedules.csv_io import from_csv
from jpipe.schedules.ticks import pack

TORCH_DUALPIPEV = pathlib.Path(__file__).parent / "fixtures" / "torch-schedules" / "torch-DualPipeV-4rank-8mb-2v.csv"
LAYERS = 2


def _torch_dualpipev() -> schedules.Schedule:
    return from_csv(TORCH_DUALPIPEV.read_text(), name="torch-dualpipev", composites=True)


@pytest.mark.parametrize("split", [False, True])
def test_second_ops_are_the_second_members_of_the_composites(split):
    schedule = schedules.build("stp", 4, 11)
    program = compile_program(schedule, split=split)
    table = pack(schedule, split=split, keep_composites=True)
    assert program.braided and program.num_ticks == table.num_ticks
    first, second = program.lanes
    for t, row in enumerate(table.ticks):
        for device, step in enumerate(row):
            if isinstance(step, Composite):
                assert first.op[t, device] == OP_CODES[step.first.op]
                assert second.op[t, device] == OP_CODES[step.second.op]
                assert second.microbatch[t, device] == step.second.microbatch
            else:
                assert second.op[t, device] == IDLE
    # Both members' messages can leave for the same neighbour in one tick: separate channels.
    assert set(second.channels) <= set(first.channels) and second.channels


def test_braid_false_and_forward_only_run_composites_one_after_the_other():
    schedule = schedules.build("dualpipev", 4, 8, overlap=True)
    flattened = compile_program(schedule, braid=False)
    assert not flattened.braided and len(flattened.lanes) == 1
    assert flattened.num_ticks == compile_program(schedule.flattened()).num_ticks
    assert not compile_program(schedule, forward_only=True, deliver=True).braided
    with pytest.raises(ValueError, match="braid"):
        compile_program(schedule, braid="yes")


def _layered_problem(schedule):
    return make_problem(schedule.num_stages, schedule.num_microbatches, layers=LAYERS)


def _sequential_layered(stage_params, loss_params, inputs, targets):
    layered = jpipe.layered(stage_fn)
    outputs = sequential_outputs(stage_params, inputs, stage=layered)
    return jnp.mean(jax.vmap(lambda y, t: loss_fn(loss_params, y, t))(outputs, targets))


CASES = {
    "stp-p4-split-sends": (lambda: schedules.build("stp", 4, 11), {"split_backward": True, "overlap_sends": True}),
    "dualpipev-pairs": (lambda: schedules.build("dualpipev", 4, 8, overlap=True), {}),
    "1f1b-overlap-p4": (lambda: schedules.build("1f1b_overlap", 4, 9), {}),
    "torch-dualpipev-csv": (_torch_dualpipev, {"split_backward": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_braided_matches_sequential(case):
    make_schedule, options = CASES[case]
    schedule = make_schedule()
    assert schedule.has_composites
    mesh = make_mesh_or_skip((schedule.num_devices,), ("stage",))
    problem = _layered_problem(schedule)
    step = jpipe.value_and_grad(jpipe.layered(stage_fn), loss_fn, schedule=schedule, mesh=mesh, **options)
    assert step.program.braided
    loss, (stage_grads, loss_grads, input_grads) = jax.jit(step)(*problem)
    ref_loss, ref_grads = jax.value_and_grad(_sequential_layered, argnums=(0, 1, 2))(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close((stage_grads, loss_grads, input_grads), ref_grads)


@pytest.mark.parametrize("braid", [True, False])
def test_stp_braided_and_flattened_match_sequential(braid):
    schedule = schedules.build("stp", 2, 5)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = _layered_problem(schedule)
    step = jpipe.value_and_grad(jpipe.layered(stage_fn), loss_fn, schedule=schedule, mesh=mesh, braid=braid)
    assert step.program.braided == braid
    loss, grads = jax.jit(step)(*problem)
    ref_loss, ref_grads = jax.value_and_grad(_sequential_layered, argnums=(0, 1, 2))(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    with pytest.raises(ValueError, match="braid"):
        jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, braid=None)


def _prologue(prologue_params, raw):
    return {"h": jnp.tanh(raw["h"] @ prologue_params["proj"]), "aux": raw["aux"] * prologue_params["gain"]}


def test_braided_ticks_run_the_prologue_and_the_loss():
    """On a V, device 0 runs first and last hops: braided pairs there hold the prologue and the loss."""
    schedule = schedules.build("stp", 2, 5)
    mesh = make_mesh_or_skip((2,), ("stage",))
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 5)
    raw = {"h": inputs["h"][..., :2], "aux": inputs["aux"]}
    prologue_params = {"proj": jax.random.normal(jax.random.key(7), (2, WIDTH)), "gain": jnp.float32(1.3)}
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, prologue=_prologue)
    program = step.program
    first, second = program.lanes
    paired = second.op != IDLE
    ends = (first.is_first | first.is_last | second.is_first | second.is_last) == 1
    assert (paired & ends).any()  # some braided tick runs a first or last hop
    loss, grads = jax.jit(step)(stage_params, loss_params, raw, targets, prologue_params)

    def reference(stage_params, loss_params, prologue_params):
        x = jax.vmap(lambda r: _prologue(prologue_params, r))(raw)
        outputs = sequential_outputs(stage_params, x)
        return jnp.mean(jax.vmap(lambda y, t: loss_fn(loss_params, y, t))(outputs, targets))

    ref_loss, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(stage_params, loss_params, prologue_params)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
