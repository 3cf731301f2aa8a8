"""Replicas and per-microbatch routes: the IR, validation, simulation, CSV, and the bitpipe, dualpipe
and skippipe generators against their formulas.

Costs are per logical stage (one chunk). DualPipe's formula is DeepSeek's README ("Pipeline Bubbles
and Memory Usage Comparison"): bubble `(PP/2 - 1)(F&B + B - 3W)` and `PP + 1` chunk activations
per device for PP = p devices; BitPipe's is the bubble ratio in Chimera's convention (F = B per
stage) and the reference order's exact idle time and peak, as stated in
`jpipe/schedules/bidirectional.py`.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from schedule_cases import makespan_with_atomic_pairs

from jpipe.schedules import (
    ROUTED_SCHEDULES,
    SCHEDULES,
    Cost,
    Op,
    Schedule,
    ScheduleError,
    build,
    default_virtual,
    render,
    schedule_routes,
    simulate,
    split_backward,
    to_csv,
    v_placement,
    validate,
)
from jpipe.schedules.bidirectional import bitpipe_layout
from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import B, F
from jpipe.schedules.streams import two_streams

UNIT = Cost(f=1.0, b=2.0, i=1.0, w=1.0, per="chunk")  # the formulas are in per-chunk times
EQUAL = Cost(f=1.0, b=1.0, i=0.5, w=0.5, per="chunk")  # F = B: Chimera's and BitPipe's convention


def exactly(value: float):
    return pytest.approx(value, rel=1e-12, abs=1e-9)


def rejects(schedule: Schedule, message: str) -> None:
    with pytest.raises(ScheduleError, match=re.escape(message)):
        validate(schedule)


def skipping() -> Schedule:
    """3 devices, 2 microbatches: microbatch 0 runs 0 -> 1 -> 2, microbatch 1 skips stage 1."""
    return Schedule(
        num_devices=3,
        num_microbatches=2,
        placement=(0, 1, 2),
        actions=(
            (F(0, 0), F(0, 1), B(0, 0), B(0, 1)),
            (F(1, 0), B(1, 0)),
            (F(2, 0), F(2, 1), B(2, 0), B(2, 1)),
        ),
        name="skipping",
        routes=((0, 1, 2), (0, 2)),
    )


def mirrored() -> Schedule:
    """2 devices, 2 model stages with a copy per direction: microbatch 0 goes down, 1 goes up."""
    return Schedule(
        num_devices=2,
        num_microbatches=2,
        placement=(0, 1, 1, 0),
        actions=(
            (F(0, 0), F(3, 1), B(3, 1), B(0, 0)),
            (F(2, 1), F(1, 0), B(1, 0), B(2, 1)),
        ),
        name="mirrored",
        model_stage=(0, 1, 0, 1),
        routes=((0, 1), (2, 3)),
    )


# --- the IR ----------------------------------------------------------------------------------------


def test_default_routes_and_model_stages():
    schedule = build("1f1b", 3, 4)
    assert schedule.routes is None and schedule.model_stage is None and schedule.is_plain
    assert schedule.route(2) == (0, 1, 2)
    assert (schedule.next_stage(0, 1), schedule.next_stage(2, 1)) == (1, None)
    assert (schedule.prev_stage(0, 1), schedule.prev_stage(2, 1)) == (None, 1)
    assert schedule.is_first_hop(0, 0) and schedule.is_last_hop(2, 0) and not schedule.is_last_hop(1, 0)
    assert (schedule.num_model_stages, schedule.model_stage_of(2), schedule.replicas(1)) == (3, 2, (1,))


def test_identity_model_stage_and_full_routes_normalise_to_none():
    schedule = dataclasses.replace(build("1f1b", 2, 2), model_stage=[0, 1], routes=[[0, 1], (0, 1)])
    assert schedule.model_stage is None and schedule.routes is None
    assert schedule == build("1f1b", 2, 2)


def test_route_accessors_follow_the_route():
    schedule = skipping()
    assert schedule.has_routes and not schedule.has_replicas and not schedule.is_plain
    assert schedule.route(1) == (0, 2)
    assert schedule.next_stage(0, 1) == 2 and schedule.prev_stage(2, 1) == 0
    assert not schedule.on_route(1, 1)
    with pytest.raises(ScheduleError, match=re.escape("stage 1 is not on microbatch 1's route 0 -> 2")):
        schedule.next_stage(1, 1)
    deps = dependencies(schedule)
    assert deps[F(2, 1)] == (F(0, 1),)
    assert set(deps[B(0, 1)]) == {F(0, 1), B(2, 1)}


def test_replica_accessors():
    schedule = mirrored()
    assert schedule.has_replicas and schedule.num_model_stages == 2
    assert schedule.replicas(0) == (0, 2) and schedule.model_stage_of(3) == 1
    assert schedule.is_first_hop(2, 1) and schedule.is_last_hop(3, 1)


def test_str_shows_model_stages_and_routes_briefly():
    text = str(mirrored())
    assert "model stages: 0 1 0 1" in text
    assert "routes: mb 0: 0>1; mb 1: 2>3" in text
    many = build("dualpipe", 4, 16, 2)
    assert "routes: mb 0-7: 0>1>2>3; mb 8-15: 4>5>6>7" in str(many)


# --- validation ------------------------------------------------------------------------------------


def test_valid_routed_schedules_pass():
    validate(skipping())
    validate(mirrored())


@pytest.mark.parametrize(
    ("model_stage", "message"),
    [
        ((0, 1, 0), "model_stage must be a tuple with one model stage per logical stage (4), got 3"),
        ((0, 1, -1, 1), "model_stage[2] = -1: expected an int >= 0"),
        ((0, 2, 0, 2), "no logical stage computes [1]"),
        ((0, 1, 1, 0), "stages 1 and 2 are replicas of model stage 1 on the same device 1"),
    ],
)
def test_malformed_model_stages_are_rejected(model_stage, message):
    rejects(dataclasses.replace(mirrored(), model_stage=model_stage), message)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (((0, 1, 2),), "routes must be a tuple with one route per microbatch (2), got 1"),
        (((0, 1, 2), ()), "route of microbatch 1 is empty"),
        (((0, 1, 2), (0, 3)), "route of microbatch 1, hop 1: stage 3 out of range [0, 3)"),
        (((0, 1, 2), (0, 2, 0)), "route of microbatch 1 visits stage 0 twice"),
        (((0, 1, 2), 7), "route of microbatch 1: expected a tuple of logical stages, got 7"),
    ],
)
def test_malformed_routes_are_rejected(routes, message):
    rejects(dataclasses.replace(skipping(), routes=routes), message)


def test_a_route_visiting_a_model_stage_twice_is_rejected():
    rejects(
        dataclasses.replace(mirrored(), routes=((0, 1), (2, 1, 3))),
        "route of microbatch 1 visits model stage 1 twice (stages 1 and 3)",
    )
    rejects(
        dataclasses.replace(mirrored(), routes=((0, 1), (2, 3, 0))),
        "route of microbatch 1 visits model stage 0 twice (stages 2 and 0)",
    )


def test_an_action_off_its_route_is_rejected():
    schedule = skipping()
    rows = list(schedule.actions)
    rows[1] = (F(1, 0), F(1, 1), B(1, 0), B(1, 1))
    rejects(
        dataclasses.replace(schedule, actions=tuple(rows)),
        "action 1F1 on device 1: stage 1 is not on microbatch 1's route (0 -> 2)",
    )


def test_a_missing_action_on_a_route_is_rejected():
    schedule = skipping()
    rows = list(schedule.actions)
    rows[2] = (F(2, 0), F(2, 1), B(2, 0))
    rejects(dataclasses.replace(schedule, actions=tuple(rows)), "missing backward on device 2: stage 2 microbatch 1")
    rows[2] = (F(2, 0), B(2, 0), B(2, 1))
    rejects(dataclasses.replace(schedule, actions=tuple(rows)), "missing action 2F1 on device 2")


def test_local_order_follows_the_route():
    """Stages 1 and 2 on one device; microbatch 0 visits 2 before 1, so 1F0 must come after 2F0."""
    schedule = Schedule(
        num_devices=2,
        num_microbatches=1,
        placement=(0, 1, 1, 0),
        actions=((F(0, 0), F(3, 0), B(3, 0), B(0, 0)), (F(1, 0), F(2, 0), B(2, 0), B(1, 0))),
        routes=((0, 2, 1, 3),),
    )
    rejects(schedule, "action 1F0 on device 1 comes before 2F0, which it needs")
    fixed = ((F(0, 0), F(3, 0), B(3, 0), B(0, 0)), (F(2, 0), F(1, 0), B(1, 0), B(2, 0)))
    validate(dataclasses.replace(schedule, actions=fixed))


def test_cross_device_deadlock_along_reordered_routes_is_reported():
    """Microbatch 0 runs 0 -> 1 -> 2, microbatch 1 runs 0 -> 2 -> 1; devices 1 and 2 each start with
    the forward the other one feeds last."""
    schedule = Schedule(
        num_devices=3,
        num_microbatches=2,
        placement=(0, 1, 2),
        actions=(
            (F(0, 0), F(0, 1), B(0, 0), B(0, 1)),
            (F(1, 1), F(1, 0), B(1, 0), B(1, 1)),
            (F(2, 0), F(2, 1), B(2, 0), B(2, 1)),
        ),
        name="crossed",
        routes=((0, 1, 2), (0, 2, 1)),
    )
    rejects(schedule, "schedule 'crossed' deadlocks")
    rejects(schedule, "device 1: 1F1 waits for 2F1")
    rejects(schedule, "device 2: 2F0 waits for 1F0")


# --- simulation, packing, CSV, rendering, streams -------------------------------------------------------


def test_simulation_follows_routes():
    """Microbatch 1 skips stage 1: its stage-2 forward starts right after its stage-0 forward."""
    simulation = simulate(skipping(), UNIT)
    start = {event.action: event.start for event in simulation.timeline}
    assert start[F(2, 1)] == exactly(max(start[F(0, 1)] + 1, start[F(2, 0)] + 1))
    assert simulation.busy == (6.0, 3.0, 6.0)
    # Lockstep packs along the routes too: at unit costs it is the async run of the split schedule.
    lockstep = simulate(skipping(), UNIT, "lockstep")
    assert lockstep.makespan == simulate(split_backward(skipping()), UNIT).makespan == 10.0


def test_to_csv_refuses_replicas_and_routes():
    with pytest.raises(ScheduleError, match="per-microbatch routes, which the format cannot express"):
        to_csv(skipping())
    with pytest.raises(ScheduleError, match=re.escape("a model-stage map and per-microbatch routes")):
        to_csv(mirrored())


def test_render_names_replicas_and_routes():
    text = render(build("bitpipe", 4, 8, 4))
    assert "bitpipe: p=4 m=8 v=4 (16 stages computing 8 model stages, per-microbatch routes of 8 stages)" in text
    assert "(3 stages, per-microbatch routes of 2-3 stages)" in render(skipping())


def test_two_streams_carry_the_routes_of_their_microbatches():
    streamed = two_streams(lambda n: build("dualpipe", 2, n, 2), 8)
    validate(streamed)
    # Microbatch 2k + stream is microbatch k of its stream's half: 0, 1 go down in each half.
    assert [streamed.route(mb) for mb in range(8)] == [(0, 1)] * 4 + [(2, 3)] * 4
    assert streamed.model_stage == (0, 1, 0, 1)


def test_build_with_send_latency_keeps_routes():
    schedule = build("dualpipe", 2, 8, 2, send_latency=1)
    validate(schedule)
    assert schedule.model_stage == (0, 1, 0, 1)


# --- registry ----------------------------------------------------------------------------------------


def test_routed_schedules_are_registered_apart():
    assert {"bitpipe", "dualpipe", "skippipe"} <= set(ROUTED_SCHEDULES)
    assert not {"bitpipe", "dualpipe", "skippipe"} & set(SCHEDULES)
    with pytest.raises(ScheduleError, match="known schedules: .*1f1b.*bitpipe"):
        build("chimera", 4, 8)


def test_build_passes_options_and_refuses_unknown_ones():
    assert build("skippipe", 4, 8, skip_ratio=0.5, steps=0).route(0) == (0, 3)
    with pytest.raises(ScheduleError, match="schedule 'skippipe' takes no option colour"):
        build("skippipe", 4, 8, colour="red")
    with pytest.raises(ScheduleError, match="schedule '1f1b' takes no option seed"):
        build("1f1b", 4, 8, seed=1)


# --- dualpipe: DeepSeek's formula -----------------------------------------------------------------------


def dualpipe_formula(p: int, m: int, cost: Cost) -> float:
    """m(F + B) of work per device plus DeepSeek's bubble (PP/2 - 1)(F&B + B - 3W), PP = p, F&B = F + B."""
    return m * (cost.f + cost.b) + (p // 2 - 1) * (cost.f + cost.b + cost.b - 3 * cost.w)


DUALPIPE_CASES = [(p, m) for p in (2, 4, 6) for m in (4, 8, 12, 16, 24, 32) if m >= 2 * p]


def test_dualpipe_layout():
    schedule = build("dualpipe", 4, 8, 2)
    assert schedule.placement == v_placement(4)
    assert schedule.model_stage == (0, 1, 2, 3, 0, 1, 2, 3)
    assert [schedule.placement[s] for s in schedule.replicas(1)] == [1, 2]  # devices d and p - 1 - d
    assert [schedule.route(mb) for mb in (0, 3, 4, 7)] == [(0, 1, 2, 3)] * 2 + [(4, 5, 6, 7)] * 2


@pytest.mark.parametrize(("p", "m"), DUALPIPE_CASES)
def test_dualpipe_matches_deepseeks_bubble_with_atomic_f_and_b(p: int, m: int):
    cost = Cost(f=1.0, b=2.0, i=1.0, w=1.0, per="chunk")  # F = I = W, the formula's own setting
    # DeepSeek's step 4 runs the middle devices' first F&B pair un-overlapped.
    middle = {d for d in range(p) if min(d, p - 1 - d) == p // 2 - 1}
    schedule = build("dualpipe", p, m, 2)
    assert makespan_with_atomic_pairs(schedule, cost, middle) == exactly(dualpipe_formula(p, m, cost))


@pytest.mark.parametrize(("p", "m"), DUALPIPE_CASES)
@pytest.mark.parametrize(
    "cost", [UNIT, Cost(f=1, b=2, i=1.2, w=0.8, per="chunk"), Cost(f=1, b=3, i=1, w=2, per="chunk")], ids=str
)
def test_dualpipe_sequential_pairs_bubble_and_peak(p: int, m: int, cost: Cost):
    """Run as F then B: never above DeepSeek's formula, `m(F + B) + (p/2 - 1)F` when I <= W; every
    device holds DeepSeek's PP + 1 = p + 1 chunk activations, (p + 1) / 2 of its two chunks."""
    simulation = simulate(build("dualpipe", p, m, 2), cost)
    work = m * (cost.f + cost.b)
    assert simulation.busy == tuple(exactly(work) for _ in range(p))
    assert simulation.makespan <= dualpipe_formula(p, m, cost) + 1e-9
    if cost.i <= cost.w:
        assert simulation.makespan == exactly(work + (p // 2 - 1) * cost.f)
    assert simulation.peak_activations == (p + 1,) * p  # each chunk is a whole model stage: DeepSeek's PP + 1


def test_dualpipe_unit_cost_numbers():
    """The numbers in the docstring, p = 4 at F = 1, B = 2: 3m + 1, bubble fraction 1 / (3m + 1)."""
    for m, makespan in ((8, 25.0), (16, 49.0)):
        simulation = simulate(build("dualpipe", 4, m, 2), UNIT)
        assert simulation.makespan == makespan
        assert simulation.bubble_fraction == exactly(1 / makespan)


@pytest.mark.parametrize(
    ("p", "m", "v", "argument"),
    [(3, 12, 2, "num_devices"), (4, 9, 2, "num_microbatches"), (4, 6, 2, "num_microbatches"), (4, 8, 1, "virtual")],
)
def test_dualpipe_refusals(p, m, v, argument):
    with pytest.raises(ScheduleError, match=argument):
        build("dualpipe", p, m, v)


# --- bitpipe -------------------------------------------------------------------------------------------

BITPIPE_CASES = [(p, m) for p in (2, 4, 6, 8) for m in (4, 8, 12, 16, 24, 32) if m % p == 0]


def test_bitpipe_layout_is_two_mirrored_vs():
    placement, model_stage = bitpipe_layout(4)
    assert placement == (0, 1, 2, 3, 3, 2, 1, 0, 3, 2, 1, 0, 0, 1, 2, 3)
    assert model_stage == tuple(range(8)) * 2
    # BitPipe's V-shaped layer assignment: device d holds model stages d, 2p-1-d, p-1-d, p+d.
    for d in range(4):
        held = {model_stage[s] for s in range(16) if placement[s] == d}
        assert held == {d, 7 - d, 3 - d, 4 + d}
    schedule = build("bitpipe", 4, 8, 4)
    downs = [mb for mb in range(8) if schedule.route(mb) == tuple(range(8))]
    assert downs == [0, 1, 4, 5]  # groups of p/2 alternate direction
    assert all(schedule.route(mb) == tuple(range(8, 16)) for mb in (2, 3, 6, 7))


@pytest.mark.parametrize(("p", "m"), BITPIPE_CASES)
@pytest.mark.parametrize("cost", [UNIT, EQUAL, Cost(f=1, b=3, per="chunk"), Cost(f=2, b=3, per="chunk")], ids=str)
def test_bitpipe_bubble_and_peak(p: int, m: int, cost: Cost):
    simulation = simulate(build("bitpipe", p, m, 4), cost)
    work = 2 * m * (cost.f + cost.b)
    assert simulation.busy == tuple(exactly(work) for _ in range(p))
    idle = (p - 2) * cost.b + (m // p - 1) * (p - 2) * (cost.b - cost.f)
    assert simulation.makespan == exactly(work + idle)
    assert simulation.peak_activations == tuple((p + p // 2 + min(d, p - 1 - d) + 1) / 2 for d in range(p))


@pytest.mark.parametrize(("p", "m"), BITPIPE_CASES)
def test_bitpipe_bubble_ratio_with_equal_forward_and_backward(p: int, m: int):
    """Chimera's convention (F = B): bubble ratio (p - 2) / (4m + p - 2), half of Chimera's
    (D - 2) / (2N + D - 2) per unit of work since every chunk is half a stage."""
    simulation = simulate(build("bitpipe", p, m, 4), EQUAL)
    assert simulation.bubble_fraction == exactly((p - 2) / (4 * m + p - 2))


def test_bitpipe_unit_cost_numbers():
    """p = 4 at F = 1, B = 2: makespan 6m + 2(m/4 + 1); device 0 holds 7 of its 16 chunk slots' worth."""
    for m, makespan in ((4, 28.0), (8, 54.0), (16, 106.0)):
        assert simulate(build("bitpipe", 4, m, 4), UNIT).makespan == makespan
    assert simulate(build("bitpipe", 2, 8, 4), UNIT).makespan == 48.0  # p = 2: no bubble


@pytest.mark.parametrize(
    ("p", "m", "v", "argument"), [(3, 6, 4, "num_devices"), (4, 6, 4, "num_microbatches"), (4, 8, 2, "virtual")]
)
def test_bitpipe_refusals(p, m, v, argument):
    with pytest.raises(ScheduleError, match=argument):
        build("bitpipe", p, m, v)


@pytest.mark.parametrize("name", ["bitpipe", "dualpipe", "skippipe"])
def test_routed_schedules_pack_in_lockstep(name: str):
    """At unit costs (F = I = W) the earliest-tick packing is the async run of the split schedule."""
    schedule = build(name, 4, 8, {"bitpipe": 4, "dualpipe": 2, "skippipe": 2}[name])
    lockstep = simulate(schedule, UNIT, "lockstep")
    assert lockstep.makespan == simulate(split_backward(schedule), UNIT).makespan
    assert lockstep.peak_activations == simulate(schedule, UNIT).peak_activations


# --- skippipe ------------------------------------------------------------------------------------------


def test_skippipe_keeps_first_and_last_stage_and_skips_its_share():
    schedule = build("skippipe", 4, 16, 2, skip_ratio=0.25, steps=20)
    for mb in range(16):
        route = schedule.route(mb)
        assert route[0] == 0 and route[-1] == 7
        assert len(route) == 6  # 0.25 * 8 stages = 2 skipped
    schedule = build("skippipe", 4, 6, 1, skip_ratio=0.125, steps=0)  # 0.125 * 4 * 6 = 3 skips in all
    assert sorted(len(schedule.route(mb)) for mb in range(6)) == [3, 3, 3, 4, 4, 4]


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_skippipe_respects_the_memory_cap(cap: int):
    for virtual in (1, 2):
        schedule = build("skippipe", 4, 12, virtual, skip_ratio=0.25, memory_cap=cap, steps=20)
        assert max(simulate(schedule).peak_activations) <= cap


def test_skippipe_makespan_shrinks_with_the_skip_ratio():
    """p = 4, 8 logical stages (v = 2), m = 16, cap 4, unit costs per chunk: 124, 94, 60."""
    makespans = [simulate(build("skippipe", 4, 16, 2, skip_ratio=r, seed=0), UNIT).makespan for r in (0.0, 0.25, 0.5)]
    assert makespans == [124.0, 94.0, 60.0]


def test_skippipe_without_skips_is_1f1b_at_one_stage_per_device():
    schedule = build("skippipe", 4, 16, 1, skip_ratio=0.0)
    assert schedule.is_plain
    assert simulate(schedule).makespan == simulate(build("1f1b", 4, 16)).makespan == 57.0


def test_skippipe_is_reproducible_and_seeded():
    first = build("skippipe", 4, 8, 2, skip_ratio=0.25, seed=3, steps=30)
    assert first == build("skippipe", 4, 8, 2, skip_ratio=0.25, seed=3, steps=30)


def test_skippipe_reorder_switch():
    for seed in range(3):
        schedule = build("skippipe", 4, 8, 2, skip_ratio=0.25, seed=seed, reorder=False, steps=30)
        assert all(list(schedule.route(mb)) == sorted(schedule.route(mb)) for mb in range(8))


def test_hand_made_routes_with_skips_and_reorders_are_scheduled_within_the_cap():
    routes = ((0, 1, 5, 4, 7), (0, 2, 3, 7), (0, 1, 2, 3, 4, 5, 6, 7), (0, 6, 5, 7), (0, 3, 4, 7), (0, 2, 1, 7))
    for cap in (1, 2, 3):
        schedule = schedule_routes(4, 6, (0, 1, 2, 3, 0, 1, 2, 3), routes, memory_cap=cap)
        validate(schedule)
        assert schedule.routes == routes
        simulation = simulate(schedule, UNIT)
        assert max(simulation.peak_activations) <= cap
        assert simulation.busy[0] == exactly(3 * (6 + 3))  # stage 0 for all six, stage 4 for three


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"skip_ratio": 0.8}, "skip_ratio"),
        ({"skip_ratio": -0.1}, "skip_ratio"),
        ({"memory_cap": 0}, "memory_cap"),
        ({"steps": -1}, "steps"),
    ],
)
def test_skippipe_refusals(options, argument):
    with pytest.raises(ScheduleError, match=argument):
        build("skippipe", 4, 8, 2, **options)


def test_skippipe_runs_full_backwards():
    schedule = build("skippipe", 4, 8, 2, skip_ratio=0.25, steps=10)
    assert {a.op for row in schedule.actions for a in row} == {Op.F, Op.B}


def test_the_search_space_refuses_routed_schedules():
    from jpipe.schedules.orders import Orders

    schedule = build("dualpipe", 2, 4, 2)
    space = Orders(2, 4, schedule.placement, UNIT)
    with pytest.raises(ValueError, match="has replicas or per-microbatch routes"):
        space.rows_of(schedule)


@pytest.mark.parametrize("name", sorted(ROUTED_SCHEDULES))
def test_the_executor_compiles_routed_schedules_by_name(name):
    """The executor follows routes (parity in tests/test_routes_executor.py): its tables build."""
    from jpipe.pipeline.program import compile_program

    program = compile_program(build(name, 4, 8))
    assert program.placement.num_model_stages == build(name, 4, 8).num_model_stages


def test_build_uses_each_schedules_own_virtual_by_default():
    assert {name: build(name, 4, 8).virtual for name in ("1f1b", "zbv", "dualpipe", "bitpipe")} == {
        "1f1b": 1,
        "zbv": 2,
        "dualpipe": 2,
        "bitpipe": 4,
    }
    assert default_virtual("interleaved_1f1b") == 2
    with pytest.raises(ScheduleError, match="unknown schedule 'nope'"):
        default_virtual("nope")
