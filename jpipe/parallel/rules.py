"""Logical axis names -> mesh axes, in one place; FSDP as a mode; per-device parameter bytes.

Model code names the dimensions of its parameters and activations with logical names ("embed",
"heads", "mlp", ...). `ShardingRules` alone decides which mesh axes those names map to, so changing
the parallelism layout never touches model code.

Tensor parallelism (Megatron style) follows from the default rules: the query/key/value and MLP
up-projections are split on their output dimension ("heads", "mlp" -> tensor: column-parallel),
the attention output and MLP down-projections on their input dimension (row-parallel), so each
block needs one reduction over `tensor` after attention and one after the MLP, which the compiler
inserts. FSDP is a mode of the data axis: each parameter's largest dimension that the rules leave
unsharded is also split over `data` (and over `stage` for parameters the pipeline does not split by
stage; see `ShardingRules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jpipe.parallel.mesh import DATA, STAGE, TENSOR

PyTree = Any
LogicalAxes = tuple[str | None, ...]
MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: Mapping[str, MeshAxes] = {
    "batch": DATA,  # activations: the batch is split over data replicas
    "stage": STAGE,  # the leading axis of stage-stacked parameters
    "layer": None,  # layers within a stage run in sequence on one device
    "seq": None,
    "position": None,
    "embed": None,
    "vocab": TENSOR,  # embedding rows and head columns: vocabulary-parallel
    "heads": TENSOR,  # q/k/v column-parallel, attention output row-parallel
    "head_dim": None,
    "mlp": TENSOR,  # up-projection column-parallel, down-projection row-parallel
    "expert": None,  # the routed experts of a mixture of experts (jpipe.models.moe): each device holds all
}

# Logical axes FSDP never splits: they index whole layers or stages, not parameter entries.
_NOT_FSDP = ("stage", "layer")


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How logical axis names map onto mesh axes.

    Attributes:
      rules: logical name -> mesh axis, tuple of mesh axes, or None (replicated). Names missing
        from the mapping are an error, so a typo in model code cannot silently replicate.
      fsdp: also shard every parameter over `fsdp_axes` (on its largest dimension the rules leave
        unsharded and that the axes divide). The pipeline gathers such parameters once per step,
        when they enter its `shard_map`.
      fsdp_axes: the mesh axes FSDP splits over; axes a parameter already uses are skipped. The
        default `(DATA, STAGE)` splits the stage-stacked blocks (which already use `stage`) over
        `data`, and the embedding and head (which the pipeline would otherwise replicate on every
        stage) over `data` and `stage`: each device then stores 1 / (data * stage * tensor) of every
        parameter. Pass `(DATA,)` to keep the embedding and head whole on every stage.
    """

    rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    fsdp: bool = False
    fsdp_axes: tuple[str, ...] = (DATA, STAGE)

    def __post_init__(self):
        object.__setattr__(self, "rules", dict(self.rules))
        object.__setattr__(self, "fsdp_axes", _as_tuple(self.fsdp_axes))
        for name, axes in self.rules.items():
            if len(set(_as_tuple(axes))) != len(_as_tuple(axes)):
                raise ValueError(f"rules[{name!r}]: mesh axes {axes!r} repeat an axis")

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes one logical name maps to (empty: replicated)."""
        if logical is None:
            return ()
        if logical not in self.rules:
            raise ValueError(f"no sharding rule for logical axis {logical!r}; known: {sorted(self.rules)}")
        return _as_tuple(self.rules[logical])

    def spec(self, logical_axes: LogicalAxes, *, what: str = "array") -> P:
        """PartitionSpec of an array whose dimensions are named `logical_axes`.

        Raises if two dimensions would use the same mesh axis (a collision: e.g. "heads" and "mlp"
        both on tensor in one array).
        """
        entries: list[MeshAxes] = []
        used: dict[str, str | None] = {}
        for logical in logical_axes:
            axes = self.mesh_axes(logical)
            for axis in axes:
                if axis in used:
                    raise ValueError(
                        f"{what}: logical axes {used[axis]!r} and {logical!r} both map to mesh axis {axis!r} "
                        f"(logical axes {logical_axes})"
                    )
                used[axis] = logical
            entries.append(axes[0] if len(axes) == 1 else (axes or None))
        return P(*entries)

    def param_spec(
        self, logical_axes: LogicalAxes, shape: tuple[int, ...], mesh: jax.sharding.Mesh, *, what: str = "param"
    ) -> P:
        """PartitionSpec of a parameter on `mesh`: the rules, plus FSDP when on.

        Every sharded dimension must divide by its mesh axes (an error names the parameter). FSDP
        picks the largest dimension left unsharded that the FSDP axes divide (the first among equals;
        never a stage or layer axis); if none, it tries fewer FSDP axes (dropping the last), and a
        parameter no FSDP axis divides stays replicated over them.
        """
        if len(logical_axes) != len(shape):
            raise ValueError(f"{what}: {len(logical_axes)} logical axes {logical_axes} for shape {shape}")
        entries = list(self.spec(logical_axes, what=what))
        for dim, (logical, entry) in enumerate(zip(logical_axes, entries)):
            axes = _as_tuple(entry)
            for axis in axes:
                if axis not in mesh.shape:
                    raise ValueError(
                        f"{what}: logical axis {logical!r} maps to {axis!r}, not a mesh axis {mesh.axis_names}"
                    )
            size = _size(mesh, axes)
            if shape[dim] % size:
                raise ValueError(
                    f"{what}: dimension {dim} ({logical!r}, size {shape[dim]}) does not divide over mesh axes "
                    f"{axes} ({size} devices)"
                )
        if self.fsdp:
            used = {axis for entry in entries for axis in _as_tuple(entry)}
            axes = tuple(a for a in self.fsdp_axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
            for count in range(len(axes), 0, -1):  # all FSDP axes if some dimension allows, else fewer
                size = _size(mesh, axes[:count])
                free = [
                    dim
                    for dim, (logical, entry) in enumerate(zip(logical_axes, entries))
                    if entry is None and logical not in _NOT_FSDP and shape[dim] % size == 0
                ]
                if free:
                    dim = max(free, key=lambda d: (shape[d], -d))
                    entries[dim] = axes[0] if count == 1 else axes[:count]
                    break
        return P(*entries)

    def param_shardings(self, logical_axes: PyTree, params: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
        """`NamedSharding`s for `params` (arrays or `jax.ShapeDtypeStruct`s) named by `logical_axes`.

        `logical_axes` has the structure of `params`, with a tuple of names per leaf.
        """
        flat_params, treedef = jax.tree_util.tree_flatten_with_path(params)
        flat_axes = treedef.flatten_up_to(logical_axes)
        specs = [
            NamedSharding(mesh, self.param_spec(tuple(axes), tuple(leaf.shape), mesh, what=jax.tree_util.keystr(path)))
            for (path, leaf), axes in zip(flat_params, flat_axes)
        ]
        return jax.tree.unflatten(treedef, specs)


def _size(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def per_device_bytes(tree: PyTree) -> dict[jax.Device, int]:
    """Bytes of `tree`'s arrays stored on each device, summed over their addressable shards."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def total_bytes(tree: PyTree) -> int:
    """Bytes of `tree`'s arrays counted once (their global shapes)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
