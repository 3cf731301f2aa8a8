"""Tiny GPT configs, the parity matrix and its compiled steps, shared by test_models and test_parallel.

Compiled programs are cached per case, so a case's step is compiled once for its parity, placement
and HLO tests together.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import make_mesh_or_skip
from flax import nnx

from jpipe import schedules
from jpipe.models import GPTConfig, PipelinedLM, params_of, reference_value_and_grad
from jpipe.models.moe import lm_class
from jpipe.parallel import MESH_AXES, ShardingRules

NUM_MICROBATCHES, BATCH = 4, 4
# 4 heads of 4 so that heads (and vocab, MLP width) divide over tensor = 4.
TINY = GPTConfig(vocab_size=64, seq_len=8, d_model=16, num_heads=4, num_layers=6, positions="learned")
TINY_ROPE_TIED = dataclasses.replace(TINY, num_layers=8, positions="rope", tie_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity case: mesh (data, stage, tensor), schedule, model, FSDP on/off."""

    mesh: tuple[int, int, int]
    schedule: str
    virtual: int
    config: GPTConfig
    fsdp: bool

    @property
    def id(self) -> str:
        fsdp = "-fsdp" if self.fsdp else ""
        return f"{self.schedule}-mesh{'x'.join(map(str, self.mesh))}-L{self.config.num_layers}{fsdp}"


# Every mesh shape and every schedule once; FSDP on two meshes; 6 layers on 4 stages twice.
CASES = [
    Case((1, 4, 1), "1f1b", 1, TINY, fsdp=False),  # stages of 2, 2, 1, 1 layers
    Case((2, 2, 2), "zb_h1", 1, TINY_ROPE_TIED, fsdp=True),
    Case((2, 4, 1), "interleaved_1f1b", 2, TINY_ROPE_TIED, fsdp=True),  # 8 stages of 1 layer
    Case((1, 2, 4), "zbv", 2, TINY, fsdp=False),  # V placement, stages of 2, 2, 1, 1 layers
]
CASE_IDS = [case.id for case in CASES]


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    return make_mesh_or_skip(shape, MESH_AXES, (jax.sharding.AxisType.Auto,) * 3)


@functools.cache
def model_params(config: GPTConfig, seed: int = 0) -> dict:
    """Random parameters shaped like `GPT(config)`'s (model layout, one device).

    Drawn with numpy: compiling the model's own initialiser costs seconds on CPU (tested once, in
    test_models). Norm scales are 1 + noise so that they matter for the gradients.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: params_of(lm_class(config)(config, rngs=nnx.Rngs(0))))

    def draw(path, leaf):
        keystr = jax.tree_util.keystr(path)
        is_scale = keystr.endswith("['scale']")
        if keystr == "['head']['out']":  # [V, D], drawn as the [D, V] it was stored as before
            return jnp.asarray(rng.normal(size=leaf.shape[::-1]).astype(np.float32).T / np.sqrt(leaf.shape[0]))
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if is_scale else noise / np.sqrt(leaf.shape[-1]))

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def batch(config: GPTConfig) -> tuple[jax.Array, jax.Array]:
    """tokens, targets: int32 `[m, B, T]`, the targets being the next tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (NUM_MICROBATCHES, BATCH, config.seq_len + 1))
    return jnp.asarray(ids[..., :-1], jnp.int32), jnp.asarray(ids[..., 1:], jnp.int32)


@functools.cache
def reference_step(config: GPTConfig):
    """The jitted unpipelined loss-and-gradient function (compiled once per config)."""
    return jax.jit(reference_value_and_grad(config))


@functools.cache
def reference(config: GPTConfig) -> tuple[jax.Array, dict]:
    return reference_step(config)(model_params(config), *batch(config))


@functools.cache
def pipeline(case: Case) -> PipelinedLM:
    schedule = schedules.build(case.schedule, case.mesh[1], NUM_MICROBATCHES, case.virtual)
    return PipelinedLM(case.config, schedule=schedule, mesh=mesh_of(case.mesh), rules=ShardingRules(fsdp=case.fsdp))


@functools.cache
def placed_params(case: Case) -> dict:
    return pipeline(case).place(model_params(case.config))


@functools.cache
def compiled_step(case: Case):
    """The case's step, lowered and compiled once (`.as_text()` gives its HLO)."""
    step = jax.jit(pipeline(case).value_and_grad())
    return step.lower(placed_params(case), *batch(case.config)).compile()
