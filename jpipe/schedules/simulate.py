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

Costs: a scalar `Cost` (`per="device"`, the default) gives the times of one device stage of the
model (what a device runs in a 1-chunk schedule); a schedule with `virtual` v runs each chunk op
in 1/v of them, so `Cost()` is the same model for 1f1b and for zbv. `Cost(..., per="chunk")` and
per-stage tuples give the times of each logical stage (chunk) as they are. `simulate` runs with
`cost.for_schedule(schedule)`, the per-chunk cost; everything below is per chunk.

Peak activations are counted in microbatches x full device stage (one p-th of the model, the unit of
a device `Cost`): the forward of a chunk allocates the fraction of a device stage it computes,
`1 / virtual` (`num_devices / num_model_stages` with replicas: 1 for dualpipe's chunks, each a
whole model stage); a full backward B frees it; with the split backward, I frees nothing (the weight
gradient still needs the stage's saved inputs) and W frees it. A device's peak depends only on the
order of its own list, so it is the same in both modes. Peak memory adds the weight residuals an I
keeps for its W (`Cost.weight_residuals`, relative to what an F stashes), so it also counts the
split backward of lockstep mode.

Tensor parallelism (`Cost.all_reduce`, default 0: no tensor parallelism, every time as before):
a chunk's forward and its input-gradient backward each all-reduce their activations over the
tensor-parallel group, `all_reduce` in all (STP's T_AR: the attention and MLP all-reduces of a
layer stack). Run alone, an F or an I waits for its all-reduce; a full B hides its input-gradient
all-reduce under its own weight-gradient compute (Megatron's overlap), exposing only the part
longer than `w`; a W has none. A composite (`jpipe.schedules.ir.Composite`, STP's braided block)
hides each member's all-reduce under the other member's compute (`Cost.duration`). The time a
device waits on all-reduces is its TP bubble (`Simulation.exposed_all_reduce`); the rest of its
idle time is its PP bubble (`Simulation.pp_bubble`).

Expert parallelism (`Cost.all_to_all`, default 0: no expert parallelism, every time as before): a
chunk's forward dispatches its tokens to their experts' devices and combines the outputs back (two
all-to-alls), and its input-gradient backward runs the transposed pair; `all_to_all` is one op's
dispatch + combine time. It is modelled as the all-reduce (both run on the one communication
stream, so an action's communication is `all_reduce + all_to_all`): run alone, F and I wait for
it; in a composite (DualPipe's overlapped F&B, Megatron's combined 1F1B) each member's all-to-all
runs under the other member's compute. One difference: a B run alone waits for its all-to-alls
too (no hiding under its own weight gradient), so that B alone lasts I alone + W; with that,
DeepSeek's published DualPipe bubble with overlap is what `dualpipev(overlap=True)` simulates
(`tests/test_moe_simulate.py`). `Simulation.exposed_all_to_all` is the time a device waits on
them: its exposed communication split over the two kinds in proportion to their times.

Composites run as one step (`braid=True`, the default): it starts when the inputs of both members
are there, lasts `Cost.duration(composite)`, and both results are ready at its end; in lockstep
mode it fills one tick. With `braid=False` each composite runs as its two actions one after the
other, what the executor does today (`jpipe.schedules.ticks.pack`).
"""

from __future__ import annotations

import dataclasses
import math

from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import Action, Cell, Composite, Op, Schedule, flatten, members
from jpipe.schedules.ticks import pack
from jpipe.schedules.validate import validated_dependencies

MODES = ("async", "lockstep")


Times = float | tuple[float, ...]
"""An op's time: one number for every logical stage, or a tuple with one entry per logical stage."""

_TIMED = ("f", "b", "i", "w", "r")
_COMMS = ("all_reduce", "all_to_all")
_PER_STAGE = (*_TIMED, *_COMMS)
PER = ("device", "chunk")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-op times of one microbatch, and a per-hop latency.

    What a time is the time of (`per`):
      - "device" (the default for scalar times): one device stage of the model, all of the layers
        one device runs in a 1-chunk schedule (one p-th of the model on p devices). A schedule with
        `virtual` v splits it evenly over its chunks: each chunk op of a v-chunk schedule takes
        `t / v`, so `Cost()` describes the same model whatever the schedule, and schedules with
        different `virtual` compare fairly. In general a logical stage computes one model stage
        (`Schedule.num_model_stages` of them), a fraction `p / num_model_stages` of a device
        stage: `t / v` without replicas; a replicated schedule (dualpipe: two copies of each of p
        model stages) runs each chunk op in `t`, bitpipe's (2p model stages) in `t / 2`.
      - "chunk": one logical stage (one chunk) of the schedule it is simulated with, whatever its
        `virtual` (the meaning before `per` existed; published bubble formulas are in these
        units). Per-stage tuples are always per logical stage: a `Cost` with any tuple is
        `per="chunk"`.
    `for_schedule(schedule)` (what `simulate` uses) and `chunk_cost(virtual)` give the per-chunk
    `Cost`; `of`, `at`, `duration` and `compute` read the times as given (per chunk for a
    per-chunk cost; for a device cost, the chunk of a 1-chunk schedule).

    `comm` is per message (one activation or gradient crossing devices, the same size whatever
    `virtual`): never split. `all_reduce` and `all_to_all` are split like the compute times (a
    device stage's collectives are spread over its chunks' layers). `weight_residuals` is a ratio:
    unchanged.

    Attributes:
      f: forward time.
      b: full backward time (used for B actions).
      i: input-gradient time (I actions; also the first half of a B in lockstep mode).
      w: weight-gradient time (W actions; also the second half of a B in lockstep mode).
      comm: latency added when a result crosses devices (async: per dependency edge; lockstep: per
        tick that sends anything).
      weight_residuals: memory, not time: what an I keeps for its W (the weight residuals), relative
        to what an F stashes for its backward (1). Used by `Simulation.peak_memory`.
      all_reduce: tensor-parallel all-reduce time of one chunk's forward, and the same again for its
        input-gradient backward (STP's T_AR); `f`, `b`, `i`, `w` are then compute only. Default 0.
        See `duration` for when it is exposed.
      all_to_all: expert-parallel all-to-all time of one chunk's forward (dispatch + combine), and
        the same again for its input-gradient backward (the transposed pair); compute times exclude
        it. Default 0. Exposed and hidden as `all_reduce`, except that a B run alone waits for it
        (see `duration`).
      r: recomputation time (R actions, `jpipe.schedules.recompute`): the forward rebuilding its
        residuals; in a schedule with R, `b` and `i` are then the backward without it.
      recomputed: memory, not time: what an R keeps until its I (or B) and W (the forward's full
        residuals), relative to what an F stashes (which, with R, is the stage input). Used by
        `Simulation.peak_memory`.
    Each of `f`, `b`, `i`, `w`, `all_reduce`, `all_to_all` is either one number (every logical
    stage costs the same) or a tuple with one number per logical stage (`f[s]` is stage s's
    forward; e.g. the first stage also embeds, the last also runs the head and loss); all tuples
    must have the same length, the schedule's `num_stages`. All values must be finite and >= 0.
    `jpipe.measure_costs` measures them for a real stage.
      per: "device" or "chunk" (above); default: "chunk" when some time is a per-stage tuple,
        else "device". Per-stage tuples with `per="device"` are refused.
    """

    f: Times = 1.0
    b: Times = 2.0
    i: Times = 1.0
    w: Times = 1.0
    comm: float = 0.0
    weight_residuals: float = 0.0
    all_reduce: Times = 0.0
    r: Times = 1.0
    recomputed: float = 0.0
    per: str | None = None
    all_to_all: Times = 0.0

    def __post_init__(self) -> None:
        lengths = set()
        for field in dataclasses.fields(self):
            if field.name == "per":
                continue
            value = getattr(self, field.name)
            if field.name in _PER_STAGE and isinstance(value, (tuple, list)):
                if not value:
                    raise ValueError(f"Cost.{field.name}: a per-stage tuple needs at least one stage")
                object.__setattr__(self, field.name, tuple(value))
                lengths.add(len(value))
                for stage, item in enumerate(value):
                    _check_time(item, f"Cost.{field.name}[{stage}]")
            else:
                _check_time(value, f"Cost.{field.name}")
        if len(lengths) > 1:
            per_stage = {
                name: len(getattr(self, name)) for name in _PER_STAGE if isinstance(getattr(self, name), tuple)
            }
            raise ValueError(f"Cost: per-stage tuples must have one length (the number of stages), got {per_stage}")
        per = self.per
        if per is None:
            per = "chunk" if lengths else "device"
        if per not in PER:
            raise ValueError(f"Cost.per: expected one of {PER}, got {per!r}")
        if lengths and per == "device":
            raise ValueError(
                "Cost: per-stage tuples give times per logical stage (chunk); per='device' applies to scalar times only"
            )
        object.__setattr__(self, "per", per)

    def for_schedule(self, schedule: Schedule) -> Cost:
        """The per-chunk `Cost` of `schedule`'s logical stages (what `simulate` runs it with).

        Itself when `per="chunk"`; a device cost's times (and collectives) times the fraction of a
        device stage one logical stage computes, `num_devices / num_model_stages` (`1 / virtual`
        without replicas).
        """
        return self._scaled(schedule.num_devices, schedule.num_model_stages)

    def chunk_cost(self, virtual: int) -> Cost:
        """The per-chunk `Cost` of a `virtual`-chunk schedule without replicas (`for_schedule`'s)."""
        if isinstance(virtual, bool) or not isinstance(virtual, int) or virtual < 1:
            raise ValueError(f"Cost.chunk_cost: virtual must be an int >= 1, got {virtual!r}")
        return self._scaled(1, virtual)

    def _scaled(self, devices: int, model_stages: int) -> Cost:
        """Per chunk: times `devices / model_stages` of the device stage's (exactly `t / v` when
        `model_stages = devices * v`)."""
        if self.per == "chunk":
            return self
        times = {name: getattr(self, name) * devices / model_stages for name in _PER_STAGE}
        return dataclasses.replace(self, **times, per="chunk")

    @property
    def num_stages(self) -> int | None:
        """The number of logical stages the per-stage tuples describe; None when every time is scalar."""
        for name in _PER_STAGE:
            value = getattr(self, name)
            if isinstance(value, tuple):
                return len(value)
        return None

    def of(self, op: Op, stage: int | None = None) -> float:
        """The time of one `op` action of logical stage `stage` (needed when that time is per stage)."""
        value = {Op.F: self.f, Op.B: self.b, Op.I: self.i, Op.W: self.w, Op.R: self.r}[op]
        if not isinstance(value, tuple):
            return value
        if stage is None:
            raise ValueError(f"Cost.of({op}): the {op} time is given per stage; pass the stage")
        return value[stage]

    def at(self, stage: int) -> Cost:
        """The scalar cost of logical stage `stage` (comm and weight_residuals unchanged)."""
        times = {name: self.of(Op(name.upper()), stage) for name in _TIMED}
        comms = {name: self._collective(name, stage) for name in _COMMS}
        return dataclasses.replace(self, **times, **comms)

    def all_reduce_of(self, stage: int | None = None) -> float:
        """The all-reduce time of one F (or one I, or the backward of one B) of logical stage `stage`."""
        return self._collective("all_reduce", stage)

    def all_to_all_of(self, stage: int | None = None) -> float:
        """The all-to-all time (dispatch + combine) of one F (or one I, or the backward of one B) of
        logical stage `stage`."""
        return self._collective("all_to_all", stage)

    def _collective(self, name: str, stage: int | None) -> float:
        value = getattr(self, name)
        if not isinstance(value, tuple):
            return value
        if stage is None:
            raise ValueError(f"Cost.{name}_of: the {name.replace('_', '-')} time is given per stage; pass the stage")
        return value[stage]

    def communication(self, action: Action, kind: str | None = None) -> float:
        """The collective time `action` waits for alone: all-reduce plus all-to-all (only `kind`,
        "all_reduce" or "all_to_all", when given); 0 for a W."""
        if action.op is Op.W:
            return 0.0
        return sum(self._collective(name, action.stage) for name in _COMMS if kind in (None, name))

    def compute(self, step: Cell) -> float:
        """Compute time of an action or a composite (both members'), collectives excluded."""
        return sum(self.of(action.op, action.stage) for action in members(step))

    def _alone(self, action: Action) -> float:
        """An action run by itself: compute plus the collective time it waits for."""
        if action.op is not Op.B:
            return self.of(action.op, action.stage) + self.communication(action)
        # The input-gradient all-reduce runs under B's own weight gradient; the all-to-alls do not.
        reduce = self.all_reduce_of(action.stage)
        hidden = self.of(Op.B, action.stage) + max(0.0, reduce - self.of(Op.W, action.stage))
        return hidden + self.all_to_all_of(action.stage)

    def duration(self, step: Cell) -> float:
        """Time of an action, or of a composite run as one braided step.

        Below, an action's collective time `r` is its `all_reduce + all_to_all` (`communication`).
        An action alone: F and I last compute + `r`; B lasts `b + max(0, all_reduce - w) +
        all_to_all` (its input-gradient all-reduce runs while it computes the weight gradient; its
        all-to-alls are exposed, so that B alone lasts I alone + W, as DeepSeek's formulas count
        it); W lasts `w`. With both collective times 0 this is `of(op, stage)`.

        A composite of `a` and `b` (compute `c_a`, `c_b`; collectives `r_a`, `r_b`, 0 for a W):
        the device computes one member while the other's all-reduce is in flight, on one compute
        stream and one communication stream, so the step lasts
        `max(c_a + c_b, alone(a), alone(b), r_a + r_b)`: both computes back to back; neither member
        faster than alone (its all-reduce still follows its own compute); both all-reduces back to
        back. With all-reduces no longer than the other member's compute this is `c_a + c_b`: the
        all-reduces are hidden (STP's braided block) and so are the all-to-alls (DualPipe's
        overlapped F&B, Megatron's combined 1F1B). This is a model of perfect interleaving, not a
        measurement.
        """
        if not isinstance(step, Composite):
            return self._alone(step)
        a, b = step.first, step.second
        collectives = self.communication(a) + self.communication(b)
        return max(self.compute(step), self._alone(a), self._alone(b), collectives)

    def exposed(self, step: Cell, kind: str) -> float:
        """The part of `step`'s wait on collectives (`duration - compute`) charged to `kind`
        ("all_reduce" or "all_to_all"): the whole wait split in proportion to their times."""
        if kind not in _COMMS:
            raise ValueError(f"Cost.exposed: kind must be one of {_COMMS}, got {kind!r}")
        total = sum(self.communication(action) for action in members(step))
        if total == 0:
            return 0.0
        share = sum(self.communication(action, kind) for action in members(step)) / total
        wait = self.duration(step) - self.compute(step)
        return wait if share == 1 else wait * share

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
    """`action` (an action, or a composite run as one braided step) ran on `device` from `start` to `end`.

    In lockstep mode `end - start` is the action's own duration, which may be shorter than its tick.
    """

    device: int
    action: Cell
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Simulation:
    """The result of `simulate`.

    Attributes:
      schedule: the simulated schedule (as given; lockstep events show each B as its I and W).
      cost: the per-chunk cost model it ran with (`cost.for_schedule(schedule)` of the given one).
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
      exposed_all_reduce: per device, the time its actions wait for tensor-parallel all-reduces
        (busy time minus compute time when `cost.all_to_all` is 0; all zero when `cost.all_reduce`
        is 0): the TP bubble.
      exposed_all_to_all: per device, the time its actions wait for expert-parallel all-to-alls
        (all zero when `cost.all_to_all` is 0); with both kinds, each step's wait is split over them
        in proportion to their times (`Cost.exposed`).
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
    exposed_all_reduce: tuple[float, ...] = ()
    exposed_all_to_all: tuple[float, ...] = ()

    @property
    def pp_bubble(self) -> tuple[float, ...]:
        """Per device, the time it neither computes nor waits for a collective: `makespan - busy`."""
        return tuple(self.makespan - busy for busy in self.busy)


def peak_activations(schedule: Schedule) -> tuple[float, ...]:
    """Per device, the most live activations (microbatch x full device stage) over its action list.

    F adds `1 / virtual` (a chunk's share of a device stage; `num_devices / num_model_stages` with
    replicas); B and W remove it; I changes nothing. A composite counts as its first member then its
    second.
    """
    peaks = []
    for row in schedule.actions:
        row = flatten(row)
        live = peak = 0
        for action in row:
            if action.op is Op.F:
                live += 1
                peak = max(peak, live)
            elif action.op in (Op.B, Op.W):
                live -= 1
        peaks.append(peak * schedule.num_devices / schedule.num_model_stages)
    return tuple(peaks)


def peak_memory(schedule: Schedule, weight_residuals: float = 0.0, recomputed: float = 0.0) -> tuple[float, ...]:
    """Per device, the most live stash plus weight residuals (microbatch x full device stage).

    F adds a stash of `1 / virtual` (`num_devices / num_model_stages` with replicas), B removes it;
    I adds weight residuals of `weight_residuals / virtual` (relative to a stash), W removes both. An
    R (recomputation) adds `recomputed / virtual`, which its B or W removes. A composite counts as
    its first member then its second.
    """
    has_r = any(action.op is Op.R for row in schedule.actions for action in flatten(row))
    peaks = []
    for row in schedule.actions:
        row = flatten(row)
        stash = residuals = rebuilt = 0
        peak = 0.0
        for action in row:
            if action.op is Op.F:
                stash += 1
            elif action.op is Op.R:
                rebuilt += 1
            elif action.op is Op.I:
                residuals += 1
            elif action.op is Op.B:
                stash, rebuilt = stash - 1, rebuilt - has_r
            else:
                stash, residuals, rebuilt = stash - 1, residuals - 1, rebuilt - has_r
            peak = max(peak, stash + residuals * weight_residuals + rebuilt * recomputed)
        peaks.append(peak * schedule.num_devices / schedule.num_model_stages)
    return tuple(peaks)


def best_split(schedule: Schedule, cost: Cost | None = None) -> bool:
    """Whether the lockstep executor is faster with each B run as I then W, under `cost`.

    Ties keep B whole (fewer ticks, no weight residuals). Schedules without B return False.
    """
    if not any(action.op is Op.B for row in schedule.actions for action in flatten(row)):
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
                step = row[cursor[device]]
                needed = [producer for action in members(step) for producer in deps[action]]
                if any(producer not in end for producer in needed):
                    break
                start = free[device]
                for producer in needed:
                    hop = cost.comm if placement[producer.stage] != device else 0.0
                    start = max(start, end[producer] + hop)
                finish = start + cost.duration(step)
                end.update((action, finish) for action in members(step))
                free[device] = finish
                events.append(Event(device, step, start, finish))
                cursor[device] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # unreachable after validate(); kept so a bug cannot loop forever
            raise AssertionError("async simulation made no progress")
    return events


def _simulate_lockstep(
    schedule: Schedule, cost: Cost, split_backward: bool, send_latency: int = 0
) -> tuple[list[Event], int, Schedule]:
    table = pack(schedule, split=split_backward, send_latency=send_latency, keep_composites=True)
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
        present = [(device, step) for device, step in enumerate(tick) if step is not None]
        duration = max((cost.duration(step) for _, step in present), default=0.0)
        sends = any(action in crosses for _, step in present for action in members(step))
        if send_latency == 0:
            duration += cost.comm if sends else 0.0  # exposed: the tick ends when its messages arrive
        elif in_flight:
            duration = max(duration, cost.comm)  # hidden behind this tick's compute
        in_flight = sends
        events += [Event(device, step, now, now + cost.duration(step)) for device, step in present]
        now += duration
    return events, table.num_ticks, table.schedule


def simulate(
    schedule: Schedule,
    cost: Cost | None = None,
    mode: str = "async",
    *,
    split_backward: bool = True,
    send_latency: int = 0,
    braid: bool = True,
) -> Simulation:
    """Simulate `schedule` under `cost` in `mode`.

    Args:
      schedule: any schedule; it is validated first (ScheduleError if invalid).
      cost: per-op times and per-hop latency; default `Cost()` (F=1, B=2, I=W=1 for one device
        stage: each chunk op of a v-chunk schedule takes 1/v of them). Scalars are per device stage
        unless `per="chunk"`; per-stage tuples (`schedule.num_stages` entries) are per logical
        stage. The simulation runs with `cost.for_schedule(schedule)`.
      mode: "async" (event-driven) or "lockstep" (ticks of `pack(schedule, split=split_backward)`).
      split_backward: lockstep only: run each B as I then W in two ticks (the executor's
        `split_backward=True`); with False a B is one tick (the executor's default).
      send_latency: lockstep only: extra ticks a message takes between devices (1: sends overlap
        the next tick's compute, which lasts at least `cost.comm`; see `jpipe.schedules.ticks.pack`).
        Idle ticks cost nothing.
      braid: run each composite as one braided step (one tick in lockstep mode); False runs its
        two actions one after the other, as the executor does today. No effect without composites.

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
    cost = cost.for_schedule(schedule)
    deps = validated_dependencies(schedule)
    given = schedule
    if not braid:
        schedule = schedule.flattened()
    if mode == "async":
        events, num_ticks, ran = _simulate_async(schedule, cost, deps), None, schedule
    else:
        events, num_ticks, ran = _simulate_lockstep(schedule, cost, split_backward, send_latency)
    events.sort(key=lambda event: (event.start, event.device))
    p = schedule.num_devices
    busy = [0.0] * p
    exposed = {kind: [0.0] * p for kind in _COMMS}
    first = [math.inf] * p
    last = [0.0] * p
    for event in events:
        busy[event.device] += event.end - event.start
        for kind, waits in exposed.items():
            waits[event.device] += cost.exposed(event.action, kind)
        first[event.device] = min(first[event.device], event.start)
        last[event.device] = max(last[event.device], event.end)
    makespan = max(last, default=0.0)
    spans = tuple(last[d] - first[d] if first[d] != math.inf else 0.0 for d in range(p))
    bubble = 1.0 - sum(busy) / (p * makespan) if makespan > 0 else 0.0
    return Simulation(
        schedule=given,
        cost=cost,
        mode=mode,
        makespan=makespan,
        bubble_fraction=bubble,
        busy=tuple(busy),
        peak_activations=peak_activations(schedule),
        peak_memory=peak_memory(ran, cost.weight_residuals, cost.recomputed),
        timeline=tuple(events),
        num_ticks=num_ticks,
        spans=spans,
        exposed_all_reduce=tuple(exposed["all_reduce"]),
        exposed_all_to_all=tuple(exposed["all_to_all"]),
    )
