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
Its F is a scan of per-layer vjps (residuals stacked `[L, ...]`) and its B a reverse scan over
the layers, so B can add each layer's parameter gradient straight into the executor's float32
accumulator (`backward_into`) instead of stacking a stage-sized gradient first: a scan's
transpose (what `jax.vjp` of the whole stage gives) materialises the stacked gradient, a second
float32 copy of the stage's parameters. I and W split each layer's backward: I is a reverse scan
of per-layer input-gradient halves (weight residuals stacked `[L, ...]`), W a scan of per-layer
weight-gradient halves that adds into the accumulator the same way (`weight_grad_into`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpipe.pipeline.lockstep import Layerwise, no_layers, run_alone
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
        return y, _residual_leaves(vjp_fn, params)

    def _vjp_fn(self, params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
        """The vjp function of the forward that stashed `residuals`."""
        return _rebuild_vjp(self._remat_fn, params, x_like, residuals)

    def _split(self, x_like: PyTree) -> SplitBackward:
        return SplitBackward(lambda params, residuals, grad: self._vjp_fn(params, x_like, residuals)(grad))

    def backward(self, params, residuals, x_like, grad) -> tuple[PyTree, PyTree]:
        """B: `(d_params, d_x)`."""
        return self._vjp_fn(params, x_like, residuals)(grad)

    def backward_into(self, params, residuals, x_like, grad, grads, chunk) -> tuple[PyTree, PyTree]:
        """B, adding `d_params` into `grads[chunk]` (float32 accumulators `[v, ...]`): `(grads, d_x)`."""
        d_params, d_x = self.backward(params, residuals, x_like, grad)
        return add_at(grads, chunk, d_params), d_x

    def input_grad(self, params, residuals, x_like, grad) -> tuple[PyTree, list[jax.Array]]:
        """I: `(d_x, weight_residuals)`."""
        return self._split(x_like).input_grad(params, residuals, grad)

    def weight_grad(self, params, residuals, x_like, weight_residuals) -> PyTree:
        """W: `d_params`."""
        return self._split(x_like).weight_grad(params, residuals, x_like, weight_residuals)

    def weight_grad_into(self, params, residuals, x_like, weight_residuals, grads, chunk) -> PyTree:
        """W, adding `d_params` into `grads[chunk]` (float32 accumulators `[v, ...]`): the new `grads`."""
        return add_at(grads, chunk, self.weight_grad(params, residuals, x_like, weight_residuals))

    # The ops the executor runs, as layerwise ops (`jpipe.pipeline.lockstep`): a plain stage has no
    # layers to step through, so each returns its result at once.

    def forward_layerwise(self, params, x) -> Layerwise:
        """`forward` as a layerwise op."""
        return no_layers(self.forward(params, x))

    def backward_into_layerwise(self, params, residuals, x_like, grad, grads, chunk) -> Layerwise:
        """`backward_into` as a layerwise op."""
        return no_layers(self.backward_into(params, residuals, x_like, grad, grads, chunk))

    def input_grad_layerwise(self, params, residuals, x_like, grad) -> Layerwise:
        """`input_grad` as a layerwise op."""
        return no_layers(self.input_grad(params, residuals, x_like, grad))

    def weight_grad_into_layerwise(self, params, residuals, x_like, weight_residuals, grads, chunk) -> Layerwise:
        """`weight_grad_into` as a layerwise op."""
        return no_layers(self.weight_grad_into(params, residuals, x_like, weight_residuals, grads, chunk))


class LayeredOps(StageOps):
    """F, B, I and W of a `Layered` stage, one layer at a time (see the module docstring).

    Residuals: for each leaf of one layer's vjp residuals, an array `[L, ...]`.
    """

    def __init__(self, stage_fn: Layered, remat, unroll: bool = False):
        super().__init__(stage_fn, remat)
        self._layer_fn = apply_remat(stage_fn.layer_fn, remat)
        self._unroll = unroll

    def _layers(self, body, carry, params, xs=(), accumulator=None, reverse: bool = False) -> Layerwise:
        """`lax.scan` of `body` over the layers as a layerwise op: `(carry, accumulator, outputs)`.

        `body(carry, accumulator, layer_params, layer_xs) -> (carry, accumulator, out)`; `params`
        and `xs` (a layer's residuals, its index) have leaves `[L, ...]`; the outputs are stacked
        `[L, ...]` as a scan stacks them. The carry is what the next layer depends on (activation
        or output gradient); the accumulator is a buffer layers add into (the float32 parameter
        gradients).

        Unrolled (braided ticks), a Python loop over the layers with a step (`jpipe.pipeline.lockstep`)
        before each layer and one after the last. Before layer `l` it yields `(carry, (params,
        layer_xs))` and continues with what it is sent back, and takes the layer's parameters from
        the `params` sent back: every matmul of the layer, its recomputation included, then waits
        for the step. After the last layer it yields `(carry, ())`. The accumulator takes no part.
        The stage's whole `params` goes through the step rather than the layer's slice, which would
        be a copy (compiled for TPU, the slices cost 1.2 MiB more temporary memory than the whole
        `params` on the `experiments/tp_overlap.py` job and hid 3 fewer of its 72 braided
        all-reduces). Not unrolled: one `lax.scan`, no steps.
        """
        if not self._unroll:

            def scan_body(state, layer):
                carry, accumulator, out = body(*state, *layer)
                return (carry, accumulator), out

            (carry, accumulator), outputs = lax.scan(scan_body, (carry, accumulator), (params, xs), reverse=reverse)
            return carry, accumulator, outputs
        count = jax.tree.leaves(params)[0].shape[0]
        outputs: list[PyTree] = [None] * count
        for index in reversed(range(count)) if reverse else range(count):
            layer_xs = jax.tree.map(lambda a, i=index: a[i], xs)
            carry, (params, layer_xs) = yield carry, (params, layer_xs)
            layer_params = jax.tree.map(lambda a, i=index: a[i], params)
            carry, accumulator, outputs[index] = body(carry, accumulator, layer_params, layer_xs)
        carry, _ = yield carry, ()
        return carry, accumulator, jax.tree.map(lambda *layers: jnp.stack(layers), *outputs)

    def forward(self, params: PyTree, x: PyTree) -> tuple[PyTree, list[jax.Array]]:
        return run_alone(self.forward_layerwise(params, x))

    def forward_layerwise(self, params: PyTree, x: PyTree) -> Layerwise:
        def layer(h, _, layer_params, __):
            y, vjp_fn = jax.vjp(self._layer_fn, layer_params, h)
            return y, None, _residual_leaves(vjp_fn, layer_params)

        y, _, residuals = yield from self._layers(layer, x, params)
        return y, residuals

    def _layer_vjp(self, layer_params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
        """One layer's vjp function rebuilt from its residuals."""
        return _rebuild_vjp(self._layer_fn, layer_params, x_like, residuals)

    def _vjp_fn(self, params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
        def vjp(grad):
            def layer(g, _, layer_params, layer_residuals):
                d_params, d_x = self._layer_vjp(layer_params, x_like, layer_residuals)(g)
                return d_x, None, d_params

            d_x, _, d_params = run_alone(self._layers(layer, grad, params, residuals, reverse=True))
            return d_params, d_x

        return vjp

    def _layer_split(self, x_like: PyTree) -> SplitBackward:
        """The I/W split of one layer's backward (a layer's output is shaped like its input)."""
        return SplitBackward(lambda layer_params, residuals, g: self._layer_vjp(layer_params, x_like, residuals)(g))

    def input_grad(self, params, residuals, x_like, grad) -> tuple[PyTree, list[jax.Array]]:
        """I, layer by layer (reverse scan): `(d_x, weight_residuals)`, each weight residual `[L, ...]`."""
        return run_alone(self.input_grad_layerwise(params, residuals, x_like, grad))

    def input_grad_layerwise(self, params, residuals, x_like, grad) -> Layerwise:
        split = self._layer_split(x_like)

        def layer(g, _, layer_params, layer_residuals):
            d_x, weight_residuals = split.input_grad(layer_params, layer_residuals, g)
            return d_x, None, weight_residuals

        d_x, _, weight_residuals = yield from self._layers(layer, grad, params, residuals, reverse=True)
        return d_x, weight_residuals

    def weight_grad(self, params, residuals, x_like, weight_residuals) -> PyTree:
        """W, layer by layer: `d_params` stacked `[L, ...]` (what the executor avoids with `weight_grad_into`)."""
        split = self._layer_split(x_like)

        def layer(_, __, layer_params, xs):
            layer_residuals, layer_weight_residuals = xs
            return None, None, split.weight_grad(layer_params, layer_residuals, x_like, layer_weight_residuals)

        return run_alone(self._layers(layer, None, params, (residuals, weight_residuals)))[2]

    def weight_grad_into(self, params, residuals, x_like, weight_residuals, grads, chunk) -> PyTree:
        """W, adding each layer's `d_params` straight into `grads[chunk, layer]`: no stacked gradient."""
        return run_alone(self.weight_grad_into_layerwise(params, residuals, x_like, weight_residuals, grads, chunk))

    def weight_grad_into_layerwise(self, params, residuals, x_like, weight_residuals, grads, chunk) -> Layerwise:
        split = self._layer_split(x_like)
        num_layers = jax.tree.leaves(params)[0].shape[0]

        def layer(_, grads, layer_params, xs):
            index, layer_residuals, layer_weight_residuals = xs
            d_params = split.weight_grad(layer_params, layer_residuals, x_like, layer_weight_residuals)
            return None, add_at(grads, (chunk, index), d_params), None

        xs = (jnp.arange(num_layers), residuals, weight_residuals)
        _, grads, _ = yield from self._layers(layer, None, params, xs, accumulator=grads)
        return grads

    def backward_into(self, params, residuals, x_like, grad, grads, chunk) -> tuple[PyTree, PyTree]:
        return run_alone(self.backward_into_layerwise(params, residuals, x_like, grad, grads, chunk))

    def backward_into_layerwise(self, params, residuals, x_like, grad, grads, chunk) -> Layerwise:
        num_layers = jax.tree.leaves(params)[0].shape[0]

        def layer(g, grads, layer_params, xs):
            index, layer_residuals = xs
            d_params, d_x = self._layer_vjp(layer_params, x_like, layer_residuals)(g)
            return d_x, add_at(grads, (chunk, index), d_params), None

        xs = (jnp.arange(num_layers), residuals)
        d_x, grads, _ = yield from self._layers(layer, grad, params, xs, accumulator=grads, reverse=True)
        return grads, d_x


def _residual_leaves(vjp_fn: Callable, params: PyTree) -> list[jax.Array]:
    """The leaves of a vjp function other than the parameters themselves."""
    param_ids = {id(leaf) for leaf in jax.tree.leaves(params)}
    return [leaf for leaf in jax.tree.leaves(vjp_fn) if id(leaf) not in param_ids]


def _rebuild_vjp(fn: Callable, params: PyTree, x_like: PyTree, residuals: list[jax.Array]) -> Callable:
    """The vjp function of `fn` at `(params, x)` from `_residual_leaves` of it (inverse of that).

    The vjp function is a pytree whose leaves are its residuals and the parameters. Its treedef
    embeds a jaxpr, so it is taken from a vjp traced here (a probe whose forward is dead code,
    removed by XLA) rather than carried across traces.
    """
    _, probe = jax.vjp(fn, params, x_like)
    leaves, treedef = jax.tree.flatten(probe)
    param_leaves = {id(leaf): leaf for leaf in jax.tree.leaves(params)}
    stash = iter(residuals)
    rebuilt = [param_leaves[id(leaf)] if id(leaf) in param_leaves else next(stash) for leaf in leaves]
    return jax.tree.unflatten(treedef, rebuilt)


def add_at(tree: PyTree, index, value: PyTree) -> PyTree:
    """`tree.at[index].add(value)` on every leaf, as one dynamic-update-slice per leaf.

    `index` is one dynamic index into the leading axis, or a tuple of them into the leading axes
    (e.g. `(chunk, layer)` of a `[v, L, ...]` accumulator); `value` has the remaining shape.
    """
    indices = index if isinstance(index, tuple) else (index,)

    def add(a, v):
        lead = len(indices)
        starts = tuple(jnp.asarray(i, jnp.int32) for i in indices) + (jnp.zeros((), jnp.int32),) * (a.ndim - lead)
        sizes = (1,) * lead + a.shape[lead:]
        current = lax.dynamic_slice(a, starts, sizes)
        return lax.dynamic_update_slice(a, current + v.astype(a.dtype).reshape(sizes), starts)

    return jax.tree.map(add, tree, value)


def stage_ops(stage_fn: Callable, remat, *, unroll: bool = False) -> StageOps:
    """The F/B/I/W implementation of `stage_fn` under `remat`.

    `unroll`: run a `Layered` stage's layers as straight-line code instead of a loop, with a step
    before each layer (`jpipe.pipeline.lockstep`), so that the two ops of a braided tick are not two
    loops the compiler runs one after the other but two layer sequences run in lockstep.
    """
    if isinstance(stage_fn, Layered):
        return LayeredOps(stage_fn, remat, unroll=unroll)
    return StageOps(stage_fn, remat)
