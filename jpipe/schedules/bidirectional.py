"""Bidirectional schedules with replicas: DualPipe (DeepSeek-V3) and BitPipe (Wu et al. 2024).

Both run two pipelines in opposite directions over the same devices. Every model stage (block of
layers) has two copies, one per direction, on devices `d` and `p - 1 - d`: the schedule has twice
as many logical stages as model stages (`Schedule.model_stage`), parameters take 2x the memory,
and the executor sums the gradients of the two copies. Half of the microbatches take the "down"
copies, half the "up" ones (`Schedule.routes`). `p` must be even: an odd `p` would put both
copies of the middle model stage on the middle device.

Notation: `p` devices, `m` microbatches (all directions), `u = p / 2`, `h(d) = min(d, p - 1 - d)`
a device's distance from the nearer end. Costs F, B, I, W are per logical stage (one chunk).
"""

from __future__ import annotations

from jpipe.schedules.generators import _dualpipe_order, _overlapped_pairs, _require_virtual, register
from jpipe.schedules.ir import Action, Op, Schedule, ScheduleError


def _require_even_devices(name: str, num_devices: int) -> None:
    if num_devices % 2 != 0:
        raise ScheduleError(
            f"{name} needs an even num_devices (the two copies of a model stage live on devices d and "
            f"p - 1 - d), got num_devices={num_devices}"
        )


@register("dualpipe", routed=True)
def dualpipe(num_devices: int, num_microbatches: int, virtual: int = 2, overlap: bool = False) -> Schedule:
    """DualPipe (DeepSeek-V3 technical report; deepseek-ai/DualPipe, `DualPipe.step`).

    Layout (2p logical stages for p model stages, virtual 2): the down copy of model stage i is
    logical stage i on device i; the up copy is logical stage p + i on device p - 1 - i (so device d
    holds stages d and 2p - 1 - d, `v_placement(p)`). Microbatches 0..m/2-1 go down (route
    0, 1, ..., p - 1), m/2..m-1 go up (route p, ..., 2p - 1). Needs p even, m even and
    `m >= 2p` (DeepSeek's `num_chunks >= 2 * num_ranks`).

    Order: DeepSeek's eight steps for each device, with `u = p / 2` devices per half and `h(d)` in
    place of DualPipeV's p and rank, each device's own direction (down for d < u, up otherwise)
    as DualPipeV's first chunk; it is `dualpipev`'s order (same code) on `m / 2` microbatches per
    chunk. Each overlapped "F&B" pair runs here as the forward then the backward.

    Formulas (DeepSeek's README, "Pipeline Bubbles and Memory Usage Comparison", PP = p ranks):
    bubble `(PP/2 - 1)(F&B + B - 3W)`, parameters 2x, activations `PP + 1` (chunk activations per
    device). Non-overlapped, F&B = F + B, the published bubble is `(p/2 - 1)(F + 2B - 3W)`: with
    each pair as one unit whose results are ready when it ends, and F = I = W, the makespan is
    exactly `m(F + B) + (p/2 - 1)(F + 2B - 3W)` (m(F + B) is each device's work). Run as F then B
    (the forward's output leaves before the backward runs) it is never longer, and equals
    `m(F + B) + (p/2 - 1)F` when I <= W (Chimera's SC'21 schedule is this idea without the F&B
    pairing or the I/W split). Peak: `p + 1` chunk activations on every device, i.e.
    `(p + 1) / 2` in `peak_activations`' unit (a device's two chunks). Measured at unit costs
    (F = 1, B = 2, I = W = 1; p in {2, 4, 6}, m from 2p to 32): `tests/test_routes.py`.

    With `overlap=True` each overlapped pair is a `Composite(F, B)` step (the same actions in the
    same order), as in `dualpipev(overlap=True)`: the executor runs the two in one braided tick, so
    one's expert-parallel all-to-alls can run under the other's matmuls (DualPipe's purpose); the
    last rank of each direction runs its first pair apart, as DeepSeek's code does.
    """
    _require_virtual("dualpipe", virtual, 2)
    p, m = num_devices, num_microbatches
    _require_even_devices("dualpipe", p)
    if m % 2 != 0 or m < 2 * p:
        raise ScheduleError(
            f"dualpipe needs an even num_microbatches >= 2 * num_devices = {2 * p} (half go each way), "
            f"got num_microbatches={m}"
        )
    half, n = p // 2, m // 2
    rows = []
    for d in range(p):
        down, up = d, 2 * p - 1 - d  # the device's copies in the two directions
        own, other = (down, up) if d < half else (up, down)
        order = _dualpipe_order(half, n, min(d, p - 1 - d), own, other)
        row = [Action(a.stage, a.op, a.microbatch + (n if a.stage >= p else 0)) for a in order]
        rows.append(_overlapped_pairs(row, skip_first=min(d, p - 1 - d) == half - 1) if overlap else row)
    return Schedule(
        num_devices=p,
        num_microbatches=m,
        placement=tuple(range(p)) + tuple(reversed(range(p))),
        actions=tuple(tuple(row) for row in rows),
        name="dualpipe",
        model_stage=tuple(s % p for s in range(2 * p)),
        routes=tuple(tuple(range(p)) if mb < n else tuple(range(p, 2 * p)) for mb in range(m)),
    )


def bitpipe_layout(num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """BitPipe's placement and model-stage map for `p` devices: 4p logical stages, 2p model stages.

    Down copies: logical stage s (0 <= s < 2p) computes model stage s, V placement (device s for
    s < p, 2p - 1 - s after the turn). Up copies: logical stage 2p + s computes model stage s on
    device p - 1 - s for s < p, s - p after. Device d holds model stages d, 2p - 1 - d (down) and
    p - 1 - d, p + d (up), as BitPipe's "V-shaped" layer assignment.
    """
    p = num_devices
    down = [s if s < p else 2 * p - 1 - s for s in range(2 * p)]
    up = [p - 1 - s if s < p else s - p for s in range(2 * p)]
    return tuple(down + up), tuple(s % (2 * p) for s in range(4 * p))


@register("bitpipe", routed=True)
def bitpipe(num_devices: int, num_microbatches: int, virtual: int = 4) -> Schedule:
    """BitPipe (Wu, Chen, Yu 2024, "BitPipe: Bidirectional Interleaved Pipeline Parallelism";
    wuhouming/BitPipe, `megatron/core/pipeline_parallel/bitpipe_schedule.py`), virtual 4.

    Layout (`bitpipe_layout`): 2p model stages, each with a down and an up copy; a down microbatch
    runs the V of logical stages 0..2p-1 (devices 0, ..., p-1, p-1, ..., 0: the turn is local), an
    up one the mirrored V 2p..4p-1 (devices p-1, ..., 0, 0, ..., p-1). Microbatches alternate
    direction in groups of u = p/2: microbatch k goes down when `k % p < u`. Needs p even and
    `m % p == 0`.

    Order (the reference's, for device d with `r = u - h(d)`): a "chunk forward list" and a
    "chunk backward list" of 2m entries each, built per group of p microbatches (u down, u up):
    forwards of the device's own direction's first chunk (r of them), then pairs of the other
    direction's first chunk and the own first chunk, then the other direction's first and second
    chunks, then the own second chunk with the other second chunk, then the own second chunk; the
    backward list mirrors it, second chunks first. The device runs `w = p + u + h(d)` forwards
    (warm-up), then for each group but the last: `r` pairs F, B; `w - r + 1` backwards; `r - 1`
    pairs F, B; `w - r + 1` forwards; then `r` pairs F, B and the remaining backwards. Every B is a
    full backward.

    Bubble and memory (measured in `tests/test_routes.py`, event-driven, no comm, B >= F, p in
    {2, 4, 6, 8}, m multiples of p): each device works `2m(F + B)` (2m chunk forwards and
    backwards) and idles `(p - 2)B + (m/p - 1)(p - 2)(B - F)`. BitPipe's paper compares bubble
    ratios in Chimera's (SC'21) convention, F = B per stage, where Chimera's is
    `(D - 2)/(2N + D - 2)` for D devices and N microbatches; with F = B this order idles
    `(p - 2)F` for every m, a bubble ratio of `(p - 2)/(4m + p - 2)`: Chimera's with chunks of half a
    stage. With B > F the reference's restart between groups (it drains `w - r + 1` backwards, then
    warms up again) adds `(p - 2)(B - F)` per group after the first; at F = 1, B = 2 the makespan is
    `6m + (p - 2)(m/p + 1)`. Peak: device d holds `p + u + h(d) + 1` chunk activations (the
    warm-up and the first steady forward), `(p + u + h(d) + 1) / 4` in `peak_activations`' unit (its
    4 chunks); parameters are 2x.
    """
    _require_virtual("bitpipe", virtual, 4)
    p, m = num_devices, num_microbatches
    _require_even_devices("bitpipe", p)
    if m % p != 0:
        raise ScheduleError(
            f"bitpipe needs num_microbatches divisible by num_devices={p} (directions alternate in groups "
            f"of p/2), got num_microbatches={m}"
        )
    placement, model_stage = bitpipe_layout(p)
    half = p // 2
    down_route, up_route = tuple(range(2 * p)), tuple(range(2 * p, 4 * p))
    routes = tuple(down_route if k % p < half else up_route for k in range(m))
    rows = [_bitpipe_order(p, m, d) for d in range(p)]
    return Schedule(
        num_devices=p,
        num_microbatches=m,
        placement=placement,
        actions=tuple(tuple(row) for row in rows),
        name="bitpipe",
        model_stage=model_stage,
        routes=routes,
    )


def _bitpipe_order(p: int, m: int, d: int) -> list[Action]:
    """Device d's actions in the reference's order (see `bitpipe`)."""
    half = p // 2
    # The device's chunks (the reference's model chunk ids 0..3) as logical stages: 0 = down first
    # half (model stage d), 1 = up first half (model p-1-d), 2 = down second half (model 2p-1-d),
    # 3 = up second half (model p+d).
    chunk_stage = (d, 3 * p - 1 - d, 2 * p - 1 - d, 3 * p + d)
    # Chunk ids of "virtual microbatches" 0..2m-1 (i < m: microbatch i's first half, i >= m: its
    # second half), and per chunk the microbatches in order.
    by_chunk: list[list[int]] = [[], [], [], []]
    for i in range(2 * m):
        chunk = (i % p) // half + (2 if i >= m else 0)
        by_chunk[chunk].append(i % m)
    own = d // half  # 0: own direction is down, 1: up
    initial = half - min(d, p - 1 - d)  # the reference's num_initial, r above

    def entry(chunk: int, index: int) -> tuple[int, int]:
        return chunk, by_chunk[chunk][index]

    def group(base: int, lead: int, other_lead: int, tail: int, other_tail: int) -> list[tuple[int, int]]:
        """One group of p virtual microbatches in the reference's interleaving of the four chunks."""
        order = [entry(lead, base + i) for i in range(initial)]
        for i in range(half - initial):
            order += [entry(other_lead, base + i), entry(lead, base + i + initial)]
        for i in range(initial):
            order += [entry(other_lead, base + i + half - initial), entry(other_tail, base + i)]
        for i in range(half - initial):
            order += [entry(tail, base + i), entry(other_tail, base + i + initial)]
        return order + [entry(tail, base + i + half - initial) for i in range(initial)]

    # Forwards run the first halves before the second ones; backwards mirror that order.
    first, other_first, second, other_second = own, 1 - own, 2 + own, 3 - own
    forwards: list[tuple[int, int]] = []
    backwards: list[tuple[int, int]] = []
    for j in range(m // p):
        forwards += group(j * half, first, other_first, second, other_second)
        backwards += group(j * half, second, other_second, first, other_first)

    def forward(index: int) -> Action:
        chunk, mb = forwards[index]
        return Action(chunk_stage[chunk], Op.F, mb)

    def backward(index: int) -> Action:
        chunk, mb = backwards[index]
        return Action(chunk_stage[chunk], Op.B, mb)

    warmup = p + half + min(d, p - 1 - d)
    remaining = 2 * p - warmup  # the reference's unit_remaining, = initial
    row = [forward(k) for k in range(warmup)]
    for j in range(m // p - 1):
        offset = 2 * p * j
        for k in range(remaining):
            row += [forward(warmup + offset + k), backward(offset + k)]
        row += [backward(offset + remaining + k) for k in range(warmup - remaining + 1)]
        for k in range(remaining - 1):
            row += [forward(2 * p + offset + k), backward(warmup + 1 + offset + k)]
        row += [forward(2 * p + offset + remaining - 1 + k) for k in range(warmup - remaining + 1)]
    middle = (m // p - 1) * 2 * p
    for k in range(remaining):
        row += [forward(warmup + middle + k), backward(middle + k)]
    row += [backward(k) for k in range(middle + remaining, 2 * m)]
    return row
