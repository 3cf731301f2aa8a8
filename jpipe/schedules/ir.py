"""Schedule IR: actions on (logical stage, microbatch) and per-device ordered action lists.

Every logical stage lives on exactly one device (`placement`). Two optional fields generalise the
pipeline beyond "every microbatch runs every stage in order":
  - `model_stage`: which part of the model (which block of layers) each logical stage computes.
    Logical stages computing the same model stage are *replicas*: copies on different devices that
    share parameters (BitPipe and DualPipe run two pipelines in opposite directions over the same
    devices, each device holding copies of two model stages). Default: logical stage s computes
    model stage s.
  - `routes`: per microbatch, the logical stages it visits, in order (SkipPipe lets microbatches
    skip and reorder stages; BitPipe and DualPipe send half of them through the replicas).
    Default: every stage 0..S-1 in order.
Code that needs the stage after or before another one on a microbatch's way asks the schedule
(`next_stage`, `prev_stage`), never `stage + 1`.

A device's row holds actions and, optionally, *composites* (`Composite`): two actions of different
microbatches that the device runs together (one cell of its row), braided so that each one's tensor-parallel
all-reduce runs under the other's compute (STP's braided blocks, DualPipe's overlapped F&B pairs,
torch.pipelining's `(0F7;7B3)OVERLAP_F_B` cells). Code that wants one action at a time reads
`Schedule.flat_actions(device)` or `Schedule.flattened()`; schedules without composites are unchanged.

A schedule is plain, immutable data. Nothing here imports jax: researchers design, validate and
simulate schedules anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import re


class ScheduleError(ValueError):
    """A schedule, or the arguments that build one, break a rule; the message names what and where."""


class Op(str, enum.Enum):
    """Pipeline operations, with torch.pipelining's letters.

    F: forward of one stage on one microbatch.
    B: full backward (input gradient and weight gradient together).
    I: input-gradient half of the backward (what the previous stage waits for).
    W: weight-gradient half of the backward (nobody waits for it; fills bubbles).
    R: recomputation of a forward (jpipe's own; not in torch.pipelining): with rematerialisation, the
       forward's residuals rebuilt from its stashed input in an op of their own, before its I or B
       (`jpipe.schedules.recompute`), so that I and B no longer carry the recomputation.
    """

    F = "F"
    B = "B"
    I = "I"  # noqa: E741  (the letter is torch.pipelining's, kept for CSV compatibility)
    W = "W"
    R = "R"

    def __str__(self) -> str:
        return self.value


_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIWR])\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    """One operation `op` of logical stage `stage` on microbatch `microbatch`.

    Printed as torch.pipelining does: `f"{stage}{op}{microbatch}"`, e.g. `2I1`.
    """

    stage: int
    op: Op
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse `"2I1"` into `Action(stage=2, op=Op.I, microbatch=1)`."""
        match = _ACTION_RE.match(text)
        if match is None:
            raise ScheduleError(f"cannot parse action {text!r}: expected '<stage><F|B|I|W><microbatch>'")
        return cls(int(match.group(1)), Op(match.group(2)), int(match.group(3)))


@dataclasses.dataclass(frozen=True)
class Composite:
    """Two actions of different microbatches that one device runs together, in one cell of its row.

    The two computations are braided: the device computes one while the tensor-parallel all-reduce
    of the other is in flight (`jpipe.schedules.simulate.Cost.duration` states the time model).
    Both members must live on the device whose row holds the composite and belong to different
    microbatches; since every data dependency links two actions of one microbatch, neither member
    then needs the other's result (`jpipe.schedules.validate`). The cell starts when the inputs of
    both members are there and both results are ready when it ends. `first` and `second` give
    the order in which code that runs one action at a time (`flatten`; the executor with
    `braid=False`) runs them; braided, the executor runs both in one tick, layer by layer.

    Printed as torch.pipelining prints its overlapped pairs, without the type: `(0F7;7B3)`.
    """

    first: Action
    second: Action

    @property
    def actions(self) -> tuple[Action, Action]:
        """`(first, second)`."""
        return (self.first, self.second)

    def __str__(self) -> str:
        return f"({self.first};{self.second})"

    def __repr__(self) -> str:
        return f"Composite{self}"


Cell = Action | Composite
"""One element of a device's row: an action, or a composite of two actions run together."""


def members(step: Cell) -> tuple[Action, ...]:
    """The actions of one row element: `(action,)` for an action, `(first, second)` for a composite."""
    return step.actions if isinstance(step, Composite) else (step,)


def flatten(row: tuple[Cell, ...] | list[Cell]) -> tuple[Action, ...]:
    """A row with every composite replaced by its two actions, first then second."""
    return tuple(action for step in row for action in members(step))


def F(stage: int, microbatch: int) -> Action:  # noqa: N802
    return Action(stage, Op.F, microbatch)


def B(stage: int, microbatch: int) -> Action:  # noqa: N802
    return Action(stage, Op.B, microbatch)


def I(stage: int, microbatch: int) -> Action:  # noqa: N802, E743
    return Action(stage, Op.I, microbatch)


def W(stage: int, microbatch: int) -> Action:  # noqa: N802
    return Action(stage, Op.W, microbatch)


def loop_placement(num_devices: int, virtual: int) -> tuple[int, ...]:
    """Interleaved placement: stage `d + k * num_devices` lives on device `d`."""
    return tuple(stage % num_devices for stage in range(num_devices * virtual))


def v_placement(num_devices: int) -> tuple[int, ...]:
    """V placement (ZB-V, DualPipeV): device `d` holds stages `d` and `2 * num_devices - 1 - d`."""
    return tuple(range(num_devices)) + tuple(reversed(range(num_devices)))


def _index(value: object) -> object:
    """`value` as a Python int when it is an integer (numpy's too); anything else unchanged."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _int_tuple(value: object) -> object:
    """A list/tuple/range as a tuple of `_index`-ed items; anything else unchanged (validate reports it)."""
    if isinstance(value, (list, tuple, range)):
        return tuple(_index(item) for item in value)
    return value


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: which device runs which action, in which order.

    Attributes:
      num_devices: pipeline devices `p`.
      num_microbatches: microbatches `m` per step.
      placement: `placement[stage]` is the device holding that logical stage; its length is the
        number of logical stages `p * virtual`.
      actions: `actions[device]` is that device's ordered tuple of steps: actions, or `Composite`s
        of two actions run together (`flat_actions` gives the actions one by one).
      name: a label for printing; the executor never reads it.
      model_stage: `model_stage[stage]` is the model stage (block of layers) logical stage `stage`
        computes; logical stages with the same model stage are replicas sharing parameters, each on
        its own device. None (the default, also what an identity tuple becomes) means stage s
        computes model stage s.
      routes: `routes[microbatch]` is the tuple of logical stages that microbatch visits, in order:
        its forward runs them first to last and its backward last to first. None (the default,
        also what a tuple of full in-order routes becomes) means every microbatch visits every
        stage in order.
    """

    num_devices: int
    num_microbatches: int
    placement: tuple[int, ...]
    actions: tuple[tuple[Cell, ...], ...]
    name: str = "custom"
    model_stage: tuple[int, ...] | None = None
    routes: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement", tuple(int(d) for d in self.placement))
        object.__setattr__(self, "actions", tuple(tuple(row) for row in self.actions))
        num_stages = len(self.placement)
        if self.model_stage is not None:
            model_stage = _int_tuple(self.model_stage)
            object.__setattr__(self, "model_stage", None if model_stage == tuple(range(num_stages)) else model_stage)
        if self.routes is not None:
            routes = (
                tuple(_int_tuple(route) for route in self.routes)
                if isinstance(self.routes, (list, tuple))
                else self.routes
            )
            full = tuple(range(num_stages))
            if isinstance(routes, tuple) and len(routes) == self.num_microbatches and all(r == full for r in routes):
                routes = None
            object.__setattr__(self, "routes", routes)

    @property
    def num_stages(self) -> int:
        """Logical stages `S = p * virtual`."""
        return len(self.placement)

    @property
    def virtual(self) -> int:
        """Stages (chunks) per device; `num_stages // num_devices`."""
        return self.num_stages // self.num_devices

    def stages_of(self, device: int) -> tuple[int, ...]:
        """Logical stages on `device`, in increasing order (the device's local chunk order)."""
        return tuple(s for s, d in enumerate(self.placement) if d == device)

    def local_index(self, stage: int) -> int:
        """Position of `stage` among the stages of its device (its local chunk index)."""
        return self.stages_of(self.placement[stage]).index(stage)

    @property
    def split_backward(self) -> bool:
        """Whether any backward is split into I and W."""
        return any(a.op in (Op.I, Op.W) for row in self.actions for a in flatten(row))

    # --- composites -----------------------------------------------------------------------------

    @property
    def has_composites(self) -> bool:
        """Whether some row holds a `Composite` (two actions run together)."""
        return any(isinstance(step, Composite) for row in self.actions for step in row)

    def flat_actions(self, device: int) -> tuple[Action, ...]:
        """`device`'s actions one by one, each composite as its first then its second member."""
        return flatten(self.actions[device])

    def flattened(self) -> Schedule:
        """The same schedule with every composite replaced by its two actions (first, then second).

        Returns `self` when there is no composite.
        """
        if not self.has_composites:
            return self
        rows = tuple(flatten(row) for row in self.actions)
        return dataclasses.replace(self, actions=rows)

    # --- model stages and replicas ------------------------------------------------------------

    @property
    def num_model_stages(self) -> int:
        """Distinct model stages (blocks of layers); `num_stages` when there are no replicas."""
        return self.num_stages if self.model_stage is None else len(set(self.model_stage))

    def model_stage_of(self, stage: int) -> int:
        """The model stage logical stage `stage` computes."""
        return stage if self.model_stage is None else self.model_stage[stage]

    def replicas(self, model_stage: int) -> tuple[int, ...]:
        """The logical stages computing `model_stage` (its replicas), in increasing order."""
        if self.model_stage is None:
            return (model_stage,) if 0 <= model_stage < self.num_stages else ()
        return tuple(s for s, k in enumerate(self.model_stage) if k == model_stage)

    @property
    def has_replicas(self) -> bool:
        """Whether some model stage is computed by more than one logical stage."""
        return self.num_model_stages < self.num_stages

    # --- routes -------------------------------------------------------------------------------

    @property
    def has_routes(self) -> bool:
        """Whether some microbatch's route is not every stage in order."""
        return self.routes is not None

    @property
    def is_plain(self) -> bool:
        """No model-stage map and no routes: the schedules torch.pipelining (and its CSV) express."""
        return self.model_stage is None and self.routes is None

    @functools.cached_property
    def _route_positions(self) -> tuple[dict[int, int], ...]:
        return tuple({stage: hop for hop, stage in enumerate(route)} for route in self.routes or ())

    def route(self, microbatch: int) -> tuple[int, ...]:
        """The logical stages `microbatch` visits, in forward order."""
        if self.routes is None:
            return tuple(range(self.num_stages))
        return self.routes[microbatch]

    def hop(self, stage: int, microbatch: int) -> int | None:
        """The position of `stage` on `microbatch`'s route (0 for its first stage); None if off it."""
        if self.routes is None:
            return stage if 0 <= stage < self.num_stages else None
        return self._route_positions[microbatch].get(stage)

    def on_route(self, stage: int, microbatch: int) -> bool:
        """Whether `microbatch` visits `stage`."""
        return self.hop(stage, microbatch) is not None

    def _hop_or_raise(self, stage: int, microbatch: int) -> int:
        hop = self.hop(stage, microbatch)
        if hop is None:
            raise ScheduleError(
                f"stage {stage} is not on microbatch {microbatch}'s route {format_route(self.route(microbatch))}"
            )
        return hop

    def next_stage(self, stage: int, microbatch: int) -> int | None:
        """The stage `microbatch` visits after `stage` (its forward's consumer); None at its last hop.

        Raises ScheduleError when `stage` is not on the microbatch's route.
        """
        hop = self._hop_or_raise(stage, microbatch)
        if self.routes is None:  # every stage in order: no route to build
            return stage + 1 if stage + 1 < self.num_stages else None
        route = self.routes[microbatch]
        return route[hop + 1] if hop + 1 < len(route) else None

    def prev_stage(self, stage: int, microbatch: int) -> int | None:
        """The stage `microbatch` visits before `stage` (its backward's consumer); None at its first hop.

        Raises ScheduleError when `stage` is not on the microbatch's route.
        """
        hop = self._hop_or_raise(stage, microbatch)
        if hop == 0:
            return None
        return stage - 1 if self.routes is None else self.routes[microbatch][hop - 1]

    def is_first_hop(self, stage: int, microbatch: int) -> bool:
        """Whether `stage` is where `microbatch` enters the pipeline (reads the input)."""
        return self._hop_or_raise(stage, microbatch) == 0

    def is_last_hop(self, stage: int, microbatch: int) -> bool:
        """Whether `stage` is where `microbatch` leaves the pipeline (computes the loss)."""
        return self._hop_or_raise(stage, microbatch) == len(self.route(microbatch)) - 1

    def __str__(self) -> str:
        lines = [
            f"Schedule {self.name!r}: {self.num_devices} devices, {self.num_stages} stages "
            f"(virtual {self.virtual}), {self.num_microbatches} microbatches"
        ]
        if self.model_stage is not None:
            lines.append("  model stages: " + " ".join(str(k) for k in self.model_stage))
        if self.routes is not None:
            lines.append("  routes: " + _format_routes(self.routes))
        for device, row in enumerate(self.actions):
            lines.append(f"  device {device}: " + " ".join(str(a) for a in row))
        return "\n".join(lines)


def format_route(route: object) -> str:
    """A route as `0 -> 1 -> 5 -> 4` (`(empty)` for none; anything else as its repr)."""
    if isinstance(route, tuple):
        return " -> ".join(str(stage) for stage in route) if route else "(empty)"
    return repr(route)


_MAX_ROUTE_GROUPS = 8


def _format_routes(routes: tuple) -> str:
    """Routes grouped over consecutive microbatches, e.g. `mb 0-1: 0>1>2; mb 2: 3>4>5`."""
    groups: list[tuple[int, int, object]] = []
    for mb, route in enumerate(routes):
        if groups and groups[-1][2] == route:
            groups[-1] = (groups[-1][0], mb, route)
        else:
            groups.append((mb, mb, route))
    parts = []
    for first, last, route in groups[:_MAX_ROUTE_GROUPS]:
        label = f"mb {first}" if first == last else f"mb {first}-{last}"
        shown = ">".join(str(s) for s in route) if isinstance(route, tuple) else repr(route)
        parts.append(f"{label}: {shown}")
    if len(groups) > _MAX_ROUTE_GROUPS:
        parts.append(f"... ({len(groups) - _MAX_ROUTE_GROUPS} more groups)")
    return "; ".join(parts)
