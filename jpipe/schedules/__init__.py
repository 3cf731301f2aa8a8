"""jpipe.schedules: pipeline schedules as data — build, validate, simulate, draw, CSV.

This package imports no jax and no flax.
"""

from jpipe.schedules.csv_io import from_csv, to_csv
from jpipe.schedules.generators import SCHEDULES, build, register
from jpipe.schedules.ir import Action, B, F, I, Op, Schedule, ScheduleError, W, loop_placement, v_placement
from jpipe.schedules.render import plot, render
from jpipe.schedules.simulate import Cost, Event, Simulation, best_split, peak_memory, simulate
from jpipe.schedules.ticks import TickTable, pack, split_backward
from jpipe.schedules.validate import validate

__all__ = [
    "B",
    "F",
    "I",
    "W",
    "Action",
    "Cost",
    "Event",
    "Op",
    "SCHEDULES",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "TickTable",
    "best_split",
    "build",
    "from_csv",
    "loop_placement",
    "pack",
    "peak_memory",
    "plot",
    "register",
    "render",
    "simulate",
    "split_backward",
    "to_csv",
    "v_placement",
    "validate",
]
