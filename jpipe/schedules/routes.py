"""SkipPipe-style schedules: microbatches skip and reorder stages (Blagoev, Chen, Ersoy 2025,
"SkipPipe: Partial and Reordered Pipelining Framework for Training LLMs in Heterogeneous Networks";
gensyn-ai/skippipe).

In SkipPipe every microbatch follows its own path through a subset of the stages, possibly with two
neighbouring stages swapped (e.g. 0 -> 1 -> 5 -> 4 of 6 stages): the model learns to tolerate
skipped and reordered layers, and a step costs less. The reference picks the paths with
conflict-based search over A* paths under three constraints: every path skips its share of the
stages, no node holds more microbatches than its memory allows, and no two microbatches collide on a
node. Its stage 0 holds the embedding and the head and every path starts and ends there.

jpipe's version is its own, smaller algorithm written from those constraints (no CBS, no A*):

1. Layout: loop placement, logical stage s on device `s % p`; each stage is its own model stage.
   The first and the last logical stage (the embedding and the head of a language model) are on
   every route; the stages between them may be skipped.
2. Skips: a skip ratio r means `round(r * S * m)` skipped stage visits in all (S logical stages, m
   microbatches), spread as evenly as possible over the microbatches (each keeps its first and
   last stage, so r <= (S - 2) / S). A first assignment skips, microbatch by microbatch, the middle
   stages whose devices have the most visits so far (ties broken by the seeded generator), so the
   devices' loads stay even.
3. Orders: `schedule_routes` turns routes into per-device orders with an event-driven list
   scheduler. A microbatch enters the pipeline only when every device on its route has room for it
   (its stash there counted until its backward on that stage): no device ever holds more than
   `memory_cap` microbatches (`peak_activations`' unit), and nothing can deadlock, since an
   admitted microbatch never waits for memory. An idle device runs, in this order of preference,
   a ready backward (oldest microbatch first), a ready forward of an admitted microbatch (oldest
   first), or admits the lowest-numbered waiting microbatch that fits.
4. Search: a seeded hill climb over the routes: move one skip of one microbatch to another middle
   stage, or (with `reorder`) swap two neighbouring middle stages of a route (at most one swap per
   route, SkipPipe's limit) or undo the swap. A move is kept when (async makespan of the list
   schedule, number of swapped routes) does not grow, so a swap stays only where it shortens the
   step. The result is the best schedule seen; it is reproducible for a seed.

Measured (`tests/test_routes.py`; p = 4, m = 16, F = 1 and B = 2 per stage, memory cap 4, seed 0,
200 moves, async makespan): with one stage per device (4 logical stages) 57, 54, 51 for skip
ratios 0, 0.25, 0.5 (57 is 1F1B's: at skip 0 the list scheduler finds 1F1B); with two stages per
device (8 logical stages) 124, 94, 60. The list scheduler is a heuristic: at skip 0 with two stages
per device, interleaved 1F1B takes 105 (holding 5.5 microbatches), the list scheduler 113 with a cap
of 6.
"""

from __future__ import annotations

import heapq
import math
import random

from jpipe.schedules.generators import register
from jpipe.schedules.ir import Action, Op, Schedule, ScheduleError, loop_placement
from jpipe.schedules.simulate import Cost

Route = tuple[int, ...]


def schedule_routes(
    num_devices: int,
    num_microbatches: int,
    placement: tuple[int, ...],
    routes: tuple[Route, ...],
    *,
    memory_cap: int,
    cost: Cost | None = None,
    name: str = "routes",
) -> Schedule:
    """Per-device orders for given routes under a memory cap (the list scheduler of step 3 above).

    Args:
      num_devices: pipeline devices `p`.
      num_microbatches: microbatches `m`.
      placement: logical stage -> device (every device the same number `v` of stages).
      routes: one route per microbatch (the logical stages it visits, in order).
      memory_cap: the most microbatches a device may hold at once, in `peak_activations`' unit
        (a stash of one stage counts `1 / v`); an int >= 1.
      cost: the times the list scheduler plans with (default `Cost()`); F and B actions only.
      name: the schedule's name.

    Returns:
      A schedule with full backwards (B); it passes `validate` when the routes do.
    """
    rows, _ = _list_schedule(num_devices, placement, routes, memory_cap, cost or Cost())
    return Schedule(
        num_devices=num_devices,
        num_microbatches=num_microbatches,
        placement=tuple(placement),
        actions=tuple(tuple(row) for row in rows),
        name=name,
        routes=tuple(tuple(route) for route in routes),
    )


def _list_schedule(
    p: int, placement: tuple[int, ...], routes: tuple[Route, ...], memory_cap: int, cost: Cost
) -> tuple[list[list[Action]], float]:
    """Event-driven list scheduling of F and B along `routes`; returns (rows, makespan)."""
    return _ListScheduler(p, placement, routes, memory_cap, cost).run()


class _ListScheduler:
    """`_list_schedule`'s state: the clock, each device's ready actions, and the stash reservations.

    A microbatch is admitted (its first F starts) only when every device it visits has room for its
    stashes (`memory_cap` per device, in stashes of a whole device stage); its stashes are released
    as its backwards end. At each moment a free device starts its most urgent ready action: a B
    before an F, then the earlier-admitted microbatch, then the later hop.
    """

    def __init__(self, p: int, placement: tuple[int, ...], routes: tuple[Route, ...], memory_cap: int, cost: Cost):
        virtual = len(placement) // p
        self.p, self.placement, self.routes = p, placement, routes
        self.cost = cost.chunk_cost(virtual)  # per chunk, as `simulate` reads it
        self.capacity = memory_cap * virtual  # in stashes of one stage
        m = len(routes)
        self.reserved = [0] * p
        self.releases: list[tuple[float, int]] = []  # (time, device) of a stash leaving the reservation
        self.free = [0.0] * p
        self.rows: list[list[Action]] = [[] for _ in range(p)]
        # ready[d]: (ready time, kind, rank, hop, mb) of actions whose inputs are scheduled; kind 0 = B, 1 = F.
        self.ready: list[list[tuple[float, int, int, int, int]]] = [[] for _ in range(p)]
        self.forward_end: dict[tuple[int, int], float] = {}
        self.rank = [-1] * m  # admission order
        self.waiting = {d: [k for k in range(m) if placement[routes[k][0]] == d] for d in range(p)}
        self.need = [[sum(placement[stage] == d for stage in route) for d in range(p)] for route in routes]
        self.admitted = 0
        self.remaining = 2 * sum(len(route) for route in routes)
        self.now = 0.0
        self.makespan = 0.0

    def run(self) -> tuple[list[list[Action]], float]:
        while self.remaining:
            while self.releases and self.releases[0][0] <= self.now:
                _, d = heapq.heappop(self.releases)
                self.reserved[d] -= 1
            while self._start_one_round():  # again after a start: a zero-time action may make more ready now
                pass
            if not self.remaining:
                break
            self.now = self._next_event()
        return self.rows, self.makespan

    def _start_one_round(self) -> bool:
        """Let every free device start one action (a ready one, else an admitted microbatch); any started."""
        started = False
        for d in range(self.p):
            if self.free[d] > self.now:
                continue
            candidates = [item for item in self.ready[d] if item[0] <= self.now]
            if candidates:
                item = min(candidates, key=lambda c: (c[1], c[2], -c[3]))
                self.ready[d].remove(item)
                self._start(d, item[1], item[4], item[3])
                started = True
            elif self._admit(d):
                started = True
        return started

    def _admit(self, d: int) -> bool:
        """Start the first forward of the first microbatch waiting on `d` that fits everywhere it goes."""
        for k in self.waiting[d]:
            if all(self.reserved[e] + self.need[k][e] <= self.capacity for e in range(self.p)):
                self.waiting[d].remove(k)
                for e in range(self.p):
                    self.reserved[e] += self.need[k][e]
                self.rank[k] = self.admitted
                self.admitted += 1
                self._start(d, 1, k, 0)
                return True
        return False

    def _next_event(self) -> float:
        """The next time a device frees, an action becomes ready or a stash is released."""
        now = self.now
        upcoming = [t for t in self.free if t > now]
        upcoming += [item[0] for d in range(self.p) for item in self.ready[d] if item[0] > now]
        upcoming += [t for t, _ in self.releases if t > now]
        if not upcoming:  # cannot happen: an admitted microbatch never waits for memory
            raise AssertionError("list scheduler stalled")
        return min(upcoming)

    def _arrival(self, end: float, producer_stage: int, consumer_stage: int) -> float:
        crosses = self.placement[producer_stage] != self.placement[consumer_stage]
        return end + (self.cost.comm if crosses else 0.0)

    def _start(self, d: int, kind: int, k: int, hop: int) -> None:
        """Run hop `hop` of microbatch `k` (kind 0: B, 1: F) on `d` now; make its successor ready."""
        route, placement = self.routes[k], self.placement
        stage = route[hop]
        op = Op.B if kind == 0 else Op.F
        end = self.now + self.cost.of(op, stage)
        self.rows[d].append(Action(stage, op, k))
        self.free[d] = end
        self.makespan = max(self.makespan, end)
        self.remaining -= 1
        if op is Op.F:
            self.forward_end[k, hop] = end
            if hop + 1 < len(route):
                nxt = route[hop + 1]
                self.ready[placement[nxt]].append((self._arrival(end, stage, nxt), 1, self.rank[k], hop + 1, k))
            else:  # the loss: the last hop's backward needs only its forward
                self.ready[d].append((end, 0, self.rank[k], hop, k))
            return
        heapq.heappush(self.releases, (end, d))
        if hop > 0:
            prev = route[hop - 1]
            at = max(self._arrival(end, stage, prev), self.forward_end[k, hop - 1])
            self.ready[placement[prev]].append((at, 0, self.rank[k], hop - 1, k))


# --- the route search ------------------------------------------------------------------------------


def _skips_per_microbatch(skip_ratio: float, num_stages: int, m: int) -> list[int]:
    total = round(skip_ratio * num_stages * m)
    base, extra = divmod(total, m)
    return [base + (1 if k < extra else 0) for k in range(m)]


def _initial_kept(
    placement: tuple[int, ...], middle: list[int], skips: list[int], rng: random.Random
) -> list[list[int]]:
    """Per microbatch, the kept middle stages: skip those on the most-visited devices so far."""
    load = [0] * (max(placement) + 1)
    stage_load = {s: 0 for s in middle}
    kept_all = []
    for count in skips:
        order = sorted(middle, key=lambda s: (-load[placement[s]], -stage_load[s], rng.random()))
        skipped = set(order[:count])
        kept = [s for s in middle if s not in skipped]
        for s in kept:
            load[placement[s]] += 1
            stage_load[s] += 1
        kept_all.append(kept)
    return kept_all


def _route(first: int, last: int, kept: list[int], swap: int | None) -> Route:
    middle = list(kept)
    if swap is not None:
        middle[swap], middle[swap + 1] = middle[swap + 1], middle[swap]
    return (first, *middle, last)


@register("skippipe", routed=True)
def skippipe(
    num_devices: int,
    num_microbatches: int,
    virtual: int = 1,
    *,
    skip_ratio: float = 0.25,
    memory_cap: int | None = None,
    seed: int = 0,
    reorder: bool = True,
    steps: int = 200,
    cost: Cost | None = None,
) -> Schedule:
    """SkipPipe-style partial, reordered routes and their orders (see the module docstring).

    Args:
      num_devices: pipeline devices `p`.
      num_microbatches: microbatches `m`.
      virtual: logical stages per device (loop placement), `S = p * virtual`; needs `S >= 2`
        unless nothing is skipped.
      skip_ratio: the share of stage visits skipped, in [0, (S - 2) / S]; the first and last stage
        are never skipped.
      memory_cap: the most microbatches any device holds at once (`peak_activations`' unit), an
        int >= 1; default `num_devices` (1F1B's peak).
      seed: seeds every random choice (tie-breaks and the search).
      reorder: allow one swap of two neighbouring middle stages per route.
      steps: hill-climbing moves to evaluate.
      cost: the times the search optimises the async makespan for (default `Cost()`).

    Returns:
      A schedule with routes (F and B actions); with `skip_ratio=0` and no helpful swap, every
      route is full and the schedule is plain.
    """
    p, m = num_devices, num_microbatches
    num_stages = p * virtual
    cost = cost or Cost()
    cost.check_stages(num_stages)
    if isinstance(skip_ratio, bool) or not isinstance(skip_ratio, (int, float)) or not math.isfinite(skip_ratio):
        raise ScheduleError(f"skip_ratio must be a number, got {skip_ratio!r}")
    most = max(0, num_stages - 2) / num_stages
    if not 0 <= skip_ratio <= most + 1e-12:
        raise ScheduleError(
            f"skip_ratio must be in [0, {most:.4g}] for {num_stages} stages (the first and last stage are "
            f"never skipped), got skip_ratio={skip_ratio}"
        )
    if memory_cap is None:
        memory_cap = p
    if isinstance(memory_cap, bool) or not isinstance(memory_cap, int) or memory_cap < 1:
        raise ScheduleError(f"memory_cap must be an int >= 1 (microbatches per device), got memory_cap={memory_cap!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ScheduleError(f"steps must be an int >= 0, got steps={steps!r}")
    placement = loop_placement(p, virtual)
    rng = random.Random(seed)
    first, last = 0, num_stages - 1
    middle = list(range(1, num_stages - 1))
    skips = _skips_per_microbatch(skip_ratio, num_stages, m)
    kept = _initial_kept(placement, middle, skips, rng)
    swaps: list[int | None] = [None] * m

    def evaluate() -> tuple[float, int]:
        routes = tuple(_route(first, last, kept[k], swaps[k]) for k in range(m)) if num_stages > 1 else ((0,),) * m
        _, makespan = _list_schedule(p, placement, routes, memory_cap, cost)
        return makespan, sum(swap is not None for swap in swaps)

    current = evaluate()
    movable = [k for k in range(m) if 0 < len(kept[k]) < len(middle)]
    swappable = [k for k in range(m) if len(kept[k]) >= 2] if reorder else []
    for _ in range(steps if (movable or swappable) else 0):
        use_swap = swappable and (not movable or rng.random() < 0.3)
        k = rng.choice(swappable if use_swap else movable)
        old_kept, old_swap = list(kept[k]), swaps[k]
        if use_swap:
            options = [None] + [i for i in range(len(kept[k]) - 1) if i != old_swap]
            swaps[k] = rng.choice([o for o in options if o != old_swap])
        else:
            skipped = [s for s in middle if s not in kept[k]]
            out, into = rng.choice(kept[k]), rng.choice(skipped)
            kept[k] = sorted([s for s in kept[k] if s != out] + [into])
        candidate = evaluate()
        if candidate <= current:
            current = candidate
        else:
            kept[k], swaps[k] = old_kept, old_swap
    routes = tuple(_route(first, last, kept[k], swaps[k]) for k in range(m)) if num_stages > 1 else ((0,),) * m
    return schedule_routes(p, m, placement, routes, memory_cap=memory_cap, cost=cost, name="skippipe")
