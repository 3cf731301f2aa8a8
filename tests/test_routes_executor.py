"""The executor on schedules with replicated stages and per-microbatch routes (DualPipe, BitPipe, SkipPipe).

Reference: each microbatch runs its own route, each logical stage applying its model stage's
parameters (replicas share them), and the loss is the mean over microbatches. Stage parameters and
gradients are `[num_model_stages, ...]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import WIDTH, assert_trees_close, loss_fn, make_problem, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline.end_slots import EndSlots
from jpipe.pipeline.placement import StagePlacement
from jpipe.pipeline.program import FORWARD, compile_program
from jpipe.schedules import Op

# Hand-made routes on 8 logical stages over 4 devices (loop placement): skips, reorders (5 -> 4,
# 2 -> 1) and one full route; m = 6 does not divide over the 4 devices (the batch is padded).
HAND_ROUTES = ((0, 1, 5, 4, 7), (0, 2, 3, 7), (0, 1, 2, 3, 4, 5, 6, 7), (0, 6, 5, 7), (0, 3, 4, 7), (0, 2, 1, 7))


@functools.cache
def _schedule(name: str, p: int, m: int) -> schedules.Schedule:
    if name == "skippipe-skips":
        return schedules.build("skippipe", p, m, 2, skip_ratio=0.25, reorder=False, steps=20)
    if name == "skippipe-reorders":
        return schedules.build("skippipe", p, m, 2, skip_ratio=0.25, seed=0, steps=40)
    if name == "dualpipe-pairs":  # overlapped F&B pairs as composites: braided ticks on replicated stages
        return schedules.build("dualpipe", p, m, overlap=True)
    if name == "hand-routes":
        return schedules.schedule_routes(p, m, schedules.loop_placement(p, 2), HAND_ROUTES, memory_cap=2)
    return schedules.build(name, p, m)


def route_outputs(schedule, stage_params, inputs):
    """`[m, ...]`: each microbatch through its own route, unpipelined.

    A scan over hops (routes padded to the longest one with masked hops) applies, at hop j of
    microbatch i, the model stage of `route(i)[j]`; one traced stage keeps compiling cheap.
    """
    m = schedule.num_microbatches
    longest = max(len(schedule.route(mb)) for mb in range(m))
    model = np.zeros((m, longest), np.int32)  # [m, L]: the model stage at each hop
    on = np.zeros((m, longest), bool)  # [m, L]: whether the hop exists
    for mb in range(m):
        route = schedule.route(mb)
        model[mb, : len(route)] = [schedule.model_stage_of(s) for s in route]
        on[mb, : len(route)] = True

    def one(x, stages, present):
        def hop(x, step):
            k, here = step
            y = stage_fn(jax.tree.map(lambda a: a[k], stage_params), x)
            return jax.tree.map(lambda new, old: jnp.where(here, new, old), y, x), None

        return jax.lax.scan(hop, x, (stages, present))[0]

    return jax.vmap(one)(inputs, jnp.asarray(model), jnp.asarray(on))


def route_loss(schedule, stage_params, loss_params, inputs, targets):
    """Mean over microbatches of the loss after each microbatch's route (the reference)."""
    outputs = route_outputs(schedule, stage_params, inputs)
    return jnp.mean(jax.vmap(lambda y, t: loss_fn(loss_params, y, t))(outputs, targets))


@functools.cache
def _reference(schedule):
    return jax.jit(jax.value_and_grad(functools.partial(route_loss, schedule), argnums=(0, 1, 2)))


def _check(schedule, **options):
    mesh = make_mesh_or_skip((schedule.num_devices,), ("stage",))
    problem = make_problem(schedule.num_model_stages, schedule.num_microbatches)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, **options))
    loss, grads = step(*problem)
    ref_loss, ref_grads = _reference(schedule)(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize(
    ("name", "p", "m", "split"),
    [
        ("dualpipe", 4, 8, True),
        ("dualpipe", 4, 16, False),
        ("dualpipe", 2, 4, False),
        ("dualpipe-pairs", 4, 8, False),
        ("bitpipe", 4, 4, True),
        ("bitpipe", 4, 8, False),
        ("bitpipe", 4, 16, True),
        ("bitpipe", 2, 4, True),
        ("skippipe-skips", 4, 8, True),
        ("skippipe-reorders", 4, 8, False),
        ("hand-routes", 4, 6, True),
    ],
)
def test_routed_schedule_matches_each_microbatchs_route(name, p, m, split):
    """Loss, stage (per model stage, replicas summed), loss-parameter and input gradients, hidden sends."""
    schedule = _schedule(name, p, m)
    assert not schedule.is_plain
    _check(schedule, split_backward=split, overlap_sends=True)


def test_the_cases_have_skips_reorders_and_replicas():
    assert _schedule("dualpipe", 4, 8).has_replicas and _schedule("bitpipe", 4, 8).has_replicas
    for name in ("skippipe-skips", "skippipe-reorders", "hand-routes"):
        schedule = _schedule(name, 4, 8 if name != "hand-routes" else 6)
        routes = [schedule.route(mb) for mb in range(schedule.num_microbatches)]
        assert any(len(r) < schedule.num_stages for r in routes)
        assert any(list(r) != sorted(r) for r in routes) == (name != "skippipe-skips")


@pytest.mark.parametrize(("name", "p", "m"), [("dualpipe", 4, 8), ("bitpipe", 2, 4)])
def test_exposed_sends(name, p, m):
    _check(_schedule(name, p, m), split_backward=True, overlap_sends=False)


def _prologue(prologue_params, raw):
    """raw {"h": [B, T, 2], "aux": [B, T]} -> the stage activation; `mix` is shaped like the loss's head."""
    h = jnp.tanh(raw["h"] @ prologue_params["proj"])
    h = h + 0.1 * (h @ prologue_params["mix"]) @ prologue_params["mix"].T
    return {"h": h, "aux": raw["aux"] * prologue_params["gain"]}


@pytest.mark.parametrize(
    ("name", "p", "m", "split"),
    [
        ("dualpipe", 4, 8, True),
        ("bitpipe", 2, 4, False),
        ("hand-routes", 4, 6, False),
        ("skippipe-reorders", 4, 8, True),
    ],
)
def test_prologue_runs_at_each_microbatchs_first_hop(name, p, m, split):
    """The prologue runs where a microbatch enters (both ends of the pipeline for DualPipe/BitPipe)."""
    schedule = _schedule(name, p, m)
    mesh = make_mesh_or_skip((p,), ("stage",))
    stage_params, loss_params, _, targets = make_problem(schedule.num_model_stages, m)
    raw = {"h": jax.random.normal(jax.random.key(3), targets.shape[:-1] + (2,)), "aux": targets[..., 0]}
    prologue_params = {
        "proj": jax.random.normal(jax.random.key(7), (2, WIDTH)),
        "gain": jnp.float32(1.3),
        "mix": 0.5 * jax.random.normal(jax.random.key(8), loss_params["head"].shape),
    }
    step = jpipe.value_and_grad(
        stage_fn, loss_fn, schedule=schedule, mesh=mesh, split_backward=split, overlap_sends=True, prologue=_prologue
    )
    # `mix` and the head may share one accumulator only when no device runs both a first and a last
    # hop: not so for DualPipe and BitPipe (a microbatch of one direction enters where one of the
    # other leaves), so for the SkipPipe routes (stage 0 on device 0, stage 7 on device 3).
    first = step.program.first_hop_devices()
    last = step.program.last_hop_devices()
    shared = EndSlots.of(step.program, loss_params, prologue_params).shared
    assert shared == (not (first & last).any())
    assert shared == name.startswith(("skippipe", "hand"))
    loss, grads = jax.jit(step)(stage_params, loss_params, raw, targets, prologue_params)

    def reference(stage_params, loss_params, prologue_params):
        x = jax.vmap(lambda r: _prologue(prologue_params, r))(raw)
        return route_loss(schedule, stage_params, loss_params, x, targets)

    ref_loss, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(stage_params, loss_params, prologue_params)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize(("name", "p", "m"), [("bitpipe", 4, 8), ("dualpipe", 2, 4), ("hand-routes", 4, 6)])
def test_forward_follows_the_routes(name, p, m):
    schedule = _schedule(name, p, m)
    mesh = make_mesh_or_skip((p,), ("stage",))
    stage_params, _, inputs, _ = make_problem(schedule.num_model_stages, m)
    outputs = jax.jit(jpipe.forward(stage_fn, schedule=schedule, mesh=mesh, overlap_sends=True))(stage_params, inputs)
    assert_trees_close(outputs, route_outputs(schedule, stage_params, inputs))


def test_device_stage_order_gives_every_replica_the_summed_gradient():
    """stage_order="device": one row per logical stage; each replica's row holds its model stage's total."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    schedule = _schedule("dualpipe", 2, 4)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(schedule.num_model_stages, 4)
    placement = StagePlacement.of(schedule)
    rows = placement.device_major_model  # [S]: the model stage of each device-major row
    stage_params = jax.tree.map(lambda a: jax.device_put(a[rows], NamedSharding(mesh, P("stage"))), problem[0])
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, stage_order="device"))
    loss, (stage_grads, loss_grads, input_grads) = step(stage_params, *problem[1:])
    ref_loss, (ref_stage, ref_loss_grads, ref_input) = _reference(schedule)(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(stage_grads, jax.tree.map(lambda a: a[rows], ref_stage))
    assert_trees_close((loss_grads, input_grads), (ref_loss_grads, ref_input))
    with pytest.raises(ValueError, match="num_stages, device-major"):
        step(problem[0], *problem[1:])


def test_logical_stage_params_are_per_model_stage():
    schedule = _schedule("bitpipe", 2, 4)
    mesh = make_mesh_or_skip((2,), ("stage",))
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh)
    with pytest.raises(ValueError, match=r"length 4 \(num_model_stages\)"):
        step(*make_problem(schedule.num_stages, 4))


def test_data_parallel_routed_schedule():
    """Microbatches split over a data axis as well; inputs delivered from their owners."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh_or_skip((2, 2), ("data", "stage"))
    schedule = _schedule("bitpipe", 2, 4)
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_model_stages, 4)
    ref_loss, ref_grads = _reference(schedule)(stage_params, loss_params, inputs, targets)
    batch_sharded = NamedSharding(mesh, P(None, "data"))
    inputs, targets = jax.device_put(inputs, batch_sharded), jax.device_put(targets, batch_sharded)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, data_axes="data"))
    loss, grads = step(stage_params, loss_params, inputs, targets)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


# --- tables (no compile) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "p", "m"), [("bitpipe", 2, 4), ("bitpipe", 4, 8), ("dualpipe", 4, 8), ("hand-routes", 4, 6)]
)
@pytest.mark.parametrize("latency", [0, 1])
def test_tables_follow_the_routes(name, p, m, latency):
    schedule = _schedule(name, p, m)
    program = compile_program(schedule, deliver=True, send_latency=latency)
    sched = program.schedule
    k = program.microbatches_per_device
    (lane,) = program.lanes
    delivery = program.delivery
    seen = 0
    for t in range(program.num_ticks):
        for d in range(p):
            if lane.op[t, d] == 0:
                continue
            stage = sched.stages_of(d)[lane.chunk[t, d]]
            mb = int(lane.microbatch[t, d])
            assert lane.is_first[t, d] == sched.is_first_hop(stage, mb)
            assert lane.is_last[t, d] == sched.is_last_hop(stage, mb)
            seen += 1
    assert seen == sum(len(row) for row in sched.actions)
    # Each owner sends at most one input per tick, to the device of the microbatch's first hop, before
    # the forward that reads it; the slot is not reused in between.
    sends = {}  # microbatch -> (tick, destination)
    for t in range(program.num_ticks):
        for c, offset in enumerate(delivery.channels):
            for dst in range(p):
                if delivery.recv_slot[t, dst, c] < program.num_inbox_slots:
                    owner = (dst - offset) % p
                    mb = owner * k + int(delivery.send_index[t, owner])
                    assert mb not in sends
                    sends[mb] = (t, dst, int(delivery.recv_slot[t, dst, c]))
    assert sorted(sends) == list(range(m))
    for mb, (sent, dst, slot) in sends.items():
        first = sched.route(mb)[0]
        assert dst == sched.placement[first]
        reads = [
            t
            for t in range(program.num_ticks)
            if lane.op[t, dst] == FORWARD
            and lane.microbatch[t, dst] == mb
            and sched.stages_of(dst)[lane.chunk[t, dst]] == first
        ]
        assert len(reads) == 1 and sent < reads[0] and lane.inbox_slot[reads[0], dst] == slot
        overwritten = (lane.recv_slot[sent + 1 : reads[0], dst] == slot).any() or (
            delivery.recv_slot[sent + 1 : reads[0], dst] == slot
        ).any()
        assert not overwritten
    if name == "bitpipe" and p == 2:
        # Owner 0 feeds both pipelines (microbatch 0 down from device 0, 1 up from device 1) in the
        # first tick: a second delivery-only tick is needed before the packed schedule.
        plain = compile_program(schedule, deliver=False, send_latency=latency)
        assert program.num_ticks == plain.num_ticks + 2


def test_stage_placement_converts_between_model_and_device_rows():
    schedule = _schedule("bitpipe", 2, 4)
    placement = StagePlacement.of(schedule)
    assert (placement.num_stages, placement.num_model_stages) == (8, 4)
    params = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # [K, 3]
    rows = placement.model_to_device(params)  # [S, 3]
    assert rows.shape == (8, 3)
    for r, s in enumerate(placement.device_major):
        np.testing.assert_array_equal(rows[r], params[schedule.model_stage_of(int(s))])
    np.testing.assert_array_equal(placement.device_to_model(rows), 2 * params)  # two replicas each
    summed = placement.sum_replicas(jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(summed), 2 * rows)
    plain = StagePlacement.of(schedules.build("zbv", 2, 4))
    assert not plain.has_replicas and plain.model_stage is None
    tree = np.arange(4)
    np.testing.assert_array_equal(plain.model_to_device(tree), plain.to_device_order(tree))
    np.testing.assert_array_equal(plain.device_to_model(plain.model_to_device(tree)), tree)


def test_skipped_model_stage_gets_no_gradient():
    """A route set that never visits stage 3: its gradient is zero, the others match."""
    routes = ((0, 1, 2), (0, 2, 1), (0, 1, 2), (0, 2))
    schedule = schedules.schedule_routes(2, 4, (0, 1, 0, 1), routes, memory_cap=2)
    assert {a.stage for row in schedule.actions for a in row if a.op is Op.F} == {0, 1, 2}
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(4, 4)
    step = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh))
    loss, grads = step(*problem)
    ref_loss, ref_grads = _reference(schedule)(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    assert all(float(jnp.abs(g[3]).max()) == 0.0 for g in jax.tree.leaves(grads[0]))


# --- the pipelined language model ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "virtual"), [("dualpipe", 2), ("bitpipe", 4)])
def test_pipelined_lm_with_replicas_matches_the_model(name, virtual):
    """PipelinedLM on a replicated schedule: one copy per logical stage, the model's loss and gradients.

    6 layers over the model stages (dualpipe: 2 of 3 layers; bitpipe: 4, padded to 2 slots), float64
    as in test_models. Every copy of a model stage gets the summed gradient, so an SGD step keeps the
    copies equal, and `to_model` (the checkpoint layout) holds each model stage once.
    """
    import dataclasses

    from lm_cases import TINY, batch, mesh_of, model_params, reference_step

    from jpipe.models import PipelinedLM

    params32 = model_params(TINY)
    with jax.enable_x64(True):
        config = dataclasses.replace(TINY, compute_dtype="float64", param_dtype="float64")
        schedule = schedules.build(name, 2, 4, virtual)
        pipe = PipelinedLM(config, schedule=schedule, mesh=mesh_of((1, 2, 1)))
        assert pipe.layout.num_stages == schedule.num_model_stages
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params32)
        placed = pipe.place(params)
        loss, grads = jax.jit(pipe.value_and_grad())(placed, *batch(config))
        ref_loss, ref_grads = reference_step(config)(params, *batch(config))
        assert_trees_close(loss, ref_loss)
        assert_trees_close(pipe.to_model(grads), ref_grads)
        assert_trees_close(pipe.to_model(placed), params)
        rows = pipe.placement.device_major_model
        for leaf in jax.tree.leaves(grads["blocks"]):
            leaf = np.asarray(leaf)
            for k in range(schedule.num_model_stages):
                copies = leaf[rows == k]
                assert len(copies) == 2 and np.array_equal(copies[0], copies[1])


def test_training_config_takes_routed_schedules_and_skip_ratio():
    import dataclasses

    from jpipe.train.config import ConfigError, ParallelConfig
    from jpipe.train.presets import preset

    config = preset("tiny")
    for parallel in (
        ParallelConfig(stage=2, virtual=4, schedule="bitpipe", microbatches=2),
        ParallelConfig(stage=2, virtual=2, schedule="dualpipe", microbatches=4),
        ParallelConfig(stage=2, virtual=2, schedule="skippipe", microbatches=2, skip_ratio=0.5),
    ):
        dataclasses.replace(config, parallel=parallel)  # the schedule builds
    assert ParallelConfig(schedule="skippipe", skip_ratio=0.5).schedule_options == {"skip_ratio": 0.5}
    with pytest.raises(ConfigError, match="skip_ratio: only for schedule 'skippipe'"):
        ParallelConfig(schedule="1f1b", skip_ratio=0.5)
    with pytest.raises(ConfigError, match="skip_ratio"):
        dataclasses.replace(
            config, parallel=ParallelConfig(stage=2, virtual=2, schedule="skippipe", microbatches=2, skip_ratio=0.9)
        )
