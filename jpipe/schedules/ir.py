"""Schedule IR: actions on (logical stage, microbatch) and per-device ordered action lists.

A schedule is plain, immutable data. Nothing here imports jax: researchers design, validate and
simulate schedules anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import re


class ScheduleError(ValueError):
    """A schedule, or the arguments that build one, break a rule; the message names what and where."""


class Op(str, enum.Enum):
    """Pipeline operations, with torch.pipelining's letters.

    F: forward of one stage on one microbatch.
    B: full backward (input gradient and weight gradient together).
    I: input-gradient half of the backward (what the previous stage waits for).
    W: weight-gradient half of the backward (nobody waits for it; fills bubbles).
    """

    F = "F"
    B = "B"
    I = "I"  # noqa: E741  (the letter is torch.pipelining's, kept for CSV compatibility)
    W = "W"

    def __str__(self) -> str:
        return self.value


_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")


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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: which device runs which action, in which order.

    Attributes:
      num_devices: pipeline devices `p`.
      num_microbatches: microbatches `m` per step.
      placement: `placement[stage]` is the device holding that logical stage; its length is the
        number of logical stages `p * virtual`.
      actions: `actions[device]` is that device's ordered tuple of actions.
      name: a label for printing; the executor never reads it.
    """

    num_devices: int
    num_microbatches: int
    placement: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement", tuple(int(d) for d in self.placement))
        object.__setattr__(self, "actions", tuple(tuple(row) for row in self.actions))

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
        return any(a.op in (Op.I, Op.W) for row in self.actions for a in row)

    def __str__(self) -> str:
        lines = [
            f"Schedule {self.name!r}: {self.num_devices} devices, {self.num_stages} stages "
            f"(virtual {self.virtual}), {self.num_microbatches} microbatches"
        ]
        for device, row in enumerate(self.actions):
            lines.append(f"  device {device}: " + " ".join(str(a) for a in row))
        return "\n".join(lines)
