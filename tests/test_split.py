"""The exact I/W split (`jpipe.pipeline.split`): I + W compute B's values with B's FLOPs, for any stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_cases import assert_trees_close

import jpipe
from jpipe.models.config import GPTConfig
from jpipe.models.parts import LMParts
from jpipe.pipeline.costs import measure_costs
from jpipe.pipeline.stage import stage_ops
from jpipe.schedules import Cost, best_split, build, peak_memory, simulate
from jpipe.schedules.ir import Action, Op, Schedule

BATCH, SEQ, WIDTH, HIDDEN = 2, 8, 16, 32
GPT_CONFIG = GPTConfig(vocab_size=64, seq_len=16, d_model=32, num_heads=2, num_layers=2)


def _mlp_params(key, layers: int):
    keys = jax.random.split(key, 2 * layers)
    return [
        {
            "w1": jax.random.normal(keys[2 * k], (WIDTH, HIDDEN)) / np.sqrt(WIDTH),
            "w2": jax.random.normal(keys[2 * k + 1], (HIDDEN, WIDTH)) / np.sqrt(HIDDEN),
        }
        for k in range(layers)
    ]


def opaque_mlp(params, x):
    """Several residual MLP layers in a Python loop (no scan): an opaque stage function."""
    for layer in params:
        x = x + jnp.tanh(x @ layer["w1"]) @ layer["w2"]
    return x


def _gpt_stage():
    parts = LMParts(GPT_CONFIG)
    from flax import nnx

    from jpipe.models.gpt import GPT, params_of

    params = params_of(GPT(GPT_CONFIG, rngs=nnx.Rngs(0)))["blocks"]  # [L, ...]: one stage of L layers
    x = jax.random.normal(jax.random.key(3), (BATCH, GPT_CONFIG.seq_len, GPT_CONFIG.d_model))
    return jpipe.layered(parts.layer_fn), params, x


def _mlp_stage():
    return opaque_mlp, _mlp_params(jax.random.key(1), 3), jax.random.normal(jax.random.key(2), (BATCH, SEQ, WIDTH))


@jax.custom_vjp
def _scaled_square(x):
    return x * x


_scaled_square.defvjp(lambda x: (x * x, x), lambda x, g: (2.0 * x * g,))


def unusual_stage(params, x):
    """A stage with a nested jit, custom_jvp (relu), custom_vjp, cond, while_loop and a captured constant."""
    constant = jnp.linspace(0.5, 1.5, WIDTH)
    h = jax.jit(lambda a, w: a @ w)(x, params["w1"])
    h = jax.nn.relu(h) + _scaled_square(h) * 0.01
    h = jax.lax.cond(jnp.sum(x) > 0, lambda a: jnp.sin(a), lambda a: jnp.cos(a), h)
    h = jax.lax.fori_loop(0, 2, lambda _, a: a * 0.9 + jnp.tanh(a), h)
    return x * constant[None, None, :] + h @ params["w2"] * params["scale"]


def _unusual():
    params = {**_mlp_params(jax.random.key(4), 1)[0], "scale": jnp.float32(0.7)}
    return unusual_stage, params, jax.random.normal(jax.random.key(5), (BATCH, SEQ, WIDTH))


STAGES = {"gpt-layered": _gpt_stage, "opaque-mlp": _mlp_stage, "jit-custom-cond-while": _unusual}


def _b_and_split(stage_fn, params, x, remat):
    ops = stage_ops(stage_fn, remat)
    grad = jax.random.normal(jax.random.key(9), x.shape, x.dtype)

    @jax.jit
    def run(params, x, grad):
        _, residuals = ops.forward(params, x)
        x_like = jnp.zeros_like(x)
        whole = ops.backward(params, residuals, x_like, grad)
        d_x, weight_residuals = ops.input_grad(params, residuals, x_like, grad)
        d_params = ops.weight_grad(params, residuals, x_like, weight_residuals)
        return whole, (d_params, d_x), weight_residuals

    return run(params, x, grad)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize("name", sorted(STAGES))
def test_input_and_weight_grads_equal_the_full_backward(name, remat):
    stage_fn, params, x = STAGES[name]()
    whole, split, weight_residuals = _b_and_split(stage_fn, params, x, remat)
    assert_trees_close(split, whole, rtol=1e-6)
    # And B itself is the gradient of the stage (the vjp of its sum against a fixed direction).
    grad = jax.random.normal(jax.random.key(9), x.shape, x.dtype)
    reference = jax.grad(lambda p, a: jnp.vdot(stage_fn(p, a), grad), argnums=(0, 1))(params, x)
    assert_trees_close(whole, reference, rtol=1e-5)
    assert weight_residuals, "W needs something from I (at least the output gradient's cotangents)"


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize("name", ["gpt-layered", "opaque-mlp"])
def test_input_plus_weight_flops_equal_the_full_backward(name, remat):
    """No equation of B runs twice: XLA's FLOP counts of I and W add up to B's (within 2%)."""
    stage_fn, params, x = STAGES[name]()
    costs = measure_costs(stage_fn, params, x, remat=remat)
    f, b, i, w = (costs.flops[k] for k in ("f", "b", "i", "w"))
    assert b > f > 0 and i > 0 and w > 0
    assert (i + w) / b <= 1.02, costs  # (it can be a little below 1: XLA fuses the halves differently)


@pytest.mark.parametrize("name", ["gpt-layered", "opaque-mlp"])
def test_weight_grad_never_recomputes_the_forward(name):
    """Under full remat, I recomputes the forward and hands W what it needs: W costs what it costs without remat."""
    stage_fn, params, x = STAGES[name]()
    none = measure_costs(stage_fn, params, x, remat="none")
    full = measure_costs(stage_fn, params, x, remat="full")
    assert full.flops["w"] == pytest.approx(none.flops["w"], rel=0.01)
    assert full.flops["i"] > none.flops["i"]  # the recomputation happens (once) in I


def test_weight_residuals_are_the_cotangents_of_the_weight_consuming_ops():
    """y = tanh(x @ w1) @ w2: W needs x and tanh(.) (stashed by F) and the cotangents at the two matmul outputs."""
    params = _mlp_params(jax.random.key(0), 1)
    x = jnp.ones((BATCH, SEQ, WIDTH))
    costs = measure_costs(lambda p, a: jnp.tanh(a @ p[0]["w1"]) @ p[0]["w2"], params, x)
    assert costs.weight_residual_bytes == 4 * BATCH * SEQ * (HIDDEN + WIDTH)


def test_stage_costs_give_a_simulator_cost_in_units_of_forward():
    stage_fn, params, x = _gpt_stage()
    costs = measure_costs(stage_fn, params, x, remat="none")
    cost = costs.cost(comm=0.1)
    assert cost.f == 1.0 and cost.comm == 0.1
    assert cost.b == pytest.approx(costs.flops["b"] / costs.flops["f"])
    assert cost.i + cost.w == pytest.approx(cost.b, rel=0.02)
    assert cost.weight_residuals == pytest.approx(costs.weight_residual_bytes / costs.stash_bytes)
    assert "(I + W) / B = 1.00" in str(costs)
    with pytest.raises(ValueError, match="time=True"):
        costs.cost(measure="seconds")
    timed = measure_costs(stage_fn, params, x, time=True, repeats=1)
    assert set(timed.seconds) == {"f", "b", "i", "w"} and all(v > 0 for v in timed.seconds.values())
    assert timed.cost(measure="seconds").f == 1.0


def test_measure_costs_rejects_bad_repeats():
    stage_fn, params, x = _mlp_stage()
    with pytest.raises(ValueError, match="repeats"):
        measure_costs(stage_fn, params, x, time=True, repeats=0)


def test_peak_memory_counts_weight_residuals_between_i_and_w():
    row = [Action(0, Op.F, 0), Action(0, Op.F, 1), Action(0, Op.I, 0), Action(0, Op.W, 0)]
    row += [Action(0, Op.I, 1), Action(0, Op.W, 1)]
    schedule = Schedule(num_devices=1, num_microbatches=2, placement=(0,), actions=(row,), name="hand")
    assert peak_memory(schedule, 0.0) == (2.0,)
    assert peak_memory(schedule, 0.5) == (2.5,)  # two stashes and one I's weight residuals


def test_lockstep_peak_memory_includes_the_split_backward():
    schedule = build("1f1b", 4, 8)
    cost = Cost(weight_residuals=0.25)
    whole = simulate(schedule, cost, "lockstep", split_backward=False)
    split = simulate(schedule, cost, "lockstep", split_backward=True)
    assert whole.peak_memory == whole.peak_activations
    assert split.peak_activations == whole.peak_activations
    assert split.peak_memory == tuple(a + 0.25 for a in whole.peak_activations)


def test_best_split_follows_the_costs():
    assert best_split(build("1f1b", 4, 16)) is True  # unit costs: mixed F/B ticks cost a B
    assert best_split(build("zb_h1", 4, 16)) is False  # already written with I and W
    # An I as expensive as B (the split two vjps make) never pays off.
    assert best_split(build("1f1b", 4, 16), Cost(f=1, b=2, i=2, w=1)) is False


def test_split_backward_option_is_checked():
    mesh = jax.make_mesh((2,), ("stage",), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="split_backward"):
        jpipe.value_and_grad(
            opaque_mlp, lambda lp, y, t: jnp.sum(y), schedule=build("1f1b", 2, 2), mesh=mesh, split_backward="yes"
        )


def test_measured_stage_costs_compare_across_virtual():
    """A measured device stage of 2 layers read as `per="device"` (the default) and one of its
    chunks (1 layer) read as `per="chunk"` describe the same model: the 2-chunk schedule's makespans
    agree once the chunk's units (its F) are converted to the device stage's."""
    params = _mlp_params(jax.random.key(1), 2)
    x = jax.random.normal(jax.random.key(2), (BATCH, SEQ, WIDTH))
    device = measure_costs(opaque_mlp, params, x)
    chunk = measure_costs(opaque_mlp, params[:1], x)
    unit = chunk.flops["f"] / device.flops["f"]  # one chunk's F in device-stage forwards
    assert unit == pytest.approx(0.5, rel=0.02)
    for mode in ("async", "lockstep"):
        one = simulate(build("1f1b", 4, 8), device.cost(), mode).makespan
        two = simulate(build("interleaved_1f1b", 4, 8, 2), device.cost(), mode).makespan
        per_chunk = simulate(build("interleaved_1f1b", 4, 8, 2), chunk.cost(per="chunk"), mode).makespan
        assert two == pytest.approx(per_chunk * unit, rel=0.02)
        assert two < one  # the same model: interleaving shrinks the bubble
    assert device.cost().per == "device" and chunk.cost(per="chunk").per == "chunk"
