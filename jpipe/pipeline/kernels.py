"""Op kernels: what each op code does to one device's state in a tick, and which buffers it writes.

A kernel is a layerwise op (`jpipe.pipeline.lockstep`): it reads the tick's `View` and its inputs,
yields before each layer and after the last (a `jpipe.layered` stage run unrolled, in a braided
tick), and returns `finish(state) -> (state, message)`, which writes what the op produced into the
buffers it declares (`Kernel.writes`). The one buffer a kernel reads from the state before
finishing is the gradient accumulator (B and W add into it layer by layer: `Kernel.accumulates`).

The executor runs each kernel under its own `lax.cond` that takes and returns only the declared
buffers, so XLA updates them in place. One `lax.switch` over the op kinds, each branch taking and
returning every buffer, makes XLA copy them every tick instead (measured on CPU, jax 0.10.2: the
temporary memory of a gpipe step held 2.6 stashes instead of under 2; `tests/test_tick.py` guards it).

With R ops in the schedule (`jpipe.schedules.recompute`; the program's `recompute`), F keeps only
its input in the stash, R rebuilds the forward's residuals from it into `Buffer.RECOMPUTED`, and
B, I and W read them there; the stage's ops are then those of remat "none".

The mode picks the kernel set: `TRAINING` (F, B, I, W, R), `FORWARD_ONLY` (F returning its output)
or `EVALUATION` (F adding the loss at the last hop). With `has_aux`, F's last hop also adds the
loss function's metrics into `Buffer.METRICS` (None, an empty subtree, without it). A new op kind
is one `OpCode`, one kernel function, one `Kernel` entry here and the `StageOps` method it calls.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jpipe.pipeline.arrays import if_, put, take, varying
from jpipe.pipeline.end_slots import EndSlots
from jpipe.pipeline.lockstep import Layerwise, no_layers
from jpipe.pipeline.program import OpCode
from jpipe.pipeline.stage import StageOps
from jpipe.pipeline.state import Buffer, Carry, LaneRow, View

PyTree = Any
Finish = Callable[[Carry], tuple[Carry, PyTree]]


@dataclasses.dataclass(frozen=True, eq=False)
class TickContext:
    """What a device's ops read besides the carry (traced values of one device, inside `shard_map`).

    Attributes:
      local_params: the device's stage parameters, leaves `[v, ...]`.
      loss_params, prologue_params: the model's ends (None when absent).
      inputs: the device's own microbatches `[k, ...]` with `deliver`, else all `[m, ...]`.
      targets: `[m, ...]`, replicated (None forward only).
      loss_fn: `(loss_params, y, target) -> scalar`, or None; with `has_aux`, `-> (scalar, metrics)`.
      prologue: `(prologue_params, inputs[i]) -> x`, or None.
      x_like: zeros shaped like one stage input (a message), varying over the manual axes.
      scale: 1 / m (the loss is the mean over microbatches).
      end_slots: the end-gradient accumulators' layout (training only).
      manual_axes: the `shard_map`'s manual axes (stage, data).
      recompute: the schedule has R ops: F stashes its input, B/I/W read what R rebuilt.
      has_aux: `loss_fn` returns `(loss, metrics)`, metrics a dict of float arrays averaged over the
        microbatches like the loss (`Carry.metrics`); gradients flow through the loss only.
      offload: the buffers that live in host memory (`jpipe.pipeline.offload`). The tick machine
        stages them: the ops see a device buffer of one slot per lane (see `TickMachine`).
    """

    local_params: PyTree
    loss_params: PyTree
    prologue_params: PyTree
    inputs: PyTree
    targets: PyTree
    loss_fn: Callable | None
    prologue: Callable | None
    x_like: PyTree
    scale: float
    end_slots: EndSlots | None
    manual_axes: tuple[str, ...]
    recompute: bool = False
    offload: frozenset[Buffer] = frozenset()
    has_aux: bool = False

    def store(self, state: Carry, buffer: Buffer, slot, value: PyTree) -> Carry:
        """`state` with `value` in slot `slot` of `buffer`."""
        return dataclasses.replace(state, **{buffer.value: put(getattr(state, buffer.value), slot, value)})

    def load(self, view: View, buffer: Buffer, slot) -> PyTree:
        """Slot `slot` of `buffer` as the tick started."""
        return take(getattr(view, buffer.value), slot)

    def stage_input(self, row: LaneRow, view: View) -> PyTree:
        """The op's input: its inbox slot, or the prologue of its microbatch at a first hop."""
        arrived = take(view.inbox, row.inbox_slot)
        if self.prologue is None:
            return arrived  # stage 0's input was delivered to the inbox like any message

        def start(arrived):
            x = self.prologue(self.prologue_params, take(self.inputs, row.microbatch))
            return jax.tree.map(lambda a, b: a.astype(b.dtype), varying(x, self.manual_axes), arrived)

        return if_(row.is_first, start, lambda a: a, arrived)

    def stage_params(self, row: LaneRow) -> PyTree:
        return take(self.local_params, row.chunk)

    def residuals(self, row: LaneRow, view: View) -> PyTree:
        """What B, I and W rebuild the vjp from: the F's stash, or with R what the R rebuilt."""
        if self.recompute:
            return self.load(view, Buffer.RECOMPUTED, row.recompute_slot)
        return self.load(view, Buffer.STASH, row.stash_slot)

    def add_loss(self, state: Carry, loss: jax.Array, metrics: dict[str, jax.Array] | None = None) -> Carry:
        """`state` with one microbatch's loss (and metrics, with `has_aux`) added, scaled by 1 / m."""
        state = dataclasses.replace(state, loss=state.loss + loss.astype(state.loss.dtype) * self.scale)
        if not self.has_aux:
            return state
        added = jax.tree.map(lambda acc, v: acc + v.astype(acc.dtype) * self.scale, state.metrics, metrics)
        return dataclasses.replace(state, metrics=added)

    def loss_and_metrics(self, loss_params: PyTree, y: PyTree, target: PyTree) -> tuple[jax.Array, PyTree]:
        """`loss_fn`'s loss and metrics (None without `has_aux`)."""
        out = self.loss_fn(loss_params, y, target)
        return out if self.has_aux else (out, None)

    def prologue_backward(self, state: Carry, row: LaneRow, d_x: PyTree) -> Carry:
        """A first hop's input gradient -> the prologue's parameter gradients (with a prologue only)."""
        if self.prologue is None:
            return state  # d_x is this op's message: it travels to the microbatch's owner

        def accumulate(acc):
            # The prologue's forward is recomputed here (an embedding lookup: cheap) rather than stashed.
            tokens = take(self.inputs, row.microbatch)
            _, prologue_vjp = jax.vjp(lambda pp: self.prologue(pp, tokens), self.prologue_params)
            (d_prologue,) = prologue_vjp(jax.tree.map(lambda g, a: g.astype(a.dtype), d_x, self.x_like))
            return self.end_slots.add(acc, self.end_slots.prologue, d_prologue)

        return dataclasses.replace(state, end_grads=if_(row.is_first, accumulate, lambda g: g, state.end_grads))


def check_metrics(out: PyTree) -> None:
    """Raise unless `out` (shapes of a `has_aux` loss function's output) is `(scalar loss, dict of float arrays)`."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise ValueError(
            f"loss_fn: with has_aux=True it must return (loss, metrics), metrics a dict; got {jax.tree.structure(out)}"
        )
    loss, metrics = out
    if getattr(loss, "shape", None) != ():
        raise ValueError(f"loss_fn: the loss must be a scalar, got shape {getattr(loss, 'shape', None)}")
    for name, value in metrics.items():
        if not isinstance(value, jax.ShapeDtypeStruct | jax.Array) or not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"loss_fn: metric {name!r} must be a float array, got {value!r}")


KernelFn = Callable[[TickContext, StageOps, Carry, LaneRow, View], Layerwise[Finish]]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One op kind: its code, its layerwise op and the buffers it writes.

    Attributes:
      code: the `OpCode` in the lane tables.
      run: `(context, ops, state, row, view) -> layerwise op of finish(state) -> (state, message)`.
      writes: the buffers its finish writes.
      writes_with_prologue: buffers it writes only when the model has a prologue.
      accumulates: it adds into `Buffer.GRADS` while it runs (two such ops in one braided tick run
        one after the other, not in lockstep).
    """

    code: OpCode
    run: KernelFn
    writes: tuple[Buffer, ...]
    writes_with_prologue: tuple[Buffer, ...] = ()
    accumulates: bool = False

    def buffers(self, context: TickContext) -> tuple[Buffer, ...]:
        """The buffers it writes in `context`."""
        return self.writes + (self.writes_with_prologue if context.prologue is not None else ())


def forward(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """F: stash the residuals; at the last hop, the loss (and metrics), its parameter gradients and d(loss)/dy."""
    x = varying(context.stage_input(row, view), context.manual_axes)
    y, residuals = yield from ops.forward_layerwise(context.stage_params(row), x)

    def with_loss(state):
        target = take(context.targets, row.microbatch)
        loss_of = functools.partial(context.loss_and_metrics, target=target)
        loss, loss_vjp, metrics = jax.vjp(loss_of, context.loss_params, y, has_aux=True)  # metrics: no gradient
        d_loss_params, d_y = loss_vjp(varying(jnp.asarray(context.scale, loss.dtype), context.manual_axes))
        end_grads = context.end_slots.add(state.end_grads, context.end_slots.loss, d_loss_params)
        return dataclasses.replace(context.add_loss(state, loss, metrics), end_grads=end_grads), d_y

    kept = x if context.recompute else residuals  # with R, the R rebuilds the residuals from x

    def finish(state):
        state = context.store(state, Buffer.STASH, row.stash_slot, kept)
        return if_(row.is_last, with_loss, lambda s: (s, y), state)

    return finish


def recompute(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """R: the forward again from the input its F kept, its residuals into the recompute slot (no message)."""
    x = context.load(view, Buffer.STASH, row.stash_slot)
    _, residuals = yield from ops.forward_layerwise(context.stage_params(row), x)

    def finish(state):
        return context.store(state, Buffer.RECOMPUTED, row.recompute_slot, residuals), context.x_like

    return finish


def backward(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """B: the input gradient (the message) and the parameter gradients, added into the accumulator."""
    grad = take(view.inbox, row.inbox_slot)
    grads, d_x = yield from ops.backward_into_layerwise(
        context.stage_params(row), context.residuals(row, view), context.x_like, grad, state.grads, row.chunk
    )
    return lambda state: (context.prologue_backward(dataclasses.replace(state, grads=grads), row, d_x), d_x)


def input_grad(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """I: the input gradient (the message); what its W needs goes to the weight stash."""
    grad = take(view.inbox, row.inbox_slot)
    d_x, weight_residuals = yield from ops.input_grad_layerwise(
        context.stage_params(row), context.residuals(row, view), context.x_like, grad
    )

    def finish(state):
        state = context.store(state, Buffer.WEIGHT_STASH, row.weight_slot, weight_residuals)
        return context.prologue_backward(state, row, d_x), d_x

    return finish


def weight_grad(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """W: the parameter gradients from the weight stash, added into the accumulator (no message)."""
    weight_residuals = context.load(view, Buffer.WEIGHT_STASH, row.weight_slot)
    grads = yield from ops.weight_grad_into_layerwise(
        context.stage_params(row),
        context.residuals(row, view),
        context.x_like,
        weight_residuals,
        state.grads,
        row.chunk,
    )
    return lambda state: (dataclasses.replace(state, grads=grads), context.x_like)


def forward_only(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """F, inference: the stage's output is the message (no residuals, no loss)."""
    y = ops.fn(context.stage_params(row), varying(context.stage_input(row, view), context.manual_axes))
    return no_layers(lambda state: (state, y))


def forward_loss(context: TickContext, ops: StageOps, state: Carry, row: LaneRow, view: View) -> Layerwise[Finish]:
    """F, evaluation: the output is the message; at the last hop the loss (and metrics) are added (no gradients)."""
    y = ops.fn(context.stage_params(row), varying(context.stage_input(row, view), context.manual_axes))

    def add_loss(state):
        loss, metrics = context.loss_and_metrics(context.loss_params, y, take(context.targets, row.microbatch))
        return context.add_loss(state, loss, metrics)

    return no_layers(lambda state: (if_(row.is_last, add_loss, lambda s: s, state), y))


TRAINING = (
    Kernel(OpCode.FORWARD, forward, (Buffer.STASH, Buffer.LOSS, Buffer.METRICS, Buffer.END_GRADS)),
    Kernel(OpCode.BACKWARD, backward, (Buffer.GRADS,), (Buffer.END_GRADS,), accumulates=True),
    Kernel(OpCode.INPUT_GRAD, input_grad, (Buffer.WEIGHT_STASH,), (Buffer.END_GRADS,)),
    Kernel(OpCode.WEIGHT_GRAD, weight_grad, (Buffer.GRADS,), accumulates=True),
    Kernel(OpCode.RECOMPUTE, recompute, (Buffer.RECOMPUTED,)),
)
FORWARD_ONLY = (Kernel(OpCode.FORWARD, forward_only, ()),)
EVALUATION = (Kernel(OpCode.FORWARD, forward_loss, (Buffer.LOSS, Buffer.METRICS)),)
