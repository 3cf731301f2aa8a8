"""The SPMD pipeline executor: any valid schedule as one `shard_map` + `lax.scan` program.

The public entry points (`value_and_grad`, `forward`, `forward_loss`) check their options, lower the
schedule to tick tables (`jpipe.pipeline.program.compile_program`), and run one `lax.scan` over the
ticks inside a `shard_map` over the stage axis (and the data axes): each device walks the tables
with a `jpipe.pipeline.tick.TickMachine`, whose op kernels (`jpipe.pipeline.kernels`) run under
`lax.cond` (idle ticks compute nothing), a braided composite's two ops in one branch (`braid`).
This module builds the `shard_map` specs, pads the batch to a multiple of the pipeline size,
places parameters and reduces the results (losses, gradients) at the end of the step.

A forward stashes the residuals of `jax.vjp` of its stage (what the `remat` policy saves, minus the
stage parameters themselves); backward ops rebuild the vjp function from the stash (see
`jpipe.pipeline.stage` for how B, I and W use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jpipe.pipeline import kernels
from jpipe.pipeline import program as prog
from jpipe.pipeline.arrays import spec_of, take, take_first, varying, zeros_like
from jpipe.pipeline.checks import check_call, check_mesh
from jpipe.pipeline.end_slots import EndSlots
from jpipe.pipeline.offload import offloaded
from jpipe.pipeline.options import PipelineOptions, resolve_overlap, resolve_split
from jpipe.pipeline.placement import StagePlacement
from jpipe.pipeline.stage import StageOps, stage_ops
from jpipe.pipeline.state import Carry, TickRow
from jpipe.pipeline.tick import BRAIDED_SCOPE, TickMachine
from jpipe.schedules.ir import Schedule
from jpipe.schedules.simulate import Cost

PyTree = Any

__all__ = ["BRAIDED_SCOPE", "forward", "forward_loss", "resolve_overlap", "resolve_split", "value_and_grad"]


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
    balance_ticks: bool | str = False,
    recompute: bool = False,
    offload: str = "none",
    has_aux: bool = False,
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
        (`jpipe.pipeline.options.resolve_overlap`); with `comm=0` that is never, as sends then cost nothing.
      braid: run the two ops of each composite (`jpipe.schedules.Composite`: STP's and DualPipe's
        overlapped F&B pairs, torch's `OVERLAP_F_B` cells) in one tick, as one computation with no
        data dependence between them, so the compiler can run one op's tensor-parallel collectives
        under the other's compute; a `jpipe.layered` stage's two ops then run layer by layer in
        lockstep (`jpipe.pipeline.lockstep`: unrolled, a barrier between layers), so every layer has
        the other op's layer beside it. The unrolled layers of both ops cost temporary memory:
        compiled for TPU, 1.8x the flattened step's for `stp` at 16 layers, 1.9x at 8
        (`experiments/tp_overlap.py`).
        False runs them one after the other in consecutive ticks. Schedules without composites are
        unaffected.
      balance_ticks: cost-balanced ticks (`jpipe.schedules.fused_ticks`): the schedule is repacked
        so that a device runs two ops of different microbatches in one tick (braided, as a
        composite) where both fit in the tick's length under `cost`, e.g. a forward beside the
        weight gradient of another microbatch while another device runs a rematerialising I.
        "auto" repacks when the lockstep simulation under `cost` is faster (never with the default
        `Cost()`, whose ops are alike); True always repacks (B split); False (default) never: the
        braided ticks of a `jpipe.layered` stage unroll its layers (compile time, temp memory).
      recompute: with `remat="full"`, run each forward recomputation as an op of its own (R,
        `jpipe.schedules.recompute`), right before its I or B (or earlier, where `balance_ticks`
        finds room): F keeps only the stage's input, R rebuilds the whole stage's residuals (as
        remat "none" keeps them) and I/B and W read them, so I no longer carries the recomputation.
        The rebuilt residuals live from R to W. A schedule that already holds R actions runs them
        whatever this says.
      offload: keep long-lived buffers in host memory (`jpipe.pipeline.offload`): "none"
        (default), "stash" (the forwards' residuals, F to backward), "weights" (what an I keeps for
        its W) or "all". The op that writes a slot copies it to the host and the op that reads it
        copies it back; on TPU the copies are asynchronous inside the tick loop. On CPU the host is
        the device: the same program, the same results.
      has_aux: `loss_fn` returns `(loss, metrics)` (as `jax.value_and_grad`'s `has_aux`), metrics a
        dict of float arrays (scalars, or e.g. `[E]`). They are averaged over microbatches exactly
        like the loss (accumulated in float32 at each microbatch's last hop, summed over the
        pipeline, averaged over `data_axes`: a per-microbatch mean over the batch, as the loss is)
        and returned beside it; gradients flow through the loss only.

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
      (stage_grads, loss_grads, prologue_grads))`. With `has_aux`, `loss` is `(loss, metrics)`:
      `step(...) -> ((loss, metrics), grads)`, metrics float32. `step.plan` is the `PipelineOptions.plan` it runs
      (`split_backward` and `overlap_sends` resolved), `step.program` its tick tables.
    """
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    check_mesh(schedule, mesh, stage_axis, data_axes)
    if stage_order not in ("logical", "device"):
        raise ValueError(f"stage_order: expected 'logical' or 'device', got {stage_order!r}")
    options = PipelineOptions(
        remat=remat,
        split_backward=split_backward,
        overlap_sends=overlap_sends,
        braid=braid,
        cost=cost,
        balance_ticks=balance_ticks,
        recompute=recompute,
        offload=offload,
    )
    plan = options.plan(schedule)
    program = prog.compile_program(
        plan.schedule, split=plan.split, deliver=prologue is None, send_latency=int(plan.overlap), braid=braid
    )
    remat = "none" if program.recompute else remat  # R ops rebuild the whole forward's residuals
    braid_ops = stage_ops(stage_fn, remat, unroll=True) if program.braided else None
    ops = stage_ops(stage_fn, remat)
    run = _build_runner(
        program, ops, loss_fn, mesh, stage_axis, data_axes, prologue, braid_ops, offloaded(options.offload), has_aux
    )
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
    step.plan = plan  # the options with "auto" resolved
    return step


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
    has_aux: bool = False,
) -> Callable:
    """Pipelined evaluation: `mean_m loss_fn(loss_params, stages(inputs[m]), targets[m])`, forwards only.

    The loss of `value_and_grad` without its backward: the schedule's forwards in each device's order
    (composites flattened), the prologue on the device of each microbatch's first hop, the loss on
    the device of its last hop; no residuals are stashed and nothing is differentiated. Arguments
    as for `value_and_grad`.

    Returns:
      `loss(stage_params, loss_params, inputs, targets) -> scalar`, or with a `prologue`
      `loss(stage_params, loss_params, inputs, targets, prologue_params) -> scalar`; with
      `has_aux`, `-> (scalar, metrics)`, the metrics averaged as `value_and_grad`'s are.
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
    ops = stage_ops(stage_fn, "none")
    run = _build_runner(program, ops, loss_fn, mesh, stage_axis, data_axes, prologue, has_aux=has_aux)
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


@dataclasses.dataclass(frozen=True, eq=False)
class _Setup:
    """What every device's program is built from (static).

    Attributes:
      program: the tick tables.
      ops, braid_ops: the stage's ops for single-op and for braided ticks.
      loss_fn, prologue: the model's ends (None when absent).
      axis, data_axes: the stage mesh axis and the data-parallel ones.
      num_data: the data-parallel degree (product of the data axes' sizes).
      offload: the buffers kept in host memory (`jpipe.pipeline.offload`).
      has_aux: `loss_fn` returns `(loss, metrics)`; the loss output is then that pair.
    """

    program: prog.Program
    ops: StageOps
    braid_ops: StageOps
    loss_fn: Callable | None
    prologue: Callable | None
    axis: str
    data_axes: tuple[str, ...]
    num_data: int
    offload: frozenset = frozenset()
    has_aux: bool = False

    @property
    def evaluating(self) -> bool:
        """`forward_loss`: the mean loss of forwards only, no gradients."""
        return self.program.forward_only and self.loss_fn is not None

    @property
    def manual_axes(self) -> tuple[str, ...]:
        return (self.axis, *self.data_axes)

    def kernels(self) -> tuple[kernels.Kernel, ...]:
        if not self.program.forward_only:
            return kernels.TRAINING
        return kernels.EVALUATION if self.evaluating else kernels.FORWARD_ONLY

    def data_mean(self, tree: PyTree) -> PyTree:
        return jax.tree.map(lambda a: lax.pmean(a, self.data_axes), tree) if self.data_axes else tree


def _build_runner(
    program: prog.Program,
    ops,
    loss_fn,
    mesh,
    axis: str,
    data_axes: tuple[str, ...],
    prologue=None,
    braid_ops=None,
    offload: frozenset = frozenset(),
    has_aux: bool = False,
) -> Callable:
    """The shard_map'ed scan over ticks, on the batch padded to a multiple of the pipeline size.

    `ops`: a `jpipe.pipeline.stage` op implementation; `braid_ops`: the one braided ticks run (its
    layers unrolled, `stage_ops(..., unroll=True)`), default `ops`.
    """
    num_data = _axes_size(mesh, data_axes)
    setup = _Setup(program, ops, braid_ops or ops, loss_fn, prologue, axis, data_axes, num_data, offload, has_aux)
    in_specs, out_specs = _specs(setup)
    manual = {axis, *data_axes}

    def body(*args):
        return _per_device(setup, *_full_arguments(setup, args))

    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual)
    return _padded(setup, mapped, mesh, in_specs)


def _specs(setup: _Setup) -> tuple[tuple, Any]:
    """`(in_specs, out_specs)` of the `shard_map` for the program's mode.

    Arguments are `(stage_params, loss_params, inputs, targets[, prologue_params])`, forward only
    `(stage_params, inputs)`; outputs `(loss, stage_grads, loss_grads, input or prologue grads)`,
    the loss alone when evaluating, the outputs forward only (with `has_aux`, "loss" is
    `(loss, metrics)`, replicated as the loss is: `P()` is a prefix of both).
    """
    axis, data_axes = setup.axis, setup.data_axes
    stage_spec = P(axis)
    batch_spec = P(None, data_axes) if data_axes else P()
    owned_spec = P(axis, data_axes) if data_axes else P(axis)  # [m, B, ...]: microbatches over stage
    inputs_spec = owned_spec if setup.prologue is None else batch_spec
    ends = (P(),) if setup.prologue is not None else ()
    if setup.program.forward_only and not setup.evaluating:
        return (stage_spec, owned_spec), owned_spec
    in_specs = (stage_spec, P(), inputs_spec, batch_spec, *ends)
    if setup.evaluating:
        return in_specs, P()
    return in_specs, (P(), stage_spec, P(), owned_spec if setup.prologue is None else P())


def _full_arguments(setup: _Setup, args: tuple) -> tuple:
    """`(local_params, loss_params, inputs, targets, prologue_params)` from the mode's arguments."""
    if setup.program.forward_only and not setup.evaluating:
        local_params, inputs = args
        return local_params, None, inputs, None, None
    return (*args, None) if setup.prologue is None else args


def _per_device(setup: _Setup, local_params, loss_params, inputs, targets, prologue_params):
    """One device's step: the tick loop, then its results reduced over the pipeline (and data).

    local_params leaves: `[1, v, ...]`; inputs: `[k, ...]` (this device's microbatches) with
    `deliver`, else `[m, ...]` replicated; targets: `[m, ...]` replicated.
    """
    # Differentiating w.r.t. an invariant (replicated) value inside a branch would transpose its
    # implicit pcast into a psum that only some devices reach: make it varying up front.
    manual_axes = setup.manual_axes
    local_params = varying(jax.tree.map(lambda a: a[0], local_params), manual_axes)
    loss_params = varying(loss_params, manual_axes)
    prologue_params = varying(prologue_params, manual_axes)
    training = not setup.program.forward_only
    context = kernels.TickContext(
        local_params=local_params,
        loss_params=loss_params,
        prologue_params=prologue_params,
        inputs=inputs,
        targets=targets,
        loss_fn=setup.loss_fn,
        prologue=setup.prologue,
        x_like=_message_like(setup, inputs, prologue_params),
        scale=1.0 / setup.program.schedule.num_microbatches,
        end_slots=EndSlots.of(setup.program, loss_params, prologue_params) if training else None,
        manual_axes=manual_axes,
        recompute=setup.program.recompute,
        offload=setup.offload,
        has_aux=setup.has_aux,
    )
    machine = TickMachine(setup.program, context, setup.kernels(), setup.ops, setup.braid_ops, setup.axis)
    device = lax.axis_index(setup.axis)
    rows = TickRow.of(setup.program, device)
    state = machine.run(machine.initial_carry(rows), rows)
    return _device_outputs(setup, context, state, device)


def _message_like(setup: _Setup, inputs, prologue_params) -> PyTree:
    """Zeros shaped like one stage input, varying over the manual axes."""
    if setup.prologue is None:
        return varying(zeros_like(take(inputs, 0)), setup.manual_axes)
    # Only the shapes matter: this prologue call is dead code, removed by XLA.
    return varying(zeros_like(setup.prologue(prologue_params, take(inputs, 0))), setup.manual_axes)


def _device_outputs(setup: _Setup, context: kernels.TickContext, state: Carry, device):
    """The step's outputs from the final state (see `_specs`)."""
    program, axis = setup.program, setup.axis
    results = take_first(state.results, program.microbatches_per_device) if program.deliver else None
    if setup.evaluating:
        return _loss_output(setup, state)
    if program.forward_only:
        return results
    grads = jax.tree.map(lambda g, a: g.astype(a.dtype)[None], setup.data_mean(state.grads), context.local_params)
    # Parameter-sized, once per step (only the devices running first / last hops hold non-zero values).
    end_slots = context.end_slots
    holds_first, holds_last = end_slots.holders(device)
    loss_grads = end_slots.reduce(
        state.end_grads, end_slots.loss, holds_last, context.loss_params, axis, setup.data_mean
    )
    if setup.prologue is None:
        # Each data shard's loss is the mean over its part of the batch: d(mean)/dx carries 1/num_data.
        first_grads = jax.tree.map(lambda g: g / setup.num_data, results)
    else:
        first_grads = end_slots.reduce(
            state.end_grads, end_slots.prologue, holds_first, context.prologue_params, axis, setup.data_mean
        )
    return _loss_output(setup, state), grads, loss_grads, first_grads


def _loss_output(setup: _Setup, state: Carry) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """The mean loss (with `has_aux`, and the mean metrics): summed over the pipeline (only the
    devices of last hops hold non-zero values), averaged over the data axes."""
    loss = setup.data_mean(lax.psum(state.loss, setup.axis))
    if not setup.has_aux:
        return loss
    return loss, setup.data_mean(jax.tree.map(lambda a: lax.psum(a, setup.axis), state.metrics))


def _padded(setup: _Setup, mapped: Callable, mesh, in_specs: tuple) -> Callable:
    """`mapped` on inputs padded to `k * p` microbatches (with `deliver`), results cut back to m."""
    program = setup.program
    manual = {setup.axis, *setup.data_axes}
    m, p = program.schedule.num_microbatches, program.schedule.num_devices
    padding = program.microbatches_per_device * p - m if program.deliver else 0
    batch_spec = P(None, setup.data_axes) if setup.data_axes else P()
    forward_only = program.forward_only and not setup.evaluating

    def pad(tree):
        return jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((padding,) + a.shape[1:], a.dtype)]), tree)

    def unpad(tree):
        # An explicit-sharding array cannot be split unevenly over `stage`: gather it first. Only when
        # m is not a multiple of p; the input gradients are then replicated over the pipeline.
        return take_first(_place(mesh, manual, batch_spec, tree), m)

    def run(*args):
        args = list(args[: len(in_specs)])  # a trailing None (no prologue params) is not an argument
        inputs_at = 1 if forward_only else 2
        if padding:
            args[inputs_at] = pad(args[inputs_at])
        out = mapped(*(_place(mesh, manual, spec, arg) for spec, arg in zip(in_specs, args)))
        if not padding or setup.evaluating:
            return out
        if forward_only:
            return unpad(out)
        loss, grads, loss_grads, input_grads = out
        return loss, grads, loss_grads, unpad(input_grads)

    return run


def _place(mesh: jax.sharding.Mesh, manual: set[str], spec: P, tree: PyTree) -> PyTree:
    """Give `tree` the sharding over the manual axes that shard_map's `spec` asks for.

    Entries for other mesh axes (e.g. tensor) are kept, so what the compiler shards stays sharded.
    Only explicit-axis meshes need this (shard_map refuses inputs sharded otherwise).
    """

    def fix(a):
        current = spec_of(a)
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
