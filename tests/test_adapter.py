"""`PipelinedModel` pipelines a model defined here, not in jpipe: loss and every gradient == the model's own.

The model is what a user brings: `nnx.Embed` -> blocks (RMSNorm + GELU MLP, partitioning metadata
via `nnx.with_partitioning`) created stacked with `nnx.vmap` -> `nnx.RMSNorm` -> `nnx.Linear` head
(or the embedding's `attend` when tied) -> cross-entropy. The reference is the unpipelined model
(its own `nnx.scan` over the blocks) under `jax.value_and_grad`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh_or_skip
from flax import nnx

import jpipe
from jpipe import schedules
from jpipe.models import PipelinedLM, PipelinedModel
from jpipe.parallel import DATA, STAGE, TENSOR, ShardingRules

VOCAB, DIM, HIDDEN, SEQ, MICROBATCHES, BATCH = 32, 8, 16, 4, 4, 4


def _partitioned(names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names, eager_sharding=False)


class MLPBlock(nnx.Module):
    """`x + down(gelu(up(norm(x))))`, `[B, T, D] -> [B, T, D]`."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, HIDDEN, kernel_init=_partitioned(("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(HIDDEN, DIM, kernel_init=_partitioned(("mlp", "embed")), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class TinyLM(nnx.Module):
    """Token ids `[B, T]` -> logits `[B, T, VOCAB]`; `num_layers` blocks stacked on a leading axis."""

    def __init__(self, num_layers: int, tied: bool, *, rngs: nnx.Rngs):
        self.tied = tied
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> MLPBlock:
            return MLPBlock(rngs=rngs)

        self.blocks = create(rngs)
        self.norm = nnx.RMSNorm(DIM, rngs=rngs)
        self.head = None if tied else nnx.Linear(DIM, VOCAB, rngs=rngs)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final activations `[B, T, D]` -> logits `[B, T, VOCAB]`."""
        x = self.norm(x)
        return self.embed.attend(x) if self.tied else self.head(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block: MLPBlock, x: jax.Array) -> jax.Array:
            return block(x)

        return self.logits(run(self.blocks, self.embed(tokens)))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])


def head_loss(model: TinyLM, x: jax.Array, targets: jax.Array) -> jax.Array:
    return cross_entropy(model.logits(x), targets)


@functools.cache
def model(num_layers: int, tied: bool) -> TinyLM:
    """The model, with norm scales and biases made non-trivial so that their gradients matter."""
    lm = TinyLM(num_layers, tied, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)

    def perturb(path, a):
        if jax.tree_util.keystr(path).endswith(("['scale']", "['bias']")):
            return a + jnp.asarray(0.1 * rng.normal(size=a.shape).astype(np.float32))
        return a

    state = nnx.state(lm, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(perturb, nnx.to_pure_dict(state)))
    nnx.update(lm, state)
    return lm


@functools.cache
def batch() -> tuple[jax.Array, jax.Array]:
    ids = np.random.default_rng(0).integers(0, VOCAB, (MICROBATCHES, BATCH, SEQ + 1))
    return jnp.asarray(ids[..., :-1], jnp.int32), jnp.asarray(ids[..., 1:], jnp.int32)


@functools.cache
def reference(num_layers: int, tied: bool) -> tuple[jax.Array, dict]:
    """Loss and gradients of the unpipelined model (mean over microbatches of equal size)."""
    graphdef, state = nnx.split(model(num_layers, tied))

    def loss(params, tokens, targets):
        lm = nnx.merge(graphdef, params)
        return cross_entropy(lm(tokens.reshape(-1, SEQ)), targets.reshape(-1, SEQ))

    return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(state), *batch())


@dataclasses.dataclass(frozen=True)
class Case:
    schedule: str
    mesh: tuple[tuple[str, int], ...]
    virtual: int = 1
    num_layers: int = 4
    tied: bool = False
    fsdp: bool = False

    @property
    def id(self) -> str:
        mesh = "x".join(f"{name}{size}" for name, size in self.mesh)
        return f"{self.schedule}-{mesh}-L{self.num_layers}{'-tied' if self.tied else ''}{'-fsdp' if self.fsdp else ''}"


CASES = [
    Case("1f1b", ((STAGE, 4),), num_layers=8),
    Case("interleaved_1f1b", ((STAGE, 2),), virtual=2),
    Case("zbv", ((STAGE, 2),), virtual=2, num_layers=6, tied=True),  # uneven: stages of 2, 2, 1, 1 layers
    Case("1f1b", ((DATA, 2), (STAGE, 2), (TENSOR, 2)), fsdp=True),  # data + tensor (from metadata) + FSDP
]


@functools.cache
def pipeline(case: Case) -> PipelinedModel:
    names, sizes = zip(*case.mesh)
    mesh = make_mesh_or_skip(sizes, names, (jax.sharding.AxisType.Auto,) * len(names))
    stages = dict(case.mesh)[STAGE]
    return PipelinedModel(
        model(case.num_layers, case.tied),
        blocks="blocks",
        prologue=lambda lm, tokens: lm.embed(tokens),
        loss=head_loss,
        schedule=schedules.build(case.schedule, stages, MICROBATCHES, case.virtual),
        mesh=mesh,
        rules=ShardingRules(fsdp=case.fsdp),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_pipelined_model_matches_the_unpipelined_model(case):
    pipe = pipeline(case)
    params = pipe.place(model(case.num_layers, case.tied))
    loss, grads = jax.jit(pipe.value_and_grad())(params, *batch())
    want_loss, want_grads = reference(case.num_layers, case.tied)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = pipe.to_model(grads)
    assert jax.tree.structure(got) == jax.tree.structure(want_grads)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # Grads are stored like params: blocks [S, slots, ...] over stage, padding slots zero.
    same = jax.tree.map(lambda g, want: g.sharding.is_equivalent_to(want, g.ndim), grads, pipe.shardings())
    assert all(jax.tree.leaves(same))
    padding = pipe.padding
    for leaf in jax.tree.leaves(grads["blocks"]):
        assert leaf.shape[:2] == padding.shape
        assert not np.any(np.asarray(leaf)[padding])
    assert padding.any() == (case.num_layers == 6)  # 6 layers on 4 stages: padded


def test_shardings_follow_the_partitioning_metadata():
    pipe = pipeline(CASES[3])  # data, stage, tensor; FSDP
    specs = jax.tree.map(lambda s: s.spec, pipe.shardings(gathered=True))
    assert specs["blocks"]["up"]["kernel"] == jax.sharding.PartitionSpec(STAGE, None, None, TENSOR)
    assert specs["blocks"]["down"]["kernel"] == jax.sharding.PartitionSpec(STAGE, None, TENSOR, None)
    assert specs["blocks"]["norm"]["scale"] == jax.sharding.PartitionSpec(STAGE, None, None)
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec(None, None)  # no metadata: replicated
    fsdp = jax.tree.map(lambda s: s.spec, pipe.shardings())
    assert fsdp["blocks"]["up"]["kernel"] == jax.sharding.PartitionSpec(STAGE, None, DATA, TENSOR)
    assert jax.tree.map(lambda a: a.shape, pipe.abstract_params()["blocks"]["up"]["kernel"]) == (2, 2, DIM, HIDDEN)


def test_round_trip_and_the_module_back():
    pipe = pipeline(CASES[2])  # uneven, V placement
    lm = model(6, True)
    params = pipe.place(lm)
    want = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, pipe.to_model(params), want)
    tokens = batch()[0][0]
    np.testing.assert_allclose(pipe.to_module(params)(tokens), lm(tokens), rtol=1e-6)


def test_stage_costs_count_every_layer_of_a_chunk():
    """XLA counts a scan's body once: the measured FLOPs are scaled to the chunk's layers.

    Two layers per chunk cost twice one layer's (the pinned behaviour of `cost_analysis()` on
    jax 0.10 and 0.12; should a JAX count every iteration, this fails rather than double counting).
    """
    mesh = make_mesh_or_skip((2,), (STAGE,))
    flops = {}
    for layers in (2, 4):
        pipe = PipelinedModel(
            model=model(layers, False),
            blocks="blocks",
            prologue=lambda lm, tokens: lm.embed(tokens),
            loss=head_loss,
            schedule=schedules.build("1f1b", 2, MICROBATCHES),
            mesh=mesh,
        )
        flops[layers] = pipe.stage_costs(jax.ShapeDtypeStruct((BATCH, SEQ, DIM), jnp.float32)).flops
    for op in ("f", "b", "i", "w"):
        assert flops[4][op] == pytest.approx(2 * flops[2][op], rel=0.01), op


def test_pipelined_lm_is_the_adapter_on_gpt():
    assert "PipelinedModel" in jpipe.__all__ and jpipe.PipelinedModel is PipelinedModel
    assert isinstance(PipelinedLM.adapter, functools.cached_property)


class TestErrors:
    def _make(self, **change):
        mesh = make_mesh_or_skip((2,), (STAGE,))
        args = dict(
            model=model(4, False),
            blocks="blocks",
            prologue=lambda lm, tokens: lm.embed(tokens),
            loss=head_loss,
            schedule=schedules.build("1f1b", 2, MICROBATCHES),
            mesh=mesh,
        )
        return PipelinedModel(**{**args, **change})

    def test_blocks_must_exist(self):
        with pytest.raises(ValueError, match=r"blocks: TinyLM has no attribute 'layers'"):
            self._make(blocks="layers")
        with pytest.raises(ValueError, match=r"blocks: TinyLM has no attribute 'blocks.inner'"):
            self._make(blocks="blocks.inner")

    def test_blocks_must_be_a_stacked_module(self):
        with pytest.raises(ValueError, match=r"blocks: 'tied' is a bool, not an nnx.Module"):
            self._make(blocks="tied")
        with pytest.raises(ValueError, match=r"blocks: the parameters of 'head' are not stacked"):
            self._make(blocks="head")

    def test_layers_must_match_the_layout(self):
        with pytest.raises(ValueError, match=r"layout: 6 layers \(3, 3\), the model has 4"):
            self._make(layout=(3, 3))
        with pytest.raises(ValueError, match=r"layout: 3 stages"):
            self._make(layout=(2, 1, 1))

    def test_functions_mesh_and_seed(self):
        with pytest.raises(ValueError, match=r"prologue: expected a function"):
            self._make(prologue=None)
        with pytest.raises(ValueError, match=r"mesh: no 'stage' axis"):
            self._make(mesh=make_mesh_or_skip((2,), (DATA,)))
        with pytest.raises(ValueError, match=r"seed: the model is an instance"):
            self._make().init(seed=1)
