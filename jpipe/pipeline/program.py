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

The tables come in *lanes* (`Lane`): a lane holds, for every tick and device, at most one op and
the channels its messages travel on. Ops a device runs alone are in lane 0. Composites
(`jpipe.schedules.ir.Composite`, two ops of different microbatches that a device runs together) are
kept with `braid=True` (the default): the composite gets one tick, its first member in lane 0 and
its second member in lane 1 (IDLE where the tick holds one op). Each lane's messages travel on the
lane's own channels, so a device can send two messages in one tick even to the same neighbour. With
`braid=False` each composite runs as its two members in consecutive ticks, one op per tick (the
unbraided baseline). Inputs delivered from their owners have a table of their own (`Delivery`).

With `send_latency=1` (the executor's hidden sends) a message produced in tick t on one device
travels while tick t + 1 computes and arrives at the end of tick t + 1: the packing gives every
cross-device dependency that extra tick (`jpipe.schedules.ticks.pack`), and `recv_slot` /
`result_index` mark the tick of arrival. Messages that stay on their device (the turn of a V,
channel offset 0) still arrive at the end of the tick that produced them. A trailing tick without
compute is added when the last messages would otherwise arrive after the last tick.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import numpy as np

from jpipe.pipeline.placement import StagePlacement
from jpipe.schedules.ir import Action, Composite, Op, Schedule
from jpipe.schedules.ticks import TickTable, pack
from jpipe.schedules.validate import validate


class OpCode(enum.IntEnum):
    """What a lane's `op` table holds: the op a device runs in a tick (IDLE: none)."""

    IDLE = 0
    FORWARD = 1
    BACKWARD = 2
    INPUT_GRAD = 3
    WEIGHT_GRAD = 4
    RECOMPUTE = 5


IDLE, FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD, RECOMPUTE = (int(code) for code in OpCode)
OP_CODES = {Op.F: FORWARD, Op.B: BACKWARD, Op.I: INPUT_GRAD, Op.W: WEIGHT_GRAD, Op.R: RECOMPUTE}


@dataclasses.dataclass(frozen=True, eq=False)
class Lane:
    """One lane's tables: per tick and device, the op it runs and where its data lives.

    Attributes:
      op: int32 `[T, p]`, an `OpCode`.
      chunk, microbatch: int32 `[T, p]`, the op's local chunk (`Schedule.local_index`) and microbatch.
      is_first, is_last: int32 `[T, p]`, 1 where the op is at its microbatch's first / last hop.
      inbox_slot: int32 `[T, p]`, where the op's input (activation for F, output gradient for B/I)
        waits.
      stash_slot: int32 `[T, p]`, where an F writes its residuals and B/I/W read them (with R: where
        an F keeps its input and its R reads it).
      weight_slot: int32 `[T, p]`, where an I leaves what its W needs (the weight residuals).
      recompute_slot: int32 `[T, p]`, where an R writes the residuals it rebuilds and B/I/W read them.
      recv_slot: int32 `[T, p, C]`, the inbox slot for the message arriving on channel c at the end
        of the tick, or `num_inbox_slots` (a scratch slot) when nothing real arrives. A message
        arrives in the tick that produced it, or `send_latency` ticks later on a channel with a
        non-zero offset.
      result_index: int32 `[T, p, C]`, where a message arriving on channel c is a result (input
        gradient, or output when forward only) of one of the device's own microbatches: its local
        index `i % k`, or `k` (nothing) otherwise. Used only with `deliver`.
      channels: the ring offsets of the lane's messages, one per channel.
    """

    op: np.ndarray
    chunk: np.ndarray
    microbatch: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    inbox_slot: np.ndarray
    stash_slot: np.ndarray
    weight_slot: np.ndarray
    recompute_slot: np.ndarray
    recv_slot: np.ndarray
    result_index: np.ndarray
    channels: tuple[int, ...]

    @classmethod
    def empty(cls, num_ticks: int, num_devices: int, channels: tuple[int, ...], num_inbox: int, k: int) -> Lane:
        """A lane in which every device idles: inputs and messages go to the scratch slot."""
        shape = (num_ticks, num_devices)
        zeros = lambda: np.zeros(shape, np.int32)  # noqa: E731
        return cls(
            op=zeros(),
            chunk=zeros(),
            microbatch=zeros(),
            is_first=zeros(),
            is_last=zeros(),
            inbox_slot=np.full(shape, num_inbox, np.int32),
            stash_slot=zeros(),
            weight_slot=zeros(),
            recompute_slot=zeros(),
            recv_slot=np.full(shape + (len(channels),), num_inbox, np.int32),
            result_index=np.full(shape + (len(channels),), k, np.int32),
            channels=channels,
        )

    def channel_used(self, num_inbox: int, k: int) -> np.ndarray:
        """bool `[T, C]`: whether any device receives on channel c in tick t (the same on every device)."""
        return (self.recv_slot < num_inbox).any(axis=1) | (self.result_index < k).any(axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class Delivery:
    """Inputs sent from their owner devices to the device of their first hop (`deliver`).

    Attributes:
      send_index: int32 `[T, p]`, the local microbatch a device sends on the input channels.
      recv_slot: int32 `[T, p, Ci]`, the inbox slot for an input arriving on input channel c, or
        `num_inbox_slots` (scratch) when none does.
      channels: ring offsets of the input channels (empty without `deliver`).
    """

    send_index: np.ndarray
    recv_slot: np.ndarray
    channels: tuple[int, ...]

    def channel_used(self, num_inbox: int) -> np.ndarray:
        """bool `[T, Ci]`: whether any device receives an input on channel c in tick t."""
        return (self.recv_slot < num_inbox).any(axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """Static tables for the SPMD executor.

    Attributes:
      tick_table: the packed schedule the tables were built from.
      lanes: one `Lane` per op a device may run in a tick: lane 0 for ops run alone and the first
        member of a kept composite, lane 1 (only when composites are kept) for second members.
      delivery: the input deliveries (`Delivery`).
      num_inbox_slots, num_stash_slots, num_weight_slots, num_recompute_slots: buffer sizes per device.
      microbatches_per_device: k, the microbatches each device owns (with `deliver`; else 0).
      placement: where the logical stages live (and the device-major row order).
      forward_only: whether the program runs only forwards (inference).
      deliver: whether inputs are delivered from their owners (see the module docstring).
      send_latency: 0 (a message arrives at the end of the tick that produced it) or 1 (at the end
        of the next tick: the send overlaps that tick's compute) for messages between devices.
    """

    tick_table: TickTable
    lanes: tuple[Lane, ...]
    delivery: Delivery
    num_inbox_slots: int
    num_stash_slots: int
    num_weight_slots: int
    microbatches_per_device: int
    placement: StagePlacement
    forward_only: bool
    deliver: bool
    send_latency: int = 0
    num_recompute_slots: int = 0

    @property
    def recompute(self) -> bool:
        """Whether the schedule recomputes forwards in R ops (F then keeps only its input)."""
        return self.num_recompute_slots > 0

    @property
    def braided(self) -> bool:
        """Whether some tick runs two ops on one device (a kept composite)."""
        return len(self.lanes) > 1

    @property
    def schedule(self) -> Schedule:
        return self.tick_table.schedule

    @property
    def num_ticks(self) -> int:
        """Rows of the tables: the packed schedule's ticks, plus the delivery-only ticks with `deliver`."""
        return self.lanes[0].op.shape[0]

    def first_hop_devices(self) -> np.ndarray:
        """bool `[p]`: the devices that run some microbatch's first hop (in any lane)."""
        return np.logical_or.reduce([(lane.is_first == 1).any(axis=0) for lane in self.lanes])

    def last_hop_devices(self) -> np.ndarray:
        """bool `[p]`: the devices that run some microbatch's last hop (in any lane)."""
        return np.logical_or.reduce([(lane.is_last == 1).any(axis=0) for lane in self.lanes])

    @functools.cached_property
    def pair_kinds(self) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """The kinds of braided ticks and where each runs: `(kinds, pair)`, computed once per program.

        A kind is `(op, is_first, is_last)` of the first op followed by the same of the second; each
        gets its own branch in the executor, in which the first/last-hop work (prologue, loss) is
        static, not a nested conditional. `pair[t, d]` (int32 `[T, p]`) is 0 where the tick holds at
        most one op, else 1 + the index of its kind. No kinds without a second lane.
        """
        pair = np.zeros((self.num_ticks, self.schedule.num_devices), np.int32)
        if not self.braided:
            return [], pair
        first, second = self.lanes[0], self.lanes[1]
        kind_of = np.stack(
            [lane_table for lane in (first, second) for lane_table in (lane.op, lane.is_first, lane.is_last)], axis=-1
        )  # [T, p, 6]
        paired = second.op != IDLE
        kinds = sorted({tuple(int(v) for v in kind) for kind in kind_of[paired]})
        for index, kind in enumerate(kinds, start=1):
            pair[paired & (kind_of == np.asarray(kind)).all(axis=-1)] = index
        return kinds, pair

    def ops_run_alone(self) -> np.ndarray:
        """The op codes of lane 0 in ticks that run one op (`[N]`, with repeats)."""
        if not self.braided:
            return self.lanes[0].op
        return self.lanes[0].op[self.lanes[1].op == IDLE]


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


@dataclasses.dataclass(frozen=True, eq=False)
class _Timed:
    """A packed schedule's actions in time, inputs and messages included (what the tables encode).

    Attributes:
      schedule: the packed schedule.
      tick_of: each action's tick, delivery-only ticks included.
      second: the second members of kept composites (lane 1).
      per_device: k, the microbatches each device owns (0 without `deliver`).
      deliveries: (send tick, the forward that reads the input), sorted.
      messages: (producer, its readers) along each microbatch's route.
      results: ops whose message is a result for the microbatch's owner (with `deliver`).
      send_latency: as `Program.send_latency`.
      lead: the delivery-only ticks before the packed schedule's first tick.
    """

    schedule: Schedule
    tick_of: dict[Action, int]
    second: frozenset[Action]
    per_device: int
    deliveries: list[tuple[int, Action]]
    messages: list[tuple[Action, list[Action]]]
    results: list[Action]
    send_latency: int
    lead: int

    def device_of(self, action: Action) -> int:
        return self.schedule.placement[action.stage]

    def owner(self, microbatch: int) -> int:
        return microbatch // self.per_device

    def arrival(self, producer: Action, destination: int) -> int:
        """The tick at whose end `producer`'s message is in `destination`'s inbox."""
        moves = self.device_of(producer) != destination
        return self.tick_of[producer] + (self.send_latency if moves else 0)

    def lane_of(self, action: Action) -> int:
        return int(action in self.second)

    def offset(self, source: int, destination: int) -> int:
        return (destination - source) % self.schedule.num_devices


def _delivery_ticks(sched: Schedule, packed: dict[Action, int], per_device: int) -> dict[Action, int]:
    """When each input leaves its owner: the forward that reads it -> its send tick (unshifted).

    Microbatch i leaves its owner in a tick before the forward of its first hop reads it, on the
    device of that hop. An owner sends one input per tick: its deliveries are given the latest free
    ticks before their reads, scheduled backwards; ticks before the packed schedule's first one
    (negative here) become leading delivery-only ticks.
    """
    readers_by_owner: dict[int, list[Action]] = {}
    for action in packed:
        if action.op is Op.F and sched.is_first_hop(action.stage, action.microbatch):
            readers_by_owner.setdefault(action.microbatch // per_device, []).append(action)
    send_of: dict[Action, int] = {}
    for readers in readers_by_owner.values():
        latest = None
        for reader in sorted(readers, key=lambda a: (packed[a], a.microbatch), reverse=True):
            sent = packed[reader] - 1 if latest is None else min(packed[reader] - 1, latest - 1)
            send_of[reader] = latest = sent
    return send_of


def _route_messages(
    sched: Schedule, tick_of: dict[Action, int], forward_only: bool, deliver: bool
) -> tuple[list[tuple[Action, list[Action]]], list[Action]]:
    """`(messages, results)` along each microbatch's route.

    F(s) -> F of the next stage; F at the last hop -> its own B/I (the loss gradient, local);
    B/I(s) -> B/I of the previous stage (and W(s-1) reads the same slot). At the first hop a B/I's
    input gradient, and forward only a last hop's output, is a result for the microbatch's owner
    (with `deliver`).
    """
    grad_op = {(a.stage, a.microbatch): a for a in tick_of if a.op in (Op.B, Op.I)}
    messages: list[tuple[Action, list[Action]]] = []
    results: list[Action] = []
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
    return messages, results


def _timed(table: TickTable, forward_only: bool, deliver: bool, send_latency: int) -> _Timed:
    """The packed schedule in time: delivery-only ticks prepended, inputs and messages found."""
    sched = table.schedule
    packed = table.tick_of()
    per_device = -(-sched.num_microbatches // sched.num_devices) if deliver else 0
    send_of = _delivery_ticks(sched, packed, per_device) if deliver else {}
    lead = max(0, -min(send_of.values(), default=0))  # the delivery-only ticks
    tick_of = {action: t + lead for action, t in packed.items()}
    messages, results = _route_messages(sched, tick_of, forward_only, deliver)
    return _Timed(
        schedule=sched,
        tick_of=tick_of,
        second=frozenset(step.second for row in table.ticks for step in row if isinstance(step, Composite)),
        per_device=per_device,
        deliveries=sorted((t + lead, reader) for reader, t in send_of.items()),
        messages=messages,
        results=results,
        send_latency=send_latency,
        lead=lead,
    )


def _lane_channels(timed: _Timed, lane: int) -> tuple[int, ...]:
    """The ring offsets lane `lane`'s messages and results travel on."""
    found = {
        timed.offset(timed.device_of(a), timed.device_of(readers[0]))
        for a, readers in timed.messages
        if timed.lane_of(a) == lane
    }
    found |= {
        timed.offset(timed.device_of(a), timed.owner(a.microbatch)) for a in timed.results if timed.lane_of(a) == lane
    }
    return tuple(sorted(found))


@dataclasses.dataclass(frozen=True)
class _Slots:
    """Each buffer's slot per key, and the most slots any device needs."""

    inbox: dict
    stash: dict
    weight: dict
    num_inbox: int
    num_stash: int
    num_weight: int
    recomputed: dict = dataclasses.field(default_factory=dict)
    num_recomputed: int = 0


def _slots(timed: _Timed, forward_only: bool) -> _Slots:
    """Inbox slots (messages, delivered inputs), stash slots (F to its last reader), weight slots (I to W),
    recompute slots (R to its last reader; with R the stash's only reader is the R)."""
    p = timed.schedule.num_devices
    inbox: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    for producer, readers in timed.messages:
        destination = timed.device_of(readers[0])
        last_read = max(timed.tick_of[r] for r in readers)
        inbox[destination].append((timed.arrival(producer, destination), last_read, producer))
    for sent, reader in timed.deliveries:
        inbox[timed.device_of(reader)].append((sent, timed.tick_of[reader], ("input", reader.microbatch)))
    stash: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    if not forward_only:
        recomputes = any(action.op is Op.R for action in timed.tick_of)
        readers_of: dict[tuple[int, int], list[int]] = {}
        for action, t in timed.tick_of.items():
            if action.op is Op.R or (action.op is not Op.F and not recomputes):
                readers_of.setdefault((action.stage, action.microbatch), []).append(t)
        for action, t in timed.tick_of.items():
            if action.op is Op.F:
                key = (action.stage, action.microbatch)
                stash[timed.device_of(action)].append((t, max(readers_of[key]), key))
    weight: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    for action, t in timed.tick_of.items():
        if action.op is Op.I:
            weight_tick = timed.tick_of[Action(action.stage, Op.W, action.microbatch)]
            weight[timed.device_of(action)].append((t, weight_tick, (action.stage, action.microbatch)))
    rebuilt: list[list[tuple[int, int, object]]] = [[] for _ in range(p)]
    last_read: dict[tuple[int, int], int] = {}
    for action, t in timed.tick_of.items():
        if action.op in (Op.B, Op.I, Op.W):
            key = (action.stage, action.microbatch)
            last_read[key] = max(t, last_read.get(key, t))
    for action, t in timed.tick_of.items():
        if action.op is Op.R:
            key = (action.stage, action.microbatch)
            rebuilt[timed.device_of(action)].append((t, last_read[key], key))
    inbox_slot_of, num_inbox = _assign_slots(inbox, strict=False)
    stash_slot_of, num_stash = _assign_slots(stash, strict=True)
    weight_slot_of, num_weight = _assign_slots(weight, strict=True)
    rebuilt_slot_of, num_rebuilt = _assign_slots(rebuilt, strict=True)
    return _Slots(
        inbox_slot_of, stash_slot_of, weight_slot_of, num_inbox, num_stash, num_weight, rebuilt_slot_of, num_rebuilt
    )


def _fill_ops(timed: _Timed, slots: _Slots, lanes: tuple[Lane, ...]) -> None:
    """Write each action's op, chunk, microbatch, hops and slots into its lane (in place)."""
    sched = timed.schedule
    input_message: dict[Action, object] = {}
    for producer, readers in timed.messages:
        for reader in readers:
            input_message[reader] = producer
    for _, reader in timed.deliveries:
        input_message[reader] = ("input", reader.microbatch)
    for action, t in timed.tick_of.items():
        d = timed.device_of(action)
        lane = lanes[timed.lane_of(action)]
        lane.op[t, d] = OP_CODES[action.op]
        lane.chunk[t, d] = sched.local_index(action.stage)
        lane.microbatch[t, d] = action.microbatch
        lane.is_first[t, d] = sched.is_first_hop(action.stage, action.microbatch)
        lane.is_last[t, d] = sched.is_last_hop(action.stage, action.microbatch)
        if action in input_message:
            lane.inbox_slot[t, d] = slots.inbox[input_message[action]]
        key = (action.stage, action.microbatch)
        if key in slots.stash:
            lane.stash_slot[t, d] = slots.stash[key]
        if key in slots.weight and action.op in (Op.I, Op.W):
            lane.weight_slot[t, d] = slots.weight[key]
        if key in slots.recomputed:
            lane.recompute_slot[t, d] = slots.recomputed[key]


def _fill_arrivals(timed: _Timed, slots: _Slots, lanes: tuple[Lane, ...], delivery: Delivery) -> None:
    """Write where each message, result and delivered input lands (in place)."""
    for producer, readers in timed.messages:
        src, dst = timed.device_of(producer), timed.device_of(readers[0])
        lane = lanes[timed.lane_of(producer)]
        channel = lane.channels.index(timed.offset(src, dst))
        lane.recv_slot[timed.arrival(producer, dst), dst, channel] = slots.inbox[producer]
    for action in timed.results:
        src, dst = timed.device_of(action), timed.owner(action.microbatch)
        lane = lanes[timed.lane_of(action)]
        channel = lane.channels.index(timed.offset(src, dst))
        lane.result_index[timed.arrival(action, dst), dst, channel] = action.microbatch % timed.per_device
    for sent, reader in timed.deliveries:
        src, dst = timed.owner(reader.microbatch), timed.device_of(reader)
        delivery.send_index[sent, src] = reader.microbatch % timed.per_device
        channel = delivery.channels.index(timed.offset(src, dst))
        delivery.recv_slot[sent, dst, channel] = slots.inbox[("input", reader.microbatch)]


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
    timed = _timed(table, forward_only, deliver, send_latency)
    slots = _slots(timed, forward_only)
    # + a tick without compute when results are still in flight after the last one
    num_ticks = max(
        [table.num_ticks + timed.lead] + [timed.arrival(a, timed.owner(a.microbatch)) + 1 for a in timed.results]
    )
    p, k = timed.schedule.num_devices, timed.per_device
    channels = [_lane_channels(timed, lane) for lane in (0, 1) if lane == 0 or timed.second]
    channels[0] = channels[0] or (0,)
    lanes = tuple(Lane.empty(num_ticks, p, c, slots.num_inbox, k) for c in channels)
    input_channels = tuple(
        sorted({timed.offset(timed.owner(a.microbatch), timed.device_of(a)) for _, a in timed.deliveries})
    )
    delivery = Delivery(
        send_index=np.zeros((num_ticks, p), np.int32),
        recv_slot=np.full((num_ticks, p, len(input_channels)), slots.num_inbox, np.int32),
        channels=input_channels,
    )
    _fill_ops(timed, slots, lanes)
    _fill_arrivals(timed, slots, lanes, delivery)
    return Program(
        tick_table=table,
        lanes=lanes,
        delivery=delivery,
        num_inbox_slots=slots.num_inbox,
        num_stash_slots=slots.num_stash,
        num_weight_slots=slots.num_weight,
        num_recompute_slots=slots.num_recomputed,
        microbatches_per_device=k,
        placement=StagePlacement.of(timed.schedule),
        forward_only=forward_only,
        deliver=deliver,
        send_latency=send_latency,
    )
