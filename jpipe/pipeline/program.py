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

Messages follow each microbatch's route (`Schedule.route`; by default every stage in order): a
forward's output goes to the forward of the next stage on the route, or at the route's last hop
(where the loss runs) to its own backward; a backward's input gradient goes to the backward of the
previous stage on the route, or at the first hop (where the input, or the prologue, was read) is a
result. `is_first` / `is_last` mark first and last hops. Logical stages that are replicas of one
model stage (`Schedule.model_stage`) are ordinary stages here: the executor gives each its own copy
of the parameters (`StagePlacement.model_to_device`).

With `deliver=True` (the generic API, whose inputs are activations) the batch is not replicated
over the pipeline: microbatch i is stored on its *owner*, device `i // k` with `k = ceil(m / p)`
microbatches per device (contiguous blocks, the layout of a `[m, ...]` array sharded over the stage
axis). The owner sends microbatch i to the device of its first hop in a tick before that forward,
on an *input channel* (one per owner offset), into an inbox slot like any other message. An owner
sends one input per tick: its deliveries take the latest free ticks before their forwards
(the tick before, when free), and leading delivery-only ticks serve the forwards of the first
ticks (one for every schedule in which one device runs all first hops; BitPipe's two pipelines can
need more). What the pipeline returns per microbatch (the input gradient from its first hop's
backward, or its last hop's output when running forward only) travels back to the owner on the
ordinary channels and lands in the owner's result buffer.

Composites (`jpipe.schedules.ir.Composite`, two ops of different microbatches that a device runs
together) are kept with `braid=True` (the default): the composite gets one tick, its first member is
the tick's op as usual and its second member the tick's *second op* (the `second_*` tables, IDLE
where the tick holds one op). The second op's message travels on its own channels
(`second_channels`, `second_recv_slot`, `second_result_index`), so a device can send two messages in
one tick even to the same neighbour. With `braid=False` each composite runs as its two members in
consecutive ticks, one op per tick (the unbraided baseline).

With `send_latency=1` (the executor's hidden sends) a message produced in tick t on one device
travels while tick t + 1 computes and arrives at the end of tick t + 1: the packing gives every
cross-device dependency that extra tick (`jpipe.schedules.ticks.pack`), and `recv_slot` /
`result_index` mark the tick of arrival. Messages that stay on their device (the turn of a V,
channel offset 0) still arrive at the end of the tick that produced them. A trailing tick without
compute is added when the last messages would otherwise arrive after the last tick.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jpipe.pipeline.layout import StagePlacement
from jpipe.schedules.ir import Action, Composite, Op, Schedule
from jpipe.schedules.ticks import TickTable, pack
from jpipe.schedules.validate import validate

IDLE, FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2, 3, 4
OP_CODES = {Op.F: FORWARD, Op.B: BACKWARD, Op.I: INPUT_GRAD, Op.W: WEIGHT_GRAD}
# The per-op tables a braided tick's second op has too (`Program.second_<name>`).
SECOND_TABLES = (
    "op",
    "chunk",
    "microbatch",
    "is_first",
    "is_last",
    "inbox_slot",
    "stash_slot",
    "weight_slot",
    "recv_slot",
    "result_index",
)


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
        of the tick, or `num_inbox_slots` (a scratch slot) when nothing real arrives. A message
        arrives in the tick that produced it, or `send_latency` ticks later on a channel with a
        non-zero offset.
      result_index: int32 `[T, p, C]`, where a message arriving on channel c is a result (input
        gradient, or output when forward only) of one of the device's own microbatches: its local
        index `i % k`, or `microbatches_per_device` (nothing) otherwise. Used only with `deliver`.
      input_send_index: int32 `[T, p]`, the local microbatch a device sends on the input channels.
      input_recv_slot: int32 `[T, p, Ci]`, the inbox slot for an input arriving on input channel c.
      channels: ring offsets, one per channel.
      input_channels: ring offsets of the input channels (empty without `deliver`).
      num_inbox_slots, num_stash_slots, num_weight_slots: buffer sizes per device.
      microbatches_per_device: k, the microbatches each device owns (with `deliver`; else 0).
      placement: where the logical stages live (and the device-major row order).
      forward_only: whether the program runs only forwards (inference).
      deliver: whether inputs are delivered from their owners (see the module docstring).
      send_latency: 0 (a message arrives at the end of the tick that produced it) or 1 (at the end
        of the next tick: the send overlaps that tick's compute) for messages between devices.
      second_op, second_chunk, second_microbatch, second_is_first, second_is_last,
      second_inbox_slot, second_stash_slot, second_weight_slot: int32 `[T, p]`, the same for the
        second member of a braided composite (`second_op` is IDLE in ticks without one).
      second_recv_slot, second_result_index: int32 `[T, p, C2]`, as `recv_slot` and `result_index`
        for the messages of second ops, which travel on `second_channels` (ring offsets; empty
        when the program braids nothing).
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
    result_index: np.ndarray
    input_send_index: np.ndarray
    input_recv_slot: np.ndarray
    channels: tuple[int, ...]
    input_channels: tuple[int, ...]
    num_inbox_slots: int
    num_stash_slots: int
    num_weight_slots: int
    microbatches_per_device: int
    placement: StagePlacement
    forward_only: bool
    deliver: bool
    send_latency: int = 0
    second_op: np.ndarray | None = None
    second_chunk: np.ndarray | None = None
    second_microbatch: np.ndarray | None = None
    second_is_first: np.ndarray | None = None
    second_is_last: np.ndarray | None = None
    second_inbox_slot: np.ndarray | None = None
    second_stash_slot: np.ndarray | None = None
    second_weight_slot: np.ndarray | None = None
    second_recv_slot: np.ndarray | None = None
    second_result_index: np.ndarray | None = None
    second_channels: tuple[int, ...] = ()

    @property
    def braided(self) -> bool:
        """Whether some tick runs two ops on one device (a kept composite)."""
        return self.second_op is not None and bool((self.second_op != IDLE).any())

    @property
    def schedule(self) -> Schedule:
        return self.tick_table.schedule

    @property
    def num_ticks(self) -> int:
        """Rows of the tables: the packed schedule's ticks, plus the delivery-only ticks with `deliver`."""
        return self.op.shape[0]

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
            "result_index": self.result_index,
            "input_send_index": self.input_send_index,
            "input_recv_slot": self.input_recv_slot,
            **{f"second_{name}": getattr(self, f"second_{name}") for name in SECOND_TABLES if self.braided},
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
    """The schedule's forwards, in each device's order (an inference fill/drain; composites flattened)."""
    rows = tuple(tuple(a for a in row if a.op is Op.F) for row in schedule.flattened().actions)
    return dataclasses.replace(schedule, actions=rows, name=f"{schedule.name}[forward]")


def compile_program(
    schedule: Schedule,
    *,
    forward_only: bool = False,
    split: bool = True,
    deliver: bool = False,
    send_latency: int = 0,
    braid: bool = True,
) -> Program:
    """Validate, pack into ticks and lower to executor tables.

    Args:
      schedule: any schedule that `jpipe.schedules.validate` accepts (replicas and routes included).
      forward_only: keep only the forwards (for `jpipe.forward`).
      split: run each B as I then W in consecutive ticks (equal-cost ticks in lockstep).
      deliver: inputs and results live on their owner devices (see the module docstring).
      send_latency: 0 or 1, ticks a message between devices spends in flight after its tick.
      braid: run each composite's two ops in one tick (see the module docstring); False runs them
        one after the other. Forward only, composites are always flattened.
    """
    if send_latency not in (0, 1) or isinstance(send_latency, bool):
        raise ValueError(f"send_latency: expected 0 or 1, got {send_latency!r}")
    if not isinstance(braid, bool):
        raise ValueError(f"braid: expected True or False, got {braid!r}")
    validate(schedule)
    if forward_only:
        schedule = forward_only_schedule(schedule)
    table = pack(schedule, split=split, send_latency=send_latency, keep_composites=braid)
    sched = table.schedule
    p, num_stages, m = sched.num_devices, sched.num_stages, sched.num_microbatches
    packed = table.tick_of()
    # Lane 1: the second member of a kept composite; every other action is lane 0.
    second = {step.second for row in table.ticks for step in row if isinstance(step, Composite)}
    local_index = {s: sched.local_index(s) for s in range(num_stages)}
    per_device = -(-m // p) if deliver else 0

    def device_of(action: Action) -> int:
        return sched.placement[action.stage]

    def owner(i: int) -> int:
        return i // per_device

    # Inputs: microbatch i leaves its owner in a tick before the forward of its first hop reads it,
    # on the device of that hop. An owner sends one input per tick: its deliveries are given the
    # latest free ticks before their reads, scheduled backwards; ticks before the packed schedule's
    # first one (negative here) become leading delivery-only ticks.
    send_of: dict[Action, int] = {}  # the forward that reads an input -> its send tick (unshifted)
    if deliver:
        readers_by_owner: dict[int, list[Action]] = {}
        for action in packed:
            if action.op is Op.F and sched.is_first_hop(action.stage, action.microbatch):
                readers_by_owner.setdefault(owner(action.microbatch), []).append(action)
        for readers in readers_by_owner.values():
            latest = None
            for reader in sorted(readers, key=lambda a: (packed[a], a.microbatch), reverse=True):
                sent = packed[reader] - 1 if latest is None else min(packed[reader] - 1, latest - 1)
                send_of[reader] = latest = sent
    lead = max(0, -min(send_of.values(), default=0))  # the delivery-only ticks
    tick_of = {action: t + lead for action, t in packed.items()}
    deliveries = sorted((t + lead, reader) for reader, t in send_of.items())  # (send tick, reader)

    # Messages: (producer action, consumer actions), along each microbatch's route: F(s) -> F of the
    # next stage; F at the last hop -> its own B/I (the loss gradient, local); B/I(s) -> B/I of the
    # previous stage (and W(s-1) reads the same slot). At the first hop a B/I's input gradient, and
    # forward only a last hop's output, is a result for the microbatch's owner (with `deliver`).
    grad_op: dict[tuple[int, int], Action] = {}
    for action in tick_of:
        if action.op in (Op.B, Op.I):
            grad_op[(action.stage, action.microbatch)] = action
    messages: list[tuple[Action, list[Action]]] = []
    results: list[Action] = []  # ops whose message is a result for the microbatch's owner
    for action in tick_of:
        s, i = action.stage, action.microbatch
        if action.op is Op.F:
            following = sched.next_stage(s, i)
            if following is not None:
                messages.append((action, [Action(following, Op.F, i)]))
            elif not forward_only:
                messages.append((action, [grad_op[(s, i)]]))
            elif deliver:
                results.append(action)
        elif action.op in (Op.B, Op.I):
            previous = sched.prev_stage(s, i)
            if previous is not None:
                messages.append((action, [grad_op[(previous, i)]]))
            elif deliver:
                results.append(action)

    def arrival(producer: Action, destination: int) -> int:
        """The tick at whose end `producer`'s message is in `destination`'s inbox."""
        return tick_of[producer] + (send_latency if device_of(producer) != destination else 0)

    num_ticks = max(
        [table.num_ticks + lead] + [arrival(a, owner(a.microbatch)) + 1 for a in results]
    )  # + a tick without compute when results are still in flight after the last one

    def offsets_of(lane: int) -> set[int]:
        found = {(device_of(c[0]) - device_of(a)) % p for a, c in messages if (a in second) == lane}
        return found | {(owner(a.microbatch) - device_of(a)) % p for a in results if (a in second) == lane}

    channels = tuple(sorted(offsets_of(0))) or (0,)
    second_channels = tuple(sorted(offsets_of(1)))
    input_channels = tuple(sorted({(device_of(a) - owner(a.microbatch)) % p for _, a in deliveries}))

    # Inbox slots per receiving device: pipeline messages and delivered inputs.
    inbox_intervals: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    for producer, readers in messages:
        destination = device_of(readers[0])
        inbox_intervals[destination].append(
            (arrival(producer, destination), max(tick_of[r] for r in readers), producer)
        )
    for sent, reader in deliveries:
        inbox_intervals[device_of(reader)].append((sent, tick_of[reader], ("input", reader.microbatch)))
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
                stash_intervals[device_of(action)].append((t, max(readers_of[key]), key))
    stash_slot_of, num_stash = _assign_slots(stash_intervals, strict=True)

    # Weight slots: from an I until its W.
    weight_intervals: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    for action, t in tick_of.items():
        if action.op is Op.I:
            weight_tick = tick_of[Action(action.stage, Op.W, action.microbatch)]
            weight_intervals[device_of(action)].append((t, weight_tick, (action.stage, action.microbatch)))
    weight_slot_of, num_weight = _assign_slots(weight_intervals, strict=True)

    shape = (num_ticks, p)

    def lane_tables(lane_channels: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {
            "op": np.zeros(shape, np.int32),
            "chunk": np.zeros(shape, np.int32),
            "microbatch": np.zeros(shape, np.int32),
            "is_first": np.zeros(shape, np.int32),
            "is_last": np.zeros(shape, np.int32),
            "inbox_slot": np.full(shape, num_inbox, np.int32),
            "stash_slot": np.zeros(shape, np.int32),
            "weight_slot": np.zeros(shape, np.int32),
            "recv_slot": np.full(shape + (len(lane_channels),), num_inbox, np.int32),
            "result_index": np.full(shape + (len(lane_channels),), per_device, np.int32),
        }

    lanes = (lane_tables(channels), lane_tables(second_channels))
    lane_channels = (channels, second_channels)
    input_send_index = np.zeros(shape, np.int32)
    input_recv_slot = np.full(shape + (len(input_channels),), num_inbox, np.int32)

    input_message: dict[Action, object] = {}
    for producer, readers in messages:
        for reader in readers:
            input_message[reader] = producer
    for _, reader in deliveries:
        input_message[reader] = ("input", reader.microbatch)
    for action, t in tick_of.items():
        d = device_of(action)
        lane = lanes[action in second]
        lane["op"][t, d] = OP_CODES[action.op]
        lane["chunk"][t, d] = local_index[action.stage]
        lane["microbatch"][t, d] = action.microbatch
        lane["is_first"][t, d] = sched.is_first_hop(action.stage, action.microbatch)
        lane["is_last"][t, d] = sched.is_last_hop(action.stage, action.microbatch)
        if action in input_message:
            lane["inbox_slot"][t, d] = inbox_slot_of[input_message[action]]
        key = (action.stage, action.microbatch)
        if key in stash_slot_of:
            lane["stash_slot"][t, d] = stash_slot_of[key]
        if key in weight_slot_of and action.op in (Op.I, Op.W):
            lane["weight_slot"][t, d] = weight_slot_of[key]
    for producer, readers in messages:
        src, dst = device_of(producer), device_of(readers[0])
        lane = producer in second
        channel = lane_channels[lane].index((dst - src) % p)
        lanes[lane]["recv_slot"][arrival(producer, dst), dst, channel] = inbox_slot_of[producer]
    for action in results:
        src, dst = device_of(action), owner(action.microbatch)
        lane = action in second
        channel = lane_channels[lane].index((dst - src) % p)
        lanes[lane]["result_index"][arrival(action, dst), dst, channel] = action.microbatch % per_device
    for sent, reader in deliveries:
        src, dst = owner(reader.microbatch), device_of(reader)
        input_send_index[sent, src] = reader.microbatch % per_device
        channel = input_channels.index((dst - src) % p)
        input_recv_slot[sent, dst, channel] = inbox_slot_of[("input", reader.microbatch)]

    return Program(
        tick_table=table,
        **lanes[0],
        input_send_index=input_send_index,
        input_recv_slot=input_recv_slot,
        channels=channels,
        input_channels=input_channels,
        num_inbox_slots=num_inbox,
        num_stash_slots=num_stash,
        num_weight_slots=num_weight,
        microbatches_per_device=per_device,
        placement=StagePlacement.of(sched),
        forward_only=forward_only,
        deliver=deliver,
        send_latency=send_latency,
        **{f"second_{name}": a for name, a in lanes[1].items()},
        second_channels=second_channels,
    )
