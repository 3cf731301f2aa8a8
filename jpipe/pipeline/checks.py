"""Argument checks that run before anything is compiled; each error names the argument."""

from __future__ import annotations

from typing import Any

import jax

from jpipe.schedules.ir import Schedule

PyTree = Any


def check_mesh(schedule: Schedule, mesh: jax.sharding.Mesh, stage_axis: str, data_axes: tuple[str, ...] = ()) -> None:
    """The mesh must have `stage_axis` with `schedule.num_devices` devices, and every data axis."""
    for name in data_axes:
        if name not in mesh.shape:
            raise ValueError(f"data_axes: mesh has no axis {name!r} (axes: {dict(mesh.shape)})")
        if name == stage_axis:
            raise ValueError(f"data_axes: {name!r} is the stage axis; the pipeline and data axes must differ")
    if stage_axis not in mesh.shape:
        raise ValueError(f"mesh: no axis named {stage_axis!r} (axes: {dict(mesh.shape)}); pass stage_axis=")
    if mesh.shape[stage_axis] != schedule.num_devices:
        raise ValueError(
            f"mesh: axis {stage_axis!r} has {mesh.shape[stage_axis]} devices but schedule "
            f"{schedule.name!r} is for num_devices={schedule.num_devices}"
        )


def _leading(tree: PyTree, what: str, expected: int, meaning: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", ())
        if len(shape) == 0 or shape[0] != expected:
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)}: expected a leading axis of length {expected} "
                f"({meaning}), got shape {tuple(shape)}"
            )


def check_call(
    schedule: Schedule,
    stage_fn,
    stage_params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    num_data: int = 1,
    prologue=None,
    prologue_params: PyTree = None,
    stage_order: str = "logical",
) -> None:
    """Shapes of the step's arguments, and that `stage_fn` preserves the activation's shape/dtype.

    `stage_params` leaves lead with `num_model_stages` rows in "logical" (model) order, with
    `num_stages` rows (one per logical stage, replicas included) in "device" order.
    """
    if stage_order == "logical":
        what = "num_model_stages" if schedule.has_replicas else "num_stages"
        _leading(stage_params, "stage_params", schedule.num_model_stages, what)
    else:
        _leading(stage_params, "stage_params", schedule.num_stages, "num_stages, device-major")
    _leading(inputs, "inputs", schedule.num_microbatches, "num_microbatches")
    if targets is not None:
        _leading(targets, "targets", schedule.num_microbatches, "num_microbatches")
    if num_data > 1:
        for what, tree in (("inputs", inputs), ("targets", targets)):
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if tree is not None else []:
                if leaf.ndim < 2 or leaf.shape[1] % num_data:
                    raise ValueError(
                        f"{what}{jax.tree_util.keystr(path)}: the batch dimension (axis 1) must divide over "
                        f"{num_data} data-parallel devices, got shape {tuple(leaf.shape)}"
                    )
    one_stage = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stage_params)
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)
    if prologue is not None:
        try:
            x = jax.eval_shape(prologue, prologue_params, x)
        except Exception as error:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"prologue failed on prologue_params and one microbatch of inputs: {error}") from error
    try:
        y = jax.eval_shape(stage_fn, one_stage, x)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"stage_fn failed on one stage's params and one microbatch: {error}") from error
    x_struct = jax.tree.structure(x)
    if jax.tree.structure(y) != x_struct:
        raise ValueError(
            f"stage_fn must return the structure of its input: got {jax.tree.structure(y)}, expected {x_struct}"
        )
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"stage_fn changes the activation{jax.tree_util.keystr(path)}: input {a.shape} {a.dtype}, "
                f"output {b.shape} {b.dtype}; a stage must keep shape and dtype"
            )
