"""Lowering a schedule to the executor's static tables (numpy only, no jax).

The executor runs one `lax.scan` step per tick. In each tick each device reads one row of the tables
built here: which op to run, on which local chunk and microbatch, which inbox slot holds its input,
which stash slot holds (or receives) its residuals, and, for every communication channel, which
inbox slot the message arriving at the end of the tick goes to.

Channels are ring offsets: a message from device `d` on channel offset `k` goes to device
`(d + k) % p`. Offsets are derived from the placement, so loop placement uses {+1, -1} and V
placement also uses offset 0 (the turn of the V stays on one device). Every device sends its one
outgoing message on every channel; receivers keep only what their table marks, so no masking is
needed. Slots are assigned by interval colouring, so buffers are sized by the schedule's peak number
of in-flight messages and live residuals, not by the number of microbatches.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jpipe.schedules.ir import Action, Op, Schedule
from jpipe.schedules.ticks import TickTable, pack
from jpipe.schedules.validate import validate

IDLE, FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2, 3, 4
OP_CODES = {Op.F: FORWARD, Op.B: BACKWARD, Op.I: INPUT_GRAD, Op.W: WEIGHT_GRAD}


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """Static tables for the SPMD executor.

    Attributes:
      tick_table: the packed schedule the tables were built from.
      op, chunk, microbatch, is_first, is_last, inbox_slot, stash_slot, weight_slot: int32 `[T, p]`.
        `inbox_slot` is where the op's input (activation for F, output gradient for B/I) waits;
        `stash_slot` is where an F writes its residuals and B/I/W read them; `weight_slot` is where
        an I leaves what its W needs (the weight residuals).
      recv_slot: int32 `[T, p, C]`, the inbox slot for the message arriving on channel c at the end
        of the tick, or `num_inbox_slots` (a scratch slot) when nothing real arrives.
      channels: ring offsets, one per channel.
      num_inbox_slots, num_stash_slots, num_weight_slots: buffer sizes per device.
      device_major_stages: `[p * v]`, the logical stage at device-major position `d * v + k`.
      forward_only: whether the program runs only forwards (inference).
    """

    tick_table: TickTable
    op: np.ndarray
    chunk: np.ndarray
    microbatch: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    inbox_slot: np.ndarray
    stash_slot: np.ndarray
    weight_slot: np.ndarray
    recv_slot: np.ndarray
    channels: tuple[int, ...]
    num_inbox_slots: int
    num_stash_slots: int
    num_weight_slots: int
    device_major_stages: np.ndarray
    forward_only: bool

    @property
    def schedule(self) -> Schedule:
        return self.tick_table.schedule

    @property
    def num_ticks(self) -> int:
        return self.tick_table.num_ticks

    def per_tick_arrays(self) -> dict[str, np.ndarray]:
        """The `[T, p, ...]` tables by name, for the scan."""
        return {
            "op": self.op,
            "chunk": self.chunk,
            "microbatch": self.microbatch,
            "is_first": self.is_first,
            "is_last": self.is_last,
            "inbox_slot": self.inbox_slot,
            "stash_slot": self.stash_slot,
            "weight_slot": self.weight_slot,
            "recv_slot": self.recv_slot,
        }


def _colour_intervals(intervals: list[tuple[int, int, object]], strict: bool) -> tuple[dict, int]:
    """Greedy interval colouring (optimal for interval graphs).

    Each interval is (start, end, key). With `strict`, a slot whose interval ends at tick t can be
    reused by one starting at t + 1; otherwise by one starting at t (a read during tick t happens
    before the write at the end of tick t).
    """
    slot_of: dict = {}
    free_at: list[int] = []  # per slot: the earliest start that may reuse it
    for start, end, key in sorted(intervals, key=lambda item: (item[0], item[1])):
        slot = next((i for i, earliest in enumerate(free_at) if start >= earliest), len(free_at))
        if slot == len(free_at):
            free_at.append(0)
        slot_of[key] = slot
        free_at[slot] = end + 1 if strict else end
    return slot_of, len(free_at)


def _assign_slots(intervals_per_device: list[list[tuple[int, int, object]]], strict: bool) -> tuple[dict, int]:
    """Colour each device's intervals; return every key's slot and the most slots any device needs."""
    slot_of: dict = {}
    most = 0
    for intervals in intervals_per_device:
        slots, count = _colour_intervals(intervals, strict=strict)
        slot_of.update(slots)
        most = max(most, count)
    return slot_of, most


def forward_only_schedule(schedule: Schedule) -> Schedule:
    """The schedule's forwards, in each device's order (an inference fill/drain)."""
    rows = tuple(tuple(a for a in row if a.op is Op.F) for row in schedule.actions)
    return dataclasses.replace(schedule, actions=rows, name=f"{schedule.name}[forward]")


def compile_program(schedule: Schedule, *, forward_only: bool = False, split: bool = True) -> Program:
    """Validate, pack into ticks and lower to executor tables.

    Args:
      schedule: any schedule that `jpipe.schedules.validate` accepts.
      forward_only: keep only the forwards (for `jpipe.forward`).
      split: run each B as I then W in consecutive ticks (equal-cost ticks in lockstep).
    """
    validate(schedule)
    if forward_only:
        schedule = forward_only_schedule(schedule)
    table = pack(schedule, split=split)
    sched = table.schedule
    p, num_stages = sched.num_devices, sched.num_stages
    last = num_stages - 1
    tick_of = table.tick_of()
    local_index = {s: sched.local_index(s) for s in range(num_stages)}

    # Messages: (producer action, consumer actions). F(s<last) -> F(s+1); F(last) -> B/I(last) (the
    # loss gradient, local); B/I(s>0) -> B/I(s-1) (and W(s-1) reads the same slot).
    grad_op: dict[tuple[int, int], Action] = {}
    for action in tick_of:
        if action.op in (Op.B, Op.I):
            grad_op[(action.stage, action.microbatch)] = action
    messages: list[tuple[Action, list[Action]]] = []
    for action in tick_of:
        s, m = action.stage, action.microbatch
        if action.op is Op.F:
            if s < last:
                messages.append((action, [Action(s + 1, Op.F, m)]))
            elif not forward_only:
                messages.append((action, [grad_op[(s, m)]]))
        elif action.op in (Op.B, Op.I) and s > 0:
            messages.append((action, [grad_op[(s - 1, m)]]))

    offsets = sorted({(sched.placement[c[0].stage] - sched.placement[a.stage]) % p for a, c in messages})
    channels = tuple(offsets) if offsets else (0,)

    # Inbox slots per receiving device.
    inbox_intervals: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    for producer, readers in messages:
        device = sched.placement[readers[0].stage]
        inbox_intervals[device].append((tick_of[producer], max(tick_of[r] for r in readers), producer))
    inbox_slot_of, num_inbox = _assign_slots(inbox_intervals, strict=False)

    # Stash slots: from the F until the last backward op that reads its residuals.
    stash_intervals: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    if not forward_only:
        readers_of: dict[tuple[int, int], list[int]] = {}
        for action, t in tick_of.items():
            if action.op is not Op.F:
                readers_of.setdefault((action.stage, action.microbatch), []).append(t)
        for action, t in tick_of.items():
            if action.op is Op.F:
                key = (action.stage, action.microbatch)
                stash_intervals[sched.placement[action.stage]].append((t, max(readers_of[key]), key))
    stash_slot_of, num_stash = _assign_slots(stash_intervals, strict=True)

    # Weight slots: from an I until its W.
    weight_intervals: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    for action, t in tick_of.items():
        if action.op is Op.I:
            weight_tick = tick_of[Action(action.stage, Op.W, action.microbatch)]
            weight_intervals[sched.placement[action.stage]].append((t, weight_tick, (action.stage, action.microbatch)))
    weight_slot_of, num_weight = _assign_slots(weight_intervals, strict=True)

    shape = (table.num_ticks, p)
    op = np.zeros(shape, np.int32)
    chunk = np.zeros(shape, np.int32)
    microbatch = np.zeros(shape, np.int32)
    is_first = np.zeros(shape, np.int32)
    is_last = np.zeros(shape, np.int32)
    inbox_slot = np.full(shape, num_inbox, np.int32)
    stash_slot = np.zeros(shape, np.int32)
    weight_slot = np.zeros(shape, np.int32)
    recv_slot = np.full(shape + (len(channels),), num_inbox, np.int32)

    input_message: dict[Action, Action] = {}
    for producer, readers in messages:
        for reader in readers:
            input_message[reader] = producer
    for action, t in tick_of.items():
        d = sched.placement[action.stage]
        op[t, d] = OP_CODES[action.op]
        chunk[t, d] = local_index[action.stage]
        microbatch[t, d] = action.microbatch
        is_first[t, d] = action.stage == 0
        is_last[t, d] = action.stage == last
        if action in input_message:
            inbox_slot[t, d] = inbox_slot_of[input_message[action]]
        key = (action.stage, action.microbatch)
        if key in stash_slot_of:
            stash_slot[t, d] = stash_slot_of[key]
        if key in weight_slot_of and action.op in (Op.I, Op.W):
            weight_slot[t, d] = weight_slot_of[key]
    for producer, readers in messages:
        src = sched.placement[producer.stage]
        dst = sched.placement[readers[0].stage]
        channel = channels.index((dst - src) % p)
        recv_slot[tick_of[producer], dst, channel] = inbox_slot_of[producer]

    device_major = np.array([s for d in range(p) for s in sched.stages_of(d)], np.int32)
    return Program(
        tick_table=table,
        op=op,
        chunk=chunk,
        microbatch=microbatch,
        is_first=is_first,
        is_last=is_last,
        inbox_slot=inbox_slot,
        stash_slot=stash_slot,
        weight_slot=weight_slot,
        recv_slot=recv_slot,
        channels=channels,
        num_inbox_slots=num_inbox,
        num_stash_slots=num_stash,
        num_weight_slots=num_weight,
        device_major_stages=device_major,
        forward_only=forward_only,
    )
