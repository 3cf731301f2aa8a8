"""A lockstep list scheduler: per-device orders built tick by tick under a memory limit.

In every tick each device runs at most one action among those whose inputs have arrived (a result
made on another device arrives `1 + send_latency` ticks after its tick, on the same device the next
tick, as `jpipe.schedules.ticks.pack` packs it). Every (stage, op) runs its microbatches in
increasing order. Which ready action a device takes is a `Policy`: backward or forward first, how
many weight gradients (W) may wait before they go first, how deep the warm-up goes (a per-device cap
on live stashes), and which chunk goes first on a device holding several. The resulting orders are
repacked by the simulator like any schedule; the list scheduler only proposes them.

Memory is the executor's buffers, as `Orders.memory` counts them (microbatch x full device stage:
the most live stashes of any device so far, each `1 / virtual`, plus the most live weight residuals
of any device so far, each `weight_residuals / virtual`): an F or an I runs only if the buffers it
may grow still fit the limit. An F that brings a new microbatch onto a device (the device's first
stage) also needs stash slots for the microbatch's later chunks on that device and a weight-residual
slot, so that the oldest microbatch in flight can finish; an order that gets stuck all the same is
dropped (`list_schedule` returns None). The policy's warm-up `depth` caps a device's own live stash
plus weight residuals at one moment.
"""

from __future__ import annotations

import dataclasses
import random

from jpipe.schedules.orders import F_, I_, W_, Orders


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a device picks among its ready actions.

    Attributes:
      forward_first: when both are ready, an F goes before an I (GPipe-like) instead of after it
        (1F1B-like).
      weight_lag: per device, how many W's may wait (their I done) before the oldest goes ahead of
        any F or I; a W also runs when nothing else is ready or fits in memory.
      depth: per device, the most live stash plus weight residuals the device may hold (same unit
        as the memory limit; the limit still applies): how deep the warm-up goes.
      deep_first: among ready F's, and among ready I's, the later stage goes first (finish a
        microbatch before starting the next chunk); otherwise the earlier stage (then the older
        microbatch).
      align: lockstep alignment: the busiest device (most work per step) picks first, and the
        others prefer, in their priority order, an action no longer than its pick (a tick lasts as
        long as its slowest action).
      noise: probability that a device takes a uniformly random allowed action instead.
      seed: seed of that randomness.
    """

    forward_first: bool
    weight_lag: tuple[int, ...]
    depth: tuple[float, ...]
    deep_first: bool = True
    align: bool = False
    noise: float = 0.0
    seed: int = 0


def list_schedule(space: Orders, policy: Policy, memory_limit: float) -> list[list[int]] | None:
    """Per-device orders (rows of action numbers of `space`) built under `policy`; None if stuck.

    Args:
      space: the placement, costs and latency.
      policy: how each device picks.
      memory_limit: the most buffer memory per device (`Orders.memory`, microbatch x full device
        stage).
    """
    p, m, stages = space.num_devices, space.num_microbatches, space.num_stages
    rng = random.Random(policy.seed)
    local = [[s for s in range(stages) if space.placement[s] == d] for d in range(p)]
    entry = [min(stages_) for stages_ in local]
    next_mb = [[0] * stages for _ in range(3)]  # next microbatch per op and stage
    tick = [-1] * len(space.device)
    stash, held = [0] * p, [0] * p  # live stashes and weight residuals, in chunks
    buffers = _Buffers(space, memory_limit)
    rows: list[list[int]] = [[] for _ in range(p)]
    total = 3 * stages * m
    done = idle = 0
    work = [0.0] * p
    for a, d in enumerate(space.device):
        work[d] += space.time[a]
    busiest = max(range(p), key=lambda d: work[d])
    devices = [busiest] + [d for d in range(p) if d != busiest] if policy.align else list(range(p))
    for t in range(8 * total + 16):
        picks = []
        longest = float("inf")
        for d in devices:
            state = (stash[d], held[d])
            ranked = _ranked(space, policy, buffers, d, t, local[d], entry[d], next_mb, tick, state, rng)
            if not ranked:
                continue
            a = next((a for a in ranked if space.time[a] <= longest + 1e-12), ranked[0])
            if policy.align and d == busiest:
                longest = space.time[a]
            picks.append((d, a))
            buffers.take(space.op[a], stash[d], held[d])
        idle = 0 if picks else idle + 1
        if _stuck(idle, space):
            return None
        for d, a in picks:
            op, s = space.op[a], space.stage[a]
            next_mb[op][s] += 1
            tick[a] = t
            rows[d].append(a)
            _account(op, d, stash, held)
            done += 1
        if done == total:
            return rows
    return None


def _ready(space: Orders, a: int, t: int, tick: list[int]) -> bool:
    for producer, delay in space.deps[a]:
        at = tick[producer]
        if at < 0 or at + delay > t:
            return False
    return True


class _Buffers:
    """The executor's buffer slots so far (the most live stashes and weight residuals of any device),
    and whether an action may grow them within the limit."""

    def __init__(self, space: Orders, memory_limit: float) -> None:
        self.residual, self.virtual = space.cost.weight_residuals, space.virtual
        self.hard = memory_limit * space.virtual + 1e-9  # in chunks
        self.stashes = self.held = 0

    def fit(self, stashes: int, held: int) -> bool:
        """Whether buffers with room for `stashes` stashes and `held` weight residuals fit the limit."""
        return max(self.stashes, stashes) + self.residual * max(self.held, held) <= self.hard

    def allows(self, op: int, stash: int, held: int) -> bool:
        """Whether a device with `stash` live stashes and `held` weight residuals may run an `op` (F, I, W)."""
        if op == F_:
            return self.fit(stash + 1, held)
        if op == I_:
            return self.fit(stash, held + 1)
        return True

    def take(self, op: int, stash: int, held: int) -> None:
        """Grow the slots for an `op` run by a device with `stash` live stashes and `held` residuals."""
        if op == F_:
            self.stashes = max(self.stashes, stash + 1)
        elif op == I_:
            self.held = max(self.held, held + 1)


def _ranked(
    space: Orders,
    policy: Policy,
    buffers: _Buffers,
    d: int,
    t: int,
    stages: list[int],
    entry: int,
    next_mb: list[list[int]],
    tick: list[int],
    state: tuple[int, int],
    rng: random.Random,
) -> list[int]:
    """The actions device `d` may run in tick `t`, best first, given its live (stashes, residuals)."""
    m, virtual, residual = space.num_microbatches, space.virtual, space.cost.weight_residuals
    stash, held = state
    cap = min(buffers.hard, policy.depth[d] * virtual + 1e-9)  # in chunks
    ready: list[list[int]] = [[], [], []]
    for s in stages:
        for op in (F_, I_, W_):
            mb = next_mb[op][s]
            if mb < m:
                a = space.index(op, s, mb)
                if _ready(space, a, t, tick):
                    ready[op].append(a)
    forwards, inputs, weights = ready
    inputs = [a for a in inputs if buffers.allows(I_, stash, held)]

    def fits(a: int) -> bool:
        if space.stage[a] == entry:  # room for the microbatch's later chunks and one weight residual
            reserve = (virtual - 1) + residual
            grown = buffers.fit(stash + virtual, max(held, 1))
        else:
            reserve, grown = 0, buffers.allows(F_, stash, held)
        return grown and stash + 1 + reserve + held * residual <= cap

    forwards = [a for a in forwards if fits(a)]
    if policy.noise and rng.random() < policy.noise:
        allowed = forwards + inputs + weights
        rng.shuffle(allowed)
        return allowed
    groups = [weights] if weights and held > policy.weight_lag[d] else []
    groups += [forwards, inputs] if policy.forward_first else [inputs, forwards]
    groups.append(weights)
    sign = -1 if policy.deep_first else 1
    ranked = []
    for group in groups:
        fresh = [a for a in group if a not in ranked]
        ranked += sorted(fresh, key=lambda a: (sign * space.stage[a], space.microbatch[a]))
    return ranked


def repack(space: Orders, rows: list[list[int]], memory_limit: float, lookahead: int) -> list[list[int]] | None:
    """`rows` made work-conserving: in each tick a device runs the first of its next `lookahead`
    actions (in its current order) whose inputs have arrived and that fits in memory.

    A device never idles while one of those is ready, so actions move ahead of ones that wait: a
    large, structured change of the orders (the local search's kick). Returns None if stuck.
    """
    p = space.num_devices
    buffers = _Buffers(space, memory_limit)
    remaining = [list(row) for row in rows]
    tick = [-1] * len(space.device)
    out: list[list[int]] = [[] for _ in range(p)]
    stash, held = [0] * p, [0] * p
    total = sum(len(row) for row in rows)
    done = idle = t = 0
    while done < total:
        picks = []
        for d in range(p):
            for index, a in enumerate(remaining[d][:lookahead]):
                op = space.op[a]
                if buffers.allows(op, stash[d], held[d]) and _ready(space, a, t, tick):
                    picks.append((d, index, a))
                    buffers.take(op, stash[d], held[d])
                    break
        idle = 0 if picks else idle + 1
        if _stuck(idle, space):
            return None
        for d, index, a in picks:
            remaining[d].pop(index)
            tick[a] = t
            out[d].append(a)
            _account(space.op[a], d, stash, held)
            done += 1
        t += 1
    return out


def _stuck(idle: int, space: Orders) -> bool:
    """Whether `idle` ticks in a row without a pick mean nothing can arrive any more."""
    return idle > 2 + 2 * space.send_latency


def _account(op: int, device: int, stash: list[int], held: list[int]) -> None:
    """Update `device`'s live stashes and weight residuals for an action of kind `op` (F, I or W)."""
    if op == F_:
        stash[device] += 1
    elif op == I_:
        held[device] += 1
    else:
        stash[device] -= 1
        held[device] -= 1
