"""Makespan, bubble and activation memory of every jpipe schedule, async (MPMD) vs lockstep (SPMD).

Command (from the repository root):

    .venv/bin/python experiments/schedule_table.py --out experiments/out/schedules

For p in {4, 8} devices and m in {4, 8, 16, 32} microbatches it builds every schedule registered in
`jpipe.schedules.SCHEDULES` (v=2 chunks per device for interleaved_1f1b, looped_bfs, zbv, v_half, v_min and
dualpipev, v=1 otherwise), validates it and simulates it under the cost model (default F=1, B=2,
I=1, W=1, comm=0, i.e. times per full stage) in both modes:

- async: event driven, each device starts an op as soon as its inputs have arrived (what MPMD gets);
- lockstep: ticks separated by a collective, a tick costs its slowest device (what jpipe's SPMD
  executor does).

It prints one markdown table (schedule, p, m, v, async makespan and bubble fraction, lockstep makespan
and bubble fraction, lockstep/async makespan ratio, async makespan of the same schedule with every B
split into I then W and the lockstep/that ratio, peak live activations as the maximum over devices
in microbatches x full device stage) and writes it to `<out>/schedule_table.md`, plus one async Gantt
chart per schedule at p=4, m=8 (`<out>/gantt-<name>-p4-m8.png`). Combinations a generator rejects (a
ScheduleError, e.g. dualpipev with m < 2p) are skipped and listed under the table.

Why two ratios: lockstep mode packs with `pack(split=True)`, i.e. runs each B as I then W, so the
previous stage gets its gradient after I, not after the whole B. For schedules written with full B
(gpipe, 1f1b, interleaved_1f1b, looped_bfs, naive) lockstep is therefore *faster* than async of the
schedule as written (ratio < 1): the two modes run different programs. The "split" ratio compares
like with like; with comm=0 it is 1.000 for every schedule (seen with the default costs), i.e. the
SPMD tick packing costs nothing against an MPMD runtime running the same split schedule.
The last two columns pack each B as one tick (`split_backward=False`; the executor picks the faster): ticks
that mix an F with a B then cost a B.

Expected, from DESIGN.md's oracles with the default costs: gpipe and 1f1b have async bubble
(p-1)/(m+p-1) and makespan (m+p-1)(F+B); zb_h1 makespan m(F+I+W)+(p-1)(F+I-W); peak activations
m for gpipe and looped_bfs, p for 1f1b, zb_h1 and zbv, 2p-1 for zb_h2, p+(p-1)/v for interleaved_1f1b.

Flags: --out DIR (default experiments/out/schedules), --cost f,b,i,w,comm (default 1,2,1,1,0).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Sequence

from jpipe.schedules import SCHEDULES, Cost, ScheduleError, build, plot, simulate, split_backward, validate

DEVICE_COUNTS = (4, 8)
MICROBATCH_COUNTS = (4, 8, 16, 32)
VIRTUAL_BY_NAME = {"interleaved_1f1b": 2, "looped_bfs": 2, "zbv": 2, "dualpipev": 2, "v_half": 2, "v_min": 2}
GANTT_DEVICES, GANTT_MICROBATCHES = 4, 8
COLUMNS = (
    "schedule",
    "p",
    "m",
    "v",
    "async makespan",
    "async bubble",
    "lockstep makespan",
    "lockstep bubble",
    "lockstep/async",
    "async makespan, B split",
    "lockstep/async split",
    "lockstep, B whole",
    "B whole/async",
    "peak activations",
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str
    num_devices: int
    num_microbatches: int
    virtual: int
    async_makespan: float
    async_bubble: float
    lockstep_makespan: float
    lockstep_bubble: float
    async_split_makespan: float
    lockstep_whole_makespan: float
    peak_activations: float

    def cells(self) -> tuple[str, ...]:
        return (
            self.name,
            str(self.num_devices),
            str(self.num_microbatches),
            str(self.virtual),
            f"{self.async_makespan:g}",
            f"{self.async_bubble:.3f}",
            f"{self.lockstep_makespan:g}",
            f"{self.lockstep_bubble:.3f}",
            f"{self.lockstep_makespan / self.async_makespan:.3f}",
            f"{self.async_split_makespan:g}",
            f"{self.lockstep_makespan / self.async_split_makespan:.3f}",
            f"{self.lockstep_whole_makespan:g}",
            f"{self.lockstep_whole_makespan / self.async_makespan:.3f}",
            f"{self.peak_activations:g}",
        )


def parse_cost(text: str) -> Cost:
    """`"1,2,1,1,0"` -> Cost(f=1, b=2, i=1, w=1, comm=0, per="chunk"): times per chunk (a v = 2
    schedule runs a model twice the size of a v = 1 one; halve its makespans for the same model)."""
    values = [float(part) for part in text.split(",")]
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"--cost needs 5 comma-separated numbers f,b,i,w,comm, got {text!r}")
    f, b, i, w, comm = values
    return Cost(f=f, b=b, i=i, w=w, comm=comm, per="chunk")


def max_over_devices(per_device: object) -> float:
    """The largest value of a per-device quantity given as a sequence, a mapping or a number."""
    if isinstance(per_device, dict):
        return float(max(per_device.values()))
    if isinstance(per_device, Sequence):
        return float(max(per_device))
    return float(per_device)  # type: ignore[arg-type]


def measure(name: str, num_devices: int, num_microbatches: int, cost: Cost) -> Row:
    """Build, validate and simulate one schedule in both modes. Raises ScheduleError if rejected."""
    virtual = VIRTUAL_BY_NAME.get(name, 1)
    schedule = build(name, num_devices, num_microbatches, virtual)
    validate(schedule)
    asynchronous = simulate(schedule, cost, "async")
    lockstep = simulate(schedule, cost, "lockstep")
    asynchronous_split = simulate(split_backward(schedule), cost, "async")
    return Row(
        name=name,
        num_devices=num_devices,
        num_microbatches=num_microbatches,
        virtual=virtual,
        async_makespan=asynchronous.makespan,
        async_bubble=asynchronous.bubble_fraction,
        lockstep_makespan=lockstep.makespan,
        lockstep_bubble=lockstep.bubble_fraction,
        async_split_makespan=asynchronous_split.makespan,
        lockstep_whole_makespan=simulate(schedule, cost, "lockstep", split_backward=False).makespan,
        peak_activations=max_over_devices(asynchronous.peak_activations),
    )


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/schedules"))
    parser.add_argument("--cost", type=parse_cost, default=Cost(f=1, b=2, i=1, w=1, comm=0, per="chunk"))
    args = parser.parse_args(argv)
    cost: Cost = args.cost
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    skipped: list[str] = []
    for num_devices in DEVICE_COUNTS:
        for num_microbatches in MICROBATCH_COUNTS:
            for name in SCHEDULES:
                try:
                    rows.append(measure(name, num_devices, num_microbatches, cost))
                except ScheduleError as error:
                    virtual = VIRTUAL_BY_NAME.get(name, 1)
                    skipped.append(f"{name} p={num_devices} m={num_microbatches} v={virtual}: {error}")

    charts = []
    for name in SCHEDULES:
        virtual = VIRTUAL_BY_NAME.get(name, 1)
        try:
            schedule = build(name, GANTT_DEVICES, GANTT_MICROBATCHES, virtual)
        except ScheduleError as error:
            skipped.append(f"chart {name}: {error}")
            continue
        path = out / f"gantt-{name}-p{GANTT_DEVICES}-m{GANTT_MICROBATCHES}.png"
        charts.append(plot(simulate(schedule, cost, "async"), path))

    report = [
        f"# Schedules: async vs lockstep (cost f={cost.f:g} b={cost.b:g} i={cost.i:g} w={cost.w:g} comm={cost.comm:g})",
        "",
        markdown_table(rows),
    ]
    if skipped:
        report += ["", "Skipped:", ""] + [f"- {note}" for note in skipped]
    text = "\n".join(report) + "\n"
    print(text)
    (out / "schedule_table.md").write_text(text)
    print(f"wrote {out / 'schedule_table.md'} and {len(charts)} Gantt charts to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
