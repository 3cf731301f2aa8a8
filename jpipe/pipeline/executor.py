"""The SPMD pipeline executor: any valid schedule as one `shard_map` + `lax.scan` program.

Each device walks the tick tables built by `jpipe.pipeline.program.compile_program`. In every tick
it runs at most one action under `lax.switch` (idle ticks compute nothing), then every device sends
its outgoing message on every ring channel with `lax.ppermute`; receivers store what their table
marks in inbox slots. A forward stashes the residuals of `jax.vjp` of its stage (what the `remat`
policy saves, minus the stage parameters themselves, which stay in place); backward ops rebuild the
vjp function from the stash. `I` and `W` call the same vjp and keep the input or the parameter half:
XLA removes the unused half.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jpipe.pipeline import program as prog
from jpipe.pipeline.checks import check_call, check_mesh
from jpipe.pipeline.remat import apply_remat
from jpipe.schedules.ir import Schedule

PyTree = Any


def _varying(tree: PyTree, axis: str) -> PyTree:
    """Mark arrays as varying over the manual `axis` (scan carries, vjp cotangents)."""

    def cast(x):
        if axis in jax.typeof(x).manual_axis_type.varying:
            return x
        return lax.pcast(x, axis, to="varying")

    return jax.tree.map(cast, tree)


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def _take(tree: PyTree, index) -> PyTree:
    """`tree[index]` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def _put(tree: PyTree, index, value: PyTree) -> PyTree:
    """`tree.at[index].set(value)` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), index, 0), tree, value)


def _add_at(tree: PyTree, index, value: PyTree) -> PyTree:
    """`tree.at[index].add(value)` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(
        lambda a, v: lax.dynamic_update_index_in_dim(
            a, lax.dynamic_index_in_dim(a, index, keepdims=False) + v.astype(a.dtype), index, 0
        ),
        tree,
        value,
    )


class _VjpStash:
    """Splits `jax.vjp(fn, params, x)` into per-microbatch residuals and the rest.

    The vjp function is a pytree whose leaves are its residuals; some leaves are the stage
    parameters themselves, which need no stash. The treedef is always taken from a vjp traced in
    the branch that uses it, so no jaxpr crosses traces.
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def forward(self, params: PyTree, x: PyTree) -> tuple[PyTree, list[jax.Array]]:
        """Returns `(y, residuals)`, residuals being the non-parameter vjp leaves."""
        y, vjp_fn = jax.vjp(self.fn, params, x)
        leaves = jax.tree.leaves(vjp_fn)
        param_ids = {id(leaf) for leaf in jax.tree.leaves(params)}
        return y, [leaf for leaf in leaves if id(leaf) not in param_ids]

    def rebuild(self, params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
        """The vjp function from `residuals`; `x_like` only fixes shapes (its forward is dead code)."""
        _, probe = jax.vjp(self.fn, params, x_like)
        leaves, treedef = jax.tree.flatten(probe)
        param_leaves = {id(leaf): leaf for leaf in jax.tree.leaves(params)}
        stash = iter(residuals)
        rebuilt = [param_leaves[id(leaf)] if id(leaf) in param_leaves else next(stash) for leaf in leaves]
        return jax.tree.unflatten(treedef, rebuilt)


def _permute_leading(mesh: jax.sharding.Mesh, a: jax.Array, order: np.ndarray) -> jax.Array:
    """`a[order]` on the leading axis; identity orders cost nothing."""
    if np.array_equal(order, np.arange(len(order))):
        return a
    # A permutation across a sharded axis is communication either way; make it explicit.
    a = jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, P()))
    return a[order]


def to_device_layout(schedule: Schedule, mesh: jax.sharding.Mesh, tree: PyTree) -> PyTree:
    """`[S, ...]` in logical stage order -> `[p, v, ...]` with device d's stages at `[d]`."""
    p, v = schedule.num_devices, schedule.virtual
    order = device_major_order(schedule)
    return jax.tree.map(lambda a: _permute_leading(mesh, a, order).reshape((p, v) + a.shape[1:]), tree)


def to_logical_layout(schedule: Schedule, mesh: jax.sharding.Mesh, tree: PyTree) -> PyTree:
    """Inverse of `to_device_layout`: `[p, v, ...]` -> `[S, ...]` in logical stage order."""
    inverse = np.argsort(device_major_order(schedule))
    return jax.tree.map(
        lambda a: _permute_leading(mesh, a.reshape((schedule.num_stages,) + a.shape[2:]), inverse), tree
    )


def device_major_order(schedule: Schedule) -> np.ndarray:
    """`order[d * v + k]` is the logical stage held by device d as its local chunk k."""
    return np.array([s for d in range(schedule.num_devices) for s in schedule.stages_of(d)], np.int32)


def value_and_grad(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree, PyTree], jax.Array],
    *,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    remat: str | Callable | None = "none",
    stage_axis: str = "stage",
    split_backward: bool = True,
) -> Callable:
    """Pipelined loss and gradients of `mean_m loss_fn(loss_params, stages(inputs[m]), targets[m])`.

    Args:
      stage_fn: `(params_of_one_stage, x) -> y`, y with x's structure, shapes and dtypes.
      loss_fn: `(loss_params, y, target) -> scalar`, applied per microbatch after the last stage.
      schedule: any schedule `jpipe.schedules.validate` accepts.
      mesh: a mesh with an axis `stage_axis` of size `schedule.num_devices`; other axes are left to
        the compiler (the shard_map is manual over `stage_axis` only).
      remat: what a forward saves for its backward (see `jpipe.pipeline.remat.apply_remat`).
      stage_axis: the mesh axis the pipeline runs over.
      split_backward: run each B as I then W in consecutive ticks (recommended).

    Returns:
      `step(stage_params, loss_params, inputs, targets) -> (loss, (stage_grads, loss_grads,
      input_grads))` where stage_params leaves are `[num_stages, ...]` in logical order,
      inputs/targets leaves are `[num_microbatches, ...]`; gradients match their arguments.
    """
    check_mesh(schedule, mesh, stage_axis)
    program = prog.compile_program(schedule, split=split_backward)
    stash = _VjpStash(apply_remat(stage_fn, remat))
    run = _build_runner(program, stash, loss_fn, mesh, stage_axis)

    def step(stage_params, loss_params, inputs, targets):
        check_call(schedule, stage_fn, stage_params, inputs, targets)
        local = to_device_layout(schedule, mesh, stage_params)
        loss, grads, loss_grads, input_grads = run(local, loss_params, inputs, targets)
        stage_grads = to_logical_layout(schedule, mesh, grads)
        return loss, (stage_grads, loss_grads, input_grads)

    step.program = program  # for inspection: tick tables, slot counts
    return step


def forward(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    *,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    stage_axis: str = "stage",
) -> Callable:
    """Pipelined forward (inference): `run(stage_params, inputs) -> outputs`, all `[m, ...]`.

    Runs the schedule's forwards in each device's order (a fill/drain without backward).
    """
    check_mesh(schedule, mesh, stage_axis)
    program = prog.compile_program(schedule, forward_only=True)
    run = _build_runner(program, _VjpStash(stage_fn), None, mesh, stage_axis)

    def apply(stage_params, inputs):
        check_call(schedule, stage_fn, stage_params, inputs, None)
        local = to_device_layout(schedule, mesh, stage_params)
        return run(local, None, inputs, None)

    apply.program = program
    return apply


def _build_runner(program: prog.Program, stash: _VjpStash, loss_fn, mesh, axis: str) -> Callable:
    """The shard_map'ed scan over ticks."""
    schedule = program.schedule
    p, m = schedule.num_devices, schedule.num_microbatches
    forward_only = program.forward_only
    tables = {name: jnp.asarray(a) for name, a in program.per_tick_arrays().items()}
    channels = program.channels
    # [T, C]: whether any device receives on channel c in tick t (identical on every device).
    channel_used = jnp.asarray((program.recv_slot < program.num_inbox_slots).any(axis=1))
    scale = 1.0 / m

    def per_device(local_params, loss_params, inputs, targets):
        # local_params leaves: [1, v, ...]; inputs/targets: [m, ...] replicated.
        local_params = jax.tree.map(lambda a: a[0], local_params)
        # Differentiating w.r.t. an invariant (replicated) value inside a branch would transpose its
        # implicit pcast into a psum that only some devices reach: make it varying up front.
        loss_params = _varying(loss_params, axis)
        device = lax.axis_index(axis)
        rows = {name: lax.dynamic_index_in_dim(a, device, axis=1, keepdims=False) for name, a in tables.items()}
        rows["channel_used"] = channel_used
        x_example = _varying(_take(inputs, 0), axis)
        # Traced here (dead code, removed by XLA) so that residual shapes and varying types are
        # exactly those of the forward branch.
        residual_shapes = stash.forward(_take(local_params, rows["chunk"][0]), x_example)[1]

        def slots(n, example):
            return jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), example)

        carry = {"inbox": slots(program.num_inbox_slots + 1, x_example)}  # + a scratch slot
        if forward_only:
            carry["outputs"] = _zeros_like(inputs)
        else:
            carry["stash"] = slots(program.num_stash_slots, residual_shapes)
            carry["grads"] = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), local_params)
            carry["loss"] = jnp.zeros((), jnp.float32)
            carry["loss_grads"] = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), loss_params)
            carry["input_grads"] = _zeros_like(inputs)
        carry = _varying(carry, axis)
        zero_message = _varying(_zeros_like(x_example), axis)

        # Buffers are only ever updated under a `lax.cond` whose other branch returns them unchanged:
        # XLA then updates them in place. (One `lax.switch` over all ops that both reads and writes the
        # same buffers makes XLA copy every buffer each tick and doubles their memory.)

        def run_forward(state, row):
            params = _take(local_params, row["chunk"])
            x = jax.tree.map(
                lambda a, b: jnp.where(row["is_first"] == 1, a, b),
                _take(inputs, row["microbatch"]),
                _take(row["inbox"], row["inbox_slot"]),
            )
            x = _varying(x, axis)
            if forward_only:
                y = stash.fn(params, x)
                outputs = lax.cond(
                    row["is_last"] == 1,
                    lambda o: _put(o, row["microbatch"], y),
                    lambda o: o,
                    state["outputs"],
                )
                return {**state, "outputs": outputs}, y
            y, residuals = stash.forward(params, x)
            state = {**state, "stash": _put(state["stash"], row["stash_slot"], residuals)}

            def with_loss(state):
                target = _take(targets, row["microbatch"])
                loss, loss_vjp = jax.vjp(lambda lp, out: loss_fn(lp, out, target), loss_params, y)
                d_loss_params, d_y = loss_vjp(_varying(jnp.asarray(scale, loss.dtype), axis))
                state = {
                    **state,
                    "loss": state["loss"] + loss.astype(jnp.float32) * scale,
                    "loss_grads": jax.tree.map(
                        lambda acc, g: acc + g.astype(jnp.float32), state["loss_grads"], d_loss_params
                    ),
                }
                return state, d_y

            return lax.cond(row["is_last"] == 1, with_loss, lambda s: (s, y), state)

        def vjp_of(row):
            params = _take(local_params, row["chunk"])
            residuals = _take(row["stash"], row["stash_slot"])
            vjp_fn = stash.rebuild(params, zero_message, residuals)
            return vjp_fn(_take(row["inbox"], row["inbox_slot"]))

        def store_input_grad(state, row, d_x):
            input_grads = lax.cond(
                row["is_first"] == 1,
                lambda g: _put(g, row["microbatch"], d_x),
                lambda g: g,
                state["input_grads"],
            )
            return {**state, "input_grads": input_grads}

        def run_backward(state, row):
            d_params, d_x = vjp_of(row)
            state = {**state, "grads": _add_at(state["grads"], row["chunk"], d_params)}
            return store_input_grad(state, row, d_x), d_x

        def run_input_grad(state, row):
            _, d_x = vjp_of(row)
            return store_input_grad(state, row, d_x), d_x

        def run_weight_grad(state, row):
            d_params, _ = vjp_of(row)
            return {**state, "grads": _add_at(state["grads"], row["chunk"], d_params)}, zero_message

        def skip(state, row):
            return state, zero_message

        forward_keys = ("outputs",) if forward_only else ("stash", "loss", "loss_grads")
        backward_keys = ("grads", "input_grads")

        def tick(state, row):
            # Branches read the inbox and stash through `row` (read-only views).
            row = {**row, "inbox": state["inbox"], "stash": state.get("stash")}
            part = {k: state[k] for k in forward_keys}
            part, message = lax.cond(row["op"] == prog.FORWARD, run_forward, skip, part, row)
            state = {**state, **part}
            if not forward_only:
                part = {k: state[k] for k in backward_keys}
                backward_ops = [run_backward, run_input_grad, run_weight_grad]
                part, backward_message = lax.cond(
                    row["op"] >= prog.BACKWARD,
                    lambda s, r: lax.switch(r["op"] - prog.BACKWARD, backward_ops, s, r),
                    skip,
                    part,
                    row,
                )
                state = {**state, **part}
                message = jax.tree.map(
                    lambda a, b: jnp.where(row["op"] == prog.FORWARD, a, b), message, backward_message
                )
            inbox = state["inbox"]
            for c, offset in enumerate(channels):
                if offset == 0:
                    arrived = message
                else:
                    # The predicate is the same on every device, so all take the same branch and the
                    # collective is skipped only where no device sends on this channel.
                    perm = [(d, (d + offset) % p) for d in range(p)]
                    arrived = lax.cond(
                        row["channel_used"][c],
                        lambda msg, perm=perm: jax.tree.map(lambda a: lax.ppermute(a, axis, perm), msg),
                        lambda msg: msg,
                        message,
                    )
                inbox = _put(inbox, row["recv_slot"][c], arrived)
            return {**state, "inbox": inbox}, None
        state, _ = lax.scan(tick, carry, rows)
        if forward_only:
            return lax.psum(state["outputs"], axis)
        grads = jax.tree.map(lambda g, a: g.astype(a.dtype)[None], state["grads"], local_params)
        loss_grads = jax.tree.map(lambda g, a: g.astype(a.dtype), lax.psum(state["loss_grads"], axis), loss_params)
        return (
            lax.psum(state["loss"], axis),
            grads,
            loss_grads,
            lax.psum(state["input_grads"], axis),
        )

    stage_spec = P(axis)
    if forward_only:
        in_specs = (stage_spec, P())
        out_specs = P()
        body = lambda lp, x: per_device(lp, None, x, None)  # noqa: E731
    else:
        in_specs = (stage_spec, P(), P(), P())
        out_specs = (P(), stage_spec, P(), P())
        body = per_device
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis})

    def run(*args):
        args = tuple(_reshard(mesh, spec, arg) for spec, arg in zip(in_specs, args))
        return mapped(*args)

    return run


def _reshard(mesh: jax.sharding.Mesh, spec: P, tree: PyTree) -> PyTree:
    """Put `tree` in the sharding shard_map expects (explicit-axis meshes refuse anything else)."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.tree.map(lambda a: jax.sharding.reshard(a, sharding), tree)


__all__ = ["forward", "value_and_grad"]
_ = functools  # reserved for future partials
