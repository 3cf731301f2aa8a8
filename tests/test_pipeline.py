"""The executor: pipelined == sequential (loss and all three gradients) for every schedule."""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import (
    BATCH,
    SEQ,
    WIDTH,
    assert_trees_close,
    loss_fn,
    make_problem,
    reference_value_and_grad,
    sequential_outputs,
    stage_fn,
)
from schedule_cases import REORDERS

import jpipe
from jpipe import schedules
from jpipe.pipeline.gpipe_autodiff import gpipe_autodiff

FIXTURES = sorted((pathlib.Path(__file__).parent / "fixtures" / "torch-schedules").glob("*.csv"))


def _cases():
    for name in sorted(schedules.SCHEDULES):
        virtual = schedules.default_virtual(name)
        for p in (2, 4):
            for m in sorted({1, p - 1, p, 2 * p + 1}):
                if name in REORDERS and (p, m) != (4, 2 * p + 1):
                    continue  # one case past the steady state: warm-up, steady and cool-down
                if m < 1:
                    continue
                try:
                    schedules.build(name, p, m, virtual)
                except schedules.ScheduleError:
                    continue  # a combination the schedule does not support (tested in test_generators)
                yield pytest.param(name, p, m, virtual, id=f"{name}-p{p}-m{m}-v{virtual}")


def _run_and_compare(schedule, **options):
    mesh = make_mesh_or_skip((schedule.num_devices,), ("stage",))
    problem = make_problem(schedule.num_stages, schedule.num_microbatches)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, **options))
    loss, grads = step(*problem)
    ref_loss, ref_grads = reference_value_and_grad(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize(("name", "p", "m", "virtual"), list(_cases()))
def test_named_schedule_matches_sequential(name, p, m, virtual):
    _run_and_compare(schedules.build(name, p, m, virtual))


@pytest.mark.parametrize("path", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_torch_written_schedule_matches_sequential(path):
    schedule = schedules.from_csv(path.read_text(), name=path.stem)
    assert schedule.num_devices == 4 and schedule.num_stages == 8
    _run_and_compare(schedule)


@pytest.mark.parametrize(
    "remat",
    ["none", "full", "dots", jax.checkpoint_policies.everything_saveable],
    ids=["none", "full", "dots", "policy"],
)
@pytest.mark.parametrize(("name", "p", "m", "virtual"), [("1f1b", 4, 6, 1), ("zbv", 2, 4, 2)])
def test_remat_modes_give_the_same_numbers(name, p, m, virtual, remat):
    _run_and_compare(schedules.build(name, p, m, virtual), remat=remat)


def _split_cases():
    for name in sorted(set(schedules.SCHEDULES) - set(REORDERS)):
        schedule = schedules.build(name, 2, 4, schedules.default_virtual(name))
        has_whole_backward = any(a.op is schedules.Op.B for row in schedule.actions for a in row)
        for split in (True, False) if has_whole_backward else (True,):
            yield pytest.param(name, split, id=f"{name}-{'split' if split else 'whole'}")


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize(("name", "split"), list(_split_cases()))
def test_split_and_whole_backward_match_sequential(name, split, remat):
    """Every schedule, B split into I and W (the exact split) or whole, under every remat mode."""
    _run_and_compare(schedules.build(name, 2, 4, schedules.default_virtual(name)), split_backward=split, remat=remat)


@pytest.mark.parametrize(
    ("name", "p", "m", "virtual", "split"),
    [
        ("zbv", 2, 4, 2, True),
        ("zb_h1", 2, 3, 1, True),
        ("1f1b", 2, 3, 1, True),
        ("1f1b", 2, 3, 1, False),
        ("dualpipev", 2, 4, 2, False),
    ],
)
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_layered_stage_matches_sequential(name, p, m, virtual, split, remat):
    """A `jpipe.layered` stage (remat per layer; the split cuts the scan over layers in two)."""
    schedule = schedules.build(name, p, m, virtual)
    mesh = make_mesh_or_skip((p,), ("stage",))
    stage = jpipe.layered(stage_fn)
    problem = make_problem(schedule.num_stages, m, layers=3)
    step = jax.jit(
        jpipe.value_and_grad(stage, loss_fn, schedule=schedule, mesh=mesh, remat=remat, split_backward=split)
    )
    loss, grads = step(*problem)
    ref_loss, ref_grads = reference_value_and_grad(*problem, stage)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize(("name", "virtual"), [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2)])
def test_forward_matches_sequential(name, virtual):
    schedule = schedules.build(name, 4, 8, virtual)
    mesh = make_mesh_or_skip((4,), ("stage",))
    stage_params, _, inputs, _ = make_problem(schedule.num_stages, 8)
    outputs = jax.jit(jpipe.forward(stage_fn, schedule=schedule, mesh=mesh))(stage_params, inputs)
    assert_trees_close(outputs, sequential_outputs(stage_params, inputs))


@pytest.mark.parametrize("virtual", [1, 2])
def test_gpipe_autodiff_baseline_matches_sequential(virtual):
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(2 * virtual, 4)
    step = jax.jit(gpipe_autodiff(stage_fn, loss_fn, mesh=mesh, num_microbatches=4, virtual=virtual))
    loss, grads = step(*problem)
    ref_loss, ref_grads = reference_value_and_grad(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


def test_runs_on_a_submesh_with_other_axes_left_to_the_compiler():
    mesh = make_mesh_or_skip((2, 2), ("data", "stage"))
    schedule = schedules.build("1f1b", 2, 4)
    problem = make_problem(2, 4)
    loss, grads = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh))(*problem)
    ref_loss, ref_grads = reference_value_and_grad(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


def test_compiles_once_for_new_data():
    schedule = schedules.build("1f1b", 2, 4)
    mesh = make_mesh_or_skip((2,), ("stage",))
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh)
    traced = jax.jit(chex.assert_max_traces(step, n=1))
    first = make_problem(2, 4, seed=1)
    second = make_problem(2, 4, seed=2)
    loss_a, _ = traced(*first)
    loss_b, _ = traced(*second)
    assert float(loss_a) != float(loss_b)


def test_buffers_are_sized_by_peak_in_flight_not_by_microbatches():
    mesh = make_mesh_or_skip((4,), ("stage",))
    sizes = {}
    for m in (8, 32):
        step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedules.build("1f1b", 4, m), mesh=mesh)
        sizes[m] = (step.program.num_stash_slots, step.program.num_inbox_slots)
    assert sizes[8] == sizes[32]
    assert sizes[32][0] == 4  # 1f1b device 0 holds p = 4 microbatches of residuals at its peak
    gpipe = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedules.build("gpipe", 4, 32), mesh=mesh)
    assert gpipe.program.num_stash_slots == 32


def test_idle_ticks_compute_nothing_and_ticks_use_one_op_per_device():
    program = jpipe.pipeline.compile_program(schedules.build("1f1b", 4, 8))
    (lane,) = program.lanes
    busy = (lane.op != 0).sum()
    assert busy == 4 * 8 * 3  # F, I, W per stage and microbatch: no op is duplicated or masked
    assert lane.op.shape == (program.num_ticks, 4)


class TestErrors:
    def setup_method(self):
        self.schedule = schedules.build("1f1b", 2, 4)
        self.problem = make_problem(2, 4)

    def _step(self, mesh=None, **kwargs):
        mesh = mesh if mesh is not None else make_mesh_or_skip((2,), ("stage",))
        return jpipe.value_and_grad(stage_fn, loss_fn, schedule=self.schedule, mesh=mesh, **kwargs)

    def test_mesh_axis_size_must_match_num_devices(self):
        with pytest.raises(ValueError, match=r"mesh: axis 'stage' has 4 devices .* num_devices=2"):
            self._step(make_mesh_or_skip((4,), ("stage",)))

    def test_mesh_needs_the_stage_axis(self):
        with pytest.raises(ValueError, match=r"mesh: no axis named 'stage'"):
            self._step(make_mesh_or_skip((2,), ("pipe",)))

    def test_stage_params_leading_axis(self):
        stage_params, loss_params, inputs, targets = make_problem(3, 4)
        with pytest.raises(ValueError, match=r"stage_params\['g'\]: expected a leading axis of length 2"):
            self._step()(stage_params, loss_params, inputs, targets)

    def test_inputs_leading_axis(self):
        stage_params, loss_params, inputs, targets = make_problem(2, 5)
        with pytest.raises(ValueError, match=r"inputs\['aux'\]: expected a leading axis of length 4"):
            self._step()(stage_params, loss_params, inputs, targets)

    def test_stage_fn_changing_shape(self):
        def widening(params, x):
            return {"h": jnp.concatenate([x["h"], x["h"]], -1), "aux": x["aux"]}

        mesh = make_mesh_or_skip((2,), ("stage",))
        step = jpipe.value_and_grad(widening, loss_fn, schedule=self.schedule, mesh=mesh)
        with pytest.raises(ValueError, match=r"stage_fn changes the activation\['h'\]"):
            step(*self.problem)

    def test_stage_fn_changing_dtype(self):
        def casting(params, x):
            return {"h": x["h"].astype(jnp.bfloat16), "aux": x["aux"]}

        mesh = make_mesh_or_skip((2,), ("stage",))
        step = jpipe.value_and_grad(casting, loss_fn, schedule=self.schedule, mesh=mesh)
        with pytest.raises(ValueError, match=r"bfloat16"):
            step(*self.problem)

    def test_invalid_schedule_is_rejected_before_compiling(self):
        rows = [list(row) for row in self.schedule.actions]
        rows[0] = rows[0][1:] + rows[0][:1]  # move the first forward to the end: B before F
        broken = schedules.Schedule(2, 4, self.schedule.placement, rows, name="broken")
        with pytest.raises(schedules.ScheduleError):
            jpipe.value_and_grad(stage_fn, loss_fn, schedule=broken, mesh=make_mesh_or_skip((2,), ("stage",)))

    def test_bad_remat(self):
        with pytest.raises(ValueError, match=r"remat: expected one of"):
            self._step(remat="sometimes")


def test_input_grads_flow_for_every_microbatch():
    schedule = schedules.build("zb_h1", 2, 3)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(2, 3)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh))
    _, (_, _, input_grads) = step(*problem)
    assert np.all(np.abs(np.asarray(input_grads["h"])).reshape(3, -1).max(-1) > 0)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_data_parallel_matches_sequential(axis_type):
    """Microbatches split over a data axis: each device computes on its part of the batch."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    kind = jax.sharding.AxisType.Auto if axis_type == "auto" else jax.sharding.AxisType.Explicit
    mesh = make_mesh_or_skip((2, 2), ("data", "stage"), (kind, kind))
    schedule = schedules.build("1f1b", 2, 4)
    stage_params, loss_params, inputs, targets = make_problem(2, 4)
    ref_loss, ref_grads = reference_value_and_grad(stage_params, loss_params, inputs, targets)
    batch_sharded = NamedSharding(mesh, P(None, "data"))
    inputs = jax.device_put(inputs, batch_sharded)
    targets = jax.device_put(targets, batch_sharded)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, data_axes="data"))
    loss, grads = step(stage_params, loss_params, inputs, targets)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    hlo = step.lower(stage_params, loss_params, inputs, targets).compile().as_text()
    # Each device computes on its half of the batch: no full-batch [B, T, D] activation appears.
    assert f"f32[1,{SEQ},{WIDTH}]" in hlo
    assert f"f32[{BATCH},{SEQ},{WIDTH}]" not in hlo


@pytest.mark.parametrize(("name", "virtual"), [("interleaved_1f1b", 2), ("zbv", 2)])
def test_device_stage_order_keeps_parameters_in_place(name, virtual):
    """stage_order="device": params stored device-major and sharded over stage never move."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    schedule = schedules.build(name, 2, 4, virtual)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(schedule.num_stages, 4)
    order = jpipe.pipeline.StagePlacement.of(schedule).device_major
    stage_params = jax.tree.map(lambda a: jax.device_put(a[order], NamedSharding(mesh, P("stage"))), problem[0])
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, stage_order="device"))
    loss, (stage_grads, loss_grads, input_grads) = step(stage_params, *problem[1:])
    ref_loss, (ref_stage, ref_loss_grads, ref_input) = reference_value_and_grad(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(stage_grads, jax.tree.map(lambda a: a[order], ref_stage))
    assert_trees_close((loss_grads, input_grads), (ref_loss_grads, ref_input))
    hlo = step.lower(stage_params, *problem[1:]).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_hlo_has_one_collective_permute_per_channel_and_leaf_and_no_gathers():
    """Per tick: one ppermute per ring offset and activation leaf; no all-gather/all-to-all at all."""
    schedule = schedules.build("1f1b", 4, 8)
    mesh = make_mesh_or_skip((4,), ("stage",))
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh)
    problem = make_problem(4, 8)
    hlo = jax.jit(step).lower(*problem).compile().as_text()
    remote_channels = [offset for offset in step.program.lanes[0].channels if offset != 0]
    # +1 (activations), -1 (gradients) on a ring of 4, and +2 (input gradients back to their owner).
    assert remote_channels == [1, 2, 3]
    # Inputs from their owners (devices 1, 2, 3) to stage 0's device 0.
    remote_inputs = [offset for offset in step.program.delivery.channels if offset != 0]
    assert remote_inputs == [1, 2, 3]
    num_leaves = len(jax.tree.leaves(problem[2]))
    permutes = re.findall(r"collective-permute(?:-start)?\(", hlo)
    assert len(permutes) == (len(remote_channels) + len(remote_inputs)) * num_leaves
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert hlo.count(" while(") == 1  # one scan over ticks; nothing unrolled per microbatch


def _prologue(prologue_params, raw):
    """raw {"h": [B, T, 2], "aux": [B, T]} -> the stage activation, through a learned projection."""
    return {"h": jnp.tanh(raw["h"] @ prologue_params["proj"]), "aux": raw["aux"] * prologue_params["gain"]}


@pytest.mark.parametrize(("name", "virtual", "split"), [("1f1b", 1, True), ("zbv", 2, True), ("gpipe", 1, False)])
def test_prologue_runs_inside_the_pipeline_and_gets_its_gradient(name, virtual, split):
    schedule = schedules.build(name, 2, 4, virtual)
    mesh = make_mesh_or_skip((2,), ("stage",))
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 4)
    raw = {"h": inputs["h"][..., :2], "aux": inputs["aux"]}
    prologue_params = {"proj": jax.random.normal(jax.random.key(7), (2, WIDTH)), "gain": jnp.float32(1.3)}
    step = jax.jit(
        jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, split_backward=split, prologue=_prologue)
    )
    loss, grads = step(stage_params, loss_params, raw, targets, prologue_params)
    _assert_prologue_parity(_prologue, (loss, grads), stage_params, loss_params, raw, targets, prologue_params)


def _assert_prologue_parity(prologue, result, stage_params, loss_params, raw, targets, prologue_params):
    """`result` (loss, grads) equals the sequential model's with `prologue` before the stages."""

    def reference(stage_params, loss_params, prologue_params):
        x = jax.vmap(lambda r: prologue(prologue_params, r))(raw)
        outputs = sequential_outputs(stage_params, x)
        return jnp.mean(jax.vmap(lambda y, t: loss_fn(loss_params, y, t))(outputs, targets))

    ref_loss, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(stage_params, loss_params, prologue_params)
    assert_trees_close(result[0], ref_loss)
    assert_trees_close(result[1], ref_grads)


def _mixing_prologue(prologue_params, raw):
    """`_prologue` plus a term through `mix` `[WIDTH, OUT]`, shaped like the loss's head."""
    h = jnp.tanh(raw["h"] @ prologue_params["proj"])
    h = h + 0.1 * (h @ prologue_params["mix"]) @ prologue_params["mix"].T
    return {"h": h, "aux": raw["aux"]}


@pytest.mark.parametrize(
    ("name", "virtual", "shared"), [("1f1b", 1, True), ("interleaved_1f1b", 2, True), ("zbv", 2, False)]
)
def test_prologue_and_loss_gradients_share_an_accumulator_when_no_device_runs_both_ends(name, virtual, shared):
    """A prologue parameter shaped like a loss parameter (an untied embedding and head) shares one
    float32 accumulator with it unless one device runs both a first and a last stage (V placement)."""
    from jpipe.pipeline.end_slots import EndSlots

    schedule = schedules.build(name, 2, 4, virtual)
    mesh = make_mesh_or_skip((2,), ("stage",))
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 4)
    raw = {"h": inputs["h"][..., :2], "aux": inputs["aux"]}
    prologue_params = {
        "proj": jax.random.normal(jax.random.key(7), (2, WIDTH)),
        "mix": jax.random.normal(jax.random.key(8), loss_params["head"].shape) / np.sqrt(WIDTH),
    }
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, prologue=_mixing_prologue)
    assert EndSlots.of(step.program, loss_params, prologue_params).shared == shared
    result = jax.jit(step)(stage_params, loss_params, raw, targets, prologue_params)
    _assert_prologue_parity(_mixing_prologue, result, stage_params, loss_params, raw, targets, prologue_params)


def test_prologue_params_must_match_the_prologue_option():
    schedule = schedules.build("1f1b", 2, 2)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(2, 2)
    with pytest.raises(ValueError, match="prologue_params"):
        jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh)(*problem, {"proj": jnp.ones(2)})
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, prologue=_prologue)
    with pytest.raises(ValueError, match="prologue_params"):
        step(*problem)
    with pytest.raises(ValueError, match="prologue failed"):
        step(*problem, {"proj": jnp.ones((3, WIDTH)), "gain": jnp.float32(1.0)})


@pytest.mark.parametrize("remat", ["none", "full"])
def test_inputs_and_input_gradients_stay_sharded_over_the_pipeline(remat):
    """Generic API: no [m, ...] buffer per device and no activation-sized reduction over `stage`.

    Microbatches live on their owners (`inputs` sharded over stage) and travel to stage 0's device
    one at a time; input gradients travel back. Temp memory does not grow with m (beyond the tick
    tables); outputs grow only by this device's share of the batch's input gradients.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpipe.parallel.hlo import collectives

    mesh = make_mesh_or_skip((4,), ("stage",))
    batch, seq = 16, 64  # microbatches large enough that the tick tables do not matter

    def compiled(m):
        def abstract(shape, spec):
            return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))

        stage_params = jax.tree.map(lambda a: abstract(a.shape, P("stage")), make_problem(4, 1)[0])
        loss_params = {"head": abstract((WIDTH, 3), P())}
        inputs = {"h": abstract((m, batch, seq, WIDTH), P("stage")), "aux": abstract((m, batch, seq), P("stage"))}
        targets = abstract((m, batch, seq, 3), P())
        step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedules.build("1f1b", 4, m), mesh=mesh, remat=remat)
        return jax.jit(step).lower(stage_params, loss_params, inputs, targets).compile()

    small, large = compiled(4), compiled(32)
    microbatch_bytes = batch * seq * (WIDTH + 1) * 4
    temp_growth = large.memory_analysis().temp_size_in_bytes - small.memory_analysis().temp_size_in_bytes
    # A replicated [m] buffer would add 28 microbatches; XLA:CPU's layout copies add up to a few.
    assert temp_growth < (32 - 4) // 4 * microbatch_bytes, temp_growth
    output_growth = large.memory_analysis().output_size_in_bytes - small.memory_analysis().output_size_in_bytes
    assert output_growth == (32 - 4) // 4 * microbatch_bytes  # this device's 7 more input gradients
    activation = f"{batch},{seq},{WIDTH}"
    reductions = [c for c in collectives(large.as_text()) if c.kind in ("all-reduce", "all-gather", "reduce-scatter")]
    assert not [c for c in reductions if activation in c.shape], reductions


@pytest.mark.parametrize("m", [3, 6])
def test_microbatch_counts_that_do_not_divide_over_the_pipeline(m):
    """m not a multiple of p: the batch is padded to one; loss and every gradient still match."""
    schedule = schedules.build("1f1b", 4, m)
    mesh = make_mesh_or_skip((4,), ("stage",))
    problem = make_problem(4, m)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh))
    loss, grads = step(*problem)
    ref_loss, ref_grads = reference_value_and_grad(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    assert jax.tree.leaves(grads[2])[0].shape[0] == m


def _overlap_cases():
    for name in sorted(set(schedules.SCHEDULES) - set(REORDERS)):
        virtual = schedules.default_virtual(name)
        for p, m in ((2, 3), (4, 9)):
            try:
                schedules.build(name, p, m, virtual)
            except schedules.ScheduleError:
                m = 2 * p  # dualpipev needs m >= 2p
            yield pytest.param(name, p, m, virtual, id=f"{name}-p{p}-m{m}-v{virtual}")


@pytest.mark.parametrize(("name", "p", "m", "virtual"), list(_overlap_cases()))
def test_hidden_sends_match_sequential(name, p, m, virtual):
    """overlap_sends=True: every message spends a tick in flight; the numbers do not change."""
    _run_and_compare(schedules.build(name, p, m, virtual), overlap_sends=True)


@pytest.mark.parametrize(("name", "virtual"), [("1f1b", 1), ("zbv", 2)])
def test_hidden_send_tables_deliver_remote_messages_one_tick_later(name, virtual):
    """With send_latency=1 a remote message lands at the end of the tick after its producer's."""
    schedule = schedules.build(name, 4, 8, virtual)
    plain = jpipe.pipeline.compile_program(schedule, deliver=True)
    hidden = jpipe.pipeline.compile_program(schedule, deliver=True, send_latency=1)
    assert hidden.send_latency == 1 and hidden.num_ticks > plain.num_ticks
    for program, latency in ((plain, 0), (hidden, 1)):
        tick_of = {a: t + 1 for a, t in program.tick_table.tick_of().items()}  # + the delivery tick
        placement = program.schedule.placement
        arrivals = 0
        for action, t in tick_of.items():
            if action.op is not schedules.Op.F or action.stage == program.schedule.num_stages - 1:
                continue
            src, dst = placement[action.stage], placement[action.stage + 1]
            reader = tick_of[schedules.Action(action.stage + 1, schedules.Op.F, action.microbatch)]
            lane = program.lanes[0]
            channel = lane.channels.index((dst - src) % 4)
            arrive = t + (latency if src != dst else 0)
            slot = lane.recv_slot[arrive, dst, channel]
            assert slot < program.num_inbox_slots and lane.inbox_slot[reader, dst] == slot
            assert reader > arrive
            arrivals += 1
        assert arrivals == 8 * (program.schedule.num_stages - 1)


def test_hidden_sends_in_forward_and_with_a_prologue():
    schedule = schedules.build("interleaved_1f1b", 2, 4, 2)
    mesh = make_mesh_or_skip((2,), ("stage",))
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 4)
    run = jpipe.forward(stage_fn, schedule=schedule, mesh=mesh, overlap_sends=True)
    assert run.program.send_latency == 1
    assert_trees_close(jax.jit(run)(stage_params, inputs), sequential_outputs(stage_params, inputs))
    raw = {"h": inputs["h"][..., :2], "aux": inputs["aux"]}
    prologue_params = {"proj": jax.random.normal(jax.random.key(7), (2, WIDTH)), "gain": jnp.float32(1.3)}
    options = dict(schedule=schedule, mesh=mesh, prologue=_prologue)
    hidden = jpipe.value_and_grad(stage_fn, loss_fn, overlap_sends=True, **options)
    exposed = jpipe.value_and_grad(stage_fn, loss_fn, overlap_sends=False, **options)
    args = (stage_params, loss_params, raw, targets, prologue_params)
    assert_trees_close(jax.jit(hidden)(*args), jax.jit(exposed)(*args))


def test_hidden_sends_auto_follows_the_simulated_comm_cost():
    schedule = schedules.build("1f1b", 4, 8)
    mesh = make_mesh_or_skip((4,), ("stage",))

    def latency(cost):
        step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, cost=cost, split_backward=True)
        return step.program.send_latency

    assert latency(schedules.Cost()) == 0  # free sends: an extra tick of latency only costs
    assert latency(schedules.Cost(comm=1.0)) == 1  # a send as long as an op: hiding it pays


def test_hidden_sends_option_is_checked():
    schedule = schedules.build("1f1b", 2, 4)
    mesh = make_mesh_or_skip((2,), ("stage",))
    with pytest.raises(ValueError, match=r"overlap_sends: expected True, False or 'auto', got 'yes'"):
        jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, overlap_sends="yes")
    with pytest.raises(ValueError, match=r"overlap_sends: expected True or False, got 'auto'"):
        jpipe.forward(stage_fn, schedule=schedule, mesh=mesh, overlap_sends="auto")


@pytest.mark.parametrize(("name", "virtual"), [("zb_h1", 1), ("zbv", 2)])
def test_two_stream_schedules_with_hidden_sends_match_sequential(name, virtual):
    schedule = schedules.build(name, 2, 5, virtual, send_latency=1)
    assert schedule.name == f"{name}[2 streams]"
    _run_and_compare(schedule, overlap_sends=True)


@pytest.mark.parametrize(("name", "p", "m"), [("1f1b", 4, 6), ("stp", 2, 5), ("skippipe", 4, 8)])
def test_forward_loss_is_the_gradient_steps_loss_without_backward_ops(name, p, m):
    from jpipe.pipeline.program import FORWARD, IDLE

    schedule = schedules.build(name, p, m)
    mesh = make_mesh_or_skip((p,), ("stage",))
    problem = make_problem(schedule.num_model_stages, m)
    evaluate = jpipe.forward_loss(stage_fn, loss_fn, schedule=schedule, mesh=mesh)
    assert set(np.unique(evaluate.program.lanes[0].op)) <= {IDLE, FORWARD}
    loss, _ = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh))(*problem)
    assert_trees_close(jax.jit(evaluate)(*problem), loss)


def test_forward_loss_runs_the_prologue():
    schedule = schedules.build("zbv", 2, 4)
    mesh = make_mesh_or_skip((2,), ("stage",))
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 4)
    raw = {"h": inputs["h"][..., :2], "aux": inputs["aux"]}
    prologue_params = {"proj": jax.random.normal(jax.random.key(7), (2, WIDTH)), "gain": jnp.float32(1.3)}
    args = (stage_params, loss_params, raw, targets, prologue_params)
    evaluate = jpipe.forward_loss(stage_fn, loss_fn, schedule=schedule, mesh=mesh, prologue=_prologue)
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, prologue=_prologue)
    assert_trees_close(jax.jit(evaluate)(*args), jax.jit(step)(*args)[0])
    with pytest.raises(ValueError, match="prologue_params"):
        evaluate(stage_params, loss_params, raw, targets)
