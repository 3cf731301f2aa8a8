"""Expert-parallel all-to-alls in the simulator (`Cost.all_to_all`) and the schedules that hide them:
DualPipe's published bubble with overlapped F&B pairs, DualPipeV's pairs against its flattened order,
and the overlapped 1F1B (`1f1b_overlap`, Megatron-Core's combined 1F1B). No devices needed."""

from __future__ import annotations

import pytest

from jpipe.schedules import (
    COMPOSITE_SCHEDULES,
    SCHEDULES,
    B,
    Composite,
    Cost,
    F,
    I,
    ScheduleError,
    W,
    build,
    default_virtual,
    simulate,
    validate,
)
from jpipe.schedules.ir import members
from jpipe.schedules.simulate import peak_activations


def exactly(value: float):
    return pytest.approx(value, abs=1e-9)


# --- the cost model ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "all_to_all", "expected"),
    [
        (F(0, 0), 0.5, 1.5),
        (I(0, 0), 0.5, 1.5),
        (W(0, 0), 0.5, 1.0),
        (B(0, 0), 0.5, 2.5),  # exposed: not hidden under its own weight gradient (B alone = I alone + W)
        (Composite(F(0, 1), B(0, 0)), 0.5, 3.0),  # both hidden under the other member's compute
        (Composite(F(0, 1), B(0, 0)), 1.5, 3.5),  # B alone: 2 + 1.5
        (Composite(F(0, 1), B(0, 0)), 2.0, 4.0),  # both all-to-alls back to back (B alone: 4)
        (Composite(F(0, 1), W(0, 0)), 0.5, 2.0),
    ],
)
def test_duration_with_all_to_all(step, all_to_all, expected):
    cost = Cost(f=1, b=2, i=1, w=1, all_to_all=all_to_all)
    assert cost.duration(step) == exactly(expected)
    assert cost.compute(step) == sum(cost.of(action.op) for action in members(step))
    assert cost.exposed(step, "all_to_all") == exactly(expected - cost.compute(step))
    assert cost.exposed(step, "all_reduce") == 0.0


def test_both_collectives_share_one_stream_and_split_the_wait():
    cost = Cost(f=1, b=2, i=1, w=1, all_reduce=0.5, all_to_all=1.0)
    assert cost.duration(F(0, 0)) == exactly(2.5)
    assert cost.duration(B(0, 0)) == exactly(3.0)  # the all-reduce hides under w, the all-to-all does not
    pair = Composite(F(0, 1), B(0, 0))
    assert cost.duration(pair) == exactly(3.0)  # max(1 + 2, 2.5, 3, 1.5 + 1.5)
    lone = Composite(F(0, 1), W(0, 0))
    assert cost.duration(lone) == exactly(2.5)  # the forward alone
    assert cost.exposed(lone, "all_reduce") + cost.exposed(lone, "all_to_all") == exactly(0.5)
    assert cost.exposed(lone, "all_to_all") == exactly(0.5 * 1.0 / 1.5)
    with pytest.raises(ValueError, match="kind"):
        cost.exposed(lone, "ppermute")


def test_all_to_all_per_stage_and_per_chunk():
    cost = Cost(f=1, b=2, i=1, w=1, all_to_all=(0.0, 0.5))
    assert cost.per == "chunk" and cost.num_stages == 2
    assert cost.duration(F(1, 0)) == 1.5 and cost.duration(F(0, 0)) == 1.0
    assert cost.at(1).all_to_all == 0.5
    with pytest.raises(ValueError, match="pass the stage"):
        cost.all_to_all_of()
    with pytest.raises(ValueError, match="one length"):
        Cost(f=(1.0, 1.0, 1.0), all_to_all=(0.0, 0.5))
    with pytest.raises(ValueError, match="all_to_all"):
        Cost(all_to_all=-1.0)
    # A device cost's all-to-all is spread over the chunks' layers like its compute.
    assert Cost(all_to_all=0.5).chunk_cost(2).all_to_all == 0.25


@pytest.mark.parametrize("mode", ["async", "lockstep"])
@pytest.mark.parametrize("name", ["1f1b", "zbv", "dualpipev"])
def test_zero_all_to_all_changes_nothing(name: str, mode: str):
    schedule = build(name, 4, 8)
    cost = Cost(f=1, b=2, i=1, w=1, all_reduce=0.5)
    plain = simulate(schedule, cost, mode)
    with_zero = simulate(schedule, Cost(f=1, b=2, i=1, w=1, all_reduce=0.5, all_to_all=0.0), mode)
    assert with_zero.timeline == plain.timeline
    assert with_zero.exposed_all_reduce == plain.exposed_all_reduce
    assert with_zero.exposed_all_to_all == (0.0,) * 4
    busy_minus_compute = [0.0] * 4
    for event in plain.timeline:
        busy_minus_compute[event.device] += event.end - event.start - cost.for_schedule(schedule).compute(event.action)
    assert plain.exposed_all_reduce == pytest.approx(busy_minus_compute, abs=1e-9)


def test_exposed_all_to_all_is_busy_minus_compute():
    schedule = build("dualpipev", 4, 10, overlap=True)
    simulation = simulate(schedule, Cost(per="chunk", f=1, b=2, i=1, w=1, all_to_all=0.5))
    compute = [0.0] * 4
    for event in simulation.timeline:
        compute[event.device] += simulation.cost.compute(event.action)
    expected = tuple(busy - work for busy, work in zip(simulation.busy, compute, strict=True))
    assert simulation.exposed_all_to_all == pytest.approx(expected, abs=1e-9)
    assert simulation.exposed_all_reduce == (0.0,) * 4


# --- DualPipe's published bubble, with overlap -------------------------------------------------------


def dualpipe_bubble(p: int, cost: Cost) -> float:
    """DeepSeek's `(PP/2 - 1)(F&B + B - 3W)` with PP = 2p stages, F&B the braided pair's time and B, W
    the times of a full and a weight-gradient backward run alone (per chunk)."""
    pair = cost.duration(Composite(F(0, 1), B(0, 0)))
    return (p - 1) * (pair + cost.duration(B(0, 0)) - 3 * cost.duration(W(0, 0)))


@pytest.mark.parametrize("chunk_time", [1.0, 0.5])
@pytest.mark.parametrize("all_to_all", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_dualpipev_pairs_reproduce_deepseeks_bubble_with_overlap(chunk_time: float, all_to_all: float):
    """F = I = W = t, B = 2t per chunk, all-to-all `a` per F and per backward: the last device idles
    exactly `(p - 1)(F&B + B - 3W)` (F&B = max(3t, 2a, 2t + a), B = 2t + a), and no device more.
    With a > 0 the other devices idle less: they run more of their ops alone, waiting on all-to-alls."""
    t = chunk_time
    cost = Cost(per="chunk", f=t, b=2 * t, i=t, w=t, all_to_all=all_to_all)
    for p in range(2, 6):
        for m in range(2 * p, 2 * p + 6):
            simulation = simulate(build("dualpipev", p, m, overlap=True), cost)
            bubble = dualpipe_bubble(p, cost)
            assert simulation.pp_bubble[-1] == exactly(bubble), (p, m)
            assert max(simulation.pp_bubble) == exactly(bubble), (p, m)


# p = 4, m = 16, per chunk F = I = W = 1, B = 2: makespans of DualPipeV's pairs braided and flattened.
OVERLAP_PAYS = {0.0: (102.0, 99.0), 0.5: (112.5, 134.0), 1.0: (123.0, 169.0), 2.0: (170.0, 239.0)}


@pytest.mark.parametrize("all_to_all", sorted(OVERLAP_PAYS))
def test_dualpipev_pairs_pay_when_all_to_alls_are_large(all_to_all: float):
    cost = Cost(per="chunk", f=1, b=2, i=1, w=1, all_to_all=all_to_all)
    schedule = build("dualpipev", 4, 16, overlap=True)
    braided, flat = simulate(schedule, cost), simulate(schedule, cost, braid=False)
    assert (braided.makespan, flat.makespan) == OVERLAP_PAYS[all_to_all]
    if all_to_all == 0:  # a pair's forward output waits for its backward: pairs cost (p - 1) F
        assert braided.makespan == flat.makespan + 3
    else:  # flattened, every F and every backward waits for its all-to-all: 4m a per device
        assert braided.makespan < flat.makespan
        assert flat.exposed_all_to_all == (64 * all_to_all,) * 4
        assert max(braided.exposed_all_to_all) < 64 * all_to_all


# --- the overlapped 1F1B -----------------------------------------------------------------------------


def test_1f1b_overlap_is_registered_with_composites():
    assert "1f1b_overlap" in COMPOSITE_SCHEDULES and "1f1b_overlap" not in SCHEDULES
    assert default_virtual("1f1b_overlap") == 1
    with pytest.raises(ScheduleError, match="virtual == 1"):
        build("1f1b_overlap", 4, 8, 2)


def test_1f1b_overlap_order():
    schedule = build("1f1b_overlap", 3, 6)
    rows = [" ".join(map(str, row)) for row in schedule.actions]
    assert rows == [
        "0F0 0F1 0F2 0F3 0F4 (0F5;0B0) 0B1 0B2 0B3 0B4 0B5",
        "1F0 1F1 1F2 (1F3;1B0) (1F4;1B1) (1F5;1B2) 1B3 1B4 1B5",
        "2F0 (2F1;2B0) (2F2;2B1) (2F3;2B2) (2F4;2B3) (2F5;2B4) 2B5",
    ]


@pytest.mark.parametrize("p", range(1, 7))
def test_1f1b_overlap_is_valid_with_distinct_microbatches_in_pairs(p: int):
    for m in range(1, 3 * p + 2):
        schedule = build("1f1b_overlap", p, m)
        validate(schedule)
        validate(schedule.flattened())
        pairs = [step for row in schedule.actions for step in row if isinstance(step, Composite)]
        assert all(step.first.microbatch != step.second.microbatch for step in pairs)
        assert len(pairs) == sum(max(0, m - (2 * (p - r) - 1)) for r in range(p))
        if m >= 2 * p:  # device r holds 2(p - r) microbatches during its first pair
            assert peak_activations(schedule) == tuple(2.0 * (p - r) for r in range(p))


@pytest.mark.parametrize("all_to_all", [0.25, 0.5, 1.0])
def test_1f1b_overlap_hides_the_steady_state_all_to_alls(all_to_all: float):
    """Makespan `(m + p - 1)(F + B) + 2pa` against 1F1B's `(m + p - 1)(F + B + 2a)` for m >= 2p - 1."""
    a = all_to_all
    cost = Cost(f=1, b=2, i=1, w=1, all_to_all=a)
    for p in range(2, 7):
        for m in range(2 * p - 1, 3 * p + 2):
            overlapped = simulate(build("1f1b_overlap", p, m), cost).makespan
            plain = simulate(build("1f1b", p, m), cost).makespan
            assert plain == exactly((m + p - 1) * (3 + 2 * a)), (p, m)
            assert overlapped == exactly((m + p - 1) * 3 + 2 * p * a), (p, m)
            assert overlapped < plain


def test_1f1b_overlap_without_all_to_alls_is_1f1b():
    """No collectives: the same makespan as 1F1B (async) for every m, so never a chunk pass worse;
    in lockstep ticks with whole backwards, shorter (one F&B tick per steady microbatch)."""
    cost = Cost(f=1, b=2, i=1, w=1)
    for p in range(1, 7):
        for m in range(1, 3 * p + 2):
            overlapped = simulate(build("1f1b_overlap", p, m), cost).makespan
            assert overlapped == simulate(build("1f1b", p, m), cost).makespan, (p, m)
    lockstep = {
        name: simulate(build(name, 4, 16), cost, "lockstep", split_backward=False) for name in ("1f1b", "1f1b_overlap")
    }
    assert (lockstep["1f1b_overlap"].makespan, lockstep["1f1b"].makespan) == (57.0, 72.0)


def test_1f1b_overlap_needs_its_warmup():
    """With 1F1B's warm-up plus one forward, each pair waits for the next device's pair of the same step:
    p = 4, m = 16 takes 99 (1.74x 1F1B's 57)."""
    from jpipe.schedules.braided import _overlapped_one_f_one_b
    from jpipe.schedules.ir import Schedule, loop_placement

    p, m = 4, 16
    rows = tuple(tuple(_overlapped_one_f_one_b(d, p - d, m)) for d in range(p))
    shallow = Schedule(num_devices=p, num_microbatches=m, placement=loop_placement(p, 1), actions=rows, name="x")
    cost = Cost(f=1, b=2, i=1, w=1)
    assert simulate(shallow, cost).makespan == 99.0
    assert simulate(build("1f1b_overlap", p, m), cost).makespan == 57.0


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (6, 12)])
def test_dualpipe_overlapped_pairs_hide_all_to_alls(p, m):
    """`dualpipe(overlap=True)`: the same actions, its F&B pairs as composites, valid; with an
    all-to-all per op the pairs hide each other's (shorter); without one a pair's results wait for
    its end, which costs p / 2 - 1 unit forwards here (0, 1, 1, 2)."""
    plain = build("dualpipe", p, m)
    paired = build("dualpipe", p, m, overlap=True)
    validate(paired)
    actions = [[a for step in row for a in members(step)] for row in paired.actions]
    assert paired.has_composites and actions == [list(row) for row in plain.actions]
    a2a = Cost(all_to_all=1.0)
    assert simulate(paired, a2a, "async").makespan < simulate(plain, a2a, "async").makespan
    assert simulate(paired, Cost(), "async").makespan == simulate(plain, Cost(), "async").makespan + p // 2 - 1
