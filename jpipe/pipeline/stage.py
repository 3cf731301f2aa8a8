"""How one stage runs its forward (F), full backward (B), input-gradient (I) and weight-gradient (W) ops.

- F runs `jax.vjp` of the stage and returns what the backward needs from it (the *residuals*, as
  chosen by the `remat` policy, minus the stage parameters, which stay in place).
- B rebuilds the vjp function from the residuals and applies it to the output gradient.
- I and W are B cut in two by `jpipe.pipeline.split`: I computes the input gradient and hands W
  the *weight residuals* (the cotangents at the outputs of the weight-consuming ops, and what those
  ops read that only I recomputes); W computes the parameter gradients from them. Every equation
  of B runs once, in I or in W, for any stage function. Measured with XLA's `cost_analysis()` on a
  `jpipe.layered` stage of GPT blocks (d_model 256, seq 128, batch 4; XLA counts the scanned block
  once): (I + W) / B = 1.000 with remat "none" and with "full"; two separate vjps give 1.54 and
  1.66 (`experiments/split_costs.py`).

A `jpipe.layered(layer_fn)` stage is a `lax.scan` over identical layers; the remat policy then
applies per layer (each layer's input is kept, each layer recomputed in its own backward step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from jpipe.pipeline.remat import apply_remat
from jpipe.pipeline.split import SplitBackward

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layered:
    """A stage made of identical layers applied in sequence.

    `layer_fn(layer_params, x) -> y` with y shaped like x; the stage's parameters are the layer
    parameters stacked on a leading axis `[L, ...]`. Calling it runs the stage (a `lax.scan`), so a
    `Layered` works anywhere a plain stage function does; the executor applies `remat` per layer.
    """

    layer_fn: Callable[[PyTree, PyTree], PyTree]

    def __call__(self, params: PyTree, x: PyTree) -> PyTree:
        return lax.scan(lambda h, layer_params: (self.layer_fn(layer_params, h), None), x, params)[0]


def layered(layer_fn: Callable[[PyTree, PyTree], PyTree]) -> Layered:
    """Declare a stage as `L` layers of `layer_fn` (params leaves `[L, ...]`), rematerialised per layer."""
    return Layered(layer_fn)


def with_remat(stage_fn: Callable, remat) -> Callable:
    """`stage_fn` under the `remat` policy (per layer for a `Layered` stage)."""
    if isinstance(stage_fn, Layered):
        return Layered(apply_remat(stage_fn.layer_fn, remat))
    return apply_remat(stage_fn, remat)


class StageOps:
    """F, B, I and W of one stage function.

    Shapes: `params` is one stage's parameters; `x_like`/`grad` are shaped like the stage input and
    output (one microbatch); `residuals` and `weight_residuals` are flat lists of arrays whose
    shapes depend only on the stage and the remat policy.
    """

    def __init__(self, stage_fn: Callable, remat):
        self.fn = stage_fn
        self._remat_fn = with_remat(stage_fn, remat)

    def forward(self, params: PyTree, x: PyTree) -> tuple[PyTree, list[jax.Array]]:
        """F: `(y, residuals)`."""
        y, vjp_fn = jax.vjp(self._remat_fn, params, x)
        param_ids = {id(leaf) for leaf in jax.tree.leaves(params)}
        return y, [leaf for leaf in jax.tree.leaves(vjp_fn) if id(leaf) not in param_ids]

    def _vjp_fn(self, params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
        """The vjp function of the forward that stashed `residuals`.

        The vjp function is a pytree whose leaves are its residuals and the parameters. Its
        treedef embeds a jaxpr, so it is taken from a vjp traced here (a probe whose forward is
        dead code, removed by XLA) rather than carried across traces.
        """
        _, probe = jax.vjp(self._remat_fn, params, x_like)
        leaves, treedef = jax.tree.flatten(probe)
        param_leaves = {id(leaf): leaf for leaf in jax.tree.leaves(params)}
        stash = iter(residuals)
        rebuilt = [param_leaves[id(leaf)] if id(leaf) in param_leaves else next(stash) for leaf in leaves]
        return jax.tree.unflatten(treedef, rebuilt)

    def _split(self, x_like: PyTree) -> SplitBackward:
        return SplitBackward(lambda params, residuals, grad: self._vjp_fn(params, x_like, residuals)(grad))

    def backward(self, params, residuals, x_like, grad) -> tuple[PyTree, PyTree]:
        """B: `(d_params, d_x)`."""
        return self._vjp_fn(params, x_like, residuals)(grad)

    def input_grad(self, params, residuals, x_like, grad) -> tuple[PyTree, list[jax.Array]]:
        """I: `(d_x, weight_residuals)`."""
        return self._split(x_like).input_grad(params, residuals, grad)

    def weight_grad(self, params, residuals, x_like, weight_residuals) -> PyTree:
        """W: `d_params`."""
        return self._split(x_like).weight_grad(params, residuals, x_like, weight_residuals)


def stage_ops(stage_fn: Callable, remat) -> StageOps:
    """The F/B/I/W implementation of `stage_fn` under `remat`."""
    return StageOps(stage_fn, remat)
