"""jpipe.schedules: pipeline schedules as data — build, validate, simulate, search, draw, CSV.

This package imports no jax and no flax.
"""

from jpipe.schedules.balance import ModelCosts, balance_layers, stage_costs
from jpipe.schedules.bidirectional import bitpipe, dualpipe
from jpipe.schedules.braided import stp
from jpipe.schedules.controllable import v_half, v_min
from jpipe.schedules.csv_io import from_csv, to_csv
from jpipe.schedules.generators import (
    COMPOSITE_SCHEDULES,
    ROUTED_SCHEDULES,
    SCHEDULES,
    build,
    default_virtual,
    register,
)
from jpipe.schedules.ir import (
    Action,
    B,
    Composite,
    F,
    I,
    Op,
    Schedule,
    ScheduleError,
    W,
    loop_placement,
    v_placement,
)
from jpipe.schedules.orders import buffer_memory, buffer_slots
from jpipe.schedules.render import plot, render
from jpipe.schedules.routes import schedule_routes, skippipe
from jpipe.schedules.search import Named, SearchResult, pareto_front, search, search_result
from jpipe.schedules.simulate import Cost, Event, Simulation, best_split, peak_memory, simulate
from jpipe.schedules.ticks import TickTable, pack, split_backward
from jpipe.schedules.validate import validate

__all__ = [
    "B",
    "F",
    "I",
    "W",
    "Action",
    "COMPOSITE_SCHEDULES",
    "Composite",
    "Cost",
    "Event",
    "ModelCosts",
    "Op",
    "ROUTED_SCHEDULES",
    "SCHEDULES",
    "Schedule",
    "ScheduleError",
    "Named",
    "SearchResult",
    "Simulation",
    "TickTable",
    "balance_layers",
    "bitpipe",
    "best_split",
    "buffer_memory",
    "buffer_slots",
    "build",
    "default_virtual",
    "dualpipe",
    "from_csv",
    "loop_placement",
    "pack",
    "pareto_front",
    "peak_memory",
    "plot",
    "register",
    "render",
    "search",
    "search_result",
    "schedule_routes",
    "simulate",
    "skippipe",
    "stp",
    "split_backward",
    "stage_costs",
    "to_csv",
    "v_half",
    "v_min",
    "v_placement",
    "validate",
]
