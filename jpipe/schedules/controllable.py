"""Controllable-memory V schedules: V-Half and V-Min (Qi et al., NeurIPS 2024).

"Pipeline Parallelism with Controllable Memory" builds a schedule by repeating one *building
block*: the times at which one microbatch's passes run on every device. Every device holds two
chunks in the V placement of ZB-V (`jpipe.schedules.ir.v_placement`: chunk 0 of device d is logical
stage d, chunk 1 is stage 2p - 1 - d), every pass (F, I or W of one chunk) takes one slot, and
microbatch k runs the block shifted by `PERIOD = 6` slots (the six passes a device runs per
microbatch). Per device the block fixes four slots (the forwards and input-gradient backwards);
the two weight-gradient passes go into the slots the pattern leaves empty, oldest first.

A chunk's activations live from its F to its W: its *lifespan*. A device then holds about
`(lifespan of chunk 0 + lifespan of chunk 1) / PERIOD` chunk activations at its peak, so the
block's shape sets the memory:
  - V-Min (`v_min`): lifespans add up to about 4p slots, peak about p/3 microbatches of a full
    device stage (1F1B holds p); simulated bubble 0.67-0.80 of 1F1B's (F = I = W, m >= 2p, p = 4, 8).
  - V-Half (`v_half`): lifespans add up to about 6p slots, peak about p/2; simulated bubble
    0.64-0.73 of 1F1B's (the authors' 1/2 needs their reordering pass, not built here).
The authors' peaks (their sail-sg/zero-bubble-pipeline-parallelism README and paper, in
microbatches x full device stage, freed at W, the weight gradient's inputs included): V-Min
`(p + 4) // 3` and V-Half `(p + 2) // 2` (`authors_peak`).

The per-device order is the block repeated m times, read by slot; an executor or the async
simulator then runs each action as soon as its inputs are there (the paper's "squeeze"), so empty
slots cost nothing. Any p >= 1 and m >= 1 build. This is written from the paper's description of the
blocks; the offsets below are the ones of the paper's figures (and of the authors' code).
"""

from __future__ import annotations

from collections import deque

from jpipe.schedules.generators import _require_virtual, _schedule, register
from jpipe.schedules.ir import Action, Op, Schedule, v_placement

PERIOD = 6
"""Slots per microbatch and device: F, I and W of each of the two chunks, one slot each."""

Block = tuple[int, int, int, int]
"""One device's slots for one microbatch: F of chunk 0, F of chunk 1, I of chunk 1, I of chunk 0."""


def v_min_block(num_devices: int) -> tuple[Block, ...]:
    """V-Min's building block: per device d, the slots of `F(c0), F(c1), I(c1), I(c0)`.

    The forward runs down the V one slot per hop (`d`, then `2p - 1 - d` on the way back) and the
    backward right after it, again one slot per hop. A gap of 2 keeps the four slots distinct
    modulo `PERIOD` when `p % 3 == 0`.
    """
    p = num_devices
    gap = 2 if p % 3 == 0 else 0
    return tuple((d, 2 * p - 1 - d, 2 * p + gap + d, 4 * p + gap - 1 - d) for d in range(p))


def v_half_block(num_devices: int) -> tuple[Block, ...]:
    """V-Half's building block: per device d, the slots of `F(c0), F(c1), I(c1), I(c0)`.

    Chunk 0's forward and chunk 1's backward advance two slots per hop, chunk 1's forward and chunk
    0's backward one: device d's chunk-0 lifespan shrinks by 3 slots per hop while its chunk-1 one
    grows by 3, so every device holds the same. A gap of 3 keeps the slots distinct modulo `PERIOD`
    when p is even.
    """
    p = num_devices
    gap = 3 if p % 2 == 0 else 0
    return tuple((2 * d, 3 * p - 2 - d, 3 * p + gap + 2 * d - 1, 6 * p + gap - 2 - d) for d in range(p))


def authors_peak(name: str, num_devices: int) -> int:
    """The authors' peak activations per device for `m` large: microbatches x full device stage."""
    return {"v_min": (num_devices + 4) // 3, "v_half": (num_devices + 2) // 2}[name]


def _timed_passes(block: Block, device: int, num_devices: int, num_microbatches: int) -> dict[int, Action]:
    """The F and I actions of one device, keyed by slot: the block repeated every `PERIOD` slots."""
    c0, c1 = device, 2 * num_devices - 1 - device
    kinds = ((c0, Op.F), (c1, Op.F), (c1, Op.I), (c0, Op.I))
    slots = {}
    for mb in range(num_microbatches):
        for offset, (stage, op) in zip(block, kinds, strict=True):
            slots[offset + PERIOD * mb] = Action(stage, op, mb)
    return slots


def _with_weights(slots: dict[int, Action]) -> list[Action]:
    """The actions by slot, each empty slot given the oldest pending W; the W's left at the end."""
    row: list[Action] = []
    pending: deque[Action] = deque()
    for slot in range(max(slots) + 1):
        action = slots.get(slot)
        if action is None:
            if pending:
                row.append(pending.popleft())
            continue
        row.append(action)
        if action.op is Op.I:
            pending.append(Action(action.stage, Op.W, action.microbatch))
    return row + list(pending)


def from_block(name: str, block: tuple[Block, ...], num_microbatches: int) -> Schedule:
    """The V-placed schedule that repeats `block` (one `Block` per device) for every microbatch.

    The block must respect the data dependencies (each pass after its producer's slot) and give
    each device four slots distinct modulo `PERIOD`; `build` validates the result.
    """
    p = len(block)
    rows = [_with_weights(_timed_passes(block[d], d, p, num_microbatches)) for d in range(p)]
    return _schedule(name, p, num_microbatches, v_placement(p), rows)


@register("v_min")
def v_min(num_devices: int, num_microbatches: int, virtual: int = 2) -> Schedule:
    """V-Min (Qi et al. 2024), V placement, B split into I + W: about 1/3 of 1F1B's activations.

    The block of `v_min_block` repeated every 6 slots (module doc). Peak `(p + 4) // 3`
    microbatches x full device stage for m large (1F1B: p); simulated bubble 0.67-0.80 of 1F1B's
    when F = I = W, m >= 2p (p = 4, 8; `tests/test_controllable.py`).
    """
    _require_virtual("v_min", virtual, 2)
    return from_block("v_min", v_min_block(num_devices), num_microbatches)


@register("v_half")
def v_half(num_devices: int, num_microbatches: int, virtual: int = 2) -> Schedule:
    """V-Half (Qi et al. 2024), V placement, B split into I + W: about 1/2 of 1F1B's activations.

    The block of `v_half_block` repeated every 6 slots (module doc). Peak `(p + 2) // 2`
    microbatches x full device stage for m large (1F1B: p); simulated bubble 0.64-0.73 of 1F1B's
    when F = I = W, m >= 2p (p = 4, 8; the authors' 1/2 comes after a reordering pass not built here).
    """
    _require_virtual("v_half", virtual, 2)
    return from_block("v_half", v_half_block(num_devices), num_microbatches)
