"""How one stage runs its forward, full backward (B), input-gradient (I) and weight-gradient (W) ops.

Two kinds of stage:

- An opaque `stage_fn(params, x) -> y`. The forward stashes the residuals of `jax.vjp`; B and I
  rebuild the vjp function from them (XLA removes the half of the vjp an op does not use). W gets
  the output gradient from I and must run the backward chain through the stage again to reach the
  parameters: for a stage of several layers, I + W then costs about one extra input-gradient pass
  over B.
- A `Layered` stage (`jpipe.layered(layer_fn)`): `L` identical layers, parameters stacked on a
  leading `[L]` axis, applied in sequence by `lax.scan`. The forward stashes per-layer residuals; I
  walks the layers backward and keeps each layer's output gradient; W then computes every layer's
  weight gradient directly from those, with no backward chain. I + W costs the same as B: this is
  the split the zero-bubble schedules assume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from jpipe.pipeline.remat import apply_remat

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layered:
    """A stage made of identical layers applied in sequence.

    `layer_fn(layer_params, x) -> y` with y shaped like x; the stage's parameters are the layer
    parameters stacked on a leading axis `[L, ...]`. Calling it runs the stage (a `lax.scan`), so a
    `Layered` works anywhere a plain stage function does; the executor also recognises it and splits
    the backward per layer.
    """

    layer_fn: Callable[[PyTree, PyTree], PyTree]

    def __call__(self, params: PyTree, x: PyTree) -> PyTree:
        return lax.scan(lambda h, layer_params: (self.layer_fn(layer_params, h), None), x, params)[0]


def layered(layer_fn: Callable[[PyTree, PyTree], PyTree]) -> Layered:
    """Declare a stage as `L` layers of `layer_fn` (params leaves `[L, ...]`): exact zero-cost I/W split."""
    return Layered(layer_fn)


class _Vjp:
    """`jax.vjp` of `fn`, split into per-microbatch residuals (to stash) and the parameters.

    The vjp function is a pytree whose leaves are its residuals; some leaves are the parameters
    themselves, which stay in place. The treedef is taken from a vjp traced where it is used, so no
    jaxpr crosses traces; that probe's forward is dead code and XLA removes it.
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def forward(self, params: PyTree, x: PyTree) -> tuple[PyTree, list[jax.Array]]:
        y, vjp_fn = jax.vjp(self.fn, params, x)
        param_ids = {id(leaf) for leaf in jax.tree.leaves(params)}
        return y, [leaf for leaf in jax.tree.leaves(vjp_fn) if id(leaf) not in param_ids]

    def rebuild(self, params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
        _, probe = jax.vjp(self.fn, params, x_like)
        leaves, treedef = jax.tree.flatten(probe)
        param_leaves = {id(leaf): leaf for leaf in jax.tree.leaves(params)}
        stash = iter(residuals)
        rebuilt = [param_leaves[id(leaf)] if id(leaf) in param_leaves else next(stash) for leaf in leaves]
        return jax.tree.unflatten(treedef, rebuilt)


class OpaqueStage:
    """Ops of an opaque stage function. Weight residuals are the output gradient itself."""

    def __init__(self, stage_fn: Callable, remat):
        self.fn = stage_fn
        self._vjp = _Vjp(apply_remat(stage_fn, remat))

    def forward(self, params, x):
        """`(y, residuals)`."""
        return self._vjp.forward(params, x)

    def backward(self, params, residuals, x_like, grad):
        """B: `(d_params, d_x)`."""
        return self._vjp.rebuild(params, x_like, residuals)(grad)

    def input_grad(self, params, residuals, x_like, grad):
        """I: `(d_x, weight_residuals)`."""
        return self._vjp.rebuild(params, x_like, residuals)(grad)[1], grad

    def weight_grad(self, params, residuals, x_like, weight_residuals):
        """W: `d_params`."""
        return self._vjp.rebuild(params, x_like, residuals)(weight_residuals)[0]


class LayeredStage:
    """Ops of a `Layered` stage: per-layer residuals; W needs no backward chain."""

    def __init__(self, stage: Layered, remat):
        self.fn = stage
        self._vjp = _Vjp(apply_remat(stage.layer_fn, remat))

    def forward(self, params, x):
        def layer(h, layer_params):
            return self._vjp.forward(layer_params, h)

        return lax.scan(layer, x, params)

    def _reverse(self, params, residuals, x_like, grad, keep_weight_grads: bool):
        def layer(g, inputs):
            layer_params, layer_residuals = inputs
            d_params, d_h = self._vjp.rebuild(layer_params, x_like, layer_residuals)(g)
            return d_h, (d_params if keep_weight_grads else g)

        return lax.scan(layer, grad, (params, residuals), reverse=True)

    def backward(self, params, residuals, x_like, grad):
        d_x, d_params = self._reverse(params, residuals, x_like, grad, keep_weight_grads=True)
        return d_params, d_x

    def input_grad(self, params, residuals, x_like, grad):
        # Weight residuals: the gradient at each layer's output, [L, ...].
        return self._reverse(params, residuals, x_like, grad, keep_weight_grads=False)

    def weight_grad(self, params, residuals, x_like, weight_residuals):
        def layer(_, inputs):
            layer_params, layer_residuals, g = inputs
            return None, self._vjp.rebuild(layer_params, x_like, layer_residuals)(g)[0]

        return lax.scan(layer, None, (params, residuals, weight_residuals))[1]


def stage_ops(stage_fn: Callable, remat) -> OpaqueStage | LayeredStage:
    """The op implementation for `stage_fn` (a `Layered` stage gets the per-layer split)."""
    if isinstance(stage_fn, Layered):
        return LayeredStage(stage_fn, remat)
    return OpaqueStage(stage_fn, remat)


