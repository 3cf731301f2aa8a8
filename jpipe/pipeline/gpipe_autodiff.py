"""The AD-GPipe baseline: the MaxText/Praxis way of pipelining in SPMD JAX, kept as the reference peer.

Every device runs its stage on every tick (bubbles are computed and masked, not skipped), the
activation ring shifts by one device per tick with `ppermute`, and the backward pass is `jax.grad`
through the whole `lax.scan`. Autodiff must keep the residuals of every tick, so activation memory
grows with the number of microbatches (GPipe memory), and only the GPipe / circular-GPipe order is
possible. Virtual stages use the circular repeat: stage `d + k * p` lives on device d, microbatches
loop back from the last device to the first through a `[m, ...]` buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jpipe.pipeline.placement import StagePlacement
from jpipe.pipeline.remat import apply_remat

PyTree = Any


def _check_arguments(mesh: jax.sharding.Mesh, stage_axis: str, m: int, virtual: int) -> None:
    if stage_axis not in mesh.shape:
        raise ValueError(f"mesh: no axis named {stage_axis!r} (axes: {dict(mesh.shape)})")
    if m < 1:
        raise ValueError(f"num_microbatches: must be >= 1, got {m}")
    if virtual < 1:
        raise ValueError(f"virtual: must be >= 1, got {virtual}")
    if virtual > 1 and m < mesh.shape[stage_axis]:
        raise ValueError(f"num_microbatches: circular AD-GPipe needs m >= p, got m={m}, p={mesh.shape[stage_axis]}")


def gpipe_autodiff(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree, PyTree], jax.Array],
    *,
    mesh: jax.sharding.Mesh,
    num_microbatches: int,
    virtual: int = 1,
    remat: str | Callable | None = "none",
    stage_axis: str = "stage",
) -> Callable:
    """AD-GPipe loss and gradients, with the signature of `jpipe.value_and_grad`'s step.

    Args:
      stage_fn, loss_fn: as for `jpipe.value_and_grad`.
      mesh: mesh with `stage_axis` of size p; the number of logical stages is `p * virtual`.
      num_microbatches: m; with `virtual > 1` it must be >= p (the loop-back needs it).
      virtual: circular repeats (stages per device, loop placement).
      remat: applied to each stage call, as MaxText does.

    Returns:
      `step(stage_params, loss_params, inputs, targets) -> (loss, (stage_grads, loss_grads,
      input_grads))`, stage_params leaves `[p * virtual, ...]` in logical stage order.
    """
    _check_arguments(mesh, stage_axis, num_microbatches, virtual)
    p, m = mesh.shape[stage_axis], num_microbatches
    fn = apply_remat(stage_fn, remat)
    num_ticks = virtual * m + p - 1
    axis = stage_axis

    def pipeline_loss(local_params, loss_params, inputs, targets):
        # local_params: [1, v, ...] (device d holds stages d, d + p, ...); inputs/targets [m, ...].
        local_params = jax.tree.map(lambda a: a[0], local_params)
        device = lax.axis_index(axis)
        x0 = jax.tree.map(lambda a: a[0], inputs)
        vary = lambda t: jax.tree.map(lambda a: lax.pcast(a, axis, to="varying"), t)  # noqa: E731
        state = vary(jax.tree.map(jnp.zeros_like, x0))
        loop_back = vary(jax.tree.map(jnp.zeros_like, inputs))
        loss = vary(jnp.zeros((), jnp.float32))

        def tick(carry, t):
            state, loop_back, loss = carry
            position = t - device
            valid = (position >= 0) & (position < virtual * m)
            position = jnp.clip(position, 0, virtual * m - 1)
            repeat, mb = position // m, position % m
            fresh = jax.tree.map(lambda a: a[mb], inputs)
            looped = jax.tree.map(lambda a: a[mb], loop_back)
            first = jax.tree.map(lambda a, b: jnp.where(repeat == 0, a, b), fresh, looped)
            x = jax.tree.map(lambda a, b: jnp.where(device == 0, a, b), first, state)
            params = jax.tree.map(lambda a: a[repeat], local_params)
            y = fn(params, x)
            target = jax.tree.map(lambda a: a[mb], targets)
            is_output = valid & (device == p - 1) & (repeat == virtual - 1)
            mb_loss = loss_fn(loss_params, y, target).astype(jnp.float32)
            loss = loss + jnp.where(is_output, mb_loss, 0.0) / m
            shifted = jax.tree.map(lambda a: lax.ppermute(a, axis, [(d, (d + 1) % p) for d in range(p)]), y)
            if virtual > 1:
                # Device 0 receives the last device's output; keep it for the next repeat.
                back = t - (p - 1)
                keep = (device == 0) & (back >= 0) & (back < (virtual - 1) * m)
                slot = jnp.clip(back, 0, virtual * m - 1) % m
                loop_back = jax.tree.map(
                    lambda buf, a: buf.at[slot].set(jnp.where(keep, a, buf[slot])), loop_back, shifted
                )
            return (shifted, loop_back, loss), None

        (_, _, loss), _ = lax.scan(tick, (state, loop_back, loss), jnp.arange(num_ticks))
        return lax.psum(loss, axis)

    mapped = jax.shard_map(
        pipeline_loss,
        mesh=mesh,
        in_specs=(P(axis), P(), P(), P()),
        out_specs=P(),
        axis_names={axis},
    )
    placement = StagePlacement.loop(p, virtual)

    def to_device(tree):
        return placement.split_devices(placement.to_device_order(tree, mesh))

    def loss_of(stage_params, loss_params, inputs, targets):
        local = jax.tree.map(_split_over(mesh, axis), to_device(stage_params))
        return mapped(local, loss_params, inputs, targets)

    # Gradients come back in logical stage order through autodiff of `to_device`.
    return jax.value_and_grad(loss_of, argnums=(0, 1, 2))


def _split_over(mesh: jax.sharding.Mesh, axis: str):
    """`a -> a` sharded on its leading axis over `axis`: `reshard` on an Explicit axis, a sharding
    constraint on an Auto one (`jpipe.parallel.make_mesh`'s meshes), where `reshard` is refused."""
    by_device = jax.sharding.NamedSharding(mesh, P(axis))
    if dict(zip(mesh.axis_names, mesh.axis_types))[axis] == jax.sharding.AxisType.Explicit:
        return lambda a: jax.sharding.reshard(a, by_device)
    return lambda a: lax.with_sharding_constraint(a, by_device)
