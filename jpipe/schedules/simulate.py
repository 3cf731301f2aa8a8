"""Simulating a schedule under a cost model: makespan, bubble, busy time, peak activations, timeline.

Two modes:
  - "async": event driven (what an MPMD runtime achieves). Each device runs its list in order and
    starts an action at `max(device free, end of each input + comm when the input was made on
    another device)`.
  - "lockstep": what the SPMD executor does. The schedule is packed into ticks with
    `jpipe.schedules.ticks.pack(schedule, split=True)` (every B runs as I then W, one action per
    device per tick); a tick lasts as long as its slowest action, plus `comm` when an action of that
    tick sends its result to another device. With `send_latency=1` (the executor's hidden sends) a
    message travels during the next tick instead, which then lasts `max(slowest action, comm)`, and
    the packing gives every cross-device result one more tick. Each event starts at its tick's start.

Both modes follow each microbatch's route (`Schedule.route`) through
`jpipe.schedules.deps.dependencies`: a forward waits for the previous stage on its route, a backward
for the next one. Replicas are ordinary logical stages here (each on its own device, each with its
own times when `Cost` is given per logical stage).

Peak activations are counted in microbatches x full device stage: the forward of a chunk allocates
`1 / virtual`; a full backward B frees it; with the split backward, I frees nothing (the weight
gradient still needs the stage's saved inputs) and W frees it. A device's peak depends only on the
order of its own list, so it is the same in both modes. Peak memory adds the weight residuals an I
keeps for its W (`Cost.weight_residuals`, relative to what an F stashes), so it also counts the
split backward of lockstep mode.
"""

from __future__ import annotations

import dataclasses
import math

from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import Action, Op, Schedule
from jpipe.schedules.ticks import pack
from jpipe.schedules.validate import validated_dependencies

MODES = ("async", "lockstep")


Times = float | tuple[float, ...]
"""An op's time: one number for every logical stage, or a tuple with one entry per logical stage."""

_TIMED = ("f", "b", "i", "w")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-op times for one logical stage (one chunk) on one microbatch, and a per-hop latency.

    Attributes:
      f: forward time.
      b: full backward time (used for B actions).
      i: input-gradient time (I actions; also the first half of a B in lockstep mode).
      w: weight-gradient time (W actions; also the second half of a B in lockstep mode).
      comm: latency added when a result crosses devices (async: per dependency edge; lockstep: per
        tick that sends anything).
      weight_residuals: memory, not time: what an I keeps for its W (the weight residuals), relative
        to what an F stashes for its backward (1). Used by `Simulation.peak_memory`.
    Each of `f`, `b`, `i`, `w` is either one number (every logical stage costs the same) or a tuple
    with one number per logical stage (`f[s]` is stage s's forward; e.g. the first stage also embeds,
    the last also runs the head and loss); all tuples must have the same length, the schedule's
    `num_stages`. All values must be finite and >= 0. `jpipe.measure_costs` measures them for a real
    stage.
    """

    f: Times = 1.0
    b: Times = 2.0
    i: Times = 1.0
    w: Times = 1.0
    comm: float = 0.0
    weight_residuals: float = 0.0

    def __post_init__(self) -> None:
        lengths = set()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _TIMED and isinstance(value, (tuple, list)):
                if not value:
                    raise ValueError(f"Cost.{field.name}: a per-stage tuple needs at least one stage")
                object.__setattr__(self, field.name, tuple(value))
                lengths.add(len(value))
                for stage, item in enumerate(value):
                    _check_time(item, f"Cost.{field.name}[{stage}]")
            else:
                _check_time(value, f"Cost.{field.name}")
        if len(lengths) > 1:
            per_stage = {name: len(getattr(self, name)) for name in _TIMED if isinstance(getattr(self, name), tuple)}
            raise ValueError(f"Cost: per-stage tuples must have one length (the number of stages), got {per_stage}")

    @property
    def num_stages(self) -> int | None:
        """The number of logical stages the per-stage tuples describe; None when every time is scalar."""
        for name in _TIMED:
            value = getattr(self, name)
            if isinstance(value, tuple):
                return len(value)
        return None

    def of(self, op: Op, stage: int | None = None) -> float:
        """The time of one `op` action of logical stage `stage` (needed when that time is per stage)."""
        value = {Op.F: self.f, Op.B: self.b, Op.I: self.i, Op.W: self.w}[op]
        if not isinstance(value, tuple):
            return value
        if stage is None:
            raise ValueError(f"Cost.of({op}): the {op} time is given per stage; pass the stage")
        return value[stage]

    def at(self, stage: int) -> Cost:
        """The scalar cost of logical stage `stage` (comm and weight_residuals unchanged)."""
        times = {name: self.of(Op(name.upper()), stage) for name in _TIMED}
        return dataclasses.replace(self, **times)

    def check_stages(self, num_stages: int) -> None:
        """Raise ValueError unless the per-stage tuples (if any) have `num_stages` entries."""
        if self.num_stages is not None and self.num_stages != num_stages:
            raise ValueError(f"cost gives times for {self.num_stages} stages, the schedule has {num_stages}")


def _check_time(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Event:
    """`action` ran on `device` from `start` to `end` (simulated time)."""

    device: int
    action: Action
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Simulation:
    """The result of `simulate`.

    Attributes:
      schedule: the simulated schedule (as given; lockstep events show each B as its I and W).
      cost: the cost model.
      mode: "async" or "lockstep".
      makespan: end of the last action (the first starts at 0).
      bubble_fraction: `1 - sum(busy) / (num_devices * makespan)` (0 when the makespan is 0).
      busy: per device, the total time spent running actions.
      peak_activations: per device, the most live activations, in microbatches x full device stage.
      peak_memory: per device, the most live activations plus weight residuals (each weighted by
        `cost.weight_residuals`), same unit; in lockstep mode with `split_backward`, of the split
        schedule the executor runs.
      timeline: every action as an `Event`, sorted by start time then device.
      num_ticks: lockstep ticks (None in async mode).
      spans: per device, end of its last action minus start of its first one; `span - busy` is the
        device's own bubble, the quantity a parallelogram-shaped schedule (ZB-H2) minimises.
    """

    schedule: Schedule
    cost: Cost
    mode: str
    makespan: float
    bubble_fraction: float
    busy: tuple[float, ...]
    peak_activations: tuple[float, ...]
    peak_memory: tuple[float, ...]
    timeline: tuple[Event, ...]
    num_ticks: int | None
    spans: tuple[float, ...]


def peak_activations(schedule: Schedule) -> tuple[float, ...]:
    """Per device, the most live activations (microbatch x full device stage) over its action list.

    F adds `1 / virtual`; B and W remove it; I changes nothing.
    """
    peaks = []
    for row in schedule.actions:
        live = peak = 0
        for action in row:
            if action.op is Op.F:
                live += 1
                peak = max(peak, live)
            elif action.op in (Op.B, Op.W):
                live -= 1
        peaks.append(peak / schedule.virtual)
    return tuple(peaks)


def peak_memory(schedule: Schedule, weight_residuals: float = 0.0) -> tuple[float, ...]:
    """Per device, the most live stash plus weight residuals (microbatch x full device stage).

    F adds a stash of `1 / virtual`, B removes it; I adds weight residuals of `weight_residuals /
    virtual` (relative to a stash), W removes both.
    """
    peaks = []
    for row in schedule.actions:
        stash = residuals = 0
        peak = 0.0
        for action in row:
            if action.op is Op.F:
                stash += 1
            elif action.op is Op.I:
                residuals += 1
            elif action.op is Op.B:
                stash -= 1
            else:
                stash, residuals = stash - 1, residuals - 1
            peak = max(peak, stash + residuals * weight_residuals)
        peaks.append(peak / schedule.virtual)
    return tuple(peaks)


def best_split(schedule: Schedule, cost: Cost | None = None) -> bool:
    """Whether the lockstep executor is faster with each B run as I then W, under `cost`.

    Ties keep B whole (fewer ticks, no weight residuals). Schedules without B return False.
    """
    if not any(action.op is Op.B for row in schedule.actions for action in row):
        return False
    split = simulate(schedule, cost, "lockstep", split_backward=True).makespan
    whole = simulate(schedule, cost, "lockstep", split_backward=False).makespan
    return split < whole


def _simulate_async(schedule: Schedule, cost: Cost, deps: dict[Action, tuple[Action, ...]]) -> list[Event]:
    placement = schedule.placement
    end: dict[Action, float] = {}
    events = []
    cursor = [0] * schedule.num_devices
    free = [0.0] * schedule.num_devices
    remaining = sum(len(row) for row in schedule.actions)
    while remaining:
        progressed = False
        for device, row in enumerate(schedule.actions):
            while cursor[device] < len(row):
                action = row[cursor[device]]
                if any(needed not in end for needed in deps[action]):
                    break
                start = free[device]
                for needed in deps[action]:
                    hop = cost.comm if placement[needed.stage] != device else 0.0
                    start = max(start, end[needed] + hop)
                finish = start + cost.of(action.op, action.stage)
                end[action] = finish
                free[device] = finish
                events.append(Event(device, action, start, finish))
                cursor[device] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # unreachable after validate(); kept so a bug cannot loop forever
            raise AssertionError("async simulation made no progress")
    return events


def _simulate_lockstep(
    schedule: Schedule, cost: Cost, split_backward: bool, send_latency: int = 0
) -> tuple[list[Event], int, Schedule]:
    table = pack(schedule, split=split_backward, send_latency=send_latency)
    placement = table.schedule.placement
    crosses = set()  # actions whose result some other device consumes
    for action, needed in dependencies(table.schedule).items():
        for producer in needed:
            if placement[producer.stage] != placement[action.stage]:
                crosses.add(producer)
    events = []
    now = 0.0
    in_flight = False  # with send_latency: whether the previous tick's sends travel during this one
    for tick in table.ticks:
        present = [(device, action) for device, action in enumerate(tick) if action is not None]
        duration = max((cost.of(action.op, action.stage) for _, action in present), default=0.0)
        sends = any(action in crosses for _, action in present)
        if send_latency == 0:
            duration += cost.comm if sends else 0.0  # exposed: the tick ends when its messages arrive
        elif in_flight:
            duration = max(duration, cost.comm)  # hidden behind this tick's compute
        in_flight = sends
        events += [Event(device, action, now, now + cost.of(action.op, action.stage)) for device, action in present]
        now += duration
    return events, table.num_ticks, table.schedule


def simulate(
    schedule: Schedule,
    cost: Cost | None = None,
    mode: str = "async",
    *,
    split_backward: bool = True,
    send_latency: int = 0,
) -> Simulation:
    """Simulate `schedule` under `cost` in `mode`.

    Args:
      schedule: any schedule; it is validated first (ScheduleError if invalid).
      cost: per-op times per logical stage (scalar, or per-stage tuples of `schedule.num_stages`
        entries) and per-hop latency; default `Cost()` (F=1, B=2, I=W=1).
      mode: "async" (event-driven) or "lockstep" (ticks of `pack(schedule, split=split_backward)`).
      split_backward: lockstep only: run each B as I then W in two ticks (the executor's
        `split_backward=True`); with False a B is one tick (the executor's default).
      send_latency: lockstep only: extra ticks a message takes between devices (1: sends overlap
        the next tick's compute, which lasts at least `cost.comm`; see `jpipe.schedules.ticks.pack`).
        Idle ticks cost nothing.

    Returns:
      A `Simulation`.

    Raises:
      ScheduleError: the schedule is invalid.
      ValueError: unknown mode, `cost` is not a `Cost`, or its per-stage times are not for
        `schedule.num_stages` stages.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cost is None:
        cost = Cost()
    if not isinstance(cost, Cost):
        raise ValueError(f"cost must be a Cost, got {cost!r}")
    cost.check_stages(schedule.num_stages)
    deps = validated_dependencies(schedule)
    if mode == "async":
        events, num_ticks, ran = _simulate_async(schedule, cost, deps), None, schedule
    else:
        events, num_ticks, ran = _simulate_lockstep(schedule, cost, split_backward, send_latency)
    events.sort(key=lambda event: (event.start, event.device))
    p = schedule.num_devices
    busy = [0.0] * p
    first = [math.inf] * p
    last = [0.0] * p
    for event in events:
        busy[event.device] += event.end - event.start
        first[event.device] = min(first[event.device], event.start)
        last[event.device] = max(last[event.device], event.end)
    makespan = max(last, default=0.0)
    spans = tuple(last[d] - first[d] if first[d] != math.inf else 0.0 for d in range(p))
    bubble = 1.0 - sum(busy) / (p * makespan) if makespan > 0 else 0.0
    return Simulation(
        schedule=schedule,
        cost=cost,
        mode=mode,
        makespan=makespan,
        bubble_fraction=bubble,
        busy=tuple(busy),
        peak_activations=peak_activations(schedule),
        peak_memory=peak_memory(ran, cost.weight_residuals),
        timeline=tuple(events),
        num_ticks=num_ticks,
        spans=spans,
    )
