"""CSV import/export in torch.pipelining's formats: round trips, torch-written fixtures, errors."""

from __future__ import annotations

import collections
import pathlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpipe.schedules import (
    SCHEDULES,
    Action,
    Cost,
    Op,
    Schedule,
    ScheduleError,
    build,
    default_virtual,
    from_csv,
    loop_placement,
    simulate,
    to_csv,
    v_placement,
    validate,
)
from jpipe.schedules.ir import B, F, I, W

FIXTURES = pathlib.Path("/work/shared/fixtures/torch-schedules")
# Chunks per device used for each generator name in the generated-schedule tests.

# Fixture file stem -> expected placement (4 ranks, 2 chunks per rank).
FIXTURE_PLACEMENTS = {
    "torch-Interleaved1F1B-4rank-8mb-2v": loop_placement(4, 2),
    "torch-LoopedBFS-4rank-8mb-2v": loop_placement(4, 2),
    "torch-InterleavedZeroBubble-4rank-8mb-2v": loop_placement(4, 2),
    "torch-ZBVZeroBubble-4rank-8mb-2v": v_placement(4),
    "torch-DualPipeV-4rank-8mb-2v": v_placement(4),
}
# Fixture file stem -> op counts over the whole schedule (8 stages x 8 microbatches = 64 of each pass).
FIXTURE_OP_COUNTS = {
    "torch-Interleaved1F1B-4rank-8mb-2v": {Op.F: 64, Op.B: 64},
    "torch-LoopedBFS-4rank-8mb-2v": {Op.F: 64, Op.B: 64},
    "torch-InterleavedZeroBubble-4rank-8mb-2v": {Op.F: 64, Op.I: 64, Op.W: 64},
    "torch-ZBVZeroBubble-4rank-8mb-2v": {Op.F: 64, Op.I: 64, Op.W: 64},
    # DualPipeV runs most backwards whole (B, many inside OVERLAP_F_B cells) and splits the rest.
    "torch-DualPipeV-4rank-8mb-2v": {Op.F: 64, Op.B: 42, Op.I: 22, Op.W: 22},
}


def one_f_one_b_by_hand() -> Schedule:
    """1F1B on 2 devices, 2 microbatches, written out by hand."""
    return Schedule(
        num_devices=2,
        num_microbatches=2,
        placement=(0, 1),
        actions=(
            (F(0, 0), F(0, 1), B(0, 0), B(0, 1)),
            (F(1, 0), B(1, 0), F(1, 1), B(1, 1)),
        ),
        name="1f1b-by-hand",
    )


def v_shape_split_by_hand() -> Schedule:
    """A V-placed schedule (2 devices, 4 stages) with split backward, written out by hand."""
    return Schedule(
        num_devices=2,
        num_microbatches=1,
        placement=v_placement(2),  # device 0: stages 0, 3; device 1: stages 1, 2
        actions=(
            (F(0, 0), F(3, 0), I(3, 0), W(3, 0), I(0, 0), W(0, 0)),
            (F(1, 0), F(2, 0), I(2, 0), I(1, 0), W(2, 0), W(1, 0)),
        ),
        name="v-by-hand",
    )


def load_fixture(stem: str) -> Schedule:
    return from_csv((FIXTURES / f"{stem}.csv").read_text(), name=stem)


def assert_same_schedule(copy: Schedule, original: Schedule) -> None:
    assert copy.actions == original.actions
    assert copy.placement == original.placement
    assert copy.num_devices == original.num_devices
    assert copy.num_microbatches == original.num_microbatches


# --- writing -------------------------------------------------------------------------------------


def test_to_csv_writes_one_row_per_device_without_idle_cells():
    assert to_csv(one_f_one_b_by_hand()) == "0F0,0F1,0B0,0B1\r\n1F0,1B0,1F1,1B1\r\n"


def test_to_csv_lockstep_aligns_rows_on_ticks_with_empty_idle_cells():
    text = to_csv(one_f_one_b_by_hand(), lockstep=True)
    assert text == "0F0,0F1,,0B0,,0B1\r\n,1F0,1B0,1F1,1B1,\r\n"


@pytest.mark.parametrize("schedule", [one_f_one_b_by_hand(), v_shape_split_by_hand()], ids=str)
@pytest.mark.parametrize("lockstep", [False, True])
def test_round_trip_hand_made(schedule: Schedule, lockstep: bool):
    copy = from_csv(to_csv(schedule, lockstep=lockstep), name=schedule.name)
    assert_same_schedule(copy, schedule)
    assert copy.name == schedule.name


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_devices", [2, 4])
def test_round_trip_generated(name: str, num_devices: int):
    schedule = build(name, num_devices, 8, default_virtual(name))
    for lockstep in (False, True):
        assert_same_schedule(from_csv(to_csv(schedule, lockstep=lockstep)), schedule)


@settings(max_examples=60, deadline=None)
@given(
    num_devices=st.integers(1, 4),
    virtual=st.integers(1, 3),
    num_microbatches=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_random_schedules(num_devices: int, virtual: int, num_microbatches: int, seed: int):
    """Any schedule whose stages each have an action survives the round trip, valid or not."""
    rng = random.Random(seed)
    stages = list(range(num_devices * virtual))
    rng.shuffle(stages)
    placement = [0] * len(stages)
    for index, stage in enumerate(stages):
        placement[stage] = index // virtual
    rows: list[list[Action]] = [[] for _ in range(num_devices)]
    for stage, device in enumerate(placement):
        count = rng.randint(1, 4)
        rows[device].extend(Action(stage, rng.choice(list(Op)), rng.randrange(num_microbatches)) for _ in range(count))
    for row in rows:
        rng.shuffle(row)
    microbatches = max(action.microbatch for row in rows for action in row) + 1
    schedule = Schedule(num_devices, microbatches, tuple(placement), tuple(tuple(r) for r in rows))
    assert_same_schedule(from_csv(to_csv(schedule)), schedule)


# --- reading torch's formats ---------------------------------------------------------------------


def test_from_csv_skips_idle_cells_and_infers_placement_and_microbatches():
    text = "0F0,,3F0, 3B0 ,0B0\n,1F0,2F0,2B0,,1B0\n"
    schedule = from_csv(text, name="mine")
    assert schedule.name == "mine"
    assert schedule.num_devices == 2
    assert schedule.placement == (0, 1, 1, 0)
    assert schedule.num_microbatches == 1
    assert schedule.actions == (
        (F(0, 0), F(3, 0), B(3, 0), B(0, 0)),
        (F(1, 0), F(2, 0), B(2, 0), B(1, 0)),
    )


def test_from_csv_drops_communication_and_splits_composite_cells():
    text = (
        "0UNSHARD,0F0,0SEND_F0,0RECV_B0,(0F1;0B0)OVERLAP_F_B,0SEND_F1,0RECV_B1,0B1,0REDUCE_GRAD,0RESHARD\n"
        "1UNSHARD,1RECV_F0,1F0,1I0,1SEND_B0,1RECV_F1,1W0,1F1,1B1,1SEND_B1,1RESHARD\n"
    )
    schedule = from_csv(text)
    assert schedule.actions == (
        (F(0, 0), F(0, 1), B(0, 0), B(0, 1)),
        (F(1, 0), I(1, 0), W(1, 0), F(1, 1), B(1, 1)),
    )
    assert schedule.num_microbatches == 2


def test_from_csv_accepts_byte_order_mark_quotes_and_trailing_blank_lines():
    text = '\ufeff"0F0","0B0"\r\n1F0,1B0\r\n\r\n,\r\n'
    schedule = from_csv(text)
    assert schedule.num_devices == 2
    assert schedule.actions == ((F(0, 0), B(0, 0)), (F(1, 0), B(1, 0)))


@pytest.mark.parametrize("stem", sorted(FIXTURE_PLACEMENTS))
def test_torch_fixture_loads_with_placement_and_counts(stem: str):
    schedule = load_fixture(stem)
    assert schedule.num_devices == 4
    assert schedule.num_microbatches == 8
    assert schedule.virtual == 2
    assert schedule.placement == FIXTURE_PLACEMENTS[stem]
    counts = collections.Counter(action.op for row in schedule.actions for action in row)
    assert counts == FIXTURE_OP_COUNTS[stem]
    # Every (stage, microbatch) has one F and either one B or one I and one W, on its own device.
    per_pair = collections.defaultdict(collections.Counter)
    for device, row in enumerate(schedule.actions):
        for action in row:
            assert schedule.placement[action.stage] == device
            per_pair[action.stage, action.microbatch][action.op] += 1
    assert len(per_pair) == 8 * 8
    for pair, ops in per_pair.items():
        assert ops in ({Op.F: 1, Op.B: 1}, {Op.F: 1, Op.I: 1, Op.W: 1}), pair


def test_dualpipev_fixture_keeps_overlapped_pairs_in_order():
    schedule = load_fixture("torch-DualPipeV-4rank-8mb-2v")
    row = schedule.actions[0]
    # Rank 0 writes `(0F7;7B3)OVERLAP_F_B` then `(7F4;0B0)OVERLAP_F_B`.
    start = row.index(F(0, 7))
    assert row[start : start + 3] == (F(0, 7), B(7, 3), F(7, 4))
    assert row[start + 3] == B(0, 0)


@pytest.mark.parametrize("stem", sorted(FIXTURE_PLACEMENTS))
def test_torch_fixture_validates_simulates_and_round_trips(stem: str):
    schedule = load_fixture(stem)
    validate(schedule)
    cost = Cost(f=1, b=2, i=1, w=1, comm=0, per="chunk")
    for mode in ("async", "lockstep"):
        simulation = simulate(schedule, cost, mode)
        # 8 stages x 8 microbatches, a forward (1) and a backward (2) each, spread over 4 devices.
        assert simulation.makespan >= 8 * 8 * 3 / 4
        assert 0.0 <= simulation.bubble_fraction < 1.0
    assert_same_schedule(from_csv(to_csv(schedule)), schedule)
    assert_same_schedule(from_csv(to_csv(schedule, lockstep=True)), schedule)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_cell",
    ["0X3", "F3", "0F", "0F1x", "-1F0", "(0F1;)OVERLAP_F_B", "(0F1;1B0)FOO", "(0F1;0Q0)OVERLAP_F_B", "0F1)"],
)
def test_unparseable_cell_is_named_with_row_and_column(bad_cell: str):
    text = f'0F0,0B0\n1F0,"{bad_cell}",1B0\n'
    with pytest.raises(ScheduleError) as raised:
        from_csv(text)
    message = str(raised.value)
    assert repr(bad_cell) in message
    assert "row 1" in message
    assert "column 2" in message


def test_stage_on_two_rows_is_an_error():
    with pytest.raises(ScheduleError, match=r"stage 1 appears on two rows: row 0 .* row 1"):
        from_csv("0F0,1F0,0B0,1B0\n1F1,1B1\n")


def test_communication_cell_on_the_wrong_row_is_an_error():
    with pytest.raises(ScheduleError, match="stage 0 appears on two rows"):
        from_csv("0F0,0B0\n0SEND_F0,1F0,1B0\n")


def test_missing_stage_is_an_error():
    with pytest.raises(ScheduleError, match=r"stages \[1\] appear on no row"):
        from_csv("0F0,0B0\n2F0,2B0\n")


@pytest.mark.parametrize("text", ["", "\n\n", ",,\n", "0UNSHARD,0RESHARD\n"])
def test_no_compute_action_is_an_error(text: str):
    with pytest.raises(ScheduleError):
        from_csv(text)
