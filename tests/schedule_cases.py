"""Reference evaluators for schedule tests, shared by the simulator and route tests."""

from __future__ import annotations

from collections.abc import Collection

from jpipe.schedules import Action, Cost, Op, Schedule
from jpipe.schedules.deps import dependencies

REORDERS = ("v_half", "v_min")
"""Named schedules that are only another order of F/I/W actions on the V placement (zbv's path through
the executor): the compiled suites that enumerate `SCHEDULES` over executor options (split or whole
backward, remat modes, hidden sends) give each of them one plain parity case, not a case per option."""


def makespan_with_atomic_pairs(schedule: Schedule, cost: Cost, unoverlapped_first_pair: Collection[int]) -> float:
    """Async makespan where each forward directly followed by a full backward on a device is DualPipe's
    overlapped "F&B" unit: it starts when both inputs are there, lasts F + B, and both results are
    ready at its end. On the devices in `unoverlapped_first_pair`, the first such pair runs as two
    plain ops (DeepSeek's step 4)."""
    deps = dependencies(schedule)
    units_per_device = []
    for device, row in enumerate(schedule.actions):
        units, index, kept_apart = [], 0, device not in unoverlapped_first_pair
        while index < len(row):
            if index + 1 < len(row) and (row[index].op, row[index + 1].op) == (Op.F, Op.B):
                if kept_apart:
                    units.append(row[index : index + 2])
                    index += 2
                    continue
                kept_apart = True
            units.append(row[index : index + 1])
            index += 1
        units_per_device.append(units)
    end: dict[Action, float] = {}
    free = [0.0] * schedule.num_devices
    cursor = [0] * schedule.num_devices
    while any(cursor[d] < len(units) for d, units in enumerate(units_per_device)):
        progressed = False
        for device, units in enumerate(units_per_device):
            while cursor[device] < len(units):
                unit = units[cursor[device]]
                needed = [dep for action in unit for dep in deps[action] if dep not in unit]
                if any(dep not in end for dep in needed):
                    break
                start = max([free[device]] + [end[dep] for dep in needed])
                free[device] = start + sum(cost.of(action.op) for action in unit)
                end.update((action, free[device]) for action in unit)
                cursor[device] += 1
                progressed = True
        assert progressed
    return max(free)
