"""The SPMD pipeline executor: any valid schedule as one `shard_map` + `lax.scan` program.

Each device walks the tick tables built by `jpipe.pipeline.program.compile_program`. In every tick
it runs at most one action, each kind under its own `lax.cond` (idle ticks compute nothing), or the
two ops of a braided composite in one branch (`braid`), then
every device sends its outgoing message on every ring channel with `lax.ppermute`; receivers store
what their table marks in inbox slots. With `overlap_sends`, the message a device produced in tick
t is sent at the start of tick t + 1, by a `ppermute` that nothing in that tick's compute depends
on, so the compiler can run the transfer while the tick computes (the tables then give every
cross-device message one more tick, see `jpipe.pipeline.program`).

A forward stashes the residuals of `jax.vjp` of its stage (what the `remat` policy saves, minus the
stage parameters themselves); backward ops rebuild the vjp function from the stash (see
`jpipe.pipeline.stage` for how B, I and W use it).

Every buffer is updated only inside a `lax.cond` whose other branch returns it unchanged, so XLA
updates it in place; a single `lax.switch` that reads and writes the same buffers in different
branches makes XLA copy them every tick and doubles their memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jpipe.pipeline import program as prog
from jpipe.pipeline.checks import check_call, check_mesh
from jpipe.pipeline.layout import StagePlacement
from jpipe.pipeline.stage import stage_ops
from jpipe.pipeline.steps import braid_steps, run_steps
from jpipe.schedules.ir import Schedule
from jpipe.schedules.simulate import Cost, best_split, simulate

PyTree = Any


BRAIDED_SCOPE = "braided_tick"
"""The `jax.named_scope` of a braided tick's ops: in the `op_name` metadata of everything they compile to."""


def _acc(*dtypes) -> jnp.dtype:
    """Accumulator dtype for values of `dtypes`: float32, or float64 when any of them is float64."""
    return jnp.dtype(jnp.float64) if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


def _varying(tree: PyTree, axes: tuple[str, ...]) -> PyTree:
    """Mark arrays as varying over the manual `axes` (scan carries, vjp cotangents)."""

    def cast(x):
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _if(flag, then: Callable, otherwise: Callable, *operands):
    """`then(*operands)` where `flag` is 1, else `otherwise(*operands)`.

    A table entry (traced) becomes a `lax.cond`; a Python int (a braided tick's branch, built for
    one combination of first/last hops) picks the function while tracing, so the branch stays
    straight-line code that the compiler can interleave with the tick's other op.
    """
    if isinstance(flag, (bool, int, np.integer)):
        return then(*operands) if flag else otherwise(*operands)
    return lax.cond(flag == 1, then, otherwise, *operands)


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def _zeros(leading: tuple[int, ...], like: jax.Array, dtype=None) -> jax.Array:
    """Zeros shaped `leading + like.shape` that keep `like`'s sharding over non-manual mesh axes.

    Under explicit sharding, buffers must carry the sharding of what is written into them (e.g. a
    batch dimension split over `data`).
    """
    dtype = like.dtype if dtype is None else dtype
    spec = _spec_of(like)
    if not any(entry is not None for entry in spec):
        return jnp.zeros(leading + like.shape, dtype)
    return jnp.zeros(leading + like.shape, dtype, out_sharding=P(*((None,) * len(leading) + spec)))


def _take(tree: PyTree, index) -> PyTree:
    """`tree[index]` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def _put(tree: PyTree, index, value: PyTree) -> PyTree:
    """`tree.at[index].set(value)` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), index, 0), tree, value)


def value_and_grad(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree, PyTree], jax.Array],
    *,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    remat: str | Callable | None = "none",
    stage_axis: str = "stage",
    data_axes: str | tuple[str, ...] = (),
    split_backward: bool | str = "auto",
    cost: Cost | None = None,
    stage_order: str = "logical",
    prologue: Callable[[PyTree, PyTree], PyTree] | None = None,
    overlap_sends: bool | str = "auto",
    braid: bool = True,
) -> Callable:
    """Pipelined loss and gradients of `mean_m loss_fn(loss_params, stages(inputs[m]), targets[m])`.

    `stages` is microbatch m's route (`Schedule.route`: by default every stage in order), each
    logical stage applying its model stage's parameters (`Schedule.model_stage`: replicas share
    them). A model stage that a microbatch skips gets no gradient from it.

    Args:
      stage_fn: `(params_of_one_stage, x) -> y`, y with x's structure, shapes and dtypes.
      loss_fn: `(loss_params, y, target) -> scalar`, applied per microbatch after its last hop.
      schedule: any schedule `jpipe.schedules.validate` accepts.
      mesh: a mesh with an axis `stage_axis` of size `schedule.num_devices`. Axes other than the
        stage and data axes (e.g. tensor) are left to the compiler.
      remat: what a forward saves for its backward (see `jpipe.pipeline.remat.apply_remat`).
      stage_axis: the mesh axis the pipeline runs over.
      data_axes: mesh axes that split each microbatch's batch dimension (dimension 1 of `inputs`
        and `targets` leaves): data parallelism, run manually. `loss_fn` must then be a mean over
        the batch; loss and gradients are averaged over these axes.
      split_backward: run each B of the schedule as I then W in consecutive ticks (ticks then hold
        ops of similar cost). The split is exact (I + W evaluate B's equations once, see
        `jpipe.pipeline.split`), so it costs no compute, only the weight residuals I keeps for W.
        "auto" (default) splits when the lockstep simulation under `cost` says it is faster
        (`jpipe.schedules.best_split`). Schedules written with I and W always run them split.
      cost: per-op costs for the "auto" choice (default `Cost()`: F=1, B=2, I=W=1); measure a
        real stage's with `jpipe.measure_costs`.
      stage_order: "logical" (stage_params leaves `[K, ...]` in model-stage order 0..K-1, K =
        `schedule.num_model_stages`, which is `num_stages` without replicas) or "device"
        (device-major `[S, ...]`, `StagePlacement.of(schedule).device_major`: device 0's logical
        stages, then device 1's, ...; a replicated model stage has one row per replica). With
        "device" and leaves sharded `P(stage_axis)`, every device already holds exactly its stages
        and no parameter moves between devices; use it for training (gradients come back in the
        same order). With "logical", interleaved and V placements permute the stages every step,
        and replicas are copied from (and their gradients summed into) their model stage's row.
        With "device", each replica's row gets the gradient summed over all replicas of its model
        stage (`StagePlacement.sum_replicas`), so an optimizer applied row by row keeps the copies
        equal, provided they start equal.
      prologue: optional `(prologue_params, inputs[i]) -> x`, the start of the model (e.g. an
        embedding lookup of token ids). It runs inside the tick loop, on the device of each
        microbatch's first hop, as part of its forward there; its backward runs in that stage's B (or I) and
        its parameter gradients are accumulated there and reduced over the pipeline once per step.
        Inputs are then typically small (token ids, replicated over the pipeline), and no input
        gradient is computed.
      overlap_sends: hide the pipeline's sends behind compute: the message produced in tick t
        travels while tick t + 1 computes, and is usable from tick t + 2 (the schedule is packed
        with `send_latency=1`, which adds ticks). Without it, each tick's sends run after its
        compute, exposed. "auto" (default) turns it on when the lockstep simulation under `cost`
        (whose `comm` is the time of one tick's send) is not slower with it
        (`resolve_overlap`); with `comm=0` that is never, as sends then cost nothing.
      braid: run the two ops of each composite (`jpipe.schedules.Composite`: STP's and DualPipe's
        overlapped F&B pairs, torch's `OVERLAP_F_B` cells) in one tick, as one computation with no
        data dependence between them, so the compiler can run one op's tensor-parallel collectives
        under the other's compute; a `jpipe.layered` stage's two ops then run layer by layer in
        lockstep (`jpipe.pipeline.steps`: unrolled, a barrier between layers), so every layer has
        the other op's layer beside it. The unrolled layers of both ops cost temporary memory:
        compiled for TPU, 1.8x the flattened step's for `stp` at 16 layers, 1.9x at 8
        (`experiments/tp_overlap.py`).
        False runs them one after the other in consecutive ticks. Schedules without composites are
        unaffected.

    Without a prologue, the batch is not replicated over the pipeline: `inputs` are stored sharded
    over `stage_axis` on their leading (microbatch) axis, microbatch i on device `i // ceil(m / p)`
    (the array is padded to a multiple of p when m is not), and sent to the device of its first
    hop before its first forward; input gradients return to the same device and come back sharded
    the same way. No collective larger than one microbatch crosses the pipeline; `targets` are
    replicated (the loss runs on the device of each microbatch's last hop).

    Returns:
      `step(stage_params, loss_params, inputs, targets) -> (loss, (stage_grads, loss_grads,
      input_grads))` where stage_params leaves are `[K, ...]` in model-stage order (see `stage_order`),
      inputs/targets leaves are `[num_microbatches, ...]`; gradients match their arguments. With a
      `prologue`: `step(stage_params, loss_params, inputs, targets, prologue_params) -> (loss,
      (stage_grads, loss_grads, prologue_grads))`.
    """
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    check_mesh(schedule, mesh, stage_axis, data_axes)
    if stage_order not in ("logical", "device"):
        raise ValueError(f"stage_order: expected 'logical' or 'device', got {stage_order!r}")
    split = resolve_split(schedule, split_backward, cost)
    overlap = resolve_overlap(schedule, overlap_sends, cost, split=split)
    if not isinstance(braid, bool):
        raise ValueError(f"braid: expected True or False, got {braid!r}")
    program = prog.compile_program(
        schedule, split=split, deliver=prologue is None, send_latency=int(overlap), braid=braid
    )
    braid_ops = stage_ops(stage_fn, remat, unroll=True) if program.braided else None
    run = _build_runner(program, stage_ops(stage_fn, remat), loss_fn, mesh, stage_axis, data_axes, prologue, braid_ops)
    placement = program.placement

    device_params = _device_params_of("value_and_grad", schedule, stage_fn, mesh, data_axes, prologue, stage_order)

    def step(stage_params, loss_params, inputs, targets, prologue_params=None):
        local = device_params(stage_params, inputs, targets, prologue_params)
        loss, grads, loss_grads, first_grads = run(local, loss_params, inputs, targets, prologue_params)
        stage_grads = placement.merge_devices(grads)
        if stage_order == "logical":
            stage_grads = placement.device_to_model(stage_grads, mesh)
        else:
            stage_grads = placement.sum_replicas(stage_grads, mesh)
        return loss, (stage_grads, loss_grads, first_grads)

    step.program = program  # for inspection: tick tables, slot counts
    return step


def resolve_split(schedule: Schedule, split_backward: bool | str, cost: Cost | None = None) -> bool:
    """The executor's `split_backward` option as a bool ("auto": the faster one in simulation)."""
    if split_backward == "auto":
        return best_split(schedule, cost)
    if not isinstance(split_backward, bool):
        raise ValueError(f"split_backward: expected True, False or 'auto', got {split_backward!r}")
    return split_backward


def resolve_overlap(schedule: Schedule, overlap_sends: bool | str, cost: Cost | None = None, *, split: bool) -> bool:
    """The executor's `overlap_sends` option as a bool ("auto": on unless the simulation says slower).

    Compares the lockstep makespan with hidden sends (`send_latency=1`: each tick lasts
    `max(compute, cost.comm)`, cross-device results take one more tick) against exposed sends (each
    sending tick lasts `compute + cost.comm`).
    """
    if overlap_sends == "auto":
        hidden = simulate(schedule, cost, "lockstep", split_backward=split, send_latency=1).makespan
        exposed = simulate(schedule, cost, "lockstep", split_backward=split).makespan
        return hidden <= exposed
    if not isinstance(overlap_sends, bool):
        raise ValueError(f"overlap_sends: expected True, False or 'auto', got {overlap_sends!r}")
    return overlap_sends


def forward(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    *,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    stage_axis: str = "stage",
    data_axes: str | tuple[str, ...] = (),
    overlap_sends: bool = False,
) -> Callable:
    """Pipelined forward (inference): `run(stage_params, inputs) -> outputs`, inputs/outputs `[m, ...]`.

    Runs the schedule's forwards in each device's order (a fill/drain without backward); microbatch
    i's output is that of its route's last hop. `stage_params` leaves are `[K, ...]` in model-stage
    order (`stage_order="logical"` of `value_and_grad`). Arguments as for `value_and_grad`; inputs
    and outputs are sharded over the pipeline as its inputs are.
    """
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    check_mesh(schedule, mesh, stage_axis, data_axes)
    if not isinstance(overlap_sends, bool):
        raise ValueError(f"overlap_sends: expected True or False, got {overlap_sends!r}")
    program = prog.compile_program(schedule, forward_only=True, deliver=True, send_latency=int(overlap_sends))
    run = _build_runner(program, stage_ops(stage_fn, "none"), None, mesh, stage_axis, data_axes)
    placement = program.placement

    def apply(stage_params, inputs):
        check_call(schedule, stage_fn, stage_params, inputs, None, _axes_size(mesh, data_axes))
        return run(placement.split_devices(placement.model_to_device(stage_params, mesh)), inputs)

    apply.program = program
    return apply


def forward_loss(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree, PyTree], jax.Array],
    *,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    stage_axis: str = "stage",
    data_axes: str | tuple[str, ...] = (),
    stage_order: str = "logical",
    prologue: Callable[[PyTree, PyTree], PyTree] | None = None,
    overlap_sends: bool = False,
) -> Callable:
    """Pipelined evaluation: `mean_m loss_fn(loss_params, stages(inputs[m]), targets[m])`, forwards only.

    The loss of `value_and_grad` without its backward: the schedule's forwards in each device's order
    (composites flattened), the prologue on the device of each microbatch's first hop, the loss on
    the device of its last hop; no residuals are stashed and nothing is differentiated. Arguments
    as for `value_and_grad`.

    Returns:
      `loss(stage_params, loss_params, inputs, targets) -> scalar`, or with a `prologue`
      `loss(stage_params, loss_params, inputs, targets, prologue_params) -> scalar`.
    """
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    check_mesh(schedule, mesh, stage_axis, data_axes)
    if stage_order not in ("logical", "device"):
        raise ValueError(f"stage_order: expected 'logical' or 'device', got {stage_order!r}")
    if not isinstance(overlap_sends, bool):
        raise ValueError(f"overlap_sends: expected True or False, got {overlap_sends!r}")
    program = prog.compile_program(
        schedule, forward_only=True, deliver=prologue is None, send_latency=int(overlap_sends)
    )
    run = _build_runner(program, stage_ops(stage_fn, "none"), loss_fn, mesh, stage_axis, data_axes, prologue)
    device_params = _device_params_of("forward_loss", schedule, stage_fn, mesh, data_axes, prologue, stage_order)

    def loss(stage_params, loss_params, inputs, targets, prologue_params=None):
        local = device_params(stage_params, inputs, targets, prologue_params)
        return run(local, loss_params, inputs, targets, prologue_params)

    loss.program = program
    return loss


def _device_params_of(api: str, schedule, stage_fn, mesh, data_axes, prologue, stage_order) -> Callable:
    """`(stage_params, inputs, targets, prologue_params) -> per-device stage params` after checking the call.

    Shared by `value_and_grad` and `forward_loss` (`api` names the one in errors): the prologue
    parameters are given exactly with a prologue, the arguments fit the schedule, and logical-order
    parameters are placed in device order.
    """
    placement = StagePlacement.of(schedule)

    def device_params(stage_params, inputs, targets, prologue_params):
        if (prologue is None) != (prologue_params is None):
            raise ValueError(
                f"prologue_params: pass them exactly when {api} was given a prologue "
                f"(prologue {'given' if prologue is not None else 'not given'})"
            )
        num_data = _axes_size(mesh, data_axes)
        check_call(schedule, stage_fn, stage_params, inputs, targets, num_data, prologue, prologue_params, stage_order)
        if stage_order == "logical":
            stage_params = placement.model_to_device(stage_params, mesh)
        return placement.split_devices(stage_params)

    return device_params


def _axes_size(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for name in axes:
        size *= mesh.shape[name]
    return size


def _build_runner(
    program: prog.Program, ops, loss_fn, mesh, axis: str, data_axes: tuple[str, ...], prologue=None, braid_ops=None
) -> Callable:
    """The shard_map'ed scan over ticks.

    `ops`: a `jpipe.pipeline.stage` op implementation; `braid_ops`: the one braided ticks run (its
    layers unrolled, `stage_ops(..., unroll=True)`), default `ops`.
    """
    braid_ops = ops if braid_ops is None else braid_ops
    num_data = _axes_size(mesh, data_axes)
    manual_axes = (axis, *data_axes)
    schedule = program.schedule
    p, m = schedule.num_devices, schedule.num_microbatches
    k = program.microbatches_per_device
    forward_only, deliver, overlap = program.forward_only, program.deliver, program.send_latency > 0
    evaluating = forward_only and loss_fn is not None  # `forward_loss`: the mean loss, no gradients
    tables = {name: jnp.asarray(a) for name, a in program.per_tick_arrays().items()}
    channels, input_channels = program.channels, program.input_channels
    # [T, C]: whether any device receives on channel c in tick t (identical on every device).
    channel_used = jnp.asarray(
        (program.recv_slot < program.num_inbox_slots).any(axis=1) | (program.result_index < k).any(axis=1)
    )
    input_channel_used = jnp.asarray((program.input_recv_slot < program.num_inbox_slots).any(axis=1))
    # Braided ticks: a device runs two ops (a kept composite) in one branch. `pair[t, d]` is 0 for a
    # tick with one op, else 1 + the index of its (first op, second op) kind in `pair_kinds`.
    braided, second_channels = program.braided, program.second_channels
    pair_kinds: list[tuple[int, int]] = []
    if braided:
        # A kind: (op, is_first, is_last) of the first and of the second op; each gets its own branch,
        # in which the first/last-hop work (prologue, loss) is static, not a nested conditional.
        kind_tables = [
            getattr(program, f"{prefix}{name}") for prefix in ("", "second_") for name in ("op", "is_first", "is_last")
        ]
        kind_of = np.stack(kind_tables, axis=-1)  # [T, p, 6]
        paired = program.second_op != prog.IDLE
        pair_kinds = sorted({tuple(int(v) for v in kind) for kind in kind_of[paired]})
        pair = np.zeros(program.op.shape, np.int32)
        for index, kind in enumerate(pair_kinds, start=1):
            pair[paired & (kind_of == np.asarray(kind)).all(axis=-1)] = index
        tables["pair"] = jnp.asarray(pair)
        second_channel_used = jnp.asarray(
            (program.second_recv_slot < program.num_inbox_slots).any(axis=1)
            | (program.second_result_index < k).any(axis=1)
        )
    scale = 1.0 / m

    def send(message, offset, used):
        """`message` from every device to device `+offset`, skipped (on all devices) when unused.

        With `overlap` the send is unconditional: a `ppermute` inside a `lax.cond` branch is a
        start immediately followed by its done, with nothing the compiler could run in between.
        """
        if offset == 0:
            return message
        if overlap:
            perm = [(d, (d + offset) % p) for d in range(p)]
            return jax.tree.map(lambda a: lax.ppermute(a, axis, perm), message)
        # The predicate is the same on every device, so all take the same branch.
        perm = [(d, (d + offset) % p) for d in range(p)]
        return lax.cond(
            used, lambda msg: jax.tree.map(lambda a: lax.ppermute(a, axis, perm), msg), lambda msg: msg, message
        )

    def per_device(local_params, loss_params, inputs, targets, prologue_params):
        # local_params leaves: [1, v, ...]; inputs: [k, ...] (this device's microbatches) with
        # `deliver`, else [m, ...] replicated; targets: [m, ...] replicated.
        local_params = jax.tree.map(lambda a: a[0], local_params)
        # Differentiating w.r.t. an invariant (replicated) value inside a branch would transpose its
        # implicit pcast into a psum that only some devices reach: make it varying up front.
        loss_params = _varying(loss_params, manual_axes)
        local_params = _varying(local_params, manual_axes)
        prologue_params = _varying(prologue_params, manual_axes)
        device = lax.axis_index(axis)
        end_slots = _EndSlots.of(program, loss_params, prologue_params)
        rows = {name: lax.dynamic_index_in_dim(a, device, axis=1, keepdims=False) for name, a in tables.items()}
        rows["channel_used"] = channel_used
        rows["input_channel_used"] = input_channel_used
        if braided:
            rows["second_channel_used"] = second_channel_used
        if prologue is None:
            x_like = _varying(_zeros_like(_take(inputs, 0)), manual_axes)
        else:
            # Only the shapes matter: this prologue call is dead code, removed by XLA.
            x_like = _varying(_zeros_like(prologue(prologue_params, _take(inputs, 0))), manual_axes)

        def slots(n, example):
            return jax.tree.map(lambda a: _zeros((n,), a), example)

        carry = {"inbox": slots(program.num_inbox_slots + 1, x_like)}  # + a scratch slot
        if overlap:
            carry["outbox"] = x_like  # the message of the previous tick, sent during this one
            if braided:
                carry["second_outbox"] = x_like
        if deliver:
            # Input gradients (or outputs, forward only) of this device's microbatches; + a scratch slot.
            carry["results"] = slots(k + 1, x_like)
        if not forward_only:
            # Traced here only for their shapes and varying types (dead code, removed by XLA).
            some_params = _take(local_params, rows["chunk"][0])
            residuals = ops.forward(some_params, x_like)[1]
            weight_residuals = ops.input_grad(some_params, residuals, x_like, x_like)[1]
            carry["stash"] = slots(program.num_stash_slots, residuals)
            carry["weight_stash"] = slots(program.num_weight_slots, weight_residuals)
            carry["grads"] = jax.tree.map(lambda a: _zeros((), a, _acc(a.dtype)), local_params)
            carry["loss"] = jnp.zeros((), _acc(*(a.dtype for a in jax.tree.leaves(loss_params))))
            carry["end_grads"] = [_zeros((), like, _acc(like.dtype)) for like in end_slots.buffers]
        if evaluating:
            carry["loss"] = jnp.zeros((), _acc(*(a.dtype for a in jax.tree.leaves(loss_params))))
        carry = _varying(carry, manual_axes)

        def stage_input(row, view):
            arrived = _take(view["inbox"], row["inbox_slot"])
            if prologue is None:
                return arrived  # stage 0's input was delivered to the inbox like any message

            def start(arrived):
                x = prologue(prologue_params, _take(inputs, row["microbatch"]))
                return jax.tree.map(lambda a, b: a.astype(b.dtype), _varying(x, manual_axes), arrived)

            return _if(row["is_first"], start, lambda a: a, arrived)

        # Each op is a step generator (`jpipe.pipeline.steps`): it reads the tick's views and its
        # inputs, yields before each layer and after the last, and returns `finish(state) -> (state,
        # message)`, which writes what it produced into the buffers. The one buffer an op reads from
        # the state before finishing is the gradient accumulator (B and W add into it layer by layer).

        def run_forward(state, row, view, ops=ops):
            params = _take(local_params, row["chunk"])
            x = _varying(stage_input(row, view), manual_axes)
            if forward_only:
                y = ops.fn(params, x)
                if not evaluating:
                    return lambda state: (state, y)

                def add_loss(state):
                    loss = loss_fn(loss_params, y, _take(targets, row["microbatch"]))
                    return {**state, "loss": state["loss"] + loss.astype(state["loss"].dtype) * scale}

                return lambda state: (_if(row["is_last"], add_loss, lambda s: s, state), y)
            y, residuals = yield from ops.forward_steps(params, x)

            def with_loss(state):
                target = _take(targets, row["microbatch"])
                loss, loss_vjp = jax.vjp(lambda lp, out: loss_fn(lp, out, target), loss_params, y)
                d_loss_params, d_y = loss_vjp(_varying(jnp.asarray(scale, loss.dtype), manual_axes))
                state = {
                    **state,
                    "loss": state["loss"] + loss.astype(state["loss"].dtype) * scale,
                    "end_grads": end_slots.add(state["end_grads"], end_slots.loss, d_loss_params),
                }
                return state, d_y

            def finish(state):
                state = {**state, "stash": _put(state["stash"], row["stash_slot"], residuals)}
                return _if(row["is_last"], with_loss, lambda s: (s, y), state)

            return finish

        def op_inputs(row, view):
            return _take(local_params, row["chunk"]), _take(view["stash"], row["stash_slot"])

        def prologue_backward(state, row, d_x):
            """Stage 0's input gradient -> the prologue's parameter gradients (prologue only)."""
            if prologue is None:
                return state  # d_x is this op's message: it travels to the microbatch's owner

            def accumulate(acc):
                # The prologue's forward is recomputed here (an embedding lookup: cheap) rather than stashed.
                tokens = _take(inputs, row["microbatch"])
                _, prologue_vjp = jax.vjp(lambda pp: prologue(pp, tokens), prologue_params)
                (d_prologue,) = prologue_vjp(jax.tree.map(lambda g, a: g.astype(a.dtype), d_x, x_like))
                return end_slots.add(acc, end_slots.prologue, d_prologue)

            grads = _if(row["is_first"], accumulate, lambda g: g, state["end_grads"])
            return {**state, "end_grads": grads}

        def run_backward(state, row, view, ops=ops):
            params, residuals = op_inputs(row, view)
            grad = _take(view["inbox"], row["inbox_slot"])
            grads, d_x = yield from ops.backward_into_steps(
                params, residuals, x_like, grad, state["grads"], row["chunk"]
            )
            return lambda state: (prologue_backward({**state, "grads": grads}, row, d_x), d_x)

        def run_input_grad(state, row, view, ops=ops):
            params, residuals = op_inputs(row, view)
            grad = _take(view["inbox"], row["inbox_slot"])
            d_x, weight_residuals = yield from ops.input_grad_steps(params, residuals, x_like, grad)

            def finish(state):
                state = {**state, "weight_stash": _put(state["weight_stash"], row["weight_slot"], weight_residuals)}
                return prologue_backward(state, row, d_x), d_x

            return finish

        def run_weight_grad(state, row, view, ops=ops):
            params, residuals = op_inputs(row, view)
            weight_residuals = _take(view["weight_stash"], row["weight_slot"])
            grads = yield from ops.weight_grad_into_steps(
                params, residuals, x_like, weight_residuals, state["grads"], row["chunk"]
            )
            return lambda state: ({**state, "grads": grads}, x_like)

        def single_op(run):
            """A step-generator op as one function `(state, row, view) -> (state, message)`."""

            def run_alone(state, row, view):
                return run_steps(run(state, row, view))(state)

            return run_alone

        def skip(state, row, view):
            return state, x_like

        # (op code, what it runs, the buffers it may update); views are read-only.
        backward_keys = ("grads", "end_grads") if prologue is not None else ("grads",)
        input_grad_keys = ("weight_stash", "end_grads") if prologue is not None else ("weight_stash",)
        forward_keys = ("stash", "loss", "end_grads") if not forward_only else ("loss",) if evaluating else ()
        kinds = [(prog.FORWARD, run_forward, forward_keys)]
        if not forward_only:
            kinds += [
                (prog.BACKWARD, run_backward, backward_keys),
                (prog.INPUT_GRAD, run_input_grad, input_grad_keys),
                (prog.WEIGHT_GRAD, run_weight_grad, ("grads",)),
            ]
        if program.num_weight_slots == 0:
            kinds = [k for k in kinds if k[0] not in (prog.INPUT_GRAD, prog.WEIGHT_GRAD)]
        runs = {code: (run, keys) for code, run, keys in kinds}  # the pairs' ops, too
        # The single-op branches only for ops some tick runs alone.
        alone = program.op[program.second_op == prog.IDLE] if braided else program.op
        kinds = [k for k in kinds if (alone == k[0]).any()]

        def braided_run(kind):
            """Both ops of a braided tick in one branch, layer by layer in lockstep (`braid_steps`).

            Neither reads what the other writes: both read the tick's views, and each writes its own
            slots. Two ops that both add into the gradient accumulator run one after the other.
            """
            first, first_is_first, first_is_last, second, second_is_first, second_is_last = kind
            (run_first, first_keys), (run_second, second_keys) = runs[first], runs[second]
            in_lockstep = not ({first, second} <= {prog.BACKWARD, prog.WEIGHT_GRAD})

            def run(state, row, view):
                first_row = {**row, "is_first": first_is_first, "is_last": first_is_last}
                second_row = {name: row[f"second_{name}"] for name in prog.SECOND_TABLES}
                second_row.update(is_first=second_is_first, is_last=second_is_last)
                with jax.named_scope(BRAIDED_SCOPE):
                    if in_lockstep:
                        finish_first, finish_second = braid_steps(
                            run_first(state, first_row, view, ops=braid_ops),
                            run_second(state, second_row, view, ops=braid_ops),
                        )
                        state, first_message = finish_first(state)
                    else:
                        state, first_message = run_steps(run_first(state, first_row, view, ops=braid_ops))(state)
                        finish_second = run_steps(run_second(state, second_row, view, ops=braid_ops))
                    state, second_message = finish_second(state)
                return state, (first_message, second_message)

            return run, tuple(dict.fromkeys(first_keys + second_keys))

        def skip_pair(state, row, view):
            return state, (x_like, x_like)

        def deliver_messages(row, inbox, results, message, lane_channels, prefix, in_flight):
            for c, offset in enumerate(lane_channels):
                if overlap and offset != 0:
                    arrived = in_flight[c]
                else:
                    arrived = send(message, offset, row[f"{prefix}channel_used"][c])
                inbox = _put(inbox, row[f"{prefix}recv_slot"][c], arrived)
                if deliver:
                    index = row[f"{prefix}result_index"][c]
                    results = lax.cond(index < k, lambda r, a=arrived, i=index: _put(r, i, a), lambda r: r, results)
            return inbox, results

        def tick(state, row):
            if overlap:
                # Sent first: nothing this tick computes depends on it, so it travels meanwhile.
                in_flight = [send(state["outbox"], offset, True) for offset in channels]
                second_in_flight = [send(state["second_outbox"], offset, True) for offset in second_channels]
            else:
                in_flight = second_in_flight = None
            message = second_message = x_like
            single = row["pair"] == 0 if braided else True
            for code, run, keys in kinds:
                view = {k: state[k] for k in ("inbox", "stash", "weight_stash") if k in state}
                part = {k: state[k] for k in keys}
                runs_here = (row["op"] == code) & single
                part, produced = lax.cond(runs_here, single_op(run), skip, part, row, view)
                state = {**state, **part}
                message = jax.tree.map(lambda a, b, r=runs_here: jnp.where(r, a, b), produced, message)
            for index, kind in enumerate(pair_kinds, start=1):
                run, keys = braided_run(kind)
                view = {k: state[k] for k in ("inbox", "stash", "weight_stash") if k in state}
                part = {k: state[k] for k in keys}
                runs_here = row["pair"] == index
                part, (produced, second_produced) = lax.cond(runs_here, run, skip_pair, part, row, view)
                state = {**state, **part}
                message = jax.tree.map(lambda a, b, r=runs_here: jnp.where(r, a, b), produced, message)
                second_message = jax.tree.map(
                    lambda a, b, r=runs_here: jnp.where(r, a, b), second_produced, second_message
                )
            inbox, results = deliver_messages(
                row, state["inbox"], state.get("results"), message, channels, "", in_flight
            )
            if braided:
                inbox, results = deliver_messages(
                    row, inbox, results, second_message, second_channels, "second_", second_in_flight
                )
            if input_channels:
                outgoing = _take(inputs, row["input_send_index"])
                for c, offset in enumerate(input_channels):
                    arrived = send(outgoing, offset, row["input_channel_used"][c])
                    inbox = _put(inbox, row["input_recv_slot"][c], arrived)
            state = {**state, "inbox": inbox}
            if deliver:
                state["results"] = results
            if overlap:
                state["outbox"] = message
                if braided:
                    state["second_outbox"] = second_message
            return state, None

        state, _ = lax.scan(tick, carry, rows)
        results = _take_first(state["results"], k) if deliver else None

        def data_mean(tree):
            return jax.tree.map(lambda a: lax.pmean(a, data_axes), tree) if data_axes else tree

        if evaluating:
            return data_mean(lax.psum(state["loss"], axis))
        if forward_only:
            return results

        grads = jax.tree.map(lambda g, a: g.astype(a.dtype)[None], data_mean(state["grads"]), local_params)
        # Parameter-sized, once per step (only the devices running first / last hops hold non-zero values).
        holds_first, holds_last = end_slots.holders(device)
        loss_grads = end_slots.reduce(state["end_grads"], end_slots.loss, holds_last, loss_params, axis, data_mean)
        if prologue is None:
            # Each data shard's loss is the mean over its part of the batch: d(mean)/dx carries 1/num_data.
            first_grads = jax.tree.map(lambda g: g / num_data, results)
        else:
            first_grads = end_slots.reduce(
                state["end_grads"], end_slots.prologue, holds_first, prologue_params, axis, data_mean
            )
        return data_mean(lax.psum(state["loss"], axis)), grads, loss_grads, first_grads

    stage_spec = P(axis)
    batch_spec = P(None, data_axes) if data_axes else P()
    owned_spec = P(axis, data_axes) if data_axes else P(axis)  # [m, B, ...]: microbatches over stage
    if evaluating and prologue is None:
        in_specs = (stage_spec, P(), owned_spec, batch_spec)
        out_specs = P()
        body = lambda lp, loss_p, x, t: per_device(lp, loss_p, x, t, None)  # noqa: E731
    elif evaluating:
        in_specs = (stage_spec, P(), batch_spec, batch_spec, P())
        out_specs = P()
        body = per_device
    elif forward_only:
        in_specs = (stage_spec, owned_spec)
        out_specs = owned_spec
        body = lambda lp, x: per_device(lp, None, x, None, None)  # noqa: E731
    elif prologue is None:
        in_specs = (stage_spec, P(), owned_spec, batch_spec)
        out_specs = (P(), stage_spec, P(), owned_spec)
        body = lambda lp, loss_p, x, t: per_device(lp, loss_p, x, t, None)  # noqa: E731
    else:
        in_specs = (stage_spec, P(), batch_spec, batch_spec, P())
        out_specs = (P(), stage_spec, P(), P())
        body = per_device
    manual = {axis, *data_axes}
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual)
    padding = k * p - m if deliver else 0

    def pad(tree):
        return jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((padding,) + a.shape[1:], a.dtype)]), tree)

    def unpad(tree):
        # An explicit-sharding array cannot be split unevenly over `stage`: gather it first. Only when
        # m is not a multiple of p; the input gradients are then replicated over the pipeline.
        return _take_first(_place(mesh, manual, batch_spec, tree), m)

    def run(*args):
        args = list(args[: len(in_specs)])  # a trailing None (no prologue params) is not an argument
        inputs_at = 1 if forward_only and not evaluating else 2
        if padding:
            args[inputs_at] = pad(args[inputs_at])
        args = tuple(_place(mesh, manual, spec, arg) for spec, arg in zip(in_specs, args))
        out = mapped(*args)
        if not padding or evaluating:
            return out
        if forward_only:
            return unpad(out)
        loss, grads, loss_grads, input_grads = out
        return loss, grads, loss_grads, unpad(input_grads)

    return run


class _EndSlots:
    """Float32 accumulators for the gradients of the model's ends: the loss's and the prologue's parameters.

    A device accumulates the loss's parameter gradients only where it runs a microbatch's last hop,
    and the prologue's only where it runs a first hop. When no device does both, a prologue
    parameter and a loss parameter of the same shape, dtype and sharding (an untied embedding table
    `[V, D]` and a head stored `[V, D]`) share one buffer: each device holds one of the two sums in
    it, and the end of the step separates them with a mask before the reduction over the pipeline.

    Attributes:
      buffers: one example array per accumulator (its shape, dtype and sharding).
      loss, prologue: per leaf of `loss_params` / `prologue_params` (flattened), its buffer index.
      shared: whether any buffer is shared.
      first_devices, last_devices: the devices running first / last hops (`[p]` 0/1 tables).
    """

    def __init__(self, buffers, loss, prologue, shared, first_devices, last_devices):
        self.buffers, self.loss, self.prologue, self.shared = buffers, loss, prologue, shared
        self.first_devices, self.last_devices = first_devices, last_devices

    @classmethod
    def of(cls, program: prog.Program, loss_params: PyTree, prologue_params: PyTree) -> _EndSlots:
        loss_leaves = jax.tree.leaves(loss_params)
        prologue_leaves = jax.tree.leaves(prologue_params)
        first_devices = (program.is_first == 1).any(axis=0)
        last_devices = (program.is_last == 1).any(axis=0)
        can_share = not (first_devices & last_devices).any()
        buffers = list(loss_leaves)
        loss = list(range(len(loss_leaves)))
        prologue, taken = [], set()
        for leaf in prologue_leaves:
            match = next(
                (
                    j
                    for j, other in enumerate(loss_leaves)
                    if can_share and j not in taken and _same_buffer(leaf, other)
                ),
                None,
            )
            if match is None:
                prologue.append(len(buffers))
                buffers.append(leaf)
            else:
                taken.add(match)
                prologue.append(match)
        return cls(
            buffers,
            tuple(loss),
            tuple(prologue),
            bool(taken),
            jnp.asarray(first_devices),
            jnp.asarray(last_devices),
        )

    def add(self, buffers: list, indices: tuple[int, ...], grads: PyTree) -> list:
        """`buffers` with the flattened `grads` added into the buffers at `indices`."""
        buffers = list(buffers)
        for index, g in zip(indices, jax.tree.leaves(grads)):
            buffers[index] = buffers[index] + g.astype(buffers[index].dtype)
        return buffers

    def holders(self, device) -> tuple[jax.Array, jax.Array]:
        """Whether `device` runs first hops, and whether it runs last hops (traced booleans)."""
        return self.first_devices[device], self.last_devices[device]

    def reduce(self, buffers, indices, holds, like: PyTree, axis: str, data_mean) -> PyTree:
        """The sums at `indices`, psum'd over the pipeline, in `like`'s structure and dtypes."""
        leaves = []
        for index, example in zip(indices, jax.tree.leaves(like)):
            value = buffers[index]
            if self.shared:
                value = jnp.where(holds, value, jnp.zeros_like(value))
            leaves.append(data_mean(lax.psum(value, axis)).astype(example.dtype))
        return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _same_buffer(a: jax.Array, b: jax.Array) -> bool:
    """Whether one accumulator can hold the gradients of `a` and of `b` (same shape, dtype and sharding)."""
    return a.shape == b.shape and _acc(a.dtype) == _acc(b.dtype) and _spec_of(a) == _spec_of(b)


def _take_first(tree: PyTree, n: int) -> PyTree:
    """The first `n` rows of every leaf (drops a scratch slot)."""
    return jax.tree.map(lambda a: a[:n], tree)


def _place(mesh: jax.sharding.Mesh, manual: set[str], spec: P, tree: PyTree) -> PyTree:
    """Give `tree` the sharding over the manual axes that shard_map's `spec` asks for.

    Entries for other mesh axes (e.g. tensor) are kept, so what the compiler shards stays sharded.
    Only explicit-axis meshes need this (shard_map refuses inputs sharded otherwise).
    """

    def fix(a):
        current = _spec_of(a)
        entries = []
        for dim in range(a.ndim):
            entry = current[dim] if dim < len(current) else None
            kept = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n and n not in manual)
            wanted = spec[dim] if dim < len(spec) else None
            wanted = tuple(n for n in (wanted if isinstance(wanted, tuple) else (wanted,)) if n)
            names = wanted + kept
            entries.append(names[0] if len(names) == 1 else (names or None))
        return jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, P(*entries)))

    if not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Auto axes: shard_map moves data over its manual axes itself, and a constraint here would
        # erase what the compiler shards over the other axes (e.g. tensor).
        return tree
    return jax.tree.map(fix, tree)


def _spec_of(a: jax.Array) -> tuple:
    """The array's current PartitionSpec entries (empty when unknown, e.g. under auto sharding)."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return tuple(spec) if spec is not None else ()
