"""The training and evaluation steps, as plain functions: what the CLI, the experiments and the tests run.

In the Flax examples' shape, the step is a module-level function of the state and a batch; what
it closes over in a training script (the loss-and-gradient function, the optimizer) are keyword
arguments, bound once with `functools.partial` before `jax.jit`:

    step = jit_train_step(pipe.value_and_grad(), optimizer, param_shardings, opt_shardings)
    params, opt_state, loss, grad_norm = step(params, opt_state, tokens, targets)

With `has_aux` (the moe family's routing metrics: `PipelinedLM.value_and_grad(has_aux=True)`),
`value_and_grad` returns `((loss, metrics), grads)` and the step returns the metrics last.

`value_and_grad` is any `(params, tokens, targets) -> (loss, grads)`: `PipelinedLM.value_and_grad()`
in the training loop and `experiments/throughput.py`, the unpipelined model's
(`jpipe.models.reference_value_and_grad`) in `experiments/parity.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any
ValueAndGrad = Callable[[PyTree, jax.Array, jax.Array], tuple[jax.Array, PyTree]]
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


def train_step(
    params: PyTree,
    opt_state: PyTree,
    tokens: jax.Array,
    targets: jax.Array,
    *,
    value_and_grad: ValueAndGrad,
    optimizer: optax.GradientTransformation,
    has_aux: bool = False,
) -> tuple:
    """One optimizer step: `(params, opt_state, loss, grad_norm)` after the update (`+ (metrics,)` with `has_aux`).

    Args:
      params, opt_state: the parameters and `optimizer`'s state (any layout `value_and_grad` takes).
      tokens, targets: int32 `[m, B / m, T]`: microbatches of byte ids and their next bytes.
      value_and_grad: `(params, tokens, targets) -> (mean loss, gradients shaped like params)`.
      optimizer: the update rule (`jpipe.train.optimizer.make_optimizer`).
      has_aux: `value_and_grad` returns `((mean loss, metrics), gradients)`, metrics a dict of
        float32 arrays (e.g. the moe family's routing metrics).

    Returns the updated parameters and optimizer state, the loss before the update (float32 `[]`)
    and the global L2 norm of the gradients (before clipping, float32 `[]`); with `has_aux`, then
    the metrics of the batch (before the update).
    """
    loss, grads = value_and_grad(params, tokens, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updated = (optax.apply_updates(params, updates), opt_state)
    if has_aux:
        loss, metrics = loss
        return *updated, loss, optax.tree.norm(grads), metrics
    return *updated, loss, optax.tree.norm(grads)


def eval_step(params: PyTree, tokens: jax.Array, targets: jax.Array, *, loss: LossFn) -> jax.Array:
    """The mean loss of `params` on `tokens` / `targets` (shapes as in `train_step`).

    `loss`: `(params, tokens, targets) -> mean loss`, forwards only (`PipelinedLM.evaluate()`: the
    executor's forward program, no backward ops, residuals or gradients); any `value_and_grad`'s
    loss works too (`lambda *a: value_and_grad(*a)[0]`).
    """
    return loss(params, tokens, targets)


GPU_COMPILER_OPTIONS: dict[str, bool | int | float | str] = {
    "xla_gpu_experimental_parallel_collective_overlap_limit": 2,
}
"""XLA options the training step is compiled with on NVIDIA GPUs (`compiler_options_for`).

XLA's GPU latency-hiding scheduler keeps at most one asynchronous collective in flight by default
(`xla_gpu_experimental_parallel_collective_overlap_limit` 1). A pipeline tick sends on two rings,
activations forward and gradients backward (two collective-permutes); with one in flight, the
scheduler overlaps one of them with the tick's compute and leaves the other exposed. With 2, both
have a matmul in flight for 1f1b, interleaved_1f1b, zb_h1 and zbv under `overlap_sends=True`, and
the temporary memory does not change (jax-cuda12-plugin 0.12.0.1, H100; `docs/gpu.md`)."""


def compiler_options_for(devices) -> dict | None:
    """The XLA options to compile the training step with on `devices`: `GPU_COMPILER_OPTIONS` for GPUs, else None."""
    device = next(iter(devices))
    return dict(GPU_COMPILER_OPTIONS) if device.platform == "gpu" else None


def jit_train_step(
    value_and_grad: ValueAndGrad,
    optimizer: optax.GradientTransformation,
    param_shardings: PyTree | None = None,
    opt_shardings: PyTree | None = None,
    compiler_options: dict | None = None,
    has_aux: bool = False,
) -> Callable:
    """`train_step` bound to `value_and_grad` and `optimizer`, jitted, parameters and optimizer state donated.

    With `param_shardings` and `opt_shardings` (`NamedSharding` trees, see `optimizer_shardings`)
    the updated state comes back on the shardings it came in with, so the second call does not
    recompile; without them the compiler chooses. `compiler_options` are XLA options for its
    compilation (`compiler_options_for(devices)`: those for GPUs). `has_aux`: see `train_step`.
    """
    step = functools.partial(train_step, value_and_grad=value_and_grad, optimizer=optimizer, has_aux=has_aux)
    out_shardings = None
    if param_shardings is not None:
        out_shardings = (param_shardings, opt_shardings, None, None) + ((None,) if has_aux else ())
    return jax.jit(step, out_shardings=out_shardings, donate_argnums=(0, 1), compiler_options=compiler_options)


def jit_eval_step(loss: LossFn) -> Callable:
    """`eval_step` bound to `loss`, jitted: `(params, tokens, targets) -> loss`."""
    return jax.jit(functools.partial(eval_step, loss=loss))


def map_params_like(fn: Callable[[PyTree], PyTree], tree: PyTree, params_structure: Any) -> PyTree:
    """Apply `fn` to every subtree of `tree` shaped like the parameters (e.g. Adam's mu and nu).

    `params_structure` is `jax.tree.structure(params)`; other subtrees (step counts) are kept.
    """
    return jax.tree.map(
        lambda sub: fn(sub) if jax.tree.structure(sub) == params_structure else sub,
        tree,
        is_leaf=lambda sub: jax.tree.structure(sub) == params_structure,
    )


def optimizer_shardings(
    optimizer: optax.GradientTransformation, abstract_params: PyTree, param_shardings: PyTree, mesh: jax.sharding.Mesh
) -> PyTree:
    """A `NamedSharding` per leaf of `optimizer`'s state for parameters `abstract_params`.

    Moments shaped like the parameters take `param_shardings`; everything else (step counts) is
    replicated over `mesh`.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return map_params_like(
        lambda _: param_shardings,
        jax.tree.map(lambda _: replicated, jax.eval_shape(optimizer.init, abstract_params)),
        jax.tree.structure(param_shardings),
    )
