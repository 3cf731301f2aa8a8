"""Array helpers the executor's modules share: dynamic slots, varying types, sharded zeros, accumulators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

PyTree = Any


def accumulator_dtype(*dtypes) -> jnp.dtype:
    """Accumulator dtype for values of `dtypes`: float32, or float64 when any of them is float64."""
    return jnp.dtype(jnp.float64) if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


def varying(tree: PyTree, axes: tuple[str, ...]) -> PyTree:
    """Mark arrays as varying over the manual `axes` (scan carries, vjp cotangents)."""

    def cast(x):
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def if_(flag, then: Callable, otherwise: Callable, *operands):
    """`then(*operands)` where `flag` is 1, else `otherwise(*operands)`.

    A table entry (traced) becomes a `lax.cond`; a Python int (a braided tick's branch, built for
    one combination of first/last hops) picks the function while tracing, so the branch stays
    straight-line code that the compiler can interleave with the tick's other op.
    """
    if isinstance(flag, (bool, int, np.integer)):
        return then(*operands) if flag else otherwise(*operands)
    return lax.cond(flag == 1, then, otherwise, *operands)


def zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def spec_of(a: jax.Array) -> tuple:
    """The array's current PartitionSpec entries (empty when unknown, e.g. under auto sharding)."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return tuple(spec) if spec is not None else ()


def zeros(leading: tuple[int, ...], like: jax.Array, dtype=None) -> jax.Array:
    """Zeros shaped `leading + like.shape` that keep `like`'s sharding over non-manual mesh axes.

    Under explicit sharding, buffers must carry the sharding of what is written into them (e.g. a
    batch dimension split over `data`).
    """
    dtype = like.dtype if dtype is None else dtype
    spec = spec_of(like)
    if not any(entry is not None for entry in spec):
        return jnp.zeros(leading + like.shape, dtype)
    return jnp.zeros(leading + like.shape, dtype, out_sharding=P(*((None,) * len(leading) + spec)))


def slots(count: int, example: PyTree) -> PyTree:
    """A buffer of `count` slots shaped like `example` (each leaf `[count, ...]`)."""
    return jax.tree.map(lambda a: zeros((count,), a), example)


def take(tree: PyTree, index) -> PyTree:
    """`tree[index]` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def put(tree: PyTree, index, value: PyTree) -> PyTree:
    """`tree.at[index].set(value)` on every leaf's leading axis (dynamic index)."""
    return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), index, 0), tree, value)


def take_first(tree: PyTree, n: int) -> PyTree:
    """The first `n` rows of every leaf (drops a scratch slot)."""
    return jax.tree.map(lambda a: a[:n], tree)
