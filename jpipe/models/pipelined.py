"""The full LM gradient step on a (data, stage, tensor) mesh: embedding -> pipelined blocks -> head.

    pipe = PipelinedLM(config, schedule=schedule, mesh=mesh, rules=ShardingRules(fsdp=True))
    params = pipe.init(seed=0)                       # pipeline layout, placed on the mesh
    loss, grads = jax.jit(pipe.value_and_grad())(params, tokens, targets)   # tokens [m, B, T]

How each kind of parallelism enters:
- pipeline: the blocks run under `jpipe.value_and_grad` with the model's block as a
  `jpipe.layered` stage. Block parameters are stored `[S, layers_per_stage, ...]` sharded over
  `stage`, rows in *device-major order* (row `d * v + k` is device d's k-th stage, see
  `jpipe.pipeline.StagePlacement`), so each device stores exactly the stages the schedule places
  on it, also for interleaved (loop) and V placements.
- data: microbatches are split over `data` on their batch dimension (the executor's `data_axes`).
- the ends of the model run inside the pipeline: the embedding is the executor's `prologue` (run on
  the device holding stage 0 as part of each microbatch's first forward, its gradient accumulated
  there), the head and loss are its `loss_fn` (on the device holding the last stage). Only token ids
  `[m, B, T]` enter the pipeline, so nothing activation-sized is replicated over `stage` or reduced
  across it, and per-device memory does not grow with the number of microbatches.
- tensor (Megatron): parameters carry `tensor` shardings from the rules (heads and MLP width), the
  compiler partitions the blocks and inserts the reductions; no model code changes.
- FSDP (`ShardingRules(fsdp=True)`): parameters are also stored split over `data` (the embedding
  and head over `data` and `stage`); entering the executor's `shard_map` (replicated over its
  manual axes) gathers them, once per step, before the tick loop. Gradients come back all-reduced
  and are re-split (a slice) to the parameters' sharding.

Block parameters go to the executor in their storage (device) order (`stage_order="device"`), so
with several stages per device (interleaved, ZB-V) no stage parameter or gradient moves between
devices either.

Schedules with replicas (DualPipe, BitPipe: `Schedule.model_stage`) split the layers into
`schedule.num_model_stages` model stages; the pipeline layout stores one copy of a model stage's
blocks per logical stage computing it (`[S, ...]` rows, device-major), and each copy's gradient is
the sum over the copies (`StagePlacement.sum_replicas`), so the optimizer keeps them equal. The model
layout (`to_model`, checkpoints) holds each model stage once. A global-norm gradient clip over the
pipeline layout counts a replicated block once per copy. Routes (SkipPipe) need nothing here: a
microbatch runs the embedding where it enters and the head where it leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jpipe.models.config import GPTConfig
from jpipe.models.gpt import GPT, block_class, logical_axes, params_of
from jpipe.models.layout import StageLayout, as_layout, masked_layer
from jpipe.models.parts import LMParts
from jpipe.parallel.mesh import DATA, STAGE
from jpipe.parallel.rules import ShardingRules
from jpipe.pipeline import executor
from jpipe.pipeline.costs import StageCosts, measure_costs
from jpipe.pipeline.layout import StagePlacement
from jpipe.pipeline.stage import layered
from jpipe.schedules.ir import Schedule
from jpipe.schedules.simulate import Cost

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PipelinedLM:
    """`GPT(config)` trained with `schedule` on `mesh` under `rules`.

    Attributes:
      config: the model.
      schedule: any schedule the executor runs; its `num_model_stages` model stages share the layers
        (`num_stages` without replicas).
      mesh: a mesh with a `stage` axis of `schedule.num_devices` devices (see
        `jpipe.parallel.make_mesh`); a `data` axis, if present, splits each microbatch's batch.
      rules: logical -> mesh axes and FSDP on/off.
      layout: layers per logical stage: a `StageLayout`, explicit counts, or None (balanced).
      remat, split_backward, cost, overlap_sends: passed to `jpipe.value_and_grad` (`cost` decides
        the "auto" split and overlap; `stage_costs()` measures it for this model).
    """

    config: GPTConfig
    schedule: Schedule
    mesh: jax.sharding.Mesh
    rules: ShardingRules = dataclasses.field(default_factory=ShardingRules)
    layout: StageLayout | Sequence[int] | None = None
    remat: str | Callable | None = "none"
    split_backward: bool | str = "auto"
    cost: Cost | None = None
    overlap_sends: bool | str = "auto"

    def __post_init__(self):
        if STAGE not in self.mesh.shape:
            raise ValueError(f"mesh: no {STAGE!r} axis (axes: {dict(self.mesh.shape)}); see jpipe.parallel.make_mesh")
        layout = as_layout(self.layout, self.config.num_layers, self.schedule.num_model_stages)
        object.__setattr__(self, "layout", layout)

    @property
    def parts(self) -> LMParts:
        return LMParts(self.config)

    @property
    def data_axes(self) -> tuple[str, ...]:
        return (DATA,) if DATA in self.mesh.shape else ()

    # Parameters: structure, logical axes, shardings, creation.

    def logical_axes(self) -> PyTree:
        """Logical axis names of the pipeline-layout parameters (blocks `("stage", "layer", ...)`)."""
        model = nnx.eval_shape(lambda: GPT(self.config, rngs=nnx.Rngs(0)))
        names = logical_axes(model)
        names["blocks"] = jax.tree.map(
            lambda axes: ("stage", *axes), names["blocks"], is_leaf=lambda x: isinstance(x, tuple)
        )
        return names

    def abstract_params(self) -> PyTree:
        """`jax.ShapeDtypeStruct`s of the pipeline-layout parameters."""
        return jax.eval_shape(lambda: self.to_pipeline(params_of(GPT(self.config, rngs=nnx.Rngs(0)))))

    def shardings(self, *, gathered: bool = False) -> PyTree:
        """`NamedSharding` of every pipeline-layout parameter on the mesh.

        With `gathered`, the sharding parameters have where they are used: without FSDP's split.
        """
        rules = dataclasses.replace(self.rules, fsdp=False) if gathered else self.rules
        return rules.param_shardings(self.logical_axes(), self.abstract_params(), self.mesh)

    @property
    def placement(self) -> StagePlacement:
        """Where the schedule puts each logical stage; block rows are stored in its device-major order."""
        return StagePlacement.of(self.schedule)

    @property
    def padding(self) -> np.ndarray:
        """`[S, layers_per_stage]` bool, rows in storage order: True at padding slots of the blocks."""
        return self.placement.model_to_device(self.layout.mask) == 0

    def to_pipeline(self, model_params: PyTree) -> PyTree:
        """Model-layout params (blocks `[L, ...]`) -> pipeline layout (blocks `[S, slots, ...]`, device-major).

        With replicas, each logical stage's rows are a copy of its model stage's layers.
        """
        stages = self.layout.to_stages(model_params["blocks"])  # [K, slots, ...]
        return {**model_params, "blocks": self.placement.model_to_device(stages)}

    def to_model(self, params: PyTree) -> PyTree:
        """Pipeline layout -> model layout (e.g. to compare with, or load into, `GPT`).

        With replicas, each model stage is read from its first copy (the copies are equal).
        """
        stages = self.placement.model_rows(params["blocks"])  # [K, slots, ...]
        return {**params, "blocks": self.layout.from_stages(stages)}

    def place(self, model_params: PyTree) -> PyTree:
        """Model-layout params -> pipeline layout, placed on the mesh with `shardings()`."""
        return jax.jit(self.to_pipeline, out_shardings=self.shardings())(model_params)

    def init(self, seed: int = 0) -> PyTree:
        """Fresh parameters (those of `GPT(config, rngs=nnx.Rngs(seed))`), created directly sharded."""
        create = lambda: self.to_pipeline(params_of(GPT(self.config, rngs=nnx.Rngs(seed))))  # noqa: E731
        return jax.jit(create, out_shardings=self.shardings())()

    def stage_costs(self, batch: int = 1) -> StageCosts:
        """Measured F/B/I/W FLOPs and memory of this model's largest stage on one microbatch.

        `batch`: sequences of `config.seq_len` tokens per microbatch on one device (the microbatch
        batch divided by the data axis). Compiles each op alone for the default backend.
        """
        config = self.config
        layers = max(self.layout.layer_counts)
        one_layer = jax.eval_shape(lambda: params_of(block_class(config)(config, rngs=nnx.Rngs(0))))
        stage_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape), a.dtype), one_layer)
        x = jax.ShapeDtypeStruct((batch, config.seq_len, config.d_model), config.residual_dtype)
        return measure_costs(layered(self.parts.layer_fn), stage_params, x, remat=self.remat)

    # The step.

    def value_and_grad(self) -> Callable:
        """`step(params, tokens, targets) -> (loss, grads)`, params in pipeline layout.

        tokens, targets: int `[m, B, T]` (m = `schedule.num_microbatches`; B divisible by the data
        axis). The loss is the mean over microbatches of the mean next-token cross-entropy; grads
        have the structure and sharding of params (padding slots get zero gradients).
        """
        parts, layout, mesh = self.parts, self.layout, self.mesh
        if layout.padded:
            stage_fn = layered(masked_layer(parts.layer_fn))
        else:
            stage_fn = layered(parts.layer_fn)
        embed_fn = parts.embed

        def prologue(embed_params: PyTree, tokens: jax.Array) -> jax.Array:
            """Token ids `[B, T]` -> activations `[B, T, D]`, on the device of each microbatch's first hop."""
            return embed_fn({"embed": embed_params}, tokens)

        pipelined = executor.value_and_grad(
            stage_fn,
            parts.head_loss,
            schedule=self.schedule,
            mesh=mesh,
            remat=self.remat,
            data_axes=self.data_axes,
            split_backward=self.split_backward,
            cost=self.cost,
            stage_order="device",
            prologue=prologue,
            overlap_sends=self.overlap_sends,
        )
        shardings = self.shardings()
        embed_in_use = self.shardings(gathered=True)["embed"]
        batch = NamedSharding(mesh, P(None, *self.data_axes[:1]))

        def step(params: PyTree, tokens: jax.Array, targets: jax.Array) -> tuple[jax.Array, PyTree]:
            tokens = jax.lax.with_sharding_constraint(tokens, batch)
            targets = jax.lax.with_sharding_constraint(targets, batch)
            # FSDP: gather the embedding once per step, explicitly, rather than let the lookup reshard.
            embed_params = jax.lax.with_sharding_constraint(params["embed"], embed_in_use)
            stage_params = params["blocks"]  # device order, as stored
            if layout.padded:
                stage_params = {"layer": stage_params, "active": self.placement.model_to_device(layout.mask)}
            loss, (stage_grads, loss_grads, embed_grads) = pipelined(
                stage_params, parts.loss_params(params), tokens, targets, embed_params
            )
            grads = {
                "embed": embed_grads,
                "blocks": stage_grads["layer"] if layout.padded else stage_grads,
                "head": loss_grads["head"],
            }
            if self.config.tie_embeddings:
                # The lookup's and the head's contributions meet once per step.
                tokens_grad = grads["embed"]["tokens"] + loss_grads["embed"]["tokens"]
                grads["embed"] = {**grads["embed"], "tokens": tokens_grad}
            return loss, jax.lax.with_sharding_constraint(grads, shardings)

        step.program = pipelined.program
        return step
