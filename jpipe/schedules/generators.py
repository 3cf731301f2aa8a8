"""Schedule generators by name: `build("1f1b", num_devices=4, num_microbatches=8)`.

Every generator is a function `(num_devices, num_microbatches, virtual) -> Schedule` registered under
a name with `@register(name)`; `build` checks the common arguments, calls it, names the result and
validates it. The orders follow the published schedules (references in each docstring); the code is
written from the descriptions, with torch.distributed.pipelining's written schedules as a cross-check.

Notation in the docstrings: `p` devices, `m` microbatches, `v` stages (chunks) per device, `r` a device.

Limits on the arguments (each violation raises `ScheduleError` naming the argument and the rule):

| name | virtual | num_microbatches |
|---|---|---|
| naive, gpipe, 1f1b, zb_h1, zb_h2 | 1 | any m >= 1 |
| interleaved_1f1b | >= 2 | any m >= 1 (Megatron's m % p == 0 generalised: groups of p..2p-1) |
| looped_bfs | any v >= 1 | any m >= 1 |
| zbv | 2 | any m >= 1 (m < 2p - 1 drops the missing microbatches from the m = 2p - 1 order) |
| dualpipev | 2 | m >= 2p (DeepSeek's DualPipeV requires it) |
| v_half, v_min (`jpipe.schedules.controllable`) | 2 | any m >= 1 |
| stp (`COMPOSITE_SCHEDULES`) | 2 | m >= 3p - 1 (STP's step counts) |
| 1f1b_overlap (`COMPOSITE_SCHEDULES`) | 1 | any m >= 1 |

Schedules with replicas or per-microbatch routes (`Schedule.model_stage`, `Schedule.routes`) are
registered apart, in `ROUTED_SCHEDULES` (`@register(name, routed=True)`): `bitpipe`, `dualpipe`
(`jpipe.schedules.bidirectional`) and `skippipe` (`jpipe.schedules.routes`). `build` finds
both kinds; `SCHEDULES` holds only the schedules every part of jpipe runs (the executor, the
training config, the schedule search), so code iterating over it does not meet routes.

Schedules whose rows hold composites (`jpipe.schedules.ir.Composite`: two actions of different
microbatches run together) are registered apart too, in `COMPOSITE_SCHEDULES`
(`@register(name, composite=True)`): `stp` and `1f1b_overlap` (`jpipe.schedules.braided`). The
executor runs each composite's two ops in one braided tick (or one after the other with
`braid=False`). `dualpipev` emits its overlapped F&B pairs as composites with
`build("dualpipev", p, m, overlap=True)`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque
from collections.abc import Callable, Iterable

from jpipe.schedules.ir import Action, Composite, Op, Schedule, ScheduleError, loop_placement, v_placement
from jpipe.schedules.validate import validate

Generator = Callable[..., Schedule]
"""`fn(num_devices, num_microbatches, virtual, **options) -> Schedule`."""

SCHEDULES: dict[str, Generator] = {}
"""Schedules without replicas or routes: what the executor, training and the search run."""

ROUTED_SCHEDULES: dict[str, Generator] = {}
"""Schedules with replicas or per-microbatch routes: validation, simulation, rendering, the
executor and training run them (replicas hold copies of one model stage's parameters)."""

COMPOSITE_SCHEDULES: dict[str, Generator] = {}
"""Schedules whose rows hold composites (two actions run together): validation, simulation,
rendering and CSV read them; the executor runs each composite's two ops braided in one tick
(`jpipe.value_and_grad(..., braid=True)`, the default), or flattened, one per tick, with `braid=False`."""


def register(name: str, *, routed: bool = False, composite: bool = False) -> Callable[[Generator], Generator]:
    """Decorator registering `fn(num_devices, num_microbatches, virtual) -> Schedule` under `name`.

    `build(name, ...)` then calls it; a later registration under the same name replaces the former
    (in any registry). With `routed=True` the generator goes to `ROUTED_SCHEDULES`: its schedules
    have replicas or per-microbatch routes; with `composite=True` to `COMPOSITE_SCHEDULES`: its
    rows hold composites.
    """
    if routed and composite:
        raise ScheduleError(f"register({name!r}): choose one registry, routed or composite")

    def wrap(fn: Generator) -> Generator:
        for registry in (SCHEDULES, ROUTED_SCHEDULES, COMPOSITE_SCHEDULES):
            registry.pop(name, None)
        target = ROUTED_SCHEDULES if routed else COMPOSITE_SCHEDULES if composite else SCHEDULES
        target[name] = fn
        return fn

    return wrap


def _check_positive_int(value: object, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{argument} must be an int, got {value!r}")
    if value < 1:
        raise ScheduleError(f"{argument} must be >= 1, got {value}")


def _generator(name: str) -> Generator:
    """The generator registered under `name` in either registry; ScheduleError listing the known ones."""
    generator = SCHEDULES.get(name) or ROUTED_SCHEDULES.get(name) or COMPOSITE_SCHEDULES.get(name)
    if generator is None:
        known = sorted(SCHEDULES) + sorted(ROUTED_SCHEDULES) + sorted(COMPOSITE_SCHEDULES)
        raise ScheduleError(f"unknown schedule {name!r}; known schedules: {', '.join(known)}")
    return generator


def default_virtual(name: str) -> int:
    """The chunks per device that schedule `name` is built with when `build` is given no `virtual`.

    The generator's own default for `virtual`, or 1 when it has none.
    """
    parameter = inspect.signature(_generator(name)).parameters.get("virtual")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return 1  # a registered generator that gives no default
    return parameter.default


def build(
    name: str,
    num_devices: int,
    num_microbatches: int,
    virtual: int | None = None,
    *,
    send_latency: int = 0,
    streams_memory_limit: float | None = None,
    **options,
) -> Schedule:
    """Build the schedule registered under `name`.

    Args:
      name: a key of `SCHEDULES` (e.g. "gpipe", "1f1b", "interleaved_1f1b", "zbv"), of
        `ROUTED_SCHEDULES` ("bitpipe", "dualpipe", "skippipe") or of `COMPOSITE_SCHEDULES` ("stp",
        "1f1b_overlap").
      num_devices: pipeline devices `p` (>= 1).
      num_microbatches: microbatches `m` per step (>= 1; some schedules need more, see the module doc).
      virtual: stages (chunks) per device `v` (>= 1); the schedule has `p * v` logical stages.
        Unset: the schedule's own default (`default_virtual(name)`: 2 for interleaved_1f1b,
        looped_bfs, zbv, dualpipev and dualpipe, 4 for bitpipe, otherwise 1).
      send_latency: 0, or 1 for an executor that hides its sends (`overlap_sends=True`): then the
        faster, in the lockstep simulation with that latency at unit costs, of the named order and
        its two-stream version (`jpipe.schedules.streams.two_streams`: two half batches interleaved
        tick by tick; about twice the peak activations), named `<name>[2 streams]` when chosen.
      streams_memory_limit: with `send_latency=1`, take the two-stream order only when its peak
        activations (`jpipe.schedules.peak_activations`, device max) are at most this multiple of
        the named order's; None (default): no limit. The training command passes its
        `parallel.two_stream_memory` (1.25 unless set), so hidden sends never double its memory.
      **options: keyword options of the generator (e.g. skippipe's `skip_ratio`, `memory_cap`,
        `seed`); the plain schedules take none.

    Returns:
      A schedule named `name` (or `<name>[2 streams]`) that passes `validate`.

    Raises:
      ScheduleError: unknown name (the message lists the known ones), or arguments the schedule does
        not support (the message names the argument and the rule).
    """
    generator = _generator(name)
    _check_positive_int(num_devices, "num_devices")
    _check_positive_int(num_microbatches, "num_microbatches")
    if virtual is None:
        virtual = default_virtual(name)
    _check_positive_int(virtual, "virtual")
    if send_latency not in (0, 1) or isinstance(send_latency, bool):
        raise ScheduleError(f"send_latency must be 0 or 1, got {send_latency!r}")
    accepted = inspect.signature(generator).parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in accepted.values())
    unknown = sorted(option for option in options if option not in accepted and not takes_any)
    if unknown:
        raise ScheduleError(f"schedule {name!r} takes no option {', '.join(unknown)}")
    schedule = generator(num_devices, num_microbatches, virtual, **options)
    if schedule.name != name:
        schedule = dataclasses.replace(schedule, name=name)
    validate(schedule)
    if streams_memory_limit is not None and (
        isinstance(streams_memory_limit, bool)
        or not isinstance(streams_memory_limit, (int, float))
        or not streams_memory_limit > 0
    ):
        raise ScheduleError(f"streams_memory_limit must be a number > 0, got {streams_memory_limit!r}")
    if send_latency and not schedule.has_composites:  # two_streams re-times single actions only
        schedule = _for_send_latency(
            schedule, name, num_devices, num_microbatches, virtual, options, streams_memory_limit
        )
    return schedule


def _for_send_latency(
    schedule: Schedule, name: str, p: int, m: int, virtual: int, options: dict, memory_limit: float | None = None
) -> Schedule:
    """`schedule` or its two-stream version, whichever packs into less time with a one-tick latency
    (the two-stream version only within `memory_limit` x the schedule's peak activations)."""
    from jpipe.schedules.simulate import peak_activations, simulate  # no import cycle: simulate needs nothing here
    from jpipe.schedules.streams import two_streams

    try:
        streamed = two_streams(lambda n: build(name, p, n, virtual, **options), m)
    except ScheduleError:
        return schedule  # a half batch the schedule does not support (e.g. dualpipev below 2p)
    validate(streamed)
    if memory_limit is not None and max(peak_activations(streamed)) > memory_limit * max(peak_activations(schedule)):
        return schedule
    plain = simulate(schedule, mode="lockstep", send_latency=1).makespan
    return streamed if simulate(streamed, mode="lockstep", send_latency=1).makespan < plain else schedule


# --- helpers ---------------------------------------------------------------------------------------


def _require_virtual(name: str, virtual: int, allowed: int) -> None:
    if virtual != allowed:
        raise ScheduleError(f"{name} needs virtual == {allowed}, got virtual={virtual}")


def _schedule(
    name: str,
    num_devices: int,
    num_microbatches: int,
    placement: tuple[int, ...],
    rows: Iterable[list[Action] | list[Action | Composite]],
) -> Schedule:
    return Schedule(
        num_devices=num_devices,
        num_microbatches=num_microbatches,
        placement=placement,
        actions=tuple(tuple(row) for row in rows),
        name=name,
    )


def _one_f_one_b_order(num_forward_first: int, forwards: list[Action], backwards: list[Action]) -> list[Action]:
    """`num_forward_first` forwards, then alternate one forward / one backward, then the backwards left.

    `forwards` and `backwards` have the same length and are in the order they must run.
    """
    warmup = min(num_forward_first, len(forwards))
    row = list(forwards[:warmup])
    for index in range(len(forwards) - warmup):
        row.append(forwards[warmup + index])
        row.append(backwards[index])
    row.extend(backwards[len(forwards) - warmup :])
    return row


# --- single-chunk schedules (virtual = 1) ---------------------------------------------------------


@register("naive")
def naive(num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """One microbatch at a time through all stages, forward then backward: no overlap (a baseline).

    Device r runs `F(r, k), B(r, k)` for k = 0..m-1; the data dependencies serialise everything, so the
    makespan is `m * p * (F + B)`.
    """
    _require_virtual("naive", virtual, 1)
    rows = []
    for device in range(num_devices):
        row: list[Action] = []
        for mb in range(num_microbatches):
            row += [Action(device, Op.F, mb), Action(device, Op.B, mb)]
        rows.append(row)
    return _schedule("naive", num_devices, num_microbatches, loop_placement(num_devices, 1), rows)


@register("gpipe")
def gpipe(num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """GPipe (Huang et al. 2019): every forward, then every backward, both in microbatch order.

    Makespan `(m + p - 1)(F + B)`; every device holds all m microbatches' activations at the turn.
    """
    _require_virtual("gpipe", virtual, 1)
    rows = [
        [Action(d, Op.F, mb) for mb in range(num_microbatches)]
        + [Action(d, Op.B, mb) for mb in range(num_microbatches)]
        for d in range(num_devices)
    ]
    return _schedule("gpipe", num_devices, num_microbatches, loop_placement(num_devices, 1), rows)


@register("1f1b")
def one_f_one_b(num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021).

    Device r: `p - 1 - r` warmup forwards, then one forward / one backward in turn, then the remaining
    backwards. Same makespan as GPipe, but device r holds at most `min(m, p - r)` microbatches.
    """
    _require_virtual("1f1b", virtual, 1)
    rows = []
    for d in range(num_devices):
        forwards = [Action(d, Op.F, mb) for mb in range(num_microbatches)]
        backwards = [Action(d, Op.B, mb) for mb in range(num_microbatches)]
        rows.append(_one_f_one_b_order(num_devices - 1 - d, forwards, backwards))
    return _schedule("1f1b", num_devices, num_microbatches, loop_placement(num_devices, 1), rows)


@register("zb_h1")
def zb_h1(num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", handcrafted H1), B split into I + W.

    Device r follows 1F1B with I in place of B (`p - 1 - r` warmup forwards), and delays each W by r
    backwards: `W(k)` runs right after `I(k + r)`; the last r W's end the list. The delayed W's fill the
    cool-down bubble: for `m >= p` and `W <= min(F, I)` the makespan is `m(F + I + W) + (p - 1)(F + I - W)`
    (the bubble is a third of 1F1B's when F = I = W), while every device holds at most `min(m, p)`
    microbatches.
    """
    _require_virtual("zb_h1", virtual, 1)
    rows = []
    for d in range(num_devices):
        forwards = [Action(d, Op.F, mb) for mb in range(num_microbatches)]
        inputs = [Action(d, Op.I, mb) for mb in range(num_microbatches)]
        row: list[Action] = []
        next_weight = 0
        for action in _one_f_one_b_order(num_devices - 1 - d, forwards, inputs):
            row.append(action)
            if action.op is Op.I and action.microbatch >= d:
                row.append(Action(d, Op.W, next_weight))
                next_weight += 1
        row += [Action(d, Op.W, mb) for mb in range(next_weight, num_microbatches)]
        rows.append(row)
    return _schedule("zb_h1", num_devices, num_microbatches, loop_placement(num_devices, 1), rows)


@register("zb_h2")
def zb_h2(num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """ZB-H2 (Qi et al. 2023, handcrafted H2), B split into I + W; peak `2p - 1` microbatches.

    Device r runs (with `s = max(0, m - (2p - 1))` steady cycles):
      1. warmup: `a = min(m, 2(p - 1 - r) + 1)` forwards (enough to cover the first I's round trip);
      2. steady: s cycles `I(k), W(k), F(a + k)`;
      3. tail 1: `t = min(2r, m - a - s)` cycles `I, F` with the W's held back (the I's now reach the
         earlier devices every `F + I` instead of every `F + I + W`);
      4. tail 2: each remaining I followed by the oldest pending W; then the W's left.
    With F = I = W every device is busy from its first action to its last one: the schedule is the
    paper's parallelogram. For `m >= 2p - 1` and `W <= min(F, I)` each device's own bubble (its span
    from first to last action, minus its busy time) is at most `(p - 1)(F + I - 2W)`, reached on some
    device. The global makespan also counts the last device's late start: `m(F + I + W) + (p - 1)F`
    at F = I = W (no schedule can start device p - 1 before `(p - 1)F`).
    """
    _require_virtual("zb_h2", virtual, 1)
    p, m = num_devices, num_microbatches
    steady = max(0, m - (2 * p - 1))
    rows = []
    for d in range(p):
        warmup = min(m, 2 * (p - 1 - d) + 1)
        held = min(2 * d, m - warmup - steady)
        row = [Action(d, Op.F, mb) for mb in range(warmup)]
        next_forward, next_weight = warmup, 0
        for mb in range(m):
            row.append(Action(d, Op.I, mb))
            if mb < steady or mb >= steady + held:
                row.append(Action(d, Op.W, next_weight))
                next_weight += 1
            if next_forward < m:
                row.append(Action(d, Op.F, next_forward))
                next_forward += 1
        row += [Action(d, Op.W, mb) for mb in range(next_weight, m)]
        rows.append(row)
    return _schedule("zb_h2", p, m, loop_placement(p, 1), rows)


# --- loop placement, several chunks per device -----------------------------------------------------


def _microbatch_groups(num_devices: int, num_microbatches: int) -> list[range]:
    """Split the microbatches into `max(1, m // p)` consecutive groups, sizes as equal as possible.

    Every group has between p and 2p - 1 microbatches (all m in one group when m < p); the larger
    groups come first. When `m % p == 0` these are Megatron's groups of exactly p.
    """
    num_groups = max(1, num_microbatches // num_devices)
    base, extra = divmod(num_microbatches, num_groups)
    groups, first = [], 0
    for index in range(num_groups):
        size = base + (1 if index < extra else 0)
        groups.append(range(first, first + size))
        first += size
    return groups


@register("interleaved_1f1b")
def interleaved_1f1b(num_devices: int, num_microbatches: int, virtual: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM), loop placement: stage `r + k p` on r.

    The microbatches are cut into `max(1, m // p)` consecutive groups of as equal sizes as possible
    (larger first; each between p and 2p - 1, or all m when m < p). The forward order on every device
    runs a group through chunk 0, chunk 1, ..., chunk v-1, then the next group; the backward order is
    the same with the chunks from the last one. Device r runs `2(p - 1 - r) + (v - 1) g` warmup
    forwards (g = the first group's size; at most m v), then 1F1B, then the remaining backwards.

    When `m % p == 0` this is Megatron's schedule (groups of p, warmup `2(p - 1 - r) + (v - 1) p`);
    other m generalise it as torch.pipelining does (which requires `m % (m // p) == 0`). Needs
    `virtual >= 2`; any m >= 1. For every `m >= p` the bubble is `(p - 1)(F + B) / v` in full-stage
    times; device 0 holds `p + (p - 1) / v` microbatches when `m % p == 0`.
    """
    if virtual < 2:
        raise ScheduleError(f"interleaved_1f1b needs virtual >= 2, got virtual={virtual} (use '1f1b' for 1)")
    p, m = num_devices, num_microbatches
    groups = _microbatch_groups(p, m)
    order = [(chunk, mb) for group in groups for chunk in range(virtual) for mb in group]
    rows = []
    for d in range(p):
        forwards = [Action(d + chunk * p, Op.F, mb) for chunk, mb in order]
        backwards = [Action(d + (virtual - 1 - chunk) * p, Op.B, mb) for chunk, mb in order]
        warmup = 2 * (p - 1 - d) + (virtual - 1) * len(groups[0])
        rows.append(_one_f_one_b_order(warmup, forwards, backwards))
    return _schedule("interleaved_1f1b", p, m, loop_placement(p, virtual), rows)


@register("looped_bfs")
def looped_bfs(num_devices: int, num_microbatches: int, virtual: int = 2) -> Schedule:
    """Looped BFS (Lamy-Poirier 2023, "Breadth-First Pipeline Parallelism"), loop placement.

    Device r runs the forwards of its chunk 0 for every microbatch, then chunk 1, ..., then the
    backwards chunk by chunk from the last one, microbatches in reverse. Bubble `(p - 1)(F + B) / v` in
    full-stage times when `m >= p`; every device holds all m microbatches at the turn.
    """
    p, m = num_devices, num_microbatches
    rows = []
    for d in range(p):
        stages = [d + chunk * p for chunk in range(virtual)]
        row = [Action(s, Op.F, mb) for s in stages for mb in range(m)]
        row += [Action(s, Op.B, mb) for s in reversed(stages) for mb in reversed(range(m))]
        rows.append(row)
    return _schedule("looped_bfs", p, m, loop_placement(p, virtual), rows)


# --- V placement: device r holds stages r and 2p - 1 - r ------------------------------------------


@register("zbv")
def zbv(num_devices: int, num_microbatches: int, virtual: int = 2) -> Schedule:
    """ZB-V (Qi et al. 2023, section 6, handcrafted for F = I = W), V placement, B split into I + W.

    Device r with chunks `c0 = r` and `c1 = 2p - 1 - r` (`n = max(m, 2p - 1)`):
      1. `2(p - r) - 1` forwards of c0; then r pairs `F(c1), F(c0)`; then `p - r` triples
         `F(c1), I(c1), W(c1)`;
      2. steady: `F(c0)` (while any are left), `I(c0), W(c0), F(c1), I(c1), W(c1)` until every c0
         forward has its c1 forward;
      3. cool-down: r pairs `I(c0), I(c1)`; `p - r` pairs `I(c0), W(c0)`; the c1 W's left; the c0 W's left.
    When `m < 2p - 1` the order is made for `n` microbatches and those >= m are dropped. Peak `p`
    full-stage microbatches (`2p` chunk activations) per device; with F = I = W = t per chunk and
    `m >= 2p - 1`, makespan `6 m t + (p - 1) t`.
    """
    _require_virtual("zbv", virtual, 2)
    p, m = num_devices, num_microbatches
    n = max(m, 2 * p - 1)
    last = 2 * p - 1
    rows = []
    for d in range(p):
        c0, c1 = d, last - d
        count = {(c0, Op.F): 0, (c1, Op.F): 0, (c0, Op.I): 0, (c1, Op.I): 0, (c0, Op.W): 0, (c1, Op.W): 0}
        row: list[Action] = []

        def emit(stage: int, op: Op, row: list[Action] = row, count: dict = count) -> None:
            row.append(Action(stage, op, count[stage, op]))
            count[stage, op] += 1

        for _ in range(2 * (p - d) - 1):
            emit(c0, Op.F)
        for _ in range(d):
            emit(c1, Op.F)
            emit(c0, Op.F)
        for _ in range(p - d):
            emit(c1, Op.F)
            emit(c1, Op.I)
            emit(c1, Op.W)
        while count[c1, Op.F] < count[c0, Op.F] or count[c0, Op.F] < n:
            if count[c0, Op.F] < n:
                emit(c0, Op.F)
            emit(c0, Op.I)
            emit(c0, Op.W)
            emit(c1, Op.F)
            emit(c1, Op.I)
            emit(c1, Op.W)
        for _ in range(d):
            emit(c0, Op.I)
            emit(c1, Op.I)
        for _ in range(p - d):
            emit(c0, Op.I)
            emit(c0, Op.W)
        while count[c1, Op.W] < count[c1, Op.I]:
            emit(c1, Op.W)
        while count[c0, Op.W] < count[c0, Op.I]:
            emit(c0, Op.W)
        rows.append([action for action in row if action.microbatch < m])
    return _schedule("zbv", p, m, v_placement(p), rows)


@register("dualpipev")
def dualpipev(num_devices: int, num_microbatches: int, virtual: int = 2, overlap: bool = False) -> Schedule:
    """DualPipeV (DeepSeek's DualPipe cut in half, Sea AI Lab), V placement; needs `m >= 2p`.

    DeepSeek's order (deepseek-ai/DualPipe, `DualPipeV.step`) for device r with chunks `c0 = r` and
    `c1 = 2p - 1 - r`, where each overlapped "F&B" pair runs here as the forward then the backward
    (a device runs one action at a time):
      1. `2(p - 1 - r)` forwards of c0;  2. r + 1 pairs `F(c0), F(c1)`;
      3. `p - 1 - r` triples `I(c1), W, F(c1)` (W = the oldest pending weight gradient);
      4. `m - 2p + r + 1` rounds `F(c0), B(c1), F(c1), B(c0)`;
      5. `p - 1 - r` rounds `B(c1), F(c1), B(c0)`;
      6. r + 1 pairs of backwards (c1 then c0): full B in the first half, I (W deferred) after;
      7. `p - 1 - r` pairs `W, I(c0)`;  8. the r + 1 W's left.
    DeepSeek's README gives the bubble `(PP/2 - 1)(F&B + B - 3W)` with PP = 2p stages, counting an
    F&B pair as one unit whose results are ready when it ends; with F&B = F + B and F = I = W this
    order reproduces it exactly. Run as F then B (the forward's output leaves earlier), the makespan
    is never above it, and equals `2m(F + B) + (p - 1)F` when I <= W. Peak `p + 1/2` full stages
    (DeepSeek's PP + 1 chunk activations).

    With `overlap=True` the overlapped pairs are `Composite(F, B)` steps instead (the same actions
    in the same order): in step 4 `(F(c0); B(c1))` and `(F(c1); B(c0))`, except the last device's
    first `F(c0), B(c1)`, which DeepSeek runs apart; in step 5 `(F(c1); B(c0))`. These are the
    `(..F..;..B..)OVERLAP_F_B` cells torch.pipelining writes for DualPipeV.
    """
    _require_virtual("dualpipev", virtual, 2)
    p, m = num_devices, num_microbatches
    if m < 2 * p:
        raise ScheduleError(f"dualpipev needs num_microbatches >= 2 * num_devices = {2 * p}, got num_microbatches={m}")
    last = 2 * p - 1
    rows = [_dualpipe_order(p, m, d, d, last - d) for d in range(p)]
    if overlap:
        rows = [_overlapped_pairs(row, skip_first=d == p - 1) for d, row in enumerate(rows)]
    return _schedule("dualpipev", p, m, v_placement(p), rows)


def _overlapped_pairs(row: list[Action], skip_first: bool) -> list[Action | Composite]:
    """DualPipe's order with each forward directly followed by a full backward as one composite.

    In `_dualpipe_order` exactly steps 4 and 5 put a B right after an F, and those are DeepSeek's
    overlapped F&B pairs; `skip_first` keeps the first such pair apart (the last rank's step 4).
    """
    steps: list[Action | Composite] = []
    index = 0
    while index < len(row):
        action = row[index]
        following = row[index + 1] if index + 1 < len(row) else None
        if action.op is Op.F and following is not None and following.op is Op.B:
            if not skip_first:
                steps.append(Composite(action, following))
                index += 2
                continue
            skip_first = False
        steps.append(action)
        index += 1
    return steps


def _dualpipe_order(half: int, n: int, rank: int, c0: int, c1: int) -> list[Action]:
    """DeepSeek's DualPipe order for one device (`DualPipe.step`, steps 1-8), as in `dualpipev`.

    `half` devices per direction (DualPipeV's p; DualPipe's PP / 2), `n` microbatches per chunk,
    `rank` the device's distance from the start of its own direction (0..half-1), `c0` the chunk it
    runs first (its own direction) and `c1` the other. Each chunk runs its microbatches 0..n-1 in
    order; the actions carry those per-chunk indices (the caller renames them).
    """
    next_forward = {c0: 0, c1: 0}
    next_backward = {c0: 0, c1: 0}
    pending_weights: deque[Action] = deque()
    row: list[Action] = []

    def forward(stage: int) -> None:
        row.append(Action(stage, Op.F, next_forward[stage]))
        next_forward[stage] += 1

    def backward(stage: int, split: bool = False) -> None:
        mb = next_backward[stage]
        next_backward[stage] += 1
        if split:
            row.append(Action(stage, Op.I, mb))
            pending_weights.append(Action(stage, Op.W, mb))
        else:
            row.append(Action(stage, Op.B, mb))

    def weight() -> None:
        if pending_weights:
            row.append(pending_weights.popleft())

    p, m, d = half, n, rank
    for _ in range(2 * (p - 1 - d)):
        forward(c0)
    for _ in range(d + 1):
        forward(c0)
        forward(c1)
    for _ in range(p - 1 - d):
        backward(c1, split=True)
        weight()
        forward(c1)
    for _ in range(m - 2 * p + d + 1):
        forward(c0)
        backward(c1)
        forward(c1)
        backward(c0)
    for _ in range(p - 1 - d):
        backward(c1)
        forward(c1)
        backward(c0)
    pairs = d + 1
    split = False
    for index in range(pairs):
        if index == pairs // 2 and d % 2 == 1:
            split = True
        backward(c1, split)
        if index == pairs // 2 and d % 2 == 0:
            split = True
        backward(c0, split)
    for _ in range(p - 1 - d):
        weight()
        backward(c0, split=True)
    while pending_weights:
        weight()
    return row
