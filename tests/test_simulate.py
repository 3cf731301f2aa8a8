"""Simulation: the DESIGN.md oracles hold exactly for the generated schedules, lockstep packing costs.

Costs are per op per logical stage (one chunk). DESIGN.md's oracle table uses full-stage times: with v
chunks per device, a full-stage forward is `F = v * f` (likewise B, I, W).

Preconditions of each oracle, as found (every one is tested over p in {1, 2, 3, 4, 8}, m up to 32):
  gpipe, 1f1b:       any m; any cost.
  interleaved_1f1b:  makespan for every m >= p; device 0's peak p + (p-1)/v when m % p == 0 and m >= 2p.
  looped_bfs:        m >= p.
  zb_h1:             m >= p and W <= min(F, I) (the handcrafted order assumes W is the cheapest op).
  zb_h2:             m >= 2p - 1 and W <= min(F, I); the bubble (p-1)(F+I-2W) is per device (a device's
                     span from its first to its last action, minus its busy time): the schedule is a
                     parallelogram, and the last device cannot start before (p-1)F, so the global
                     makespan is m(F+I+W) + (p-1)F (tested at F = I = W).
  zbv:               m >= 2p - 1 and F = I = W = t per chunk (the formula's own assumption).
  dualpipev:         m >= 2p. DeepSeek's README, "DualPipeV ... (PP/2-1)(F&B+B-3W)" with PP = 2p stages,
                     F, B, W per chunk. Its F&B pair is one unit whose outputs (the forward's too) are
                     ready when the pair ends; under that reading, with F&B = F + B (no overlap) and
                     F = I = W, the order matches the formula exactly. The simulator runs the pair as F
                     then B, so the forward's output leaves earlier and the makespan is lower:
                     2m(F+B) + (p-1)F whenever I <= W (the V-placement lower bound), and never above the
                     formula.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schedule_cases import makespan_with_atomic_pairs

from jpipe.schedules import (
    SCHEDULES,
    Cost,
    Op,
    Schedule,
    ScheduleError,
    Simulation,
    build,
    default_virtual,
    pack,
    simulate,
    split_backward,
)
from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import B, F, I, W

UNIT = Cost(per="chunk", f=1.0, b=2.0, i=1.0, w=1.0)
SKEW = Cost(per="chunk", f=1.0, b=2.0, i=1.2, w=0.8)  # I > W, W <= min(F, I): inside every formula's domain
DEVICES = (1, 2, 3, 4, 8)
MAX_MICROBATCHES = 32
ALL_NAMES = ("naive", "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb_h1", "zb_h2", "zbv", "dualpipev")


def exactly(value: float):
    return pytest.approx(value, rel=1e-12, abs=1e-9)


def microbatch_range(minimum: int, cost: Cost) -> list[int]:
    """Every m from `minimum` to 32 at the unit cost; a spread of them for the other cost (runtime)."""
    if cost == UNIT:
        return list(range(minimum, MAX_MICROBATCHES + 1))
    return sorted({minimum, minimum + 1, 2 * minimum + 1, 17, MAX_MICROBATCHES} - {0})


def assert_bubble_consistent(simulation: Simulation) -> None:
    p = simulation.schedule.num_devices
    expected = 1 - sum(simulation.busy) / (p * simulation.makespan)
    assert simulation.bubble_fraction == exactly(expected)


# --- oracles: gpipe, 1f1b ---------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [UNIT, SKEW], ids=["unit", "skew"])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_makespan_bubble_and_peak(name: str, cost: Cost):
    for p in DEVICES:
        for m in microbatch_range(1, cost):
            simulation = simulate(build(name, p, m), cost)
            assert simulation.makespan == exactly((m + p - 1) * (cost.f + cost.b)), (p, m)
            assert simulation.bubble_fraction == exactly((p - 1) / (m + p - 1)), (p, m)
            assert simulation.busy == tuple(exactly(m * (cost.f + cost.b)) for _ in range(p))
            if name == "gpipe":
                assert simulation.peak_activations == (m,) * p
            else:
                assert simulation.peak_activations == tuple(min(m, p - r) for r in range(p))


def test_naive_serialises_everything():
    for p in (1, 2, 4):
        for m in (1, 3, 8):
            simulation = simulate(build("naive", p, m), SKEW)
            assert simulation.makespan == exactly(m * p * (SKEW.f + SKEW.b))
            assert simulation.bubble_fraction == exactly(1 - 1 / p)
            assert simulation.peak_activations == (1,) * p


# --- oracles: loop placement ------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [UNIT, SKEW], ids=["unit", "skew"])
@pytest.mark.parametrize("virtual", [2, 3, 4])
def test_interleaved_bubble_is_p_minus_1_full_stages_over_v(virtual: int, cost: Cost):
    for p in DEVICES:
        for m in microbatch_range(p, cost):
            simulation = simulate(build("interleaved_1f1b", p, m, virtual), cost)
            full_f, full_b = virtual * cost.f, virtual * cost.b  # DESIGN.md's full-stage times
            bubble_time = (p - 1) * (full_f + full_b) / virtual
            assert simulation.makespan == exactly(m * (full_f + full_b) + bubble_time), (p, m)
            assert simulation.bubble_fraction == exactly(bubble_time / simulation.makespan)
            if m % p == 0 and m >= 2 * p:
                assert simulation.peak_activations[0] == exactly(p + (p - 1) / virtual), (p, m)
            assert max(simulation.peak_activations) == simulation.peak_activations[0]


@pytest.mark.parametrize("cost", [UNIT, SKEW], ids=["unit", "skew"])
@pytest.mark.parametrize("virtual", [1, 2, 3, 4])
def test_looped_bfs_bubble_and_peak(virtual: int, cost: Cost):
    for p in DEVICES:
        for m in microbatch_range(p, cost):
            simulation = simulate(build("looped_bfs", p, m, virtual), cost)
            full_f, full_b = virtual * cost.f, virtual * cost.b
            bubble_time = (p - 1) * (full_f + full_b) / virtual
            assert simulation.makespan == exactly(m * (full_f + full_b) + bubble_time), (p, m)
            assert simulation.bubble_fraction == exactly(bubble_time / simulation.makespan)
            assert simulation.peak_activations == tuple(exactly(m) for _ in range(p))


# --- oracles: zero bubble -----------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [UNIT, SKEW], ids=["unit", "skew"])
def test_zb_h1_makespan_bubble_and_peak(cost: Cost):
    f, i, w = cost.f, cost.i, cost.w
    for p in DEVICES:
        for m in microbatch_range(p, cost):
            simulation = simulate(build("zb_h1", p, m), cost)
            bubble_time = (p - 1) * (f + i - w)
            assert simulation.makespan == exactly(m * (f + i + w) + bubble_time), (p, m)
            assert simulation.bubble_fraction == exactly(bubble_time / simulation.makespan)
            assert simulation.peak_activations == (p,) * p


def test_zb_h1_bubble_is_a_third_of_1f1b_at_unit_cost():
    for p in (2, 4, 8):
        zb = simulate(build("zb_h1", p, 16), UNIT)
        one_f_one_b = simulate(build("1f1b", p, 16), UNIT)
        assert zb.makespan - 16 * 3 == exactly((one_f_one_b.makespan - 16 * 3) / 3)


@pytest.mark.parametrize("cost", [UNIT, SKEW], ids=["unit", "skew"])
def test_zb_h2_per_device_bubble_and_peak(cost: Cost):
    f, i, w = cost.f, cost.i, cost.w
    for p in DEVICES:
        for m in microbatch_range(2 * p - 1, cost):
            simulation = simulate(build("zb_h2", p, m), cost)
            own_bubbles = [span - busy for span, busy in zip(simulation.spans, simulation.busy)]
            assert max(own_bubbles) == exactly((p - 1) * (f + i - 2 * w)), (p, m)
            assert simulation.peak_activations == (2 * p - 1,) * p


def test_zb_h2_is_a_parallelogram_at_unit_cost():
    """F = I = W: every device is busy from its first action to its last (zero per-device bubble); the
    global makespan still has the last device's late start, m(F+I+W) + (p-1)F."""
    for p in DEVICES:
        for m in range(2 * p - 1, MAX_MICROBATCHES + 1):
            simulation = simulate(build("zb_h2", p, m), UNIT)
            assert simulation.spans == tuple(exactly(3 * m) for _ in range(p))
            assert simulation.makespan == exactly(3 * m + (p - 1))
            assert simulation.bubble_fraction == exactly((p - 1) / (3 * m + p - 1))


@pytest.mark.parametrize("chunk_time", [1.0, 0.5])
def test_zbv_makespan_and_peak(chunk_time: float):
    t = chunk_time
    cost = Cost(per="chunk", f=t, b=2 * t, i=t, w=t)
    for p in DEVICES:
        for m in range(2 * p - 1, MAX_MICROBATCHES + 1):
            simulation = simulate(build("zbv", p, m, 2), cost)
            assert simulation.makespan == exactly(6 * m * t + (p - 1) * t), (p, m)
            assert simulation.bubble_fraction == exactly((p - 1) / (6 * m + p - 1))
            assert simulation.peak_activations == (p,) * p


# --- dualpipev: DeepSeek's formula ----------------------------------------------------------------------


def dualpipev_formula(p: int, m: int, cost: Cost) -> float:
    """2m(F+B) of work per device plus DeepSeek's bubble (PP/2 - 1)(F&B + B - 3W), PP = 2p, F&B = F + B."""
    f_and_b = cost.f + cost.b
    return 2 * m * (cost.f + cost.b) + (p - 1) * (f_and_b + cost.b - 3 * cost.w)


@pytest.mark.parametrize("chunk_time", [1.0, 0.5])
def test_dualpipev_matches_deepseeks_formula_with_atomic_f_and_b(chunk_time: float):
    t = chunk_time
    cost = Cost(per="chunk", f=t, b=2 * t, i=t, w=t)
    for p in DEVICES:
        for m in range(2 * p, MAX_MICROBATCHES + 1):
            schedule = build("dualpipev", p, m, 2)
            # DeepSeek's step 4 runs the last device's first F&B pair un-overlapped.
            assert makespan_with_atomic_pairs(schedule, cost, {p - 1}) == exactly(dualpipev_formula(p, m, cost)), (p, m)


@pytest.mark.parametrize(
    "cost", [UNIT, SKEW, Cost(per="chunk", f=1, b=2, i=0.8, w=1.2), Cost(per="chunk", f=1, b=3, i=2, w=1)], ids=str
)
def test_dualpipev_sequential_pairs_stay_within_the_formula(cost: Cost):
    for p in DEVICES:
        for m in microbatch_range(2 * p, cost):
            simulation = simulate(build("dualpipev", p, m, 2), cost)
            work = 2 * m * (cost.f + cost.b)
            assert simulation.busy == tuple(exactly(work) for _ in range(p))
            assert simulation.makespan <= dualpipev_formula(p, m, cost) + 1e-9, (p, m)
            if cost.i <= cost.w:
                assert simulation.makespan == exactly(work + (p - 1) * cost.f), (p, m)
            # DeepSeek's "PP + 1" activations per device, in chunks: (2p + 1) / 2 full stages.
            assert simulation.peak_activations == (p + 0.5,) * p


# --- random costs ---------------------------------------------------------------------------------------

positive = st.floats(0.1, 4.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(f=positive, i=positive, w=positive, p=st.integers(1, 5), extra=st.integers(0, 12))
def test_zb_h1_formula_for_random_costs_with_cheapest_weight_gradient(f, i, w, p, extra):
    w = min(w, f, i)
    cost = Cost(per="chunk", f=f, b=i + w, i=i, w=w)
    m = p + extra
    simulation = simulate(build("zb_h1", p, m), cost)
    assert simulation.makespan == pytest.approx(m * (f + i + w) + (p - 1) * (f + i - w), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(f=positive, b=positive, p=st.integers(1, 5), extra=st.integers(0, 12), virtual=st.integers(2, 4))
def test_1f1b_and_interleaved_formulas_for_random_costs(f, b, p, extra, virtual):
    cost = Cost(per="chunk", f=f, b=b, i=b / 2, w=b / 2)
    m = p + extra
    assert simulate(build("1f1b", p, m), cost).makespan == pytest.approx((m + p - 1) * (f + b), rel=1e-9)
    interleaved = simulate(build("interleaved_1f1b", p, m, virtual), cost)
    assert interleaved.makespan == pytest.approx((m * virtual + p - 1) * (f + b), rel=1e-9)


# --- async semantics by hand ------------------------------------------------------------------------------


def two_stage_one_microbatch() -> Schedule:
    return Schedule(2, 1, (0, 1), ((F(0, 0), B(0, 0)), (F(1, 0), B(1, 0))), name="tiny")


def test_async_adds_comm_per_cross_device_dependency():
    cost = Cost(per="chunk", f=1, b=2, i=1, w=1, comm=0.5)
    simulation = simulate(two_stage_one_microbatch(), cost, "async")
    timeline = {(event.device, str(event.action)): (event.start, event.end) for event in simulation.timeline}
    assert timeline == {
        (0, "0F0"): (0.0, 1.0),
        (1, "1F0"): (1.5, 2.5),
        (1, "1B0"): (2.5, 4.5),
        (0, "0B0"): (5.0, 7.0),
    }
    assert simulation.makespan == 7.0
    assert simulation.busy == (3.0, 3.0)
    assert simulation.bubble_fraction == exactly(1 - 6 / 14)
    assert simulation.spans == (7.0, 3.0)
    assert simulation.num_ticks is None and simulation.mode == "async" and simulation.cost == cost


def test_async_same_device_dependencies_pay_no_comm():
    # V placement on one device: stage 0 feeds stage 1 locally.
    schedule = Schedule(1, 1, (0, 0), ((F(0, 0), F(1, 0), B(1, 0), B(0, 0)),))
    simulation = simulate(schedule, Cost(comm=10.0, per="chunk"))
    assert simulation.makespan == 6.0
    assert simulation.peak_activations == (1.0,)  # two chunks of a v=2 device = one full stage


def test_timeline_has_every_action_once_in_start_order():
    schedule = build("interleaved_1f1b", 4, 8, 2)
    simulation = simulate(schedule, SKEW)
    assert sorted(event.action for event in simulation.timeline) == sorted(a for row in schedule.actions for a in row)
    starts = [(event.start, event.device) for event in simulation.timeline]
    assert starts == sorted(starts)
    for event in simulation.timeline:
        assert event.end - event.start == exactly(SKEW.of(event.action.op))
        assert schedule.placement[event.action.stage] == event.device


def test_input_gradient_frees_nothing_weight_gradient_frees():
    schedule = Schedule(1, 2, (0,), ((F(0, 0), F(0, 1), I(0, 0), I(0, 1), W(0, 0), W(0, 1)),))
    assert simulate(schedule).peak_activations == (2.0,)
    interleaved = Schedule(1, 2, (0,), ((F(0, 0), I(0, 0), W(0, 0), F(0, 1), I(0, 1), W(0, 1)),))
    assert simulate(interleaved).peak_activations == (1.0,)


# --- lockstep ---------------------------------------------------------------------------------------------


def test_lockstep_ticks_cost_their_slowest_action_plus_comm_when_sending():
    cost = Cost(per="chunk", f=1, b=2, i=1, w=1, comm=0.5)
    simulation = simulate(two_stage_one_microbatch(), cost, "lockstep")
    # Ticks (B run as I then W): 0F0 | 1F0 | 1I0 | 0I0 1W0 | 0W0. 0F0 and 1I0 send to the other device.
    timeline = {(event.device, str(event.action)): (event.start, event.end) for event in simulation.timeline}
    assert timeline == {
        (0, "0F0"): (0.0, 1.0),
        (1, "1F0"): (1.5, 2.5),
        (1, "1I0"): (2.5, 3.5),
        (0, "0I0"): (4.0, 5.0),
        (1, "1W0"): (4.0, 5.0),
        (0, "0W0"): (5.0, 6.0),
    }
    assert simulation.makespan == 6.0
    assert simulation.num_ticks == 5 == pack(two_stage_one_microbatch(), split=True).num_ticks
    assert simulation.mode == "lockstep"


def test_lockstep_events_start_at_their_tick():
    schedule = build("zbv", 4, 8, 2)
    simulation = simulate(schedule, SKEW, "lockstep")
    table = pack(schedule, split=True)
    assert simulation.num_ticks == table.num_ticks
    starts = sorted({event.start for event in simulation.timeline})
    assert len(starts) == table.num_ticks
    tick_of = table.tick_of()
    for event in simulation.timeline:
        assert event.start == starts[tick_of[event.action]]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_lockstep_equals_async_of_the_split_schedule_at_unit_cost(name: str):
    """One op per device per tick with F = I = W: the packing loses nothing against an event-driven run
    of the same (split) actions."""
    schedule = build(name, 4, 16, default_virtual(name))
    lockstep = simulate(schedule, UNIT, "lockstep")
    assert lockstep.makespan == exactly(simulate(split_backward(schedule), UNIT, "async").makespan)
    assert lockstep.peak_activations == simulate(schedule, UNIT, "async").peak_activations


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1"])
def test_lockstep_within_5_percent_of_async_p4_m16(name: str):
    """Project target: SPMD lockstep packing loses at most 5% against async (p=4, m=16, F=1, B=2, I=W=1).

    Lockstep runs each B as I then W, which takes W off the critical path, so for schedules written
    with full B it is even faster than async of the schedule as written (gpipe, 1f1b: 54 vs 57).
    """
    schedule = build(name, 4, 16, default_virtual(name))
    ratio = simulate(schedule, UNIT, "lockstep").makespan / simulate(schedule, UNIT, "async").makespan
    assert ratio <= 1.05, ratio


@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b"])
def test_unsplit_lockstep_pays_for_mixed_ticks(name: str):
    """With B as one tick, a tick mixing F and B costs B: 1f1b 72 vs 57 async (1.26x) at p=4, m=16.

    (gpipe has no mixed ticks: all forwards, then all backwards, so unsplit lockstep equals async.)
    """
    schedule = build(name, 4, 16, default_virtual(name))
    unsplit = simulate(schedule, UNIT, "lockstep", split_backward=False)
    split = simulate(schedule, UNIT, "lockstep", split_backward=True)
    asynchronous = simulate(schedule, UNIT, "async")
    assert unsplit.makespan > asynchronous.makespan > split.makespan
    assert unsplit.num_ticks < split.num_ticks


# --- arguments ------------------------------------------------------------------------------------------


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of \\('async', 'lockstep'\\), got 'sync'"):
        simulate(two_stage_one_microbatch(), UNIT, "sync")


@pytest.mark.parametrize(
    ("field", "value"), [("f", -1.0), ("b", -0.5), ("i", math.nan), ("w", math.inf), ("comm", -1e-3)]
)
def test_costs_must_be_finite_and_non_negative(field: str, value: float):
    with pytest.raises(ValueError, match=f"Cost.{field} must be finite and >= 0"):
        Cost(**{field: value})


def test_cost_must_be_a_cost():
    with pytest.raises(ValueError, match="cost must be a Cost"):
        simulate(two_stage_one_microbatch(), {"f": 1.0}, "async")
    with pytest.raises(ValueError, match="Cost.f must be a number"):
        Cost(per="chunk", f="1")


def test_default_cost_and_zero_cost():
    assert Cost().per == "device" and Cost(f=(1.0, 1.0)).per == "chunk"
    # two stages on two devices: a chunk is a whole device stage
    assert simulate(two_stage_one_microbatch()).cost == Cost(f=1.0, b=2.0, i=1.0, w=1.0, comm=0.0, per="chunk")
    zero = simulate(two_stage_one_microbatch(), Cost(0, 0, 0, 0, 0))
    assert zero.makespan == 0.0 and zero.bubble_fraction == 0.0


def test_invalid_schedule_is_refused_before_simulating():
    broken = Schedule(2, 1, (0, 1), ((F(0, 0), B(0, 0)), (B(1, 0), F(1, 0))))
    for mode in ("async", "lockstep"):
        with pytest.raises(ScheduleError, match="1B0 on device 1 comes before 1F0"):
            simulate(broken, UNIT, mode)


def test_simulation_is_frozen_and_consistent():
    simulation = simulate(build("1f1b", 4, 8), SKEW, "lockstep")
    with pytest.raises(dataclasses.FrozenInstanceError):
        simulation.makespan = 0.0  # type: ignore[misc]
    assert_bubble_consistent(simulation)
    assert {event.action.op for event in simulation.timeline} == {Op.F, Op.I, Op.W}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_send_latency_delays_only_cross_device_results(name):
    """send_latency=1: a result reaches another device one tick later; on its own device it does not."""
    virtual = default_virtual(name)
    schedule = build(name, 4, 8, virtual)
    plain, delayed = pack(schedule), pack(schedule, send_latency=1)
    tick = delayed.tick_of()
    placement = delayed.schedule.placement
    gaps = {True: [], False: []}
    for action, needed in dependencies(delayed.schedule).items():
        for producer in needed:
            remote = placement[producer.stage] != placement[action.stage]
            gaps[remote].append(tick[action] - tick[producer])
    assert min(gaps[True]) >= 2
    assert min(gaps[False], default=1) >= 1
    assert delayed.num_ticks >= plain.num_ticks
    simulated = simulate(schedule, mode="lockstep", send_latency=1)
    assert simulated.makespan >= simulate(schedule, mode="lockstep").makespan


def test_send_latency_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="send_latency: expected an integer >= 0, got -1"):
        pack(build("1f1b", 2, 2), send_latency=-1)


def test_hidden_sends_cost_max_of_compute_and_comm_per_tick():
    """Exposed sends add `comm` to each sending tick; hidden ones make the next tick max(compute, comm)."""
    schedule = build("1f1b", 4, 8)
    exposed = simulate(schedule, Cost(comm=0.5), mode="lockstep")
    plain = simulate(schedule, Cost(), mode="lockstep")
    table = pack(schedule)
    placement = table.schedule.placement
    deps = dependencies(table.schedule)
    remote_producers = {d for a, ds in deps.items() for d in ds if placement[d.stage] != placement[a.stage]}
    sending = [t for t, row in enumerate(table.ticks) if any(a in remote_producers for a in row)]
    # The makespan ends with the last event: comm of sending ticks up to the last one's start counts.
    counted = sum(1 for t in sending if t < table.num_ticks - 1)
    assert exposed.makespan == pytest.approx(plain.makespan + 0.5 * counted)
    hidden = simulate(schedule, Cost(comm=0.5), mode="lockstep", send_latency=1)
    assert hidden.makespan == simulate(schedule, Cost(), mode="lockstep", send_latency=1).makespan
    slow_link = simulate(schedule, Cost(comm=3.0), mode="lockstep", send_latency=1)
    assert slow_link.makespan > hidden.makespan


@pytest.mark.parametrize("mode", ["async", "lockstep"])
def test_a_scalar_cost_is_one_device_stage_split_over_the_chunks(mode):
    """`Cost()` is one device stage: zbv's chunks take half of it, the same as per-chunk times halved."""
    schedule = build("zbv", 4, 8, 2)
    device = simulate(schedule, Cost(f=1.0, b=2.0, i=1.2, w=0.8, comm=0.25, all_reduce=0.5), mode)
    halves = {"f": 0.5, "b": 1.0, "i": 0.6, "w": 0.4, "r": 0.5, "all_reduce": 0.25}
    chunk = simulate(schedule, Cost(**halves, comm=0.25, per="chunk"), mode)
    assert device.makespan == exactly(chunk.makespan) and device.cost == chunk.cost
    unhalved = simulate(schedule, Cost(f=1.0, b=2.0, i=1.2, w=0.8, comm=0.25, all_reduce=0.5, per="chunk"), mode)
    assert unhalved.makespan > device.makespan
    # One model, 1 or 2 chunks per device: the chunks of zbv do each device's work of 1f1b.
    one = simulate(build("1f1b", 4, 8), Cost(), mode)
    assert sum(simulate(schedule, Cost(), mode).busy) == exactly(sum(one.busy))
    halved = Cost(f=0.5, b=1.0, i=0.5, w=0.5, r=0.5, per="chunk")
    assert Cost().chunk_cost(2) == Cost().for_schedule(schedule) == halved


def test_replicated_chunks_are_whole_model_stages():
    """dualpipe's chunks are copies of whole model stages: a device `Cost` is not split for them."""
    schedule = build("dualpipe", 4, 8)
    assert Cost().for_schedule(schedule) == Cost(per="chunk")
    assert sum(simulate(schedule, Cost()).busy) == exactly(sum(simulate(build("1f1b", 4, 8), Cost()).busy))


def test_per_is_checked():
    with pytest.raises(ValueError, match="Cost.per"):
        Cost(per="stage")
    with pytest.raises(ValueError, match="per='device' applies to scalar times only"):
        Cost(f=(1.0, 1.0), per="device")
    with pytest.raises(ValueError, match="virtual must be an int >= 1"):
        Cost().chunk_cost(0)
