"""Recomputation as an op of its own (R): a schedule's backward ops without the forward they redo.

With rematerialisation every backward op first recomputes its stage's forward: I costs 1.7-2.2 F on
GPT blocks (remat "full"), which makes the I ticks of a lockstep executor the slowest by far. With
R the forward recomputation of stage-microbatch (s, m) is an action `R(s, m)` of its own: F keeps
only the stage input, R rebuilds the forward's residuals from it, and I (or B) and W read them. F,
R, I and W then cost about the same, and `jpipe.schedules.fused_ticks` can pair an R with a lighter
op in one tick (Mario, PPoPP'25, places recomputation in pipeline bubbles the same way).

Memory: R's residuals (one microbatch's whole stage, as remat "none" stashes them) live from R to
the W (or B) of the same stage-microbatch: `Cost.recomputed`, relative to a stash.

`with_recompute(schedule)` puts each R right before its I or B in the device's row (before the
composite that holds it); `balance_ticks` may run it earlier, in a tick with room.
"""

from __future__ import annotations

import dataclasses

from jpipe.schedules.ir import Action, Cell, Op, Schedule, ScheduleError, members


def has_recompute(schedule: Schedule) -> bool:
    """Whether the schedule holds R actions."""
    return any(action.op is Op.R for row in schedule.actions for cell in row for action in members(cell))


def with_recompute(schedule: Schedule) -> Schedule:
    """`schedule` with `R(s, m)` right before each I or B of (s, m) in its device's row.

    Raises ScheduleError when the schedule already recomputes (it holds R actions).
    """
    if has_recompute(schedule):
        raise ScheduleError(f"schedule {schedule.name!r} already holds R (recompute) actions")
    rows = []
    for row in schedule.actions:
        new_row: list[Cell] = []
        for cell in row:
            for action in members(cell):
                if action.op in (Op.I, Op.B):
                    new_row.append(Action(action.stage, Op.R, action.microbatch))
            new_row.append(cell)
        rows.append(tuple(new_row))
    return dataclasses.replace(schedule, actions=tuple(rows), name=f"{schedule.name}+R")
