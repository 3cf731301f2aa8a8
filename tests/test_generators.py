"""Schedule generators: every supported (p, m, v) builds a valid schedule; unsupported ones are refused."""

from __future__ import annotations

import csv
import pathlib
import re

import pytest

from jpipe.schedules import (
    SCHEDULES,
    Action,
    Op,
    Schedule,
    ScheduleError,
    build,
    loop_placement,
    register,
    v_placement,
    validate,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch-schedules"
DEVICES = (1, 2, 3, 4, 8)
MICROBATCHES = range(1, 33)
VIRTUALS = (1, 2, 3, 4)
ALL_NAMES = ("naive", "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb_h1", "zb_h2", "zbv", "dualpipev")
V_PLACED = ("zbv", "dualpipev")
SPLIT_BACKWARD = ("zb_h1", "zb_h2", "zbv")  # only I/W (dualpipev mixes B and I/W)


def refusal(name: str, p: int, m: int, v: int) -> str | None:
    """The argument a generator must name when it refuses (p, m, v); None when it must accept.

    These are the limits documented in jpipe/schedules/generators.py.
    """
    if name in ("naive", "gpipe", "1f1b", "zb_h1", "zb_h2") and v != 1:
        return "virtual"
    if name == "interleaved_1f1b" and v < 2:
        return "virtual"
    if name in V_PLACED and v != 2:
        return "virtual"
    if name == "dualpipev" and m < 2 * p:
        return "num_microbatches"
    return None


def test_all_documented_schedules_are_registered():
    assert set(ALL_NAMES) <= set(SCHEDULES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_supported_combination_builds_a_valid_schedule(name: str):
    """Over p in {1,2,3,4,8}, m in 1..32, v in 1..4: accepted exactly where documented, and valid."""
    for p in DEVICES:
        for m in MICROBATCHES:
            for v in VIRTUALS:
                argument = refusal(name, p, m, v)
                if argument is not None:
                    with pytest.raises(ScheduleError, match=argument):
                        build(name, p, m, v)
                    continue
                schedule = build(name, p, m, v)
                validate(schedule)  # build validates already; the contract is explicit here
                assert schedule.name == name
                assert (schedule.num_devices, schedule.num_microbatches, schedule.virtual) == (p, m, v)
                expected = v_placement(p) if name in V_PLACED else loop_placement(p, v)
                assert schedule.placement == expected
                ops = {action.op for row in schedule.actions for action in row}
                if name in SPLIT_BACKWARD:
                    assert ops == {Op.F, Op.I, Op.W}
                elif name != "dualpipev":
                    assert ops == {Op.F, Op.B}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ScheduleError, match="unknown schedule 'pipedream'") as error:
        build("pipedream", 4, 8)
    for name in ALL_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0, 8, 1), "num_devices must be >= 1, got 0"),
        ((-2, 8, 1), "num_devices must be >= 1, got -2"),
        ((4, 0, 1), "num_microbatches must be >= 1, got 0"),
        ((4, 8, 0), "virtual must be >= 1, got 0"),
        ((4.0, 8, 1), "num_devices must be an int"),
        ((4, "8", 1), "num_microbatches must be an int"),
        ((4, 8, True), "virtual must be an int"),
    ],
)
def test_bad_common_arguments_are_named(arguments, message):
    with pytest.raises(ScheduleError, match=re.escape(message)):
        build("1f1b", *arguments)


@pytest.mark.parametrize(
    ("name", "p", "m", "v", "message"),
    [
        ("gpipe", 4, 8, 2, "gpipe needs virtual == 1, got virtual=2"),
        ("naive", 4, 8, 3, "naive needs virtual == 1, got virtual=3"),
        ("1f1b", 4, 8, 2, "1f1b needs virtual == 1, got virtual=2"),
        ("zb_h1", 4, 8, 2, "zb_h1 needs virtual == 1, got virtual=2"),
        ("zb_h2", 4, 8, 4, "zb_h2 needs virtual == 1, got virtual=4"),
        ("zbv", 4, 8, 1, "zbv needs virtual == 2, got virtual=1"),
        ("zbv", 4, 8, 3, "zbv needs virtual == 2, got virtual=3"),
        ("dualpipev", 4, 8, 3, "dualpipev needs virtual == 2, got virtual=3"),
        ("interleaved_1f1b", 4, 8, 1, "interleaved_1f1b needs virtual >= 2, got virtual=1"),
        ("dualpipev", 4, 7, 2, "dualpipev needs num_microbatches >= 2 * num_devices = 8, got num_microbatches=7"),
    ],
)
def test_unsupported_combinations_name_the_argument_and_rule(name, p, m, v, message):
    with pytest.raises(ScheduleError, match=re.escape(message)):
        build(name, p, m, v)


# --- the orders themselves -------------------------------------------------------------------------


def forwards_before_first_backward(row: tuple[Action, ...]) -> int:
    return next(index for index, action in enumerate(row) if action.op is not Op.F)


@pytest.mark.parametrize(("p", "m"), [(4, 8), (8, 32), (3, 2)])
def test_1f1b_warmup_is_p_minus_1_minus_r(p: int, m: int):
    schedule = build("1f1b", p, m)
    for device, row in enumerate(schedule.actions):
        warmup = min(m, p - 1 - device)
        assert all(action.op is Op.F for action in row[:warmup])
        # After the warmup, one backward follows each forward until the forwards run out.
        steady = row[warmup : warmup + 2 * (m - warmup)]
        assert [action.op for action in steady] == [Op.F, Op.B] * (m - warmup)
        assert all(action.op is Op.B for action in row[warmup + 2 * (m - warmup) :])


@pytest.mark.parametrize(("p", "m", "v"), [(4, 8, 2), (4, 16, 3), (8, 16, 2), (2, 6, 4)])
def test_interleaved_warmup_is_megatrons_when_m_is_a_multiple_of_p(p: int, m: int, v: int):
    schedule = build("interleaved_1f1b", p, m, v)
    for device, row in enumerate(schedule.actions):
        assert forwards_before_first_backward(row) == (p - device - 1) * 2 + (v - 1) * p + 1  # +1: 1F1B
        forwards = [action for action in row if action.op is Op.F]
        # Groups of p microbatches, chunk by chunk.
        expected = [
            Action(device + chunk * p, Op.F, mb)
            for first in range(0, m, p)
            for chunk in range(v)
            for mb in range(first, first + p)
        ]
        assert forwards == expected


def test_zb_h1_delays_each_weight_gradient_by_the_device_index():
    p, m = 4, 8
    schedule = build("zb_h1", p, m)
    for device, row in enumerate(schedule.actions):
        for mb in range(m - device):
            weight = row.index(Action(device, Op.W, mb))
            assert row[weight - 1] == Action(device, Op.I, mb + device)
        trailing = row[len(row) - device :]
        assert trailing == tuple(Action(device, Op.W, mb) for mb in range(m - device, m))


def test_zb_h2_warms_up_with_2p_minus_1_minus_2r_forwards():
    p, m = 4, 12
    schedule = build("zb_h2", p, m)
    for device, row in enumerate(schedule.actions):
        assert forwards_before_first_backward(row) == 2 * (p - 1 - device) + 1


def test_dualpipev_mixes_full_and_split_backwards_like_deepseek():
    schedule = build("dualpipev", 4, 10, 2)
    for device, row in enumerate(schedule.actions):
        ops = [action.op for action in row]
        assert Op.B in ops and Op.I in ops and ops.count(Op.I) == ops.count(Op.W)
        assert row[-1].op is Op.W
        # The first backward of the device's second chunk is split (DeepSeek's step 3 uses zero bubble)
        # on every device but the last.
        first_backward = next(action for action in row if action.op is not Op.F)
        assert first_backward.stage == 2 * 4 - 1 - device
        assert first_backward.op is (Op.I if device < 3 else Op.B)


# --- against the schedules torch.distributed.pipelining writes ------------------------------------


def torch_compute_rows(path: pathlib.Path) -> list[list[str]]:
    """Compute actions per rank of a torch compute+comms CSV (comms dropped, overlaps in order)."""
    rows = []
    with path.open(newline="") as handle:
        for line in csv.reader(handle):
            if not line:
                continue
            row = []
            for cell in (cell.strip() for cell in line):
                overlap = re.fullmatch(r"\((.*)\)OVERLAP_F_B", cell)
                for part in overlap.group(1).split(";") if overlap else [cell]:
                    if re.fullmatch(r"\d+[FBIW]\d+", part):
                        row.append(part)
            rows.append(row)
    return rows


@pytest.mark.parametrize(
    ("name", "torch_name"),
    [
        ("interleaved_1f1b", "Interleaved1F1B"),
        ("looped_bfs", "LoopedBFS"),
        ("zbv", "ZBVZeroBubble"),
        ("dualpipev", "DualPipeV"),
    ],
)
def test_orders_match_torch_written_schedules_at_p4_m8(name: str, torch_name: str):
    path = FIXTURES / f"torch-{torch_name}-4rank-8mb-2v.csv"
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    expected = torch_compute_rows(path)
    ours = [[str(action) for action in row] for row in build(name, 4, 8, 2).actions]
    assert ours == expected


def test_torch_interleaved_zero_bubble_fixture_is_valid():
    path = FIXTURES / "torch-InterleavedZeroBubble-4rank-8mb-2v.csv"
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    rows = [tuple(Action.parse(cell) for cell in row) for row in torch_compute_rows(path)]
    validate(Schedule(4, 8, loop_placement(4, 2), rows, name="torch-izb"))


# --- registering a new schedule --------------------------------------------------------------------


def test_register_adds_a_buildable_schedule():
    @register("test_reverse_gpipe")
    def reverse_gpipe(num_devices: int, num_microbatches: int, virtual: int) -> Schedule:
        rows = [
            [Action(d, Op.F, mb) for mb in range(num_microbatches)]
            + [Action(d, Op.B, mb) for mb in reversed(range(num_microbatches))]
            for d in range(num_devices)
        ]
        return Schedule(num_devices, num_microbatches, loop_placement(num_devices, 1), rows)

    try:
        schedule = build("test_reverse_gpipe", 3, 4)
        assert schedule.name == "test_reverse_gpipe"
        assert schedule.actions[0][-1] == Action(0, Op.B, 0)
    finally:
        del SCHEDULES["test_reverse_gpipe"]


def test_build_validates_what_a_registered_generator_returns():
    @register("test_broken")
    def broken(num_devices: int, num_microbatches: int, virtual: int) -> Schedule:
        return Schedule(1, 1, (0,), ((Action(0, Op.B, 0), Action(0, Op.F, 0)),))

    try:
        with pytest.raises(ScheduleError, match="0B0 on device 0 comes before 0F0"):
            build("test_broken", 1, 1)
    finally:
        del SCHEDULES["test_broken"]
