"""Schedules for sends that take an extra tick: two half-batch streams, interleaved tick by tick.

When the executor hides its sends behind compute (`overlap_sends`), a message produced in tick t is
usable on another device from tick t + 2 instead of t + 1. Orders built for a one-tick hop then
wait (`pack(..., send_latency=1)`): 1f1b and zb_h1 lose about a third at p = 4, m = 16.

`two_streams` rebuilds a named schedule for that latency without designing a new one: it splits
the microbatches into two streams (even and odd ids), packs the schedule for each half as usual, and
interleaves them, stream A in even ticks and stream B in odd ticks. A message of stream A produced
in tick 2t is next needed in tick 2t + 2, exactly when the extra tick has passed, and stream B fills
the ticks between. The result is the named schedule's order dilated by two, so its makespan is at
most twice the half-batch schedule's plus one tick; each device holds both streams' in-flight
microbatches, so peak activations about double. At p = 4, m = 16 and unit costs this reaches the
lower bound of a one-tick latency for zbv (102 ticks against 99 without latency) and zb_h1 (54
against 51).
"""

from __future__ import annotations

import dataclasses

from jpipe.schedules.ir import Action, Schedule, ScheduleError
from jpipe.schedules.ticks import pack


def two_streams(build_half, num_microbatches: int) -> Schedule:
    """Interleave two half-batch schedules, one per tick parity (see the module docstring).

    Args:
      build_half: `n -> Schedule` building the schedule for `n` microbatches (same devices,
        stages, placement and model-stage map for every n). Routes follow their microbatches:
        microbatch `2k + stream` takes the route of microbatch k of its stream's half schedule.
      num_microbatches: m; stream A gets microbatches 0, 2, 4, ... (ceil(m / 2) of them), stream B
        1, 3, 5, ...

    Returns:
      A schedule over `num_microbatches` microbatches whose per-device order follows the two
      streams' packed ticks (the split backward: B as I then W), named `<name>[2 streams]`.
    """
    sizes = ((num_microbatches + 1) // 2, num_microbatches // 2)
    timed: list[list[tuple[int, Action]]] | None = None
    template: Schedule | None = None
    routes: list[tuple[int, ...]] = [()] * num_microbatches
    for stream, size in enumerate(sizes):
        if size == 0:
            continue
        half = build_half(size)
        template = half if template is None else template
        if (half.placement, half.model_stage) != (template.placement, template.model_stage):
            raise ScheduleError("two_streams: the half schedules differ in placement or model stages")
        for k in range(size):
            routes[2 * k + stream] = half.route(k)
        if timed is None:
            timed = [[] for _ in range(half.num_devices)]
        for tick, row in enumerate(pack(half, split=True).ticks):
            for device, action in enumerate(row):
                if action is not None:
                    renamed = Action(action.stage, action.op, 2 * action.microbatch + stream)
                    timed[device].append((2 * tick + stream, renamed))
    assert template is not None and timed is not None  # num_microbatches >= 1
    rows = tuple(tuple(action for _, action in sorted(row, key=lambda item: item[0])) for row in timed)
    return dataclasses.replace(
        template,
        actions=rows,
        num_microbatches=num_microbatches,
        name=f"{template.name}[2 streams]",
        routes=tuple(routes),
    )
