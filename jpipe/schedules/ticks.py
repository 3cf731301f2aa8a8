"""Packing per-device action lists into lockstep ticks, shared by the simulator and the executor.

An SPMD program advances all devices together: in each tick every device runs at most one action,
then all devices exchange messages. Data produced in tick `t` is usable from tick `t + 1`. A tick
lasts as long as its slowest action, so mixing a forward with a full backward in one tick wastes
time; running each B as I then W (one op per device per tick) evens the ticks out. With unit F and
I = W = F, this packing makes every named schedule exactly as fast in lockstep as an event-driven
(async) run of the same split schedule (and gpipe/1f1b 5% faster than async with whole B's, since W
leaves the critical path). Without the split, ticks mixing F and B cost a B: 1f1b at p=4, m=16 takes
72 instead of 57.

Composites (`jpipe.schedules.ir.Composite`, two actions a device runs together): `pack` flattens
each into its two actions in consecutive ticks (first, then second) unless asked to keep them:
that is how the executor runs them with `braid=False`, one op after the other.
`pack(..., keep_composites=True)` gives each composite one tick: the braided step the lockstep
simulator times (`jpipe.schedules.simulate`) and the executor runs by default
(`jpipe.pipeline.compile_program(..., braid=True)`).
"""

from __future__ import annotations

import dataclasses

from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import Action, Cell, Composite, Op, Schedule, ScheduleError, members


def split_backward(schedule: Schedule) -> Schedule:
    """The same schedule with every full backward `B` replaced by `I` followed directly by `W`.

    A composite holding a B keeps the I in its place and is followed by the W (by both W's, first
    member's first, when both members are B's).
    """
    rows = []
    for row in schedule.actions:
        new_row: list[Cell] = []
        for step in row:
            weights = [Action(a.stage, Op.W, a.microbatch) for a in members(step) if a.op is Op.B]
            if isinstance(step, Composite):
                first, second = (Action(a.stage, Op.I, a.microbatch) if a.op is Op.B else a for a in step.actions)
                new_row.append(Composite(first, second))
            elif step.op is Op.B:
                new_row.append(Action(step.stage, Op.I, step.microbatch))
            else:
                new_row.append(step)
            new_row.extend(weights)
        rows.append(tuple(new_row))
    return dataclasses.replace(schedule, actions=tuple(rows))


@dataclasses.dataclass(frozen=True)
class TickTable:
    """A schedule packed into lockstep ticks.

    Attributes:
      schedule: the schedule that was packed (with B split into I, W when `split` was requested, and
        composites flattened unless they were kept).
      ticks: `ticks[t][device]` is the action (or kept composite) that device runs in tick `t`, or
        None when idle.
    """

    schedule: Schedule
    ticks: tuple[tuple[Cell | None, ...], ...]

    @property
    def num_ticks(self) -> int:
        return len(self.ticks)

    def tick_of(self) -> dict[Action, int]:
        """Map each action (each member of a kept composite) to its tick."""
        return {a: t for t, row in enumerate(self.ticks) for step in row if step is not None for a in members(step)}


def pack(schedule: Schedule, *, split: bool = True, send_latency: int = 0, keep_composites: bool = False) -> TickTable:
    """Assign every action the earliest tick its device order and data dependencies allow.

    The dependencies follow each microbatch's route (`jpipe.schedules.deps.dependencies`).
    Composites are flattened first (first member, then second, in consecutive ticks, one op per
    device per tick: the executor's `braid=False`) unless `keep_composites` gives each one tick (the
    executor's default, braided).

    Args:
      schedule: a schedule that passes `validate`.
      split: run each B as I then W in consecutive ticks (recommended: equal-cost ticks).
      send_latency: extra ticks a result takes to reach another device. 0: produced in tick t,
        usable there from tick t + 1. 1: the message travels while tick t + 1 computes (sends
        hidden behind compute) and is usable from tick t + 2. Results used on their own device are
        always usable from the next tick.
      keep_composites: give each composite one tick instead (both members start there and their
        results are usable from the next tick, as for an action): the braided step.

    Returns:
      The tick table. Raises ScheduleError if the per-device orders deadlock.
    """
    if not keep_composites:
        schedule = schedule.flattened()
    if split:
        schedule = split_backward(schedule)
    if isinstance(send_latency, bool) or not isinstance(send_latency, int) or send_latency < 0:
        raise ValueError(f"send_latency: expected an integer >= 0, got {send_latency!r}")
    deps = dependencies(schedule)
    placement = schedule.placement

    def ready_at(producer: Action, consumer: Action) -> int:
        remote = placement[producer.stage] != placement[consumer.stage]
        return tick[producer] + 1 + (send_latency if remote else 0)

    tick: dict[Action, int] = {}
    cursor = [0] * schedule.num_devices
    next_free = [0] * schedule.num_devices
    remaining = sum(len(row) for row in schedule.actions)
    while remaining:
        progressed = False
        for device, row in enumerate(schedule.actions):
            while cursor[device] < len(row):
                step = members(row[cursor[device]])
                needed = [(d, action) for action in step for d in deps[action]]
                if any(d not in tick for d, _ in needed):
                    break
                start = max([next_free[device]] + [ready_at(d, action) for d, action in needed])
                tick.update((action, start) for action in step)
                next_free[device] = start + 1
                cursor[device] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = [str(row[cursor[d]]) for d, row in enumerate(schedule.actions) if cursor[d] < len(row)]
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks: blocked actions {blocked}")
    num_ticks = max(tick.values(), default=-1) + 1
    grid: list[list[Cell | None]] = [[None] * schedule.num_devices for _ in range(num_ticks)]
    for device, row in enumerate(schedule.actions):
        for step in row:
            at = tick[members(step)[0]]
            if grid[at][device] is not None:
                raise ScheduleError(f"action {step} appears twice (validate the schedule before packing)")
            grid[at][device] = step
    return TickTable(schedule=schedule, ticks=tuple(tuple(row) for row in grid))
