"""Search a schedule: the least simulated makespan within the memory the executor allocates.

    schedule = jpipe.schedules.search(4, 16, cost, memory_limit=4, virtual=2)
    result = jpipe.schedules.search_result(4, 16, cost, memory_limit=4, virtual=2)  # with the baseline

The search
  1. builds every named schedule (`SCHEDULES`, `v_half` and `v_min` included) for every `virtual`
     from 1 to the given one that it accepts (with `send_latency=1` also `build(..., send_latency=1)`'s
     version of it, e.g. its two-stream order), simulates it (the objective:
     `simulate(schedule, cost, mode, send_latency=...)`'s makespan; in lockstep mode with each B
     split into I and W or whole, whichever is faster, as the executor's `split_backward="auto"`
     runs it) and keeps those whose buffer memory (below) fits: the best of them is the baseline.
     Their Pareto front (makespan against memory, `SearchResult.front`) is the memory/time
     trade-off the named schedules offer;
  2. proposes more starting points with a lockstep list scheduler (`jpipe.schedules.greedy`) under
     a grid of policies (backward or forward first, weight-gradient lag, warm-up depth, chunk
     order) on every placement those named schedules use (loop with 1..virtual chunks, V);
  3. improves the best starting points by local search over per-device orders
     (`jpipe.schedules.local_search`) with half of an evaluation budget, then repeatedly kicks the
     best found (a work-conserving repack of its orders, `jpipe.schedules.greedy.repack`) and
     climbs again with the rest (iterated local search);
  4. returns the best schedule found, checked with `validate` and `simulate`, or the baseline itself
     when nothing beats it: never worse than the best named schedule that fits. So with a limit
     that 1F1B fits (e.g. 1.25x its memory), the result is never slower than 1F1B as the executor
     runs it (`tests/test_search.py`, measured GPT costs with remat).

Every searched schedule has F, I and W actions only (B split) and a named schedule's placement, so
the executor runs it unchanged.

Memory is the stash and weight-residual buffers the executor allocates per device
(`jpipe.schedules.orders`): `(S + cost.weight_residuals x R) / virtual` in microbatch x full device
stage (a device's whole share of the model holding one microbatch's stash), where S is the most
stashes and R the most weight residuals (an I's, until its W) any one device holds live, each
counted at its own peak: `compile_program(schedule, split=True)`'s `num_stash_slots` and
`num_weight_slots`. The executor is one SPMD program, so every device allocates those slots, and the
limit bounds them on every device. Named schedules are counted as the executor runs them in
lockstep mode (B split into I and W, or whole where that is no slower: a whole B holds no weight
residual); in async mode as written. This is at least `jpipe.schedules.peak_memory` (stash plus
weight residuals live at one moment on one device): the two peaks may come at different moments,
or on different devices. Not counted: parameters, gradients, optimizer state, the inbox of messages
in flight, temporaries.

Costs: read as `simulate` reads them. A scalar `Cost` (`per="device"`, the default) is one device
stage of the model, split evenly over a v-chunk schedule's chunks (`Cost.chunk_cost(v)`: each chunk
op takes 1/v), so schedules with different `virtual` are compared on the same model. A scalar
`Cost(..., per="chunk")` gives every chunk the same times whatever `virtual` (a v-chunk schedule
then runs a model v times as large). For per-chunk costs that depend on `virtual`, pass a function
`virtual -> Cost` (e.g. `jpipe.schedules.balance.stage_costs` for that many stages; a device
`Cost` it returns is split as above). A `Cost` with per-stage tuples only applies to schedules with
that many stages. `SearchResult.cost` is the per-chunk `Cost` of the chosen `virtual`.

Determinism: every random choice comes from `random.Random(seed)`; a run is reproducible for a seed
and a budget unless `time_limit` cuts it short (`SearchResult.timed_out`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence

from jpipe.schedules.generators import SCHEDULES, build
from jpipe.schedules.greedy import Policy, list_schedule, repack
from jpipe.schedules.ir import Op, Schedule, ScheduleError, flatten
from jpipe.schedules.local_search import EPSILON, improve
from jpipe.schedules.orders import Orders, buffer_memory, buffer_slots
from jpipe.schedules.simulate import MODES, Cost, simulate
from jpipe.schedules.ticks import split_backward
from jpipe.schedules.validate import validate

CostModel = Cost | Callable[[int], Cost]


@dataclasses.dataclass(frozen=True)
class Named:
    """A named schedule as the search saw it: its simulated makespan and buffer memory (microbatch x
    full device stage, the count the limit bounds), with each B run as the executor's
    `split_backward="auto"` would run it (`split`: as I then W; else whole, holding no weight
    residual)."""

    schedule: Schedule
    virtual: int
    makespan: float
    memory: float
    split: bool = True

    @property
    def label(self) -> str:
        """E.g. "zbv (v=2)", "1f1b (v=1, B whole)"."""
        whole = ", B whole" if not self.split and _has_b(self.schedule) else ""
        return f"{self.schedule.name} (v={self.virtual}{whole})"


def pareto_front(named: Sequence[Named]) -> tuple[Named, ...]:
    """The memory/time trade-off: the schedules no other is at least as good as in both makespan
    and memory (and better in one), least memory first; of equal points the first given."""
    front: list[Named] = []
    for candidate in sorted(named, key=lambda n: (n.memory, n.makespan)):
        if not front or candidate.makespan < front[-1].makespan - EPSILON:
            front.append(candidate)
    return tuple(front)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `search_result` found.

    Attributes:
      schedule: the chosen schedule (the baseline itself when nothing beat it).
      makespan: its simulated makespan (`simulate(schedule, cost, mode, send_latency=...)`).
      memory: its buffer memory per device (microbatch x full device stage; the count the limit
        bounds, see the module docstring): `buffer_memory(slots, cost.weight_residuals, virtual)`.
      slots: per device, its peak live stashes and weight residuals (`buffer_slots` of the schedule
        the executor runs; their maxima are `compile_program`'s slot counts).
      cost: the per-chunk `Cost` of its `virtual` (`per="chunk"`; what to simulate it with).
      baseline: the best named schedule that fits the limit.
      baseline_makespan: its simulated makespan.
      named: every named schedule built, fitting or not, in build order.
      front: the Pareto front of `named` (makespan against memory, `pareto_front`), least memory
        first: the memory/time trade-off the named schedules offer.
      evaluations: orders evaluated (list-scheduled and local-search moves).
      seconds: wall time of the search.
      timed_out: whether `time_limit` stopped the search before its budget was spent.
      split: whether `makespan` and `memory` count each B of the schedule split into I and W (else
        whole: a named schedule whose B ran no slower whole in lockstep; the executor's
        `split_backward="auto"` runs it so).
    """

    schedule: Schedule
    makespan: float
    memory: float
    slots: tuple[tuple[int, int], ...]
    cost: Cost
    baseline: Schedule
    baseline_makespan: float
    named: tuple[Named, ...]
    front: tuple[Named, ...]
    evaluations: int
    seconds: float
    timed_out: bool
    split: bool = True

    @property
    def ratio(self) -> float:
        """Searched makespan over the baseline's (<= 1)."""
        return self.makespan / self.baseline_makespan if self.baseline_makespan else 1.0


def search(
    num_devices: int,
    num_microbatches: int,
    cost: CostModel | None = None,
    *,
    memory_limit: float,
    virtual: int = 2,
    mode: str = "lockstep",
    send_latency: int = 0,
    time_limit: float = 30.0,
    seed: int = 0,
    budget: int = 20_000,
) -> Schedule:
    """A valid schedule with the least simulated makespan found, every device within `memory_limit`.

    Args:
      num_devices: pipeline devices `p`.
      num_microbatches: microbatches `m`.
      cost: a `Cost` (as `simulate` reads it: scalars per device stage, split over a schedule's
        chunks, unless `per="chunk"`; per-stage tuples per logical stage) or a function
        `virtual -> Cost`; default `Cost()`.
      memory_limit: the most stash and weight-residual buffer memory per device, in microbatch x
        full device stage, as the executor allocates it (see the module docstring).
      virtual: the most stages (chunks) per device to consider (1 to `virtual`).
      mode: the simulator's mode to minimise: "lockstep" (the SPMD executor) or "async".
      send_latency: lockstep: extra ticks per message between devices (1: the executor's hidden
        sends; see `jpipe.schedules.ticks.pack`).
      time_limit: seconds after which the search stops and returns the best found so far.
      seed: seed of every random choice.
      budget: how many orders to evaluate (about 0.2 ms each at p = 4, m = 16).

    Returns:
      The schedule (named "auto" when searched, else the best named schedule as built).

    Raises:
      ValueError: bad arguments, or no schedule fits `memory_limit` (the message gives the smallest
        limit one fits).
    """
    return search_result(
        num_devices,
        num_microbatches,
        cost,
        memory_limit=memory_limit,
        virtual=virtual,
        mode=mode,
        send_latency=send_latency,
        time_limit=time_limit,
        seed=seed,
        budget=budget,
    ).schedule


def search_result(
    num_devices: int,
    num_microbatches: int,
    cost: CostModel | None = None,
    *,
    memory_limit: float,
    virtual: int = 2,
    mode: str = "lockstep",
    send_latency: int = 0,
    time_limit: float = 30.0,
    seed: int = 0,
    budget: int = 20_000,
) -> SearchResult:
    """`search`, with the baseline it beat and what the search spent (see `search` for the args)."""
    started = time.monotonic()
    deadline = started + time_limit
    _check_arguments(num_devices, num_microbatches, memory_limit, virtual, mode, send_latency, time_limit, budget)
    cost_of = _cost_model(cost, num_devices, virtual)
    named, spaces = _named(num_devices, num_microbatches, cost_of, mode, send_latency)
    fitting = [n for n in named if n.memory <= memory_limit + EPSILON]
    if not fitting:
        smallest = min(named, key=lambda n: n.memory)
        raise ValueError(
            f"memory_limit={memory_limit:g}: no schedule fits; the smallest limit that fits is "
            f"{smallest.memory:g} ({smallest.schedule.name}, virtual {smallest.virtual}); "
            f"memory is in microbatch x full device stage"
        )
    baseline = min(fitting, key=lambda n: n.makespan)
    rng = random.Random(seed)
    starts, evaluations = _starts(spaces, fitting, memory_limit, rng, deadline, budget)
    pool, evaluations = _climb(starts, spaces, memory_limit, rng, deadline, budget, evaluations)
    best_space, best_rows, best = min(pool, key=lambda entry: entry[2]) if pool else (None, None, math.inf)
    timed_out = time.monotonic() > deadline
    chosen = _chosen(baseline, best_space, best_rows, best, mode, send_latency, memory_limit)
    return SearchResult(
        schedule=chosen.schedule,
        makespan=chosen.makespan,
        memory=chosen.memory,
        slots=_slots(chosen),
        cost=cost_of[chosen.virtual],
        baseline=baseline.schedule,
        baseline_makespan=baseline.makespan,
        named=tuple(named),
        front=pareto_front(named),
        evaluations=evaluations,
        seconds=time.monotonic() - started,
        timed_out=timed_out,
        split=chosen.split,
    )


_NUM_STARTS = 4  # how many of the best starting points the local search improves
_KICK_MOVES = 5000  # moves of each hill climb after a kick
_LOOKAHEADS = (2, 3, 4, 6)  # how far a kick's repack looks ahead in a device's order


def _check_arguments(
    p: int, m: int, limit: float, virtual: int, mode: str, latency: int, time_limit: float, budget: int
) -> None:
    for name, value in (("num_devices", p), ("num_microbatches", m), ("virtual", virtual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"memory_limit: expected a number > 0 (microbatch x full device stage), got {limit!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(latency, bool) or not isinstance(latency, int) or latency < 0:
        raise ValueError(f"send_latency: expected an int >= 0, got {latency!r}")
    if not time_limit > 0:
        raise ValueError(f"time_limit: expected seconds > 0, got {time_limit!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget: expected an int >= 0, got {budget!r}")


def _cost_model(cost: CostModel | None, p: int, virtual: int) -> dict[int, Cost]:
    """The per-chunk `Cost` of every virtual the search may use (`Cost.chunk_cost`)."""
    if cost is None:
        cost = Cost()
    costs = {}
    for v in range(1, virtual + 1):
        if isinstance(cost, Cost):
            if cost.num_stages in (None, p * v):
                costs[v] = cost.chunk_cost(v)
        else:
            one = cost(v)
            if not isinstance(one, Cost):
                raise ValueError(f"cost({v}): expected a Cost, got {one!r}")
            one.check_stages(p * v)
            costs[v] = one.chunk_cost(v)
    if not costs:
        raise ValueError(f"cost gives times for {cost.num_stages} stages: not p * v for p = {p}, v <= {virtual}")
    return costs


def _named(
    p: int, m: int, cost_of: dict[int, Cost], mode: str, latency: int
) -> tuple[list[Named], dict[tuple[int, ...], Orders]]:
    """Every named schedule that builds, simulated, and one search space per placement they use.

    In lockstep mode `simulate` runs every B as I then W, so the fast evaluation of the split
    schedule gives its makespan and memory exactly; a schedule with B actions is also simulated with
    B whole, and kept so when that is no slower (what the executor's `split_backward="auto"`
    runs; a whole B holds no weight residual). In async mode `simulate` itself is used, and the
    memory of the schedule as written.
    """
    named, spaces = [], {}
    for name in SCHEDULES:
        for v in sorted(cost_of):
            for schedule in _built(name, p, m, v, latency):
                placement = schedule.placement
                if placement not in spaces:
                    spaces[placement] = Orders(p, m, placement, cost_of[v], mode, latency)
                if mode == "lockstep":
                    named.append(_lockstep_named(schedule, v, spaces[placement], latency))
                else:
                    sim = simulate(schedule, cost_of[v], mode, send_latency=latency)
                    memory = buffer_memory(buffer_slots(schedule), cost_of[v].weight_residuals, v)
                    named.append(Named(schedule, v, sim.makespan, memory, split=False))
    return named, spaces


def _lockstep_named(schedule: Schedule, virtual: int, space: Orders, latency: int) -> Named:
    """`schedule` in lockstep with B split (the fast evaluation) or whole, whichever is faster (ties: whole)."""
    score = space.evaluate(space.rows_of(schedule))
    split = Named(schedule, virtual, score.makespan, score.memory)
    if not _has_b(schedule):
        return split
    whole = simulate(schedule, space.cost, "lockstep", split_backward=False, send_latency=latency).makespan
    if whole > split.makespan:
        return split
    memory = buffer_memory(buffer_slots(schedule), space.cost.weight_residuals, virtual)
    return Named(schedule, virtual, whole, memory, split=False)


def _has_b(schedule: Schedule) -> bool:
    return any(action.op is Op.B for row in schedule.actions for action in flatten(row))


def _built(name: str, p: int, m: int, v: int, latency: int) -> list[Schedule]:
    """The named schedule, and with a send latency its version `build` makes for that latency (the
    two-stream order, when that packs faster at unit costs), if different."""
    try:
        schedules = [build(name, p, m, v)]
    except ScheduleError:
        return []
    if latency == 1:
        for_latency = build(name, p, m, v, send_latency=1)
        if for_latency.actions != schedules[0].actions:
            schedules.append(for_latency)
    return schedules


_LIST_COST = 20  # one list-scheduled order costs about as much as this many evaluations
_LIST_SHARE = 5  # list scheduling spends at most 1 / this of the budget


def _policies(p: int, limit: float, rng: random.Random) -> list[Policy]:
    """The list scheduler's policy grid and as many random policies, in a random order."""
    grid = []
    for forward_first in (False, True):
        for lag in (0, 1, 2, 1 << 30):
            for deep_first in (True, False):
                for align in (False, True):
                    for slope, offset in ((1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (0, 1 << 30)):
                        depth = tuple(float(offset + slope * (p - d)) for d in range(p))
                        grid.append(Policy(forward_first, (lag,) * p, depth, deep_first, align))
    for _ in range(len(grid)):
        lag = tuple(rng.choice((0, 1, 2, 3, 1 << 30)) for _ in range(p))
        depth = tuple(rng.uniform(1.0, max(1.0, limit)) for _ in range(p))
        noise = rng.choice((0.0, 0.02, 0.1))
        flags = [rng.random() < 0.5 for _ in range(3)]
        grid.append(Policy(flags[0], lag, depth, flags[1], flags[2], noise=noise, seed=rng.randrange(1 << 30)))
    rng.shuffle(grid)
    return grid


def _starts(
    spaces: dict[tuple[int, ...], Orders],
    fitting: list[Named],
    limit: float,
    rng: random.Random,
    deadline: float,
    budget: int,
) -> tuple[list[tuple[tuple[int, ...], list[list[int]], float]], int]:
    """Starting points, best first: the fitting named schedules and list-scheduled orders.

    List scheduling spends about `budget / _LIST_SHARE` evaluations' worth of time.
    """
    starts = []
    evaluations = 0
    seen = set()
    for n in fitting:
        space = spaces[n.schedule.placement]
        rows = space.rows_of(n.schedule)
        evaluations += 1
        # In async mode a whole B frees its stash at once; split into I and W it holds weight residuals.
        if space.memory(rows) <= limit + EPSILON:
            starts.append((n.schedule.placement, rows, space.makespan(rows)))
            seen.add(_fingerprint(rows))
    p = next(iter(spaces.values())).num_devices
    lists = max(1, budget // (_LIST_SHARE * _LIST_COST * len(spaces)))
    for policy in _policies(p, limit, rng)[:lists]:
        for placement, space in spaces.items():
            if time.monotonic() > deadline:
                break
            rows = list_schedule(space, policy, limit)
            evaluations += _LIST_COST
            if rows is None or space.memory(rows) > limit + EPSILON:
                continue
            key = _fingerprint(rows)
            if key in seen:
                continue
            seen.add(key)
            starts.append((placement, rows, space.makespan(rows)))
    starts.sort(key=lambda start: start[2])
    return starts, evaluations


def _climb(
    starts: list[tuple[tuple[int, ...], list[list[int]], float]],
    spaces: dict[tuple[int, ...], Orders],
    limit: float,
    rng: random.Random,
    deadline: float,
    budget: int,
    evaluations: int,
) -> tuple[list[list], int]:
    """Local search from the best starts, then kicks; returns the pool [space, rows, makespan] and
    the evaluations spent in all.

    Half of what is left of the budget climbs from the `_NUM_STARTS` best starts (half of that from
    the best one). The rest is iterated local search: kick a pool entry (the best one every other
    time) with a work-conserving repack of its orders, climb again, keep the result if better.
    """
    remaining = max(0, budget - evaluations) // 2
    pool: list[list] = []
    chosen = starts[:_NUM_STARTS]
    for index, (key, rows, _) in enumerate(chosen):
        share = remaining // 2 if index == 0 and len(chosen) > 1 else remaining // (len(chosen) - index)
        rows, makespan, used = improve(spaces[key], rows, limit, rng, share, deadline)
        remaining -= used
        evaluations += used
        pool.append([spaces[key], rows, makespan])
    while pool and evaluations < budget and time.monotonic() <= deadline:
        best = min(range(len(pool)), key=lambda k: pool[k][2])
        entry = pool[best] if rng.random() < 0.5 else pool[rng.randrange(len(pool))]
        space, rows, makespan = entry
        kicked = repack(space, rows, limit, rng.choice(_LOOKAHEADS))
        evaluations += _LIST_COST
        if kicked is None or space.memory(kicked) > limit + EPSILON:
            continue
        kicked, climbed, used = improve(space, kicked, limit, rng, min(_KICK_MOVES, budget - evaluations), deadline)
        evaluations += used
        if climbed < makespan - EPSILON:
            entry[1:] = [kicked, climbed]
    return pool, evaluations


def _fingerprint(rows: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(row) for row in rows)


def _chosen(
    baseline: Named,
    space: Orders | None,
    rows: list[list[int]] | None,
    makespan: float,
    mode: str,
    latency: int,
    limit: float,
) -> Named:
    """The searched schedule, checked by `validate`, `simulate` and `buffer_slots`, if it beats the
    baseline."""
    if space is None or rows is None or not makespan < baseline.makespan - EPSILON:
        return baseline
    schedule = space.schedule(rows)
    validate(schedule)
    sim = simulate(schedule, space.cost, mode, send_latency=latency)
    memory = buffer_memory(buffer_slots(schedule), space.cost.weight_residuals, space.virtual)
    if abs(sim.makespan - makespan) > 1e-6 * max(1.0, makespan) or memory > limit + EPSILON:
        raise AssertionError(
            f"search: the fast evaluation (makespan {makespan}, memory <= {limit}) disagrees with simulate "
            f"and buffer_slots (makespan {sim.makespan}, memory {memory})"
        )
    return Named(schedule, space.virtual, sim.makespan, memory)


def _slots(chosen: Named) -> tuple[tuple[int, int], ...]:
    """Per device, the buffer slots of the chosen schedule as the search counted it (B split or whole)."""
    return buffer_slots(split_backward(chosen.schedule) if chosen.split else chosen.schedule)
