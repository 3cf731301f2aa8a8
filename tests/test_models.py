"""The GPT model, its pipeline parts, stage layouts, and the pipelined LM step == the unpipelined model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_cases import (
    CASE_IDS,
    CASES,
    TINY,
    batch,
    compiled_step,
    mesh_of,
    model_params,
    pipeline,
    placed_params,
    reference_step,
)
from lm_cases import reference as reference_of
from pipeline_cases import assert_trees_close

from jpipe import schedules
from jpipe.models import GPT, GPTConfig, LMParts, PipelinedLM, StageLayout, logical_axes, masked_layer


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pipelined_lm_matches_unpipelined(case):
    """Loss and every parameter gradient equal the one-device model's (relative 1e-5), in float64.

    In float32 both sides are 5e-6 to 1.1e-5 of each leaf's largest entry away from the float64
    result (CPU matmul kernels round partial sums differently: jax 0.10 vs 0.12), which is the
    tolerance itself; in float64 they agree to about 1e-14, so any difference is the pipeline's.
    """
    params32 = model_params(case.config)  # drawn outside x64: the cached float32 parameters other tests use
    with jax.enable_x64(True):
        config = dataclasses.replace(case.config, compute_dtype="float64", param_dtype="float64")
        pipe = pipeline(dataclasses.replace(case, config=config))
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params32)
        loss, grads = jax.jit(pipe.value_and_grad())(pipe.place(params), *batch(config))
        ref_loss, ref_grads = reference_step(config)(params, *batch(config))
        assert loss.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
        assert_trees_close(loss, ref_loss)
        assert_trees_close(pipe.to_model(grads), ref_grads)
    if pipe.layout.padded:  # padding slots: exactly zero gradient
        assert pipe.padding.any()
        for leaf in jax.tree.leaves(grads["blocks"]):
            assert np.all(np.asarray(leaf)[pipe.padding] == 0)


def test_uneven_layers_train_like_the_reference():
    """6 layers on 4 stages: three SGD steps give the reference's losses; padding slots stay zero."""
    case = CASES[0]
    pipe, step = pipeline(case), compiled_step(case)
    assert pipe.layout.layer_counts == (2, 2, 1, 1)
    tokens, targets = batch(case.config)
    params, ref_params = placed_params(case), model_params(case.config)
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.5 * b, p, g)  # noqa: E731
    losses = []
    for _ in range(3):
        loss, grads = step(params, tokens, targets)
        ref_loss, ref_grads = reference_step(case.config)(ref_params, tokens, targets)
        assert_trees_close(loss, ref_loss)
        params, ref_params = sgd(params, grads), sgd(ref_params, ref_grads)
        losses.append(float(loss))
    assert losses[2] < losses[0]
    assert_trees_close(pipe.to_model(params), ref_params)
    assert all(np.all(np.asarray(a)[pipe.padding] == 0) for a in jax.tree.leaves(params["blocks"]))


def test_bfloat16_compute_is_close_to_float32():
    """bfloat16 matmuls, float32 parameters, residual stream and loss: near the float32 reference.

    A bfloat16 residual stream (fp32_residual=False) is not run here: the executor's bfloat16
    `psum` of input gradients in its partial-manual shard_map aborts the XLA:CPU compiler.
    """
    config = dataclasses.replace(TINY, compute_dtype="bfloat16", fp32_residual=True)
    mesh = mesh_of((2, 2, 1))
    pipe = PipelinedLM(config, schedule=schedules.build("1f1b", 2, 4), mesh=mesh)
    params = pipe.place(model_params(TINY))
    loss, grads = jax.jit(pipe.value_and_grad())(params, *batch(TINY))
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    ref_loss, ref_grads = reference_of(TINY)
    assert_trees_close(loss, ref_loss, rtol=1e-2)
    for leaf, ref_leaf in zip(jax.tree.leaves(pipe.to_model(grads)), jax.tree.leaves(ref_grads)):
        a, e = np.asarray(leaf).ravel(), np.asarray(ref_leaf).ravel()
        assert a @ e / (np.linalg.norm(a) * np.linalg.norm(e)) > 0.98  # same direction, bfloat16 noise


def _attention_score_dtypes(jaxpr, size: int) -> set:
    """Dtypes of the dot_generals in `jaxpr` (and its sub-jaxprs) with `size` elements: the `[B, H, T, T]` scores."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.size == size:
            found.add(eqn.outvars[0].aval.dtype)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _attention_score_dtypes(inner, size)
    return found


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_float32_attention_off_computes_scores_in_the_compute_dtype(family):
    """float32_attention=False: bfloat16 scores and softmax (MaxText's float32_logits: false), logits still close."""
    tokens = batch(TINY)[0][0]
    logits = {}
    for wide in (True, False):
        config = dataclasses.replace(TINY, family=family, compute_dtype="bfloat16", float32_attention=wide)
        model = GPT(config, rngs=nnx.Rngs(0))
        graph, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda st, t, graph=graph: nnx.merge(graph, st)(t))(state, tokens).jaxpr
        scores = tokens.shape[0] * TINY.num_heads * TINY.seq_len**2  # no other matmul output has this size
        assert _attention_score_dtypes(jaxpr, scores) == {jnp.dtype(jnp.float32 if wide else jnp.bfloat16)}
        logits[wide] = np.asarray(model(tokens))
    assert logits[False].dtype == np.float32
    np.testing.assert_allclose(logits[False], logits[True], atol=5e-2)
    with pytest.raises(ValueError, match="float32_attention"):
        dataclasses.replace(TINY, float32_attention="no")


def test_init_creates_the_model_directly_sharded():
    pipe = pipeline(CASES[1])  # 8 layers on 2 stages, tied embeddings
    created = pipe.init(seed=0)
    assert jax.tree.map(lambda a: a.sharding.spec, created) == jax.tree.map(lambda s: s.spec, pipe.shardings())
    params = pipe.to_model(created)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, model_params(pipe.config))
    np.testing.assert_array_equal(params["head"]["norm"]["scale"], 1.0)
    wq = np.asarray(params["blocks"]["attention"]["wq"])
    assert not np.allclose(wq[0], wq[1])  # split_rngs: each layer drew its own values
    assert 0.015 < wq.std() < 0.025  # init_std 0.02


class TestModel:
    def test_blocks_are_stacked_on_a_layer_axis_with_distinct_layers(self):
        model = nnx.eval_shape(lambda: GPT(TINY, rngs=nnx.Rngs(0)))
        params, names = nnx.to_pure_dict(nnx.state(model, nnx.Param)), logical_axes(model)
        for leaf, axes in zip(jax.tree.leaves(params["blocks"]), jax.tree.leaves(names["blocks"], is_leaf=_is_axes)):
            assert leaf.shape[0] == TINY.num_layers and axes[0] == "layer" and len(axes) == leaf.ndim
        assert names["blocks"]["attention"]["wq"] == ("layer", "embed", "heads", "head_dim")
        assert names["blocks"]["mlp"]["w_down"] == ("layer", "mlp", "embed")

    def test_parts_run_the_module(self):
        """embed -> layer_fn per layer -> head_loss == GPT.loss."""
        config = dataclasses.replace(TINY, positions="rope", tie_embeddings=True, num_layers=2)
        parts = LMParts(config)
        tokens, targets = (t[0] for t in batch(config))

        graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))

        @jax.jit
        def both(params, tokens, targets):
            model = nnx.merge(graphdef, params)
            x = parts.embed(params, tokens)
            for layer in range(config.num_layers):
                x = parts.layer_fn(jax.tree.map(lambda a, i=layer: a[i], params["blocks"]), x)
            return parts.head_loss(parts.loss_params(params), x, targets), model.loss(tokens, targets), model(tokens)

        from_parts, from_module, logits = both(model_params(config), tokens, targets)
        np.testing.assert_allclose(from_parts, from_module, rtol=1e-6)
        assert logits.shape == (tokens.shape[0], config.seq_len, config.vocab_size)

    def test_config_derived_sizes(self):
        config = GPTConfig(d_model=64, num_heads=4, mlp_ratio=3, compute_dtype="bfloat16", fp32_residual=True)
        assert (config.head_dim, config.d_ff) == (16, 192)
        assert (config.dtype, config.residual_dtype, config.params_dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"d_model": 18}, "must divide by num_heads"),
            ({"num_layers": 0}, "num_layers"),
            ({"positions": "alibi"}, "positions"),
            ({"compute_dtype": "float16"}, "compute_dtype"),
            ({"d_model": 12, "num_heads": 4, "positions": "rope"}, "even head_dim"),
        ],
    )
    def test_config_checks(self, change, message):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(TINY, **change)

    def test_sequence_longer_than_config_is_rejected(self):
        model = nnx.eval_shape(lambda: GPT(TINY, rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match="exceeds GPTConfig.seq_len"):
            model(jnp.zeros((1, TINY.seq_len + 1), jnp.int32))


class TestStageLayout:
    def test_balanced_counts(self):
        assert StageLayout.balanced(6, 4).layer_counts == (2, 2, 1, 1)
        assert StageLayout.balanced(8, 4).layer_counts == (2, 2, 2, 2)
        assert not StageLayout.balanced(8, 4).padded and StageLayout.balanced(6, 4).padded
        np.testing.assert_array_equal(StageLayout((2, 1)).slot_layer, [[0, 1], [2, -1]])

    def test_round_trip_and_zero_padding(self):
        layout = StageLayout((1, 3, 0, 2))
        blocks = {"w": jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2) + 1}
        stages = layout.to_stages(blocks)
        assert stages["w"].shape == (4, 3, 2)
        np.testing.assert_array_equal(np.asarray(stages["w"])[layout.mask == 0], 0)
        np.testing.assert_array_equal(stages["w"][1, 2], blocks["w"][3])
        np.testing.assert_array_equal(layout.from_stages(stages)["w"], blocks["w"])

    def test_masked_layer_is_the_identity_with_zero_gradient(self):
        layer = masked_layer(lambda p, x: x * p["w"] + 1.0)
        x = jnp.arange(3.0)

        def out(active, w):
            return jnp.sum(layer({"layer": {"w": w}, "active": active}, x) ** 2)

        np.testing.assert_array_equal(layer({"layer": {"w": 2.0}, "active": jnp.float32(0)}, x), x)
        assert float(jax.grad(out, argnums=1)(jnp.float32(0), jnp.float32(2))) == 0.0
        assert float(jax.grad(out, argnums=1)(jnp.float32(1), jnp.float32(2))) != 0.0

    def test_errors(self):
        with pytest.raises(ValueError, match="at least one layer"):
            StageLayout((0, 0))
        with pytest.raises(ValueError, match="expected a leading layer axis of 3"):
            StageLayout((1, 2)).to_stages({"w": jnp.zeros((4, 2))})
        mesh = mesh_of((1, 2, 1))
        with pytest.raises(ValueError, match=r"layout: 5 layers .* the model has 6"):
            PipelinedLM(TINY, schedule=schedules.build("1f1b", 2, 4), mesh=mesh, layout=(3, 2))
        with pytest.raises(ValueError, match=r"layout: 3 stages .* the schedule has 2"):
            PipelinedLM(TINY, schedule=schedules.build("1f1b", 2, 4), mesh=mesh, layout=(2, 2, 2))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)
