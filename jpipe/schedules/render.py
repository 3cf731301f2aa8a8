"""Text charts and matplotlib Gantt charts of schedules and simulations.

`render` draws a schedule as text: one row per device, one column per time step, each cell an action
printed as torch.pipelining does (`<stage><op><microbatch>`, e.g. `0F3`), idle steps as `.`.
`plot` draws the timeline of one or several `Simulation`s as a Gantt chart (PNG, SVG or PDF).
Both follow the schedule's routes through the packing and the simulation; the header says when a
schedule has replicas or per-microbatch routes, and a Gantt bar of a schedule with replicas names
its logical stage (`mb/s<stage>`), which `Schedule.model_stage_of` maps to its block of layers.

A composite (two actions a device runs together, `jpipe.schedules.ir.Composite`) is one cell,
`(0F7;7B3)`, and one Gantt box split in two halves (first member on top), coloured by the members'
ops and labelled with both.

matplotlib is imported inside `plot` only, so `import jpipe.schedules` stays light.
"""

from __future__ import annotations

import math
import pathlib
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jpipe.schedules.ir import Action, Cell, Composite, Op, Schedule, ScheduleError, members
from jpipe.schedules.simulate import Cost, simulate
from jpipe.schedules.ticks import pack

if TYPE_CHECKING:
    from jpipe.schedules.simulate import Simulation

IDLE = "."
CONTINUATION = "-"
OP_NAMES = {Op.F: "forward", Op.B: "backward", Op.I: "input grad", Op.W: "weight grad", Op.R: "recompute"}
OP_COLORS = {Op.F: "#4c72b0", Op.B: "#dd8452", Op.I: "#55a868", Op.W: "#8172b3", Op.R: "#937860"}
# Above this many columns a timed layout coarsens its time quantum (keeps text charts printable).
MAX_TIME_COLUMNS = 2000


def _header(schedule: Schedule) -> str:
    layout = f"{schedule.num_stages} stages"
    if schedule.has_replicas:
        layout += f" computing {schedule.num_model_stages} model stages"
    if schedule.has_routes:
        lengths = sorted({len(schedule.route(mb)) for mb in range(schedule.num_microbatches)})
        hops = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        layout += f", per-microbatch routes of {hops} stages"
    return f"{schedule.name}: p={schedule.num_devices} m={schedule.num_microbatches} v={schedule.virtual} ({layout})"


def _tick_grid(schedule: Schedule) -> tuple[list[list[str]], str]:
    """Cells laid out on the lockstep ticks of `pack(schedule, split=False)` (a composite in one tick),
    and what a column means."""
    try:
        table = pack(schedule, split=False, keep_composites=True)
    except ScheduleError as error:
        grid = [[str(action) for action in row] for row in schedule.actions]
        return grid, f"column = position in the device's list (not time: {error})"
    grid = [
        [IDLE if tick[device] is None else str(tick[device]) for tick in table.ticks]
        for device in range(schedule.num_devices)
    ]
    return grid, f"column = one lockstep tick of pack(split=False), {table.num_ticks} ticks"


def _time_grid(schedule: Schedule, cost: Cost, mode: str) -> tuple[list[list[str]], str]:
    """Cells laid out on simulated time: an action spans its duration, `-` marks its continuation."""
    simulation = simulate(schedule, cost, mode)
    events = list(simulation.timeline)
    durations = [event.end - event.start for event in events if event.end > event.start]
    makespan = max((event.end for event in events), default=0.0)
    quantum = min(durations, default=1.0)
    quantum = max(quantum, makespan / MAX_TIME_COLUMNS)
    num_columns = max(1, math.ceil(makespan / quantum - 1e-9))
    grid = [[IDLE] * num_columns for _ in range(schedule.num_devices)]
    for event in sorted(events, key=lambda event: (event.device, event.start)):
        first = min(round(event.start / quantum), num_columns - 1)
        last = max(first + 1, min(round(event.end / quantum), num_columns))
        grid[event.device][first] = str(event.action)
        for column in range(first + 1, last):
            grid[event.device][column] = CONTINUATION
    return grid, (
        f"{mode} simulation, column = {quantum:.4g} time units, makespan {simulation.makespan:.4g}, "
        f"bubble {simulation.bubble_fraction:.1%}"
    )


def render(
    schedule: Schedule,
    *,
    cost: Cost | None = None,
    mode: str = "lockstep",
    width: int | None = None,
) -> str:
    """A text chart of `schedule`: rows are devices, columns time steps, `.` idle.

    Args:
      schedule: the schedule to draw.
      cost: when given (or when `mode` is not "lockstep"), the actions are laid out on the timeline of
        `simulate(schedule, cost, mode)`: each column is one time quantum (the shortest action), an
        action prints in its first column and `-` fills the rest. When None with mode "lockstep",
        one column is one tick of `pack(schedule, split=False)` (if that deadlocks, the columns are
        positions in each device's list and a note says so).
      mode: "lockstep" or "async" (the simulation mode; the default cost is used when `cost` is None).
      width: the maximum line length: header lines are wrapped, wider charts are cut after the last
        whole column that fits (at least one column is shown) and a note tells how many were left out.

    Returns:
      A header line, a legend line, a column ruler, then one line per device, e.g. `d0 | 0F0 0F1 .`.
    """
    if cost is None and mode == "lockstep":
        grid, column_meaning = _tick_grid(schedule)
    else:
        grid, column_meaning = _time_grid(schedule, cost if cost is not None else Cost(), mode)
    num_columns = max((len(row) for row in grid), default=0)
    cell_width = max([len(IDLE)] + [len(cell) for row in grid for cell in row])
    label_width = len(f"d{schedule.num_devices - 1}")
    prefix_width = label_width + 3  # "d0 | "
    shown = num_columns
    if width is not None:
        fits = (width - prefix_width + 1) // (cell_width + 1)
        shown = min(num_columns, max(1, fits))

    # From the cells, not the schedule: a simulation may run each B as I and W.
    ops_present = {
        Action.parse(part).op
        for row in grid
        for cell in row
        if cell not in (IDLE, CONTINUATION)
        for part in cell.strip("()").split(";")
    }
    legend = ", ".join(f"{op.value} {OP_NAMES[op]}" for op in Op if op in ops_present) or "no actions"
    lines = [
        _header(schedule),
        f"cell = <stage><op><microbatch>{_COMPOSITE_NOTE if schedule.has_composites else ''}: {legend}; "
        f"{IDLE} idle; {column_meaning}",
    ]
    if width is not None:
        lines = [wrapped for line in lines for wrapped in textwrap.wrap(line, width, subsequent_indent="  ")]
    ruler = [" "] * (shown * (cell_width + 1))
    for column in range(0, shown, 5):
        for offset, char in enumerate(str(column)):
            position = column * (cell_width + 1) + offset
            if position < len(ruler):
                ruler[position] = char
    lines.append(" " * prefix_width + "".join(ruler).rstrip())
    for device, row in enumerate(grid):
        padded = row + [IDLE] * (num_columns - len(row))
        cells = " ".join(cell.ljust(cell_width) for cell in padded[:shown])
        lines.append(f"{f'd{device}'.ljust(label_width)} | {cells}".rstrip())
    if shown < num_columns:
        note = (
            f"[truncated to width {width}: showing columns 0-{shown - 1} of {num_columns}; "
            f"{num_columns - shown} more not shown]"
        )
        lines.extend(textwrap.wrap(note, width, subsequent_indent="  "))
    return "\n".join(lines)


_COMPOSITE_NOTE = " ((a;b) = a and b run together)"


def _event_label(step: Cell, schedule: Schedule) -> str:
    plain = schedule.virtual == 1 and not schedule.has_routes
    labels = [f"{a.microbatch}" if plain else f"{a.microbatch}/s{a.stage}" for a in members(step)]
    return "&".join(labels)


def plot(
    simulation: Simulation | Sequence[Simulation],
    path: str | pathlib.Path,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """Draw the timeline of a simulation (or several, stacked, sharing the time axis) as a Gantt chart.

    One row per device (device 0 on top), one bar per event from its start to its end, coloured by op
    (F, B, I, W), labelled with its microbatch (`mb/s<stage>` when a device holds several stages or
    the microbatches take their own routes); a composite is one box, its top half coloured by its
    first member's op and its bottom half by its second's, labelled `a&b`;
    idle time stays blank. Each panel's title gives schedule name, p, m, v, mode, makespan and bubble
    fraction.

    Args:
      simulation: a `Simulation` or a sequence of them.
      path: the output file; its suffix picks the format (.png, .svg or .pdf). Parent folders are made.
      title: an optional title above all panels.

    Returns:
      `path` as a `pathlib.Path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = pathlib.Path(path)
    file_format = path.suffix.lower().lstrip(".")
    if file_format not in ("png", "svg", "pdf"):
        raise ValueError(f"plot writes .png, .svg or .pdf files, not {path.name!r}")
    simulations = list(simulation) if isinstance(simulation, Sequence) else [simulation]
    if not simulations:
        raise ValueError("plot needs at least one simulation")

    max_events_per_device = max(
        (sum(1 for e in sim.timeline if e.device == d) for sim in simulations for d in range(sim.schedule.num_devices)),
        default=1,
    )
    figure_width = min(40.0, max(10.0, 0.3 * max_events_per_device))
    panel_heights = [0.45 * sim.schedule.num_devices + 0.9 for sim in simulations]
    figure = Figure(figsize=(figure_width, sum(panel_heights) + (0.5 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes_column = figure.subplots(
        len(simulations), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": panel_heights}
    )[:, 0]
    longest = max(max((e.end for e in sim.timeline), default=0.0) for sim in simulations) or 1.0
    points_per_time = figure_width * 0.85 * 72 / longest
    ops_drawn: set[Op] = set()
    for axes, sim in zip(axes_column, simulations, strict=True):
        ops_drawn |= _draw_bars(axes, sim)
        _draw_labels(axes, sim, points_per_time)
        _style_panel(axes, sim, longest)
    axes_column[-1].set_xlabel("time")
    handles = [
        Patch(facecolor=OP_COLORS[op], edgecolor="black", label=f"{op.value} ({OP_NAMES[op]})")
        for op in Op
        if op in ops_drawn
    ]
    if handles:
        axes_column[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=file_format, dpi=120)
    return path


def _draw_bars(axes, sim: Simulation) -> set[Op]:
    """One bar per event on its device's row (a composite: two half-height bars in one outline); the ops drawn."""
    drawn = set()
    for op in Op:
        # (row centre, bar height) of each bar of this op: whole actions, then composite halves.
        bars = [(e, e.device, 0.8) for e in sim.timeline if isinstance(e.action, Action) and e.action.op is op]
        for e in sim.timeline:
            if isinstance(e.action, Composite):
                if e.action.first.op is op:
                    bars.append((e, e.device - 0.2, 0.4))
                if e.action.second.op is op:
                    bars.append((e, e.device + 0.2, 0.4))
        if not bars:
            continue
        drawn.add(op)
        axes.barh(
            [y for _, y, _ in bars],
            [e.end - e.start for e, _, _ in bars],
            left=[e.start for e, _, _ in bars],
            height=[h for _, _, h in bars],
            color=OP_COLORS[op],
            edgecolor="black",
            linewidth=0.4,
        )
    braided = [e for e in sim.timeline if isinstance(e.action, Composite)]
    if braided:  # one outline around both halves: the composite is one step
        axes.barh(
            [e.device for e in braided],
            [e.end - e.start for e in braided],
            left=[e.start for e in braided],
            height=0.8,
            fill=False,
            edgecolor="black",
            linewidth=1.2,
        )
    return drawn


def _draw_labels(axes, sim: Simulation, points_per_time: float) -> None:
    """Each event's microbatch label, inside its bar where it fits at 4 points or more."""
    for event in sim.timeline:
        label = _event_label(event.action, sim.schedule)
        bar_points = (event.end - event.start) * points_per_time
        font_size = min(8.0, bar_points / (0.62 * len(label) + 0.4))
        if font_size >= 4.0:
            axes.text(
                (event.start + event.end) / 2,
                event.device,
                label,
                ha="center",
                va="center",
                fontsize=font_size,
                color="white",
            )


def _style_panel(axes, sim: Simulation, longest: float) -> None:
    """Device rows, the shared time axis and the panel's title (schedule, mode, makespan, bubble)."""
    schedule = sim.schedule
    axes.set_yticks(range(schedule.num_devices), [f"device {d}" for d in range(schedule.num_devices)])
    axes.set_ylim(schedule.num_devices - 0.5, -0.5)
    axes.set_xlim(0, longest)
    axes.grid(axis="x", linewidth=0.3, alpha=0.5)
    axes.set_axisbelow(True)
    axes.set_title(
        f"{schedule.name} (p={schedule.num_devices}, m={schedule.num_microbatches}, v={schedule.virtual})"
        f" — {sim.mode}: makespan {sim.makespan:.4g}, bubble {sim.bubble_fraction:.1%}",
        fontsize=10,
    )
