"""Import and export schedules in torch.distributed.pipelining's CSV formats.

torch writes a schedule (`PipelineScheduleMulti._dump_csv`) as one CSV row per rank, each cell one
action printed as `f"{stage}{type}{microbatch}"`, an empty cell for an idle step. Two flavours exist:

- compute only: cells `0F3` (forward), `2I1` (input gradient), `2W1` (weight gradient), `5B0` (full
  backward), and empty cells;
- compute + comms (what `_PipelineScheduleRuntime` dumps): additionally `0SEND_F1`, `4RECV_B0`,
  `0UNSHARD`, `7RESHARD`, `0REDUCE_GRAD`, and composite cells such as `(0F7;7B3)OVERLAP_F_B` (two
  computations the runtime overlaps).

`from_csv` reads both. Conventions:

- Row `r` is rank (device) `r`; the number of rows is the number of devices. Blank rows at the end of
  the text are ignored (so a trailing device without any action cannot be expressed).
- Empty cells (idle steps) are skipped: only the order of a row matters to a jpipe schedule.
- Communication and bookkeeping cells are dropped; they still take part in the placement check.
- A composite cell contributes its compute sub-actions, in the order written; with
  `from_csv(..., composites=True)` a composite cell of two compute actions becomes one
  `Composite` step instead (jpipe's braided step: the two run together).
- Placement is inferred: a stage lives on the row whose cells name it. A stage named on two rows is an
  error, and so is a stage index below the largest one that no row names.
- The number of microbatches is the largest microbatch index of a compute action plus one.
- Errors are `ScheduleError`s naming the row (rank), the 1-based column and the cell.

torch's format has no model-stage map and no per-microbatch routes: every microbatch runs every
stage in order and every stage is its own part of the model. `to_csv` therefore refuses schedules
with replicas or routes (BitPipe, DualPipe, SkipPipe) instead of writing a file that would read back
as a different schedule.

`to_csv` writes the compute-only format with `\\r\\n` line ends, as Python's `csv` module (and so torch)
does. By default each row lists the device's actions without idle cells (every valid or invalid
schedule without replicas or routes can be written, and torch reads it unchanged). With
`lockstep=True` the rows are aligned on the lockstep ticks of
`jpipe.schedules.ticks.pack(schedule, split=False)`: column `t` is tick `t`, idle ticks are empty
cells, so the file shows the timing when opened in a spreadsheet. A `Composite` step is written
as torch writes its overlapped pairs, `(0F7;7B3)OVERLAP_F_B` (one cell, one tick), so
`from_csv(to_csv(schedule), composites=True)` gives the schedule back.
"""

from __future__ import annotations

import csv
import io
import re

from jpipe.schedules.ir import Action, Cell, Composite, Op, Schedule, ScheduleError, members
from jpipe.schedules.ticks import pack

# torch's computation types that are not computations: sends, receives, FSDP bookkeeping.
_COMMUNICATION_TYPES = ("UNSHARD", "RESHARD", "REDUCE_GRAD", "SEND_F", "RECV_F", "SEND_B", "RECV_B")
# torch's container type for composite cells `(a;b)TYPE`.
_COMPOSITE_TYPES = ("OVERLAP_F_B",)

_COMPUTE_CELL = re.compile(r"(\d+)([FBIWR])(\d+)")  # R (recompute) is jpipe's own
# Longer names first so `SEND_F` is not read as something shorter.
_COMMUNICATION_CELL = re.compile(r"(\d+)(" + "|".join(sorted(_COMMUNICATION_TYPES, key=len, reverse=True)) + r")(\d*)")
_COMPOSITE_CELL = re.compile(r"\((.*)\)([A-Z_]+)")


class _CellError(Exception):
    """A cell (or part of one) that cannot be read; `from_csv` adds row and column to the message."""


def _parse_simple(text: str) -> tuple[int, Action | None]:
    """Parse one non-composite cell into (stage it names, compute action or None for a comm cell)."""
    if match := _COMPUTE_CELL.fullmatch(text):
        stage, op, microbatch = match.groups()
        return int(stage), Action(int(stage), Op(op), int(microbatch))
    if match := _COMMUNICATION_CELL.fullmatch(text):
        return int(match.group(1)), None
    raise _CellError(
        f"{text!r} is not '<stage><F|B|I|W|R><microbatch>' nor a torch communication action "
        f"('<stage><{'|'.join(_COMMUNICATION_TYPES)}>[<microbatch>]')"
    )


def _parse_cell(cell: str) -> list[tuple[int, Action | None]]:
    """Parse a cell into (stage, compute action or None) pairs; an empty cell gives no pair."""
    text = cell.strip()
    if not text:
        return []
    if text.startswith("("):
        match = _COMPOSITE_CELL.fullmatch(text)
        if match is None:
            raise _CellError("composite cell must look like '(<action>;<action>...)<TYPE>'")
        inner, container = match.groups()
        if container not in _COMPOSITE_TYPES:
            raise _CellError(f"unknown composite type {container!r} (known: {', '.join(_COMPOSITE_TYPES)})")
        parts = [part.strip() for part in inner.split(";")]
        if not all(parts):
            raise _CellError("composite cell has an empty sub-action")
        return [_parse_simple(part) for part in parts]
    return [_parse_simple(text)]


def _rows_of(text: str) -> list[list[str]]:
    """CSV rows of `text` with a UTF-8 byte-order mark and trailing blank rows removed."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    return rows


def from_csv(text: str, name: str = "csv", *, composites: bool = False) -> Schedule:
    """Read a schedule written by torch.pipelining (compute only or compute + comms) or by `to_csv`.

    Args:
      text: the CSV text, one row per rank.
      name: the name of the returned schedule.
      composites: read each `(a;b)OVERLAP_F_B` cell as one `Composite(a, b)` step (it must hold
        exactly two compute actions); by default its actions are read one after the other, as the
        executor runs them.

    Returns:
      The schedule, with placement and microbatch count inferred from the cells.

    Raises:
      ScheduleError: a cell cannot be parsed, a stage is named on two rows, a stage index is missing,
        or there is no compute action at all.
    """
    rows = _rows_of(text)
    if not rows:
        raise ScheduleError(f"CSV schedule {name!r} has no rows")
    actions: list[list[Cell]] = []
    device_of_stage: dict[int, int] = {}
    where_named: dict[int, tuple[int, str]] = {}  # stage -> (column, cell) of its first mention
    for rank, row in enumerate(rows):
        row_actions: list[Cell] = []
        for column, cell in enumerate(row, start=1):
            try:
                parsed = _parse_cell(cell)
                computed = [action for _, action in parsed if action is not None]
                braided = composites and cell.strip().startswith("(")
                if braided and len(computed) != 2:
                    raise _CellError(f"a composite step needs two compute actions, this cell has {len(computed)}")
            except _CellError as error:
                raise ScheduleError(
                    f"CSV schedule {name!r}: cannot parse row {rank} (rank {rank}), column {column}, "
                    f"cell {cell!r}: {error}"
                ) from None
            for stage, _ in parsed:
                owner = device_of_stage.setdefault(stage, rank)
                if owner != rank:
                    first_column, first_cell = where_named[stage]
                    raise ScheduleError(
                        f"CSV schedule {name!r}: stage {stage} appears on two rows: row {owner} "
                        f"(column {first_column}, cell {first_cell!r}) and row {rank} "
                        f"(column {column}, cell {cell!r})"
                    )
                where_named.setdefault(stage, (column, cell.strip()))
            if braided:
                row_actions.append(Composite(*computed))
            else:
                row_actions.extend(computed)
        actions.append(row_actions)
    compute = [action for row in actions for step in row for action in members(step)]
    if not compute:
        raise ScheduleError(f"CSV schedule {name!r} has no compute action (F, B, I or W)")
    num_stages = max(device_of_stage) + 1
    missing = [stage for stage in range(num_stages) if stage not in device_of_stage]
    if missing:
        raise ScheduleError(
            f"CSV schedule {name!r}: stages {missing} appear on no row, but stage {num_stages - 1} does"
        )
    return Schedule(
        num_devices=len(rows),
        num_microbatches=max(action.microbatch for action in compute) + 1,
        placement=tuple(device_of_stage[stage] for stage in range(num_stages)),
        actions=tuple(tuple(row) for row in actions),
        name=name,
    )


def to_csv(schedule: Schedule, *, lockstep: bool = False) -> str:
    """Write `schedule` in torch.pipelining's compute-only CSV format.

    Args:
      schedule: any schedule without a model-stage map or routes (`Schedule.is_plain`); with
        `lockstep=True` it must not deadlock.
      lockstep: align the rows on the ticks of `pack(schedule, split=False, keep_composites=True)`,
        idle ticks as empty cells (all rows then have `num_ticks` cells); otherwise each row lists
        its device's actions back to back. A composite is one `(a;b)OVERLAP_F_B` cell.

    Returns:
      The CSV text, one row per device (`\\r\\n` line ends). `from_csv` (with `composites=True`
      when the schedule has composites) reads it back to the same actions and placement, provided
      every device holds at least one stage and the last holds an action.

    Raises:
      ScheduleError: the schedule has replicas or routes, which torch's CSV cannot express.
    """
    if not schedule.is_plain:
        what = [
            name
            for name, present in (
                ("a model-stage map", schedule.model_stage is not None),
                ("per-microbatch routes", schedule.routes is not None),
            )
            if present
        ]
        raise ScheduleError(
            f"cannot write schedule {schedule.name!r} as torch.pipelining CSV: it has {' and '.join(what)}, "
            f"which the format cannot express (every microbatch runs every stage in order there)"
        )
    if lockstep:
        table = pack(schedule, split=False, keep_composites=True)
        rows = [
            ["" if tick[device] is None else _cell(tick[device]) for tick in table.ticks]
            for device in range(schedule.num_devices)
        ]
    else:
        rows = [[_cell(step) for step in row] for row in schedule.actions]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _cell(step: Cell) -> str:
    """A CSV cell: `0F3` for an action, torch's `(0F7;7B3)OVERLAP_F_B` for a composite."""
    return f"{step}{_COMPOSITE_TYPES[0]}" if isinstance(step, Composite) else str(step)
