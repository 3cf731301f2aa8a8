"""Validation: every malformed kind is rejected with a message naming the offending action and device."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpipe.schedules import (
    Action,
    Schedule,
    ScheduleError,
    build,
    default_virtual,
    loop_placement,
    v_placement,
    validate,
)
from jpipe.schedules.ir import B, F, I, W


def two_device_1f1b(**changes) -> Schedule:
    """A valid 1F1B schedule on 2 devices and 2 microbatches; `changes` replace its fields."""
    schedule = Schedule(
        num_devices=2,
        num_microbatches=2,
        placement=(0, 1),
        actions=(
            (F(0, 0), F(0, 1), B(0, 0), B(0, 1)),
            (F(1, 0), B(1, 0), F(1, 1), B(1, 1)),
        ),
        name="by-hand",
    )
    return dataclasses.replace(schedule, **changes)


def one_device_split(row) -> Schedule:
    """One device, one stage, one microbatch, with the given action row."""
    return Schedule(1, 1, (0,), (tuple(row),), name="one")


def rejects(schedule: Schedule, message: str) -> None:
    with pytest.raises(ScheduleError, match=re.escape(message)):
        validate(schedule)


def test_valid_hand_written_schedules_pass():
    validate(two_device_1f1b())
    validate(one_device_split([F(0, 0), I(0, 0), W(0, 0)]))
    validate(
        Schedule(
            2,
            1,
            v_placement(2),
            (
                (F(0, 0), F(3, 0), I(3, 0), W(3, 0), I(0, 0), W(0, 0)),
                (F(1, 0), F(2, 0), I(2, 0), I(1, 0), W(2, 0), W(1, 0)),
            ),
        )
    )


# --- shape and placement ---------------------------------------------------------------------------


def test_num_devices_must_be_positive():
    rejects(Schedule(0, 1, (), ()), "num_devices must be an int >= 1, got 0")


def test_one_action_row_per_device():
    rejects(
        two_device_1f1b(actions=((F(0, 0), B(0, 0)),)),
        "actions has 1 rows, expected one per device (num_devices=2)",
    )


def test_num_microbatches_must_be_positive():
    rejects(two_device_1f1b(num_microbatches=0), "num_microbatches must be an int >= 1, got 0")


def test_placement_length_must_be_a_multiple_of_num_devices():
    rejects(two_device_1f1b(placement=(0, 1, 0)), "placement has 3 stages, which is not a non-zero multiple")
    rejects(two_device_1f1b(placement=()), "placement has 0 stages")


def test_placement_devices_must_be_in_range():
    rejects(two_device_1f1b(placement=(0, 2)), "placement[1] = 2: device out of range [0, 2)")
    rejects(two_device_1f1b(placement=(-1, 1)), "placement[0] = -1: device out of range [0, 2)")


def test_every_device_holds_the_same_number_of_stages():
    rejects(two_device_1f1b(placement=(0, 0, 0, 1)), "device 0 holds 3 stages [0, 1, 2], expected 2")


def test_an_action_must_be_on_the_device_holding_its_stage():
    schedule = two_device_1f1b(
        actions=(
            (F(0, 0), F(1, 1), F(0, 1), B(0, 0), B(0, 1)),
            (F(1, 0), B(1, 0), B(1, 1)),
        )
    )
    rejects(schedule, "action 1F1 is on device 0, but stage 1 is placed on device 1")


def test_actions_must_be_actions():
    rejects(one_device_split([F(0, 0), "0B0"]), "device 0, position 1: expected an Action, got '0B0'")


# --- ranges, duplicates, completeness --------------------------------------------------------------


def test_stage_out_of_range():
    schedule = two_device_1f1b(
        actions=((F(0, 0), F(0, 1), B(0, 0), B(0, 1)), (F(1, 0), B(1, 0), F(1, 1), B(1, 1), F(5, 0)))
    )
    rejects(schedule, "action 5F0 on device 1: stage 5 out of range [0, 2)")


@pytest.mark.parametrize("microbatch", [2, -1])
def test_microbatch_out_of_range(microbatch: int):
    schedule = two_device_1f1b(
        actions=((F(0, 0), F(0, 1), B(0, 0), B(0, 1), F(0, microbatch)), (F(1, 0), B(1, 0), F(1, 1), B(1, 1)))
    )
    rejects(schedule, f"action 0F{microbatch} on device 0: microbatch {microbatch} out of range [0, 2)")


def test_duplicate_action():
    schedule = two_device_1f1b(
        actions=((F(0, 0), F(0, 1), B(0, 0), B(0, 1)), (F(1, 0), B(1, 0), F(1, 1), B(1, 1), B(1, 0)))
    )
    rejects(schedule, "duplicate action 1B0 on device 1: positions 1 and 4")


def test_missing_forward():
    schedule = two_device_1f1b(actions=((F(0, 0), B(0, 0), B(0, 1)), (F(1, 0), B(1, 0), F(1, 1), B(1, 1))))
    rejects(schedule, "missing action 0F1 on device 0: stage 0 microbatch 1 has no forward")


def test_missing_backward():
    schedule = two_device_1f1b(actions=((F(0, 0), F(0, 1), B(0, 0), B(0, 1)), (F(1, 0), B(1, 0), F(1, 1))))
    rejects(schedule, "missing backward on device 1: stage 1 microbatch 1 needs 1B1, or 1I1 and 1W1")


def test_missing_weight_gradient():
    rejects(one_device_split([F(0, 0), I(0, 0)]), "missing action 0W0 on device 0: 0I0 has no weight gradient")


def test_missing_input_gradient():
    rejects(one_device_split([F(0, 0), W(0, 0)]), "missing action 0I0 on device 0: 0W0 has no input gradient")


@pytest.mark.parametrize("split", [[I(0, 0)], [W(0, 0)], [I(0, 0), W(0, 0)]])
def test_mixing_full_and_split_backward(split):
    rejects(
        one_device_split([F(0, 0), B(0, 0), *split]),
        f"action 0B0 on device 0 mixes a full backward with a split one ({split[0]})",
    )


# --- order -----------------------------------------------------------------------------------------


def test_input_gradient_before_its_forward():
    rejects(one_device_split([I(0, 0), F(0, 0), W(0, 0)]), "action 0I0 on device 0 comes before 0F0")


def test_full_backward_before_its_forward():
    schedule = two_device_1f1b(actions=((F(0, 0), F(0, 1), B(0, 0), B(0, 1)), (B(1, 0), F(1, 0), F(1, 1), B(1, 1))))
    rejects(schedule, "action 1B0 on device 1 comes before 1F0, which it needs")


def test_weight_gradient_before_its_input_gradient():
    rejects(one_device_split([F(0, 0), W(0, 0), I(0, 0)]), "action 0W0 on device 0 comes before 0I0")


def test_v_placement_forward_order_on_one_device():
    # Device 1 holds stages 1 and 2: 2F0 needs 1F0 first.
    schedule = Schedule(
        2,
        1,
        v_placement(2),
        (
            (F(0, 0), F(3, 0), I(3, 0), W(3, 0), I(0, 0), W(0, 0)),
            (F(2, 0), F(1, 0), I(2, 0), I(1, 0), W(2, 0), W(1, 0)),
        ),
    )
    rejects(schedule, "action 2F0 on device 1 comes before 1F0")


def test_cross_device_deadlock_reports_the_blocked_heads():
    # Device 0 waits for 1B0 before sending 0F1; device 1 waits for 0F1 before running 1B0.
    schedule = two_device_1f1b(
        actions=((F(0, 0), B(0, 0), F(0, 1), B(0, 1)), (F(1, 0), F(1, 1), B(1, 0), B(1, 1))),
        name="crossed",
    )
    rejects(
        schedule,
        "schedule 'crossed' deadlocks: the device orders cannot all finish; blocked head actions: "
        "device 0: 0B0 waits for 1B0; device 1: 1F1 waits for 0F1",
    )


def test_reordered_backwards_that_can_still_finish_are_valid():
    schedule = two_device_1f1b(actions=((F(0, 0), F(0, 1), B(0, 0), B(0, 1)), (F(1, 0), F(1, 1), B(1, 1), B(1, 0))))
    validate(schedule)  # reversed backward order on the last device alone is fine
    schedule = two_device_1f1b(actions=((F(0, 0), F(0, 1), B(0, 1), B(0, 0)), (F(1, 0), F(1, 1), B(1, 0), B(1, 1))))
    validate(schedule)  # and on the first device alone too
    three = Schedule(
        3,
        2,
        loop_placement(3, 1),
        (
            (F(0, 0), F(0, 1), B(0, 0), B(0, 1)),
            (F(1, 0), F(1, 1), B(1, 1), B(1, 0)),
            (F(2, 0), B(2, 0), F(2, 1), B(2, 1)),
        ),
        name="waits",
    )
    validate(three)


# --- generated schedules and random damage ---------------------------------------------------------


@st.composite
def generated_schedules(draw) -> Schedule:
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb_h1", "zb_h2", "zbv"]))
    p = draw(st.integers(1, 4))
    m = draw(st.integers(1, 8))
    return build(name, p, m, default_virtual(name))


def replace_row(schedule: Schedule, device: int, row: list[Action]) -> Schedule:
    rows = list(schedule.actions)
    rows[device] = tuple(row)
    return dataclasses.replace(schedule, actions=tuple(rows))


@settings(max_examples=60, deadline=None)
@given(generated_schedules(), st.data())
def test_dropping_any_action_is_reported_as_missing(schedule: Schedule, data):
    device = data.draw(st.integers(0, schedule.num_devices - 1))
    row = list(schedule.actions[device])
    position = data.draw(st.integers(0, len(row) - 1))
    dropped = row.pop(position)
    with pytest.raises(ScheduleError, match="missing") as error:
        validate(replace_row(schedule, device, row))
    assert f"device {device}" in str(error.value)
    assert str(dropped) in str(error.value) or f"stage {dropped.stage} microbatch {dropped.microbatch}" in str(
        error.value
    )


@settings(max_examples=60, deadline=None)
@given(generated_schedules(), st.data())
def test_repeating_any_action_is_reported_as_duplicate(schedule: Schedule, data):
    device = data.draw(st.integers(0, schedule.num_devices - 1))
    row = list(schedule.actions[device])
    repeated = row[data.draw(st.integers(0, len(row) - 1))]
    row.insert(data.draw(st.integers(0, len(row))), repeated)
    with pytest.raises(ScheduleError, match=re.escape(f"duplicate action {repeated} on device {device}")):
        validate(replace_row(schedule, device, row))


@settings(max_examples=60, deadline=None)
@given(generated_schedules(), st.data())
def test_moving_a_backward_before_its_forward_is_reported(schedule: Schedule, data):
    device = data.draw(st.integers(0, schedule.num_devices - 1))
    row = list(schedule.actions[device])
    backward = data.draw(st.sampled_from([action for action in row if action.op.value in "BI"]))
    forward = Action(backward.stage, F(0, 0).op, backward.microbatch)
    row.remove(backward)
    row.insert(row.index(forward), backward)
    with pytest.raises(ScheduleError, match=re.escape(f"action {backward} on device {device} comes before {forward}")):
        validate(replace_row(schedule, device, row))
