"""How the executor runs a schedule, declared once, and the plan its "auto" choices resolve to.

`PipelineOptions` holds the executor's options (`remat`, `split_backward`, `overlap_sends`, `braid`,
`balance_ticks` and the `cost` that decides the "auto" ones). `jpipe.value_and_grad` takes them as keywords (its
defaults are these); the model adapters (`jpipe.models.PipelinedModel`, `PipelinedLM`) carry one
as `options`; the training config builds one (`ParallelConfig.pipeline_options`). Bad values are
refused here, when the options are made.

`PipelineOptions.plan(schedule)` resolves the "auto" choices once, with the lockstep simulator
(several simulations each), into a `PipelinePlan`: the executor builds its program from it, the
step carries it (`step.plan`), and the training loop reports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jpipe.pipeline.offload import offloaded
from jpipe.schedules.fused_ticks import balance_ticks
from jpipe.schedules.ir import Op, Schedule, members
from jpipe.schedules.recompute import with_recompute
from jpipe.schedules.simulate import Cost, best_split, simulate

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """The executor's options (see `jpipe.value_and_grad` for what each does).

    Attributes:
      remat: what a forward saves for its backward (`jpipe.pipeline.remat.apply_remat`).
      split_backward: run each B as I then W: True, False or "auto" (the faster in simulation).
      overlap_sends: send each tick's messages during the next tick: True, False or "auto" (on
        unless the simulation says slower).
      braid: run a composite's two ops in one tick, layer by layer (False: one after the other).
      balance_ticks: let a device run two ops of different microbatches in one tick where they fit
        in the tick's length (`jpipe.schedules.fused_ticks`): True, False (default) or "auto" (when
        the lockstep simulation under `cost` is faster and its simulated peak memory is at most
        `BALANCE_MEMORY_LIMIT` x that of the plan it replaces). Needs `braid`. Off by default: a braided
        tick of a `jpipe.layered` stage unrolls its layers, which costs compile time and temporary
        memory; with the default `Cost()` (F = I = W) no packing is faster anyway.
      cost: per-op costs for the "auto" choices (default `Cost()`: F=1, B=2, I=W=1); read as
        `simulate` reads it (scalars are one device stage, split over the schedule's chunks, unless
        `per="chunk"`; per-stage tuples are per logical stage).
      recompute: with `remat="full"`, run each forward's recomputation as an R op of its own, right
        before its I or B (`jpipe.schedules.recompute`); `cost.r` is its time.
      offload: which long-lived buffers live in host memory: "none" (default), "stash", "weights"
        or "all" (`jpipe.pipeline.offload`).
    """

    remat: str | Callable | None = "none"
    split_backward: bool | str = AUTO
    overlap_sends: bool | str = AUTO
    braid: bool = True
    cost: Cost | None = None
    balance_ticks: bool | str = False
    recompute: bool = False
    offload: str = "none"

    def __post_init__(self):
        offloaded(self.offload)  # a clear error for an unknown choice
        for name in ("split_backward", "overlap_sends", "balance_ticks"):
            value = getattr(self, name)
            if value != AUTO and not isinstance(value, bool):
                raise ValueError(f"{name}: expected True, False or 'auto', got {value!r}")
        if not isinstance(self.braid, bool):
            raise ValueError(f"braid: expected True or False, got {self.braid!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute: expected True or False, got {self.recompute!r}")
        if self.recompute and self.remat != "full":
            raise ValueError(
                f"recompute=True runs remat's forward recomputation as R ops: it needs remat='full', got {self.remat!r}"
            )
        if self.balance_ticks is True and not self.braid:
            raise ValueError("balance_ticks=True runs two ops in one tick: it needs braid=True, got braid=False")

    def keywords(self) -> dict:
        """The options as `jpipe.value_and_grad` keywords."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def plan(self, schedule: Schedule) -> PipelinePlan:
        """The options with their "auto" choices resolved for `schedule` (simulations: once, here)."""
        if self.recompute:
            schedule = with_recompute(schedule)
        split = resolve_split(schedule, self.split_backward, self.cost)
        overlap = resolve_overlap(schedule, self.overlap_sends, self.cost, split=split)
        if self.balance_ticks is False or not self.braid:
            return PipelinePlan(self, split=split, overlap=overlap, schedule=schedule)
        balanced = balance_ticks(schedule, self.cost, send_latency=int(overlap))
        if self.balance_ticks == AUTO and not _fits(balanced.schedule, schedule, self.cost, split, overlap):
            return PipelinePlan(self, split=split, overlap=overlap, schedule=schedule)
        if balanced.fused:
            return PipelinePlan(self, split=True, overlap=overlap, schedule=balanced.schedule, balanced=True)
        # Nothing packed (no two ops fit in a tick): the plain plan, B whole where that is faster.
        return PipelinePlan(self, split=split, overlap=overlap, schedule=schedule)


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """What the executor runs: the options, with "auto" resolved.

    Attributes:
      options: as given.
      split: whether each B runs as I then W (schedules written with I and W always run them split).
      overlap: whether sends are hidden behind the next tick's compute (`send_latency=1`).
      schedule: the schedule the executor runs: the one given, or its cost-balanced packing.
      balanced: whether `schedule` is a cost-balanced packing (`jpipe.schedules.fused_ticks`).
    """

    options: PipelineOptions
    split: bool
    overlap: bool
    schedule: Schedule | None = None
    balanced: bool = False

    def describe(self) -> str:
        """One line, e.g. "backward split into I and W (auto), sends overlapped (auto)"."""

        def how(value, option) -> str:
            return f"{value} (auto)" if option == AUTO else value

        if self.schedule is not None and _writes_split(self.schedule):
            split = "split into I and W (as written)"
        else:
            split = how("split into I and W" if self.split else "whole", self.options.split_backward)
        sends = how("overlapped" if self.overlap else "exposed", self.options.overlap_sends)
        text = f"backward {split}, sends {sends}"
        if self.balanced:
            text += f", ticks {how('cost-balanced', self.options.balance_ticks)}"
        return text


def _writes_split(schedule: Schedule) -> bool:
    """Whether the schedule itself holds I or W actions (it runs them split whatever `split` says)."""
    return any(action.op in (Op.I, Op.W) for row in schedule.actions for step in row for action in members(step))


BALANCE_MEMORY_LIMIT = 1.25
"""`balance_ticks="auto"` keeps a packing only within this factor of the replaced plan's peak memory."""


def _fits(fused: Schedule, schedule: Schedule, cost: Cost | None, split: bool, overlap: bool) -> bool:
    """Whether `fused` needs at most `BALANCE_MEMORY_LIMIT` x the simulated peak memory of `schedule` run
    with `split` (stash plus weight residuals, `Cost.weight_residuals`): under remat a split backward
    holds weight residuals many times a stash, which "auto" must not add silently."""

    def peak(s: Schedule, split_backward: bool) -> float:
        sim = simulate(s, cost, "lockstep", split_backward=split_backward, send_latency=int(overlap))
        return max(sim.peak_memory, default=0.0)

    return peak(fused, True) <= BALANCE_MEMORY_LIMIT * peak(schedule, split) + 1e-12


def resolve_split(schedule: Schedule, split_backward: bool | str, cost: Cost | None = None) -> bool:
    """The executor's `split_backward` option as a bool ("auto": the faster one in simulation)."""
    if split_backward == AUTO:
        return best_split(schedule, cost)
    if not isinstance(split_backward, bool):
        raise ValueError(f"split_backward: expected True, False or 'auto', got {split_backward!r}")
    return split_backward


def resolve_overlap(schedule: Schedule, overlap_sends: bool | str, cost: Cost | None = None, *, split: bool) -> bool:
    """The executor's `overlap_sends` option as a bool ("auto": on unless the simulation says slower).

    Compares the lockstep makespan with hidden sends (`send_latency=1`: each tick lasts
    `max(compute, cost.comm)`, cross-device results take one more tick) against exposed sends (each
    sending tick lasts `compute + cost.comm`).
    """
    if overlap_sends == AUTO:
        hidden = simulate(schedule, cost, "lockstep", split_backward=split, send_latency=1).makespan
        exposed = simulate(schedule, cost, "lockstep", split_backward=split).makespan
        return hidden <= exposed
    if not isinstance(overlap_sends, bool):
        raise ValueError(f"overlap_sends: expected True, False or 'auto', got {overlap_sends!r}")
    return overlap_sends
