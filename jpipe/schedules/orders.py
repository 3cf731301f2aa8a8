"""Per-device action orders as integers, with a fast makespan and buffer memory: the search's inner loop.

`Orders` is one placement's search space: every (stage, op, microbatch) of a split-backward schedule
(F, I, W only) numbered once, with its device, time, dependencies and whether its result crosses
devices. `Orders.evaluate(rows)` gives the same makespan as `jpipe.schedules.simulate` (lockstep:
the same earliest-tick packing as `jpipe.schedules.ticks.pack` and the same tick durations; async:
the same event-driven run) and the buffer memory the executor allocates for the orders, on integer
rows, without building `Action`s. `Orders.schedule(rows)` turns rows back into a `Schedule`.

Buffer memory (what the search's memory limit bounds): the executor
(`jpipe.pipeline.program.compile_program`) gives every device one stash buffer with a slot per live
stash (from an F until the last backward op of that stage and microbatch) and one weight-residual
buffer with a slot per live weight residual (from an I until its W), each sized for its own peak;
the program is SPMD, so every device allocates the slots the busiest device needs. A device's
memory is therefore

    (max over devices of peak live stashes + weight_residuals x max over devices of peak live
     weight residuals) / virtual

in microbatch x full device stage (one chunk's stash is `1 / virtual` of it; `Cost.weight_residuals`
is a weight residual's bytes over a stash's), the same on every device. It is at least
`jpipe.schedules.peak_memory`'s count (stash plus weight residuals live at one moment, what an
allocator freeing each buffer at once would need): the two peaks may come at different moments and
on different devices. `buffer_slots` counts a `Schedule` the same way.

The space assumes the plain layout: every microbatch visits every stage in order and every stage
is its own model stage (`Schedule.is_plain`); schedules with replicas or routes are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jpipe.schedules.ir import Action, Op, Schedule
from jpipe.schedules.simulate import Cost
from jpipe.schedules.ticks import split_backward

OPS = (Op.F, Op.I, Op.W)
F_, I_, W_ = 0, 1, 2


Slots = tuple[int, int]
"""One device's (peak live stashes, peak live weight residuals), in chunks: the executor's buffer slots."""


@dataclasses.dataclass(frozen=True)
class Score:
    """A candidate's quality: `makespan` (simulated, as `simulate` reports it) and `memory` (the
    executor's buffers per device, microbatch x full device stage: `buffer_memory`). `makespan` is
    infinite when the orders deadlock."""

    makespan: float
    memory: float


def buffer_slots(schedule: Schedule) -> tuple[Slots, ...]:
    """Per device, the peak live stashes and the peak live weight residuals of its action list.

    F starts a stash; B ends it; I starts a weight residual; W ends it and the stash. Each count's
    peak is taken on its own. For a schedule of F, I and W (`split_backward(schedule)`, what the
    executor runs with `split=True`) the maxima over devices are `compile_program`'s
    `num_stash_slots` and `num_weight_slots`.
    """
    slots = []
    for row in schedule.actions:
        stash = held = top_stash = top_held = 0
        for action in row:
            if action.op is Op.F:
                stash += 1
                top_stash = max(top_stash, stash)
            elif action.op is Op.I:
                held += 1
                top_held = max(top_held, held)
            elif action.op is Op.W:
                stash, held = stash - 1, held - 1
            else:
                stash -= 1
        slots.append((top_stash, top_held))
    return tuple(slots)


def buffer_memory(slots: Sequence[Slots], weight_residuals: float, virtual: int) -> float:
    """The executor's stash and weight-residual buffers per device, in microbatch x full device stage:
    `(max stashes + weight_residuals x max weight residuals) / virtual` over `slots` (one per device)."""
    stashes = max((s for s, _ in slots), default=0)
    held = max((h for _, h in slots), default=0)
    return (stashes + weight_residuals * held) / virtual


class Orders:
    """The actions of one placement, numbered `(op * num_stages + stage) * m + microbatch`.

    Args:
      num_devices: pipeline devices `p`.
      num_microbatches: microbatches `m`.
      placement: logical stage -> device (as `Schedule.placement`).
      cost: times per op (scalar or per stage, for `len(placement)` stages), read as `simulate`
        reads them (a device `Cost` is split over the chunks; `self.cost` is the per-chunk one).
      mode: "lockstep" or "async" (as `simulate`).
      send_latency: lockstep: extra ticks for a message between devices (as `pack`).
    """

    def __init__(
        self,
        num_devices: int,
        num_microbatches: int,
        placement: tuple[int, ...],
        cost: Cost,
        mode: str = "lockstep",
        send_latency: int = 0,
    ) -> None:
        cost.check_stages(len(placement))
        self.num_devices, self.num_microbatches = num_devices, num_microbatches
        self.num_stages = len(placement)
        self.virtual = self.num_stages // num_devices
        cost = cost.chunk_cost(self.virtual)  # per chunk, as `simulate` reads it
        self.placement, self.cost, self.mode, self.send_latency = tuple(placement), cost, mode, send_latency
        stages, m = self.num_stages, num_microbatches
        size = 3 * stages * m
        self.device = [0] * size
        self.time = [0.0] * size
        self.op = [0] * size
        self.stage = [0] * size
        self.microbatch = [0] * size
        self.crosses = [False] * size
        # deps[a]: (producer, ticks after the producer's tick when a may run) pairs.
        self.deps: list[tuple[tuple[int, int], ...]] = [()] * size
        for op in range(3):
            for stage in range(stages):
                device = placement[stage]
                for mb in range(m):
                    a = self.index(op, stage, mb)
                    self.device[a], self.op[a], self.stage[a], self.microbatch[a] = device, op, stage, mb
                    self.time[a] = cost.of(OPS[op], stage)
                    needed = []
                    if op == F_ and stage > 0:
                        needed.append(self.index(F_, stage - 1, mb))
                    elif op == I_:
                        needed.append(self.index(F_, stage, mb))
                        if stage < stages - 1:
                            needed.append(self.index(I_, stage + 1, mb))
                    elif op == W_:
                        needed.append(self.index(I_, stage, mb))
                    remote = [placement[(d // m) % stages] != device for d in needed]
                    self.deps[a] = tuple((d, 1 + (send_latency if r else 0)) for d, r in zip(needed, remote))
                    if op == F_ and stage < stages - 1:
                        self.crosses[a] = placement[stage + 1] != device
                    elif op == I_ and stage > 0:
                        self.crosses[a] = placement[stage - 1] != device

    def index(self, op: int, stage: int, microbatch: int) -> int:
        """The number of action `op` (0 F, 1 I, 2 W) of `stage` on `microbatch`."""
        return (op * self.num_stages + stage) * self.num_microbatches + microbatch

    def action(self, a: int) -> Action:
        """Action number `a` as an `Action`."""
        return Action(self.stage[a], OPS[self.op[a]], self.microbatch[a])

    def rows_of(self, schedule: Schedule) -> list[list[int]]:
        """A schedule of this placement (B's are split into I, W) as integer rows."""
        if tuple(schedule.placement) != self.placement or schedule.num_microbatches != self.num_microbatches:
            raise ValueError("rows_of: the schedule's placement or microbatch count differs from this search space")
        if not schedule.is_plain:
            raise ValueError(
                f"rows_of: schedule {schedule.name!r} has replicas or per-microbatch routes; this search space "
                f"assumes every microbatch visits every stage in order"
            )
        split = split_backward(schedule)
        return [[self.index(OPS.index(a.op), a.stage, a.microbatch) for a in row] for row in split.actions]

    def schedule(self, rows: list[list[int]], name: str = "auto") -> Schedule:
        """Integer rows as a `Schedule` named `name`."""
        return Schedule(
            num_devices=self.num_devices,
            num_microbatches=self.num_microbatches,
            placement=self.placement,
            actions=tuple(tuple(self.action(a) for a in row) for row in rows),
            name=name,
        )

    # --- evaluation ---------------------------------------------------------------------------

    def slots(self, row: list[int]) -> Slots:
        """One device's peak live stashes and peak live weight residuals (`buffer_slots` of one row)."""
        stash = held = top_stash = top_held = 0
        op = self.op
        for a in row:
            kind = op[a]
            if kind == F_:
                stash += 1
                if stash > top_stash:
                    top_stash = stash
            elif kind == I_:
                held += 1
                if held > top_held:
                    top_held = held
            else:
                stash -= 1
                held -= 1
        return top_stash, top_held

    def memory_of(self, slots: Sequence[Slots]) -> float:
        """`buffer_memory` of per-device slots, with this space's weight residuals and virtual."""
        return buffer_memory(slots, self.cost.weight_residuals, self.virtual)

    def memory(self, rows: list[list[int]]) -> float:
        """The executor's buffers per device for `rows` (microbatch x full device stage)."""
        return self.memory_of([self.slots(row) for row in rows])

    def evaluate(self, rows: list[list[int]]) -> Score:
        """Makespan and buffer memory of `rows` (infinite makespan if they deadlock)."""
        return Score(self.makespan(rows), self.memory(rows))

    def makespan(self, rows: list[list[int]]) -> float:
        """The simulated makespan of `rows` in this space's mode (infinite if they deadlock)."""
        if self.mode == "lockstep":
            ticks = self.ticks(rows)
            return float("inf") if ticks is None else self._lockstep_makespan(rows, ticks)
        return self._async_makespan(rows)

    def ticks(self, rows: list[list[int]]) -> list[int] | None:
        """Each action's tick under `pack`'s earliest-tick rule (indexed by action), None on deadlock."""
        tick = [-1] * len(self.device)
        deps = self.deps
        cursor = [0] * len(rows)
        free = [0] * len(rows)
        remaining = sum(len(row) for row in rows)
        while remaining:
            progressed = False
            for device, row in enumerate(rows):
                position, start_free = cursor[device], free[device]
                while position < len(row):
                    a = row[position]
                    start = start_free
                    for producer, delay in deps[a]:
                        t = tick[producer]
                        if t < 0:
                            break
                        if t + delay > start:
                            start = t + delay
                    else:
                        tick[a] = start
                        start_free = start + 1
                        position += 1
                        continue
                    break
                if position != cursor[device]:
                    remaining -= position - cursor[device]
                    cursor[device], free[device] = position, start_free
                    progressed = True
            if not progressed:
                return None
        return tick

    def _lockstep_makespan(self, rows: list[list[int]], tick: list[int]) -> float:
        num_ticks = 1 + max((tick[a] for row in rows for a in row), default=-1)
        longest = [0.0] * num_ticks
        present = [False] * num_ticks
        sends = [False] * num_ticks
        time, crosses = self.time, self.crosses
        for row in rows:
            for a in row:
                t = tick[a]
                present[t] = True
                if time[a] > longest[t]:
                    longest[t] = time[a]
                if crosses[a]:
                    sends[t] = True
        comm = self.cost.comm
        now = makespan = 0.0
        in_flight = False
        for t in range(num_ticks):
            duration = longest[t]
            if present[t]:
                makespan = max(makespan, now + longest[t])
            if self.send_latency == 0:
                duration += comm if sends[t] else 0.0
            elif in_flight:
                duration = max(duration, comm)
            in_flight = sends[t]
            now += duration
        return makespan

    def _async_makespan(self, rows: list[list[int]]) -> float:
        end = [-1.0] * len(self.device)
        device_of, time, deps, comm = self.device, self.time, self.deps, self.cost.comm
        cursor = [0] * len(rows)
        free = [0.0] * len(rows)
        remaining = sum(len(row) for row in rows)
        while remaining:
            progressed = False
            for device, row in enumerate(rows):
                while cursor[device] < len(row):
                    a = row[cursor[device]]
                    start = free[device]
                    if any(end[producer] < 0 for producer, _ in deps[a]):
                        break
                    for producer, _ in deps[a]:
                        hop = comm if device_of[producer] != device else 0.0
                        start = max(start, end[producer] + hop)
                    end[a] = free[device] = start + time[a]
                    cursor[device] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                return float("inf")
        return max(free, default=0.0)
