"""Composite steps (two actions of different microbatches run together): IR, validation, packing,
simulation, CSV and rendering."""

from __future__ import annotations

import pathlib

import pytest

from jpipe.schedules import (
    COMPOSITE_SCHEDULES,
    SCHEDULES,
    Action,
    B,
    Composite,
    Cost,
    F,
    I,
    Schedule,
    ScheduleError,
    W,
    build,
    default_virtual,
    from_csv,
    pack,
    plot,
    render,
    simulate,
    split_backward,
    to_csv,
    validate,
)
from jpipe.schedules.ir import flatten, members

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "torch-schedules" / "torch-DualPipeV-4rank-8mb-2v.csv"


def one_device(row, m=2) -> Schedule:
    """One device, one stage: `row` is its steps."""
    return Schedule(num_devices=1, num_microbatches=m, placement=(0,), actions=(tuple(row),), name="one")


def two_devices(row0, row1, m=2) -> Schedule:
    """Two devices, stages 0 and 1 (stage 1 computes the loss)."""
    return Schedule(num_devices=2, num_microbatches=m, placement=(0, 1), actions=(tuple(row0), tuple(row1)), name="two")


def braided_two_devices() -> Schedule:
    """1F1B on two devices with device 1's second forward braided with its first backward."""
    return two_devices(
        [F(0, 0), F(0, 1), B(0, 0), B(0, 1)],
        [F(1, 0), Composite(F(1, 1), B(1, 0)), B(1, 1)],
    )


# --- IR ------------------------------------------------------------------------------------------


def test_composite_prints_like_torch_and_flattens_in_order():
    step = Composite(F(0, 7), B(7, 3))
    assert str(step) == "(0F7;7B3)"
    assert repr(step) == "Composite(0F7;7B3)"
    assert members(step) == (F(0, 7), B(7, 3))
    assert members(F(0, 1)) == (F(0, 1),)
    assert flatten([F(0, 1), step, W(7, 2)]) == (F(0, 1), F(0, 7), B(7, 3), W(7, 2))


def test_schedule_helpers_give_flat_actions():
    schedule = braided_two_devices()
    assert schedule.has_composites
    assert schedule.flat_actions(1) == (F(1, 0), F(1, 1), B(1, 0), B(1, 1))
    flat = schedule.flattened()
    assert not flat.has_composites
    assert flat.actions == (schedule.flat_actions(0), schedule.flat_actions(1))
    assert "(1F1;1B0)" in str(schedule)
    plain = flat.flattened()
    assert plain is flat
    assert not build("1f1b", 2, 4).has_composites


def test_split_backward_property_sees_composite_members():
    assert not braided_two_devices().split_backward
    split = one_device([F(0, 0), Composite(F(0, 1), I(0, 0)), W(0, 0), I(0, 1), W(0, 1)])
    assert split.split_backward


# --- validation ----------------------------------------------------------------------------------


def test_valid_composite_schedules_pass():
    validate(braided_two_devices())
    validate(one_device([F(0, 0), Composite(F(0, 1), B(0, 0)), B(0, 1)]))
    steps = [F(0, 0), F(0, 1), Composite(I(0, 0), F(0, 2)), Composite(W(0, 0), I(0, 1)), W(0, 1), B(0, 2)]
    validate(one_device(steps, 3))


def rejects(schedule: Schedule, message: str) -> None:
    with pytest.raises(ScheduleError) as raised:
        validate(schedule)
    assert message in str(raised.value)


def test_members_of_one_microbatch_are_rejected():
    rejects(
        one_device([Composite(F(0, 0), B(0, 0)), F(0, 1), B(0, 1)]),
        "composite (0F0;0B0) on device 0, position 0: both members are microbatch 0",
    )


def test_members_must_be_actions():
    rejects(one_device([Composite(F(0, 0), "0B1")]), "composite on device 0, position 0: members must be Actions")


def test_member_on_another_device_is_named_with_its_composite():
    rejects(
        two_devices([F(0, 0), Composite(F(0, 1), B(1, 0)), B(0, 0), B(0, 1)], [F(1, 0), F(1, 1), B(1, 1)]),
        "action 1B0 (in composite (0F1;1B0)) is on device 0, but stage 1 is placed on device 1",
    )


def test_member_repeated_elsewhere_is_a_duplicate():
    rejects(
        one_device([F(0, 0), Composite(F(0, 1), B(0, 0)), F(0, 1), B(0, 1)]),
        "duplicate action 0F1 on device 0: positions 1 and 2",
    )


def test_member_before_what_it_needs_on_its_device():
    rejects(
        one_device([Composite(F(0, 1), B(0, 0)), F(0, 0), B(0, 1)]),
        "action 0B0 on device 0 comes before 0F0, which it needs (positions 0 and 1 on the same device)",
    )


def test_braiding_can_deadlock_what_runs_flattened():
    # Braided, 0F1 waits with 0B0 for 1B0, which device 1 runs after 1F1, which needs 0F1; one
    # after the other (0F1 first) the same order runs.
    schedule = two_devices(
        [F(0, 0), Composite(F(0, 1), B(0, 0)), B(0, 1)],
        [F(1, 0), F(1, 1), B(1, 0), B(1, 1)],
    )
    validate(schedule.flattened())
    rejects(schedule, "blocked head actions: device 0: (0F1;0B0) waits for 1B0; device 1: 1F1 waits for 0F1")


# --- packing -------------------------------------------------------------------------------------


def test_pack_flattens_composites_by_default():
    schedule = braided_two_devices()
    table = pack(schedule, split=False)
    assert not table.schedule.has_composites
    ticks = table.tick_of()
    assert ticks[B(1, 0)] == ticks[F(1, 1)] + 1  # one op per tick, first member first
    assert table.ticks == pack(schedule.flattened(), split=False).ticks


def test_pack_keeps_composites_in_one_tick_on_request():
    schedule = braided_two_devices()
    table = pack(schedule, split=False, keep_composites=True)
    ticks = table.tick_of()
    assert ticks[F(1, 1)] == ticks[B(1, 0)] == 2
    assert table.ticks[2][1] == Composite(F(1, 1), B(1, 0))
    # Device 0: 0F0 0F1 . 0B0 0B1; device 1: . 1F0 (1F1;1B0) 1B1 . (0B0 and 1B1 use the composite's results).
    assert table.num_ticks == 5
    assert table.ticks[3] == (B(0, 0), B(1, 1))


def test_split_backward_keeps_input_half_in_composite_and_weight_after():
    schedule = split_backward(braided_two_devices())
    assert schedule.actions[1] == (F(1, 0), Composite(F(1, 1), I(1, 0)), W(1, 0), I(1, 1), W(1, 1))
    validate(schedule)


# --- simulation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "all_reduce", "expected"),
    [
        (F(0, 0), 0.0, 1.0),
        (F(0, 0), 0.5, 1.5),
        (I(0, 0), 0.5, 1.5),
        (W(0, 0), 0.5, 1.0),
        (B(0, 0), 0.5, 2.0),  # hidden under B's own weight gradient
        (B(0, 0), 1.5, 2.5),  # 0.5 longer than the weight gradient
        (Composite(F(0, 1), B(0, 0)), 0.0, 3.0),
        (Composite(F(0, 1), B(0, 0)), 0.5, 3.0),  # both all-reduces hidden
        (Composite(F(0, 1), W(0, 0)), 0.5, 2.0),
        (Composite(F(0, 1), W(0, 0)), 1.5, 2.5),  # the forward alone: 1 + 1.5
        (Composite(F(0, 1), F(0, 2)), 3.0, 6.0),  # two all-reduces back to back
        (Composite(F(0, 1), B(0, 0)), 3.0, 6.0),  # both all-reduces back to back (F alone: 4, B alone: 4)
    ],
)
def test_duration_model(step, all_reduce, expected):
    cost = Cost(f=1, b=2, i=1, w=1, all_reduce=all_reduce)
    assert cost.duration(step) == pytest.approx(expected, abs=1e-12)
    assert cost.compute(step) == sum(cost.of(a.op) for a in members(step))


def test_all_reduce_per_stage_and_at():
    cost = Cost(f=1, b=2, i=1, w=1, all_reduce=(0.0, 0.5))
    assert cost.num_stages == 2
    assert cost.duration(F(1, 0)) == 1.5
    assert cost.duration(F(0, 0)) == 1.0
    assert cost.at(1).all_reduce == 0.5
    with pytest.raises(ValueError, match="one length"):
        Cost(f=(1.0, 1.0, 1.0), all_reduce=(0.0, 0.5))


def test_default_cost_leaves_plain_simulations_unchanged():
    schedule = build("zb_h1", 4, 8)
    for mode in ("async", "lockstep"):
        simulation = simulate(schedule, Cost(), mode)
        assert simulation.exposed_all_reduce == (0.0,) * 4
        assert simulation.pp_bubble == tuple(simulation.makespan - b for b in simulation.busy)


@pytest.mark.parametrize("mode", ["async", "lockstep"])
def test_one_device_braided_times(mode: str):
    schedule = one_device([F(0, 0), Composite(F(0, 1), B(0, 0)), B(0, 1)])
    cost = Cost(f=1, b=2, i=1, w=1, all_reduce=0.5)
    braided = simulate(schedule, cost, mode, split_backward=False)
    # 0F0 alone 1.5, (0F1;0B0) max(3, 1.5, 2, 1) = 3, 0B1 alone 2 + max(0, 0.5 - 1) = 2.
    assert braided.makespan == pytest.approx(6.5, abs=1e-12)
    assert braided.exposed_all_reduce == pytest.approx((0.5,), abs=1e-12)
    assert braided.timeline[1].action == Composite(F(0, 1), B(0, 0))
    assert (braided.timeline[1].start, braided.timeline[1].end) == pytest.approx((1.5, 4.5), abs=1e-12)
    flat = simulate(schedule, cost, mode, split_backward=False, braid=False)
    # 0F0 1.5, 0F1 1.5, 0B0 2, 0B1 2: both forwards wait for their all-reduce.
    assert flat.makespan == pytest.approx(7.0, abs=1e-12)
    assert flat.exposed_all_reduce == pytest.approx((1.0,), abs=1e-12)
    assert flat.schedule is schedule


def test_composite_waits_for_both_members_inputs_async():
    schedule = braided_two_devices()
    simulation = simulate(schedule, Cost(f=1, b=2, i=1, w=1), "async")
    (event,) = [e for e in simulation.timeline if isinstance(e.action, Composite)]
    # 1F1 needs 0F1 (ends at 2); 1B0 needs 1F0 (ends at 2): the step runs [2, 5].
    assert (event.device, event.start, event.end) == (1, 2.0, 5.0)
    # 0B0 needs 1B0, ready only when the composite ends.
    (backward,) = [e for e in simulation.timeline if e.action == B(0, 0)]
    assert backward.start == 5.0
    assert simulation.makespan == 9.0


def test_lockstep_composite_fills_one_tick():
    schedule = braided_two_devices()
    simulation = simulate(schedule, Cost(f=1, b=2, i=1, w=1), "lockstep", split_backward=False)
    assert simulation.num_ticks == 5
    # Ticks: 1 (0F0), 1 (0F1 | 1F0), 3 ((1F1;1B0)), 2 (0B0 | 1B1), 2 (0B1).
    assert simulation.makespan == 9.0
    assert simulation.pp_bubble == (3.0, 3.0)  # device 0 idles in tick 2, device 1 in ticks 0 and 4


def test_peak_activations_count_members_in_order():
    schedule = one_device([F(0, 0), Composite(F(0, 1), B(0, 0)), B(0, 1)])
    assert simulate(schedule).peak_activations == (2.0,)


# --- CSV -----------------------------------------------------------------------------------------


def test_to_csv_writes_composites_as_overlap_cells():
    text = to_csv(braided_two_devices())
    assert text == "0F0,0F1,0B0,0B1\r\n1F0,(1F1;1B0)OVERLAP_F_B,1B1\r\n"
    assert to_csv(braided_two_devices(), lockstep=True) == "0F0,0F1,,0B0,0B1\r\n,1F0,(1F1;1B0)OVERLAP_F_B,1B1,\r\n"


@pytest.mark.parametrize("lockstep", [False, True])
@pytest.mark.parametrize("name", ["stp", "dualpipev"])
def test_round_trip_with_composites(name: str, lockstep: bool):
    options = {"overlap": True} if name == "dualpipev" else {}
    schedule = build(name, 4, 12, **options)
    assert schedule.has_composites
    copy = from_csv(to_csv(schedule, lockstep=lockstep), name=name, composites=True)
    assert copy.actions == schedule.actions
    assert copy.placement == schedule.placement
    assert copy.num_microbatches == schedule.num_microbatches
    # Read without composites: the same actions one after the other.
    assert from_csv(to_csv(schedule, lockstep=lockstep)).actions == schedule.flattened().actions


def test_torch_dualpipev_overlap_cells_are_our_overlapped_pairs():
    schedule = from_csv(FIXTURE.read_text(), name="torch-dualpipev", composites=True)
    validate(schedule)
    assert schedule.actions == build("dualpipev", 4, 8, overlap=True).actions
    assert sum(isinstance(step, Composite) for row in schedule.actions for step in row) == 25


def test_composite_cell_with_one_compute_action_is_rejected_when_braiding():
    text = "0F0,(0F1;0SEND_F1)OVERLAP_F_B,0B0,0B1\n"
    assert from_csv(text).actions == ((F(0, 0), F(0, 1), B(0, 0), B(0, 1)),)
    with pytest.raises(ScheduleError, match=r"row 0 \(rank 0\), column 2.*needs two compute actions, this cell has 1"):
        from_csv(text, composites=True)


# --- rendering -----------------------------------------------------------------------------------


def test_render_shows_a_composite_as_one_cell():
    text = render(braided_two_devices())
    lines = text.splitlines()
    assert "(a;b) = a and b run together" in lines[1]
    assert "5 ticks" in lines[1]
    cells = lines[-1].split("|")[1].split()
    assert cells == [".", "1F0", "(1F1;1B0)", "1B1", "."]
    timed = render(braided_two_devices(), cost=Cost(all_reduce=0.5), mode="async")
    assert "(1F1;1B0)" in timed


def test_plot_draws_composites(tmp_path):
    schedule = build("stp", 2, 5)
    path = plot(simulate(schedule, Cost(all_reduce=0.5)), tmp_path / "stp.png")
    assert path.stat().st_size > 0


# --- registry ------------------------------------------------------------------------------------


def test_composite_schedules_are_registered_apart():
    assert "stp" in COMPOSITE_SCHEDULES
    assert "stp" not in SCHEDULES
    assert default_virtual("stp") == 2
    assert not any(build(name, 2, 4).has_composites for name in SCHEDULES if name != "dualpipev")


def test_dualpipev_overlap_only_groups_its_pairs():
    for p, m in ((2, 4), (4, 8), (4, 13), (6, 20)):
        plain = build("dualpipev", p, m)
        braided = build("dualpipev", p, m, overlap=True)
        assert braided.flattened().actions == plain.actions
        for device, row in enumerate(braided.actions):
            pairs = [step for step in row if isinstance(step, Composite)]
            assert all(isinstance(a, Action) for step in pairs for a in members(step))
            assert all((step.first.op, step.second.op) == (F(0, 0).op, B(0, 0).op) for step in pairs)
            # DeepSeek's steps 4 and 5: 2(m - 2p + r + 1) + (p - 1 - r) pairs, one fewer on the last device.
            expected = 2 * (m - 2 * p + device + 1) + (p - 1 - device) - (1 if device == p - 1 else 0)
            assert len(pairs) == expected


def test_send_latency_keeps_composites():
    schedule = build("stp", 2, 5, send_latency=1)
    assert schedule.name == "stp"
    assert schedule.has_composites
