"""Local search over per-device orders: move one action within its device's list, keep what helps.

A move takes one action and puts it elsewhere in its device's list, between the same-device actions
it needs and those that need it (so the list stays locally valid; a cross-device deadlock shows as an
infinite makespan and is refused). A move is kept when the simulated makespan does not grow and every
device's peak memory stays within the limit; equal-makespan moves are kept too (the search walks
plateaus, which is how a W drifts into a bubble). Everything random comes from one seeded
`random.Random`, so a run is reproducible for a seed and a number of moves.
"""

from __future__ import annotations

import random
import time

from jpipe.schedules.orders import Orders

EPSILON = 1e-9


def same_device_links(space: Orders) -> tuple[list[list[int]], list[list[int]]]:
    """Per action, the actions on its own device that it needs, and those that need it."""
    needs: list[list[int]] = [[] for _ in space.device]
    needed_by: list[list[int]] = [[] for _ in space.device]
    for a, deps in enumerate(space.deps):
        for producer, _ in deps:
            if space.device[producer] == space.device[a]:
                needs[a].append(producer)
                needed_by[producer].append(a)
    return needs, needed_by


def improve(
    space: Orders,
    rows: list[list[int]],
    memory_limit: float,
    rng: random.Random,
    moves: int,
    deadline: float,
    reach: tuple[int, ...] = (2, 6, 24),
) -> tuple[list[list[int]], float, int]:
    """Hill-climb from `rows` for `moves` proposed moves or until `time.monotonic() > deadline`.

    Args:
      space: the placement, costs, mode and latency (the objective is `space.evaluate`).
      rows: a feasible starting point (not modified).
      memory_limit: per-device peak limit (microbatch x full device stage).
      rng: the only source of randomness.
      moves: how many moves to propose.
      deadline: a `time.monotonic()` value after which the search stops.
      reach: how far (positions) a move may take an action: one of these, drawn per move.

    Returns:
      (best rows, their makespan, moves proposed).
    """
    rows = [list(row) for row in rows]
    needs, needed_by = same_device_links(space)
    position = [0] * len(space.device)
    for row in rows:
        for i, a in enumerate(row):
            position[a] = i
    current = space.evaluate(rows).makespan
    limit = memory_limit + EPSILON
    proposed = 0
    busy = [d for d, row in enumerate(rows) if len(row) > 1]
    while proposed < moves and busy:
        if proposed % 64 == 0 and time.monotonic() > deadline:
            break
        proposed += 1
        d = busy[rng.randrange(len(busy))]
        row = rows[d]
        i = rng.randrange(len(row))
        a = row[i]
        low = max((position[x] + 1 for x in needs[a]), default=0)
        high = min((position[x] - 1 for x in needed_by[a]), default=len(row) - 1)
        far = reach[rng.randrange(len(reach))]
        low, high = max(low, i - far), min(high, i + far)
        if high <= low:
            continue
        j = rng.randrange(low, high)
        if j >= i:
            j += 1
        moved = row[:i] + row[i + 1 :]
        moved.insert(j, a)
        if space.memory(moved) > limit:
            continue
        rows[d] = moved
        makespan = space.makespan(rows)
        if makespan <= current + EPSILON:
            current = min(current, makespan)
            for k in range(min(i, j), max(i, j) + 1):
                position[moved[k]] = k
        else:
            rows[d] = row
    return rows, current, proposed
