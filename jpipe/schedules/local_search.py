"""Local search over per-device orders: move one action within its device's list, keep what helps.

A move takes one action and puts it elsewhere in its device's list, at most a few positions away
(the distance drawn per move), between the same-device actions it needs and those that need it
(so the list stays locally valid). A cross-device deadlock shows as an infinite makespan and is
refused. A move is kept when the simulated makespan does not grow and the executor's buffers
(`Orders.memory`: the most live stashes and weight residuals of any device, each its own peak) stay
within the limit; equal-makespan moves are kept too (the search walks plateaus, which is how a W
drifts into a bubble).
Everything random comes from one seeded `random.Random`, so a run is reproducible for a seed and a
number of moves.
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


class _Search:
    """The state of one hill climb: rows, each action's position, the current makespan."""

    def __init__(self, space: Orders, rows: list[list[int]], memory_limit: float, rng: random.Random) -> None:
        self.space, self.rng = space, rng
        self.rows = [list(row) for row in rows]
        self.needs, self.needed_by = same_device_links(space)
        self.position = [0] * len(space.device)
        for row in self.rows:
            for i, a in enumerate(row):
                self.position[a] = i
        self.slots = [space.slots(row) for row in self.rows]
        self.current = space.makespan(self.rows)
        self.limit = memory_limit + EPSILON

    def relocate(self, d: int, far: int) -> tuple[int, int] | None:
        """A random move of one action of device `d` by at most `far` positions: (from, to)."""
        row, position = self.rows[d], self.position
        i = self.rng.randrange(len(row))
        a = row[i]
        low = max((position[x] + 1 for x in self.needs[a]), default=0)
        high = min((position[x] - 1 for x in self.needed_by[a]), default=len(row) - 1)
        low, high = max(low, i - far), min(high, i + far)
        if high <= low:
            return None
        j = self.rng.randrange(low, high)
        return (i, j + 1 if j >= i else j)

    def step(self, reach: tuple[int, ...]) -> bool:
        """Propose one move; return whether it was evaluated (feasible and not a no-op)."""
        rows, rng = self.rows, self.rng
        d = rng.randrange(len(rows))
        row = rows[d]
        if len(row) < 2:
            return False
        far = reach[rng.randrange(len(reach))]
        move = self.relocate(d, far)
        if move is None:
            return False
        i, j = move
        moved = row[:i] + row[i + 1 :]
        moved.insert(j, row[i])
        slots = self.space.slots(moved)
        if slots != self.slots[d]:
            others = self.slots[:d] + [slots] + self.slots[d + 1 :]
            if self.space.memory_of(others) > self.limit:
                return False
        rows[d] = moved
        makespan = self.space.makespan(rows)
        if makespan <= self.current + EPSILON:
            self.current = min(self.current, makespan)
            self.slots[d] = slots
            for k in range(min(i, j), max(i, j) + 1):
                self.position[moved[k]] = k
        else:
            rows[d] = row
        return True


def improve(
    space: Orders,
    rows: list[list[int]],
    memory_limit: float,
    rng: random.Random,
    moves: int,
    deadline: float,
    reach: tuple[int, ...] = (2, 6, 24),
) -> tuple[list[list[int]], float, int]:
    """Hill-climb from `rows` for `moves` evaluated moves or until `time.monotonic() > deadline`.

    Args:
      space: the placement, costs, mode and latency (the objective is `space.makespan`).
      rows: a feasible starting point (not modified).
      memory_limit: the most buffer memory per device (`Orders.memory`, microbatch x full device
        stage); `rows` must fit it.
      rng: the only source of randomness.
      moves: how many moves to evaluate (at most 4x as many are proposed).
      deadline: a `time.monotonic()` value after which the search stops.
      reach: how far (positions) a move may take an action: one of these, drawn per move.

    Returns:
      (best rows, their makespan, moves evaluated).
    """
    search = _Search(space, rows, memory_limit, rng)
    evaluated = proposed = 0
    while evaluated < moves and proposed < 4 * moves:
        if proposed % 64 == 0 and time.monotonic() > deadline:
            break
        proposed += 1
        evaluated += search.step(reach)
    return search.rows, search.current, evaluated
