"""Cost-balanced lockstep ticks: two ops of different microbatches share a tick when they fit.

A lockstep tick lasts as long as its slowest op. With the backward split into I and W, measured ops
are not alike: with rematerialisation I carries the forward's recomputation (I = 1.7-2.2 F for GPT
blocks), and at long sequences attention's backward has no weights, so W shrinks (0.6 F at 4096
tokens). One op per device per tick then pays the slowest op in every tick: 26-55% over an
event-driven (MPMD) run of the same ops (`experiments/lockstep_tax.py`).

`fuse_ticks(schedule, cost, target)` repacks the schedule tick by tick, the way the executor
advances: in each tick every device takes its next op in row order when its inputs are there
(otherwise a W whose I has run, pulled forward: a W has no consumer, so moving it earlier never
delays another op and only frees its residuals sooner; or, in a schedule with recomputation ops,
its next R, which needs only its F: run early, its rebuilt residuals live longer). The tick then lasts
`L = max(target, slowest first op)`, and a device whose op leaves room adds a second ready op (its
next one in order, else a pulled W) of another microbatch when the two fit in `L`. A pair becomes a
`jpipe.schedules.ir.Composite`: the lockstep simulator times it as one step (`Cost.duration`: both
computes back to back) and the executor runs it in one tick, braided. Composites the schedule
already holds (STP, DualPipe's pairs) stay as they are and take no third op.

`balance_ticks(schedule, cost)` tries every `target` that matters (each single op's time and each
sum of two) and keeps the fastest packing under the lockstep simulator, or the schedule itself when
no packing is faster: the same simulator times both, and the executor runs what it returns, so the
simulator and the executor share one packing.

Memory: pulling a W forward frees its weight residuals sooner; nothing runs later than its
row order lets it, so the stash never lives longer than in the split schedule. A braided tick
keeps both ops' intermediates live at once: the executor's temp memory grows with the number of pair
kinds (`jpipe.pipeline.program.Program.pair_kinds`); `experiments/lockstep_tax.py` reports it.
"""

from __future__ import annotations

import dataclasses
import itertools

from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import Action, Cell, Composite, Op, Schedule, members
from jpipe.schedules.simulate import Cost, simulate
from jpipe.schedules.ticks import split_backward
from jpipe.schedules.validate import validate


@dataclasses.dataclass(frozen=True)
class Balanced:
    """What `balance_ticks` chose.

    Attributes:
      schedule: the schedule to run: fused (B split into I and W, pairs as composites) or the
        schedule as given when fusing is not faster.
      fused: whether `schedule` is a fused packing.
      target: the tick length the chosen packing aimed at (None when not fused).
      makespan: the lockstep makespan of `schedule` (the faster of B split and whole when not fused).
      baseline: the lockstep makespan of the schedule as given (the faster of B split and whole).
    """

    schedule: Schedule
    fused: bool
    target: float | None
    makespan: float
    baseline: float


class _Packer:
    """State of one tick-by-tick repacking (see `fuse_ticks`)."""

    def __init__(self, schedule: Schedule, cost: Cost, send_latency: int):
        self.cost = cost
        self.latency = send_latency
        self.placement = schedule.placement
        self.deps = dependencies(schedule)
        self.rows = [list(row) for row in schedule.actions]
        self.out: list[list[Cell]] = [[] for _ in schedule.actions]
        self.done: dict[Action, int] = {}

    def ready(self, cell: Cell, tick: int) -> bool:
        """Whether every input of `cell` (each member's) is usable in `tick`."""
        for action in members(cell):
            for producer in self.deps[action]:
                if producer not in self.done:
                    return False
                remote = self.placement[producer.stage] != self.placement[action.stage]
                if self.done[producer] + 1 + (self.latency if remote else 0) > tick:
                    return False
        return True

    def time(self, cell: Cell) -> float:
        return self.cost.duration(cell)

    def take(self, device: int, tick: int, fits) -> Cell | None:
        """Remove and return the device's next ready cell accepted by `fits`: next in order, else a W,
        else its first R (a recomputation may run any time after its F)."""
        row = self.rows[device]
        first_r = next((i for i, c in enumerate(row) if isinstance(c, Action) and c.op is Op.R), None)
        for index, cell in enumerate(row):
            movable = isinstance(cell, Action) and (cell.op is Op.W or index == first_r)
            if (index == 0 or movable) and fits(cell) and self.ready(cell, tick):
                return row.pop(index)
        return None

    def tick(self, tick: int, target: float) -> bool:
        """Pack one tick; return whether any device ran something."""
        firsts = {d: self.take(d, tick, lambda cell: True) for d in range(len(self.rows))}
        firsts = {d: cell for d, cell in firsts.items() if cell is not None}
        length = max([target, *(self.time(cell) for cell in firsts.values())])
        for device, first in firsts.items():
            cell: Cell = first
            if isinstance(first, Action):
                room = length - self.time(first)

                def fits(other: Cell, first=first, room=room) -> bool:
                    return (
                        isinstance(other, Action)
                        and other.microbatch != first.microbatch
                        and self.time(other) <= room + 1e-9
                    )

                second = self.take(device, tick, fits)
                if second is not None:
                    cell = Composite(first, second)
            self.out[device].append(cell)
            self.done.update((action, tick) for action in members(cell))
        return bool(firsts)


def fuse_ticks(schedule: Schedule, cost: Cost | None = None, target: float = 0.0, *, send_latency: int = 0) -> Schedule:
    """`schedule` repacked into cost-balanced ticks aiming at tick length `target` (module docstring).

    Args:
      schedule: a valid schedule; each B is split into I and W first.
      cost: per-op times (default `Cost()`); composites already in the schedule keep their place.
      target: the tick length a pair may fill (a tick is never shorter than its slowest op), in
        the per-chunk times of `cost.for_schedule(schedule)` (what `targets` lists).
      send_latency: as the executor will run it (1 with hidden sends): when a result is usable.

    Returns:
      A valid schedule with the same actions, B split, in which some ticks hold a composite.
    """
    cost = (Cost() if cost is None else cost).for_schedule(schedule)
    packer = _Packer(split_backward(schedule), cost, send_latency)
    remaining = sum(len(row) for row in packer.rows)
    tick = idle = 0
    while any(packer.rows):
        ran = packer.tick(tick, target)
        idle = 0 if ran else idle + 1
        if idle > send_latency + 1:  # unreachable for a valid schedule; guards against a bug
            raise AssertionError(f"fuse_ticks made no progress at tick {tick} ({remaining} cells)")
        tick += 1
    fused = dataclasses.replace(schedule, actions=tuple(tuple(row) for row in packer.out))
    validate(fused)
    return fused


def targets(schedule: Schedule, cost: Cost) -> list[float]:
    """Tick lengths worth trying: each op's time and each sum of two, over the schedule's stages."""
    cost = cost.for_schedule(schedule)
    times = {
        cost.duration(action) for row in split_backward(schedule).actions for cell in row for action in members(cell)
    }
    return sorted(times | {a + b for a, b in itertools.combinations_with_replacement(times, 2)})


def _lockstep(schedule: Schedule, cost: Cost, send_latency: int, split: bool = True) -> float:
    return simulate(schedule, cost, "lockstep", split_backward=split, send_latency=send_latency).makespan


def balance_ticks(schedule: Schedule, cost: Cost | None = None, *, send_latency: int = 0) -> Balanced:
    """The fastest cost-balanced packing of `schedule` under `cost`, or the schedule itself.

    Tries `fuse_ticks` at every tick length in `targets` and keeps the packing with the smallest
    lockstep makespan (ties: the smaller peak memory); returns the schedule unchanged unless that
    packing beats the faster of B split and B whole.
    """
    cost = Cost() if cost is None else cost
    cost.check_stages(schedule.num_stages)
    cost = cost.for_schedule(schedule)
    baseline = min(_lockstep(schedule, cost, send_latency, split) for split in (True, False))
    best: tuple[float, float, float, Schedule] | None = None
    for target in targets(schedule, cost):
        fused = fuse_ticks(schedule, cost, target, send_latency=send_latency)
        sim = simulate(fused, cost, "lockstep", send_latency=send_latency)
        key = (sim.makespan, max(sim.peak_memory, default=0.0), target, fused)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None or best[0] >= baseline * (1 - 1e-9):
        return Balanced(schedule, fused=False, target=None, makespan=baseline, baseline=baseline)
    return Balanced(best[3], fused=True, target=best[2], makespan=best[0], baseline=baseline)
