"""Auxiliary metrics out of the pipeline: a `has_aux` loss's metrics averaged like the loss.

The reference is the unpipelined mean over microbatches (`pipeline_cases`): the pipelined metrics
must match it to float32 1e-5 for a plain schedule, braided ones and data parallelism, and the
gradients must be those of the loss alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import (
    assert_trees_close,
    loss_fn,
    make_problem,
    reference_value_and_grad,
    sequential_outputs,
    stage_fn,
)

import jpipe
from jpipe import schedules


def loss_with_metrics(loss_params, y, target):
    """`loss_fn` and metrics that are known functions of the outputs: scalars and a `[D]` vector."""
    prediction = y["h"] @ loss_params["head"]
    metrics = {
        "squared_error": jnp.mean((prediction - target) ** 2),
        "aux_square": jnp.mean(y["aux"] ** 2),
        "mean_h": jnp.mean(y["h"], axis=(0, 1)),  # [D]
    }
    return loss_fn(loss_params, y, target), metrics


def reference_metrics(stage_params, loss_params, inputs, targets):
    """The metrics' mean over microbatches, unpipelined."""
    outputs = sequential_outputs(stage_params, inputs)
    per_microbatch = jax.vmap(lambda y, t: loss_with_metrics(loss_params, y, t)[1])(outputs, targets)
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), per_microbatch)


@pytest.mark.parametrize(
    ("name", "p", "m", "options", "braided"),
    [
        ("1f1b", 4, 6, {}, False),
        ("zbv", 2, 5, {}, False),
        ("dualpipev", 2, 4, {"overlap": True}, True),  # F&B pairs braided in one tick
        ("1f1b_overlap", 2, 4, {}, True),
    ],
)
def test_metrics_match_the_sequential_reference(name, p, m, options, braided):
    schedule = schedules.build(name, p, m, schedules.default_virtual(name), **options)
    mesh = make_mesh_or_skip((p,), ("stage",))
    problem = make_problem(schedule.num_model_stages, m)
    step = jpipe.value_and_grad(stage_fn, loss_with_metrics, schedule=schedule, mesh=mesh, has_aux=True)
    assert step.program.braided == braided
    (loss, metrics), grads = jax.jit(step)(*problem)
    ref_loss, ref_grads = reference_value_and_grad(*problem)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    assert_trees_close(metrics, reference_metrics(*problem))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(metrics))


def test_forward_loss_returns_the_metrics_too():
    schedule = schedules.build("dualpipev", 2, 4, overlap=True)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(schedule.num_model_stages, 4)
    evaluate = jpipe.forward_loss(stage_fn, loss_with_metrics, schedule=schedule, mesh=mesh, has_aux=True)
    loss, metrics = jax.jit(evaluate)(*problem)
    assert_trees_close(loss, reference_value_and_grad(*problem)[0])
    assert_trees_close(metrics, reference_metrics(*problem))


def test_metrics_are_averaged_over_the_data_axis():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh_or_skip((2, 2), ("data", "stage"))
    schedule = schedules.build("1f1b", 2, 4)
    stage_params, loss_params, inputs, targets = make_problem(2, 4)
    expected = reference_metrics(stage_params, loss_params, inputs, targets)
    batch_sharded = NamedSharding(mesh, P(None, "data"))
    inputs, targets = jax.device_put(inputs, batch_sharded), jax.device_put(targets, batch_sharded)
    step = jpipe.value_and_grad(
        stage_fn, loss_with_metrics, schedule=schedule, mesh=mesh, data_axes="data", has_aux=True
    )
    (_, metrics), _ = jax.jit(step)(stage_params, loss_params, inputs, targets)
    assert_trees_close(metrics, expected)


def test_without_has_aux_the_step_is_unchanged():
    schedule = schedules.build("1f1b", 2, 3)
    mesh = make_mesh_or_skip((2,), ("stage",))
    problem = make_problem(2, 3)
    loss, _ = jax.jit(jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh))(*problem)
    assert loss.shape == ()


def test_a_loss_without_metrics_is_rejected_under_has_aux():
    schedule = schedules.build("1f1b", 2, 2)
    mesh = make_mesh_or_skip((2,), ("stage",))
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, has_aux=True)
    with pytest.raises(ValueError, match="has_aux"):
        step(*make_problem(2, 2))
