"""Text charts (`render`) and matplotlib Gantt charts (`plot`) of schedules and simulations."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from jpipe.schedules import (
    SCHEDULES,
    Action,
    Cost,
    Schedule,
    build,
    default_virtual,
    plot,
    render,
    simulate,
    v_placement,
)
from jpipe.schedules.ir import B, F, I, W

UNIT_COST = Cost(f=1, b=2, i=1, w=1, comm=0)


def one_f_one_b_by_hand() -> Schedule:
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


def device_rows(text: str, num_devices: int) -> list[list[str]]:
    """The cells of the device lines of a `render` chart."""
    rows = [line for line in text.splitlines() if line.startswith("d") and " | " in line]
    assert len(rows) == num_devices
    return [line.split(" | ", 1)[1].split() for line in rows]


# --- render --------------------------------------------------------------------------------------


def test_render_lays_actions_on_lockstep_ticks():
    text = render(one_f_one_b_by_hand())
    lines = text.splitlines()
    assert lines[0] == "1f1b-by-hand: p=2 m=2 v=1 (2 stages)"
    assert "F forward" in lines[1] and "B backward" in lines[1] and "6 ticks" in lines[1]
    assert lines[3:] == [
        "d0 | 0F0 0F1 .   0B0 .   0B1",
        "d1 | .   1F0 1B0 1F1 1B1 .",
    ]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_render_generated_p8_m32_shows_every_action_on_its_device(name: str):
    schedule = build(name, 8, 32, default_virtual(name))
    text = render(schedule)
    assert f"p=8 m=32 v={schedule.virtual}" in text.splitlines()[0]
    rows = device_rows(text, 8)
    assert len({len(row) for row in rows}) == 1  # one column per tick on every row
    for device, (cells, actions) in enumerate(zip(rows, schedule.actions, strict=True)):
        shown = [cell for cell in cells if cell != "."]
        assert shown == [str(action) for action in actions], device


def test_render_truncates_to_width_with_a_note():
    schedule = build("1f1b", 8, 32)
    text = render(schedule, width=100)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert "truncated to width 100" in text
    assert len(device_rows(text, 8)) == 8
    assert "truncated" not in render(schedule, width=10_000)


def test_render_with_cost_spans_actions_over_their_duration():
    schedule = one_f_one_b_by_hand()
    text = render(schedule, cost=UNIT_COST, mode="async")
    assert "async simulation" in text
    rows = device_rows(text, 2)
    # B lasts two F: its cell is followed by one continuation cell.
    for device, row in enumerate(rows):
        for column, cell in enumerate(row):
            if "B" in cell:
                assert row[column + 1] == "-", (device, row)
    cells = {cell for row in rows for cell in row}
    assert {str(action) for row in schedule.actions for action in row} <= cells


def test_render_lockstep_with_cost_uses_the_simulated_time():
    text = render(one_f_one_b_by_hand(), cost=UNIT_COST, mode="lockstep")
    assert "lockstep simulation" in text
    assert len(device_rows(text, 2)) == 2


def test_render_of_a_deadlocking_schedule_shows_device_order_with_a_note():
    deadlocked = Schedule(2, 1, (0, 1), ((B(0, 0), F(0, 0)), (F(1, 0), B(1, 0))), name="deadlock")
    text = render(deadlocked)
    assert "not time" in text and "deadlocks" in text
    assert device_rows(text, 2) == [["0B0", "0F0"], ["1F0", "1B0"]]


def test_render_handles_split_backward_and_v_placement():
    schedule = Schedule(
        2,
        1,
        v_placement(2),
        (
            (F(0, 0), F(3, 0), I(3, 0), W(3, 0), I(0, 0), W(0, 0)),
            (F(1, 0), F(2, 0), I(2, 0), I(1, 0), W(2, 0), W(1, 0)),
        ),
        name="v-by-hand",
    )
    text = render(schedule)
    assert "v=2" in text.splitlines()[0]
    assert "I input grad" in text and "W weight grad" in text
    assert [c for c in device_rows(text, 2)[1] if c != "."] == ["1F0", "2F0", "2I0", "1I0", "2W0", "1W0"]


# --- plot ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StandInEvent:
    device: int
    action: Action
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class StandInSimulation:
    """Just the attributes `plot` reads, so `plot` is tested apart from the simulator."""

    schedule: Schedule
    timeline: tuple[StandInEvent, ...]
    mode: str
    makespan: float
    bubble_fraction: float


def test_plot_draws_a_stand_in_timeline(tmp_path: pathlib.Path):
    schedule = one_f_one_b_by_hand()
    events = (
        StandInEvent(0, F(0, 0), 0, 1),
        StandInEvent(0, F(0, 1), 1, 2),
        StandInEvent(1, F(1, 0), 1, 2),
        StandInEvent(1, B(1, 0), 2, 4),
        StandInEvent(1, F(1, 1), 4, 5),
        StandInEvent(0, B(0, 0), 4, 6),
        StandInEvent(1, B(1, 1), 5, 7),
        StandInEvent(0, B(0, 1), 7, 9),
    )
    simulation = StandInSimulation(schedule, events, "async", 9.0, 1 - 12 / 18)
    path = plot(simulation, tmp_path / "stand-in.png", title="stand-in")
    assert path == tmp_path / "stand-in.png"
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_a_gantt_chart(tmp_path: pathlib.Path, suffix: str):
    simulation = simulate(build("zbv", 4, 8, 2), UNIT_COST, "async")
    path = plot(simulation, tmp_path / "charts" / f"zbv{suffix}")
    data = path.read_bytes()
    assert len(data) > 1000
    if suffix == ".png":
        assert data.startswith(b"\x89PNG")
    else:
        assert b"<svg" in data[:1000]


def test_plot_stacks_several_simulations(tmp_path: pathlib.Path):
    schedule = build("1f1b", 4, 8)
    simulations = [simulate(schedule, UNIT_COST, mode) for mode in ("async", "lockstep")]
    path = plot(simulations, tmp_path / "stacked.svg", title="1f1b: async vs lockstep")
    text = path.read_text()
    assert "async" in text and "lockstep" in text


def test_plot_rejects_unknown_suffix(tmp_path: pathlib.Path):
    simulation = simulate(one_f_one_b_by_hand(), UNIT_COST, "async")
    with pytest.raises(ValueError, match="png"):
        plot(simulation, tmp_path / "chart.gif")


def test_schedules_package_imports_neither_jax_nor_matplotlib():
    """`jpipe.schedules` itself pulls in no heavy dependency (the parent `jpipe` package, which holds
    the executor, is bypassed here: its `__init__` imports jax on purpose)."""
    code = (
        "import importlib.util, sys, types\n"
        "parent = types.ModuleType('jpipe')\n"
        "parent.__path__ = list(importlib.util.find_spec('jpipe').submodule_search_locations)\n"
        "sys.modules['jpipe'] = parent\n"
        "import jpipe.schedules\n"
        "heavy = [m for m in ('jax', 'flax', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
