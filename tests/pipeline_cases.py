"""A small but non-trivial pipeline problem and its unpipelined reference, shared by executor tests.

The stage is layernorm -> MLP with a residual on a pytree activation `{"h": [B, T, D], "aux": [B, T]}`
(so pytree activations, broadcasting and a reduction are all exercised); the loss is a linear head
with squared error on `h` plus a penalty on `aux`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BATCH, SEQ, WIDTH, HIDDEN, OUT = 2, 3, 8, 16, 3


def stage_fn(params, x):
    """One stage. params: g [D], w1 [D, H], w2 [H, D]; x: {"h": [B, T, D], "aux": [B, T]}."""
    h = x["h"]
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    normed = (h - mean) * jax.lax.rsqrt(var + 1e-5) * params["g"][None, None, :]
    h = h + jnp.tanh(normed @ params["w1"]) @ params["w2"]
    return {"h": h, "aux": 0.9 * x["aux"] + jnp.sin(h.sum(-1))}


def loss_fn(loss_params, y, target):
    """Per-microbatch loss: mean squared error of a linear head + 0.1 * mean(aux^2)."""
    prediction = y["h"] @ loss_params["head"]
    return jnp.mean((prediction - target) ** 2) + 0.1 * jnp.mean(y["aux"] ** 2)


def make_problem(num_stages: int, num_microbatches: int, seed: int = 0, layers: int | None = None):
    """Returns (stage_params [S, ...], loss_params, inputs [m, ...], targets [m, B, T, OUT]).

    With `layers`, stage parameters get a layer axis, `[S, layers, ...]`, for `jpipe.layered(stage_fn)`.
    """
    keys = jax.random.split(jax.random.key(seed), 6)
    lead = (num_stages,) if layers is None else (num_stages, layers)
    stage_params = {
        "g": 1.0 + 0.1 * jax.random.normal(keys[0], lead + (WIDTH,)),
        "w1": jax.random.normal(keys[1], lead + (WIDTH, HIDDEN)) / np.sqrt(WIDTH),
        "w2": jax.random.normal(keys[2], lead + (HIDDEN, WIDTH)) / np.sqrt(HIDDEN),
    }
    loss_params = {"head": jax.random.normal(keys[3], (WIDTH, OUT)) / np.sqrt(WIDTH)}
    inputs = {
        "h": jax.random.normal(keys[4], (num_microbatches, BATCH, SEQ, WIDTH)),
        "aux": jnp.linspace(-1.0, 1.0, num_microbatches * BATCH * SEQ).reshape(num_microbatches, BATCH, SEQ),
    }
    targets = jax.random.normal(keys[5], (num_microbatches, BATCH, SEQ, OUT))
    return stage_params, loss_params, inputs, targets


def sequential_outputs(stage_params, inputs, stage=stage_fn):
    """All stages in logical order on every microbatch, unpipelined, with plain Python loops."""
    num_stages = jax.tree.leaves(stage_params)[0].shape[0]

    def one(x):
        for s in range(num_stages):
            params = jax.tree.map(lambda a, s=s: a[s], stage_params)
            if stage is stage_fn:
                x = stage_fn(params, x)
            else:  # a layered stage: apply its layers one by one
                for layer in range(jax.tree.leaves(params)[0].shape[0]):
                    x = stage_fn(jax.tree.map(lambda a, layer=layer: a[layer], params), x)
        return x

    return jax.vmap(one)(inputs)


def sequential_loss(stage_params, loss_params, inputs, targets, stage=stage_fn):
    """Mean over microbatches of the per-microbatch loss, unpipelined (the reference)."""
    outputs = sequential_outputs(stage_params, inputs, stage)
    return jnp.mean(jax.vmap(lambda y, t: loss_fn(loss_params, y, t))(outputs, targets))


reference_value_and_grad = jax.jit(jax.value_and_grad(sequential_loss, argnums=(0, 1, 2)), static_argnums=4)


def assert_trees_close(actual, expected, rtol: float = 1e-5) -> None:
    """Every leaf within `rtol` of the reference, relative to the reference leaf's largest entry."""
    actual_leaves, actual_def = jax.tree.flatten(actual)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert actual_def == expected_def, (actual_def, expected_def)
    for path_and_leaf, a in zip(jax.tree_util.tree_flatten_with_path(expected)[0], actual_leaves):
        path, e = path_and_leaf
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
        scale = max(float(np.max(np.abs(e))), 1e-30)
        error = float(np.max(np.abs(a - e)))
        assert error <= rtol * scale, f"{jax.tree_util.keystr(path)}: max error {error:.3g} > {rtol} * {scale:.3g}"
