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

Document masking (`GPTConfig.document_end`): the embedding (prologue) also computes each token's
document from the token ids, and the activation between stages is `{"x": [B, T, D], "segments":
[B, T]}`, so every stage's attention masks at document boundaries as the unpipelined model does.

Mixture of experts (`GPTConfig(family="moe")`, `jpipe.models.moe`): the model is `MoELM`, the
prologue runs the embedding and the dense first layers, the activation between stages is `{"x":
[B, T, D], "aux": [B], "load": [B, E], "dropped": [B]}` (plus "segments"): each MoE block adds its
per-sequence balance loss to "aux" and its routing statistics to "load" and "dropped", and the loss
at the last stage adds the balance loss's weighted mean to the cross-entropy and returns the routing
metrics beside it (`has_aux`; `value_and_grad(has_aux=True)`).

All of this is `jpipe.models.PipelinedModel` (any NNX model with stacked blocks) applied to `GPT`:
the prologue is `model.embed`, the loss `cross_entropy(model.head(x, table), targets)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpipe.models import moe
from jpipe.models.adapter import PipelinedModel
from jpipe.models.config import GPTConfig
from jpipe.models.gpt import GPT, cross_entropy
from jpipe.models.layout import StageLayout
from jpipe.models.parts import LMParts
from jpipe.parallel.mesh import DATA
from jpipe.parallel.rules import ShardingRules
from jpipe.pipeline.costs import StageCosts
from jpipe.pipeline.options import PipelineOptions
from jpipe.pipeline.placement import StagePlacement
from jpipe.schedules.ir import Schedule

PyTree = Any


def _embed(model: GPT, tokens: jax.Array) -> jax.Array | dict[str, jax.Array]:
    """Token ids `[B, T]` -> activations `[B, T, D]`, or with document masking `{"x": ..., "segments": ...}`.

    The segments (`jpipe.models.layers.document_segments`, `[B, T]`) travel with the activation
    from stage to stage, as float32 (exact for ids up to 2^24; their gradient is zero), so every
    stage's attention sees them.
    """
    x = model.embed(tokens)
    segments = model.segments(tokens)
    return x if segments is None else {"x": x, "segments": segments.astype(jnp.float32)}


def _layer(block: nnx.Module, x: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One block on a document-masked activation: the segments pass through unchanged."""
    segments = jax.lax.stop_gradient(x["segments"])
    return {"x": block(x["x"], segments), "segments": x["segments"]}


def _head_loss(model: GPT, x: jax.Array | dict[str, jax.Array], targets: jax.Array) -> jax.Array:
    """Final norm, head (the embedding table when tied) and mean cross-entropy: a scalar."""
    x = x["x"] if isinstance(x, dict) else x
    table = model.embed.tokens[...] if model.config.tie_embeddings else None
    return cross_entropy(model.head(x, table), targets)


def activation_shape(config: GPTConfig, batch: int, seq: int) -> jax.ShapeDtypeStruct | dict[str, jax.ShapeDtypeStruct]:
    """What passes between stages for `batch` sequences of `seq` tokens (`_embed`'s output's shapes)."""
    if config.moe:
        return moe.activation_shape(config, batch, seq)
    x = jax.ShapeDtypeStruct((batch, seq, config.d_model), config.residual_dtype)
    if config.document_end is None:
        return x
    return {"x": x, "segments": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}


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
      options: the executor's options (`jpipe.pipeline.PipelineOptions`; its `cost` decides the
        "auto" split and overlap, and `stage_costs()` measures it for this model).
    """

    config: GPTConfig
    schedule: Schedule
    mesh: jax.sharding.Mesh
    rules: ShardingRules = dataclasses.field(default_factory=ShardingRules)
    layout: StageLayout | Sequence[int] | None = None
    options: PipelineOptions = PipelineOptions()

    def __post_init__(self):
        # The adapter checks the mesh and resolves the layout; built here so that bad input fails now.
        object.__setattr__(self, "layout", self.adapter.layout)

    @functools.cached_property
    def adapter(self) -> PipelinedModel:
        """The generic pipeline of this model: `PipelinedModel` with the GPT's embedding, blocks and head."""
        config = self.config
        if config.moe:
            return PipelinedModel(
                lambda rngs: moe.MoELM(config, rngs=rngs),
                blocks="blocks",
                prologue=lambda model, tokens: model.first(tokens),
                loss=moe.head_loss_and_metrics,
                layer=functools.partial(moe.moe_layer, expert_axis=self.expert_axis),
                has_aux=True,
                schedule=self.schedule,
                mesh=self.mesh,
                rules=self.rules,
                layout=self.layout,
                options=self.options,
            )
        return PipelinedModel(
            lambda rngs: GPT(config, rngs=rngs),
            blocks="blocks",
            prologue=_embed,
            loss=_head_loss,
            layer=None if config.document_end is None else _layer,
            schedule=self.schedule,
            mesh=self.mesh,
            rules=self.rules,
            layout=self.layout,
            options=self.options,
        )

    @property
    def expert_axis(self) -> str | None:
        """The mesh axis the moe family's experts are computed over (expert parallelism), or None.

        The data axis when the rules map "expert" to it (`ShardingRules(rules={..., "expert": "data"})`)
        and it has more than one device: experts are stored split over data, gathered on entering the
        pipeline (as FSDP's parameters are), and each data-parallel device computes its share of the
        experts for the tokens of all of them, which reach it and return with all-to-alls.
        """
        if not self.config.moe or DATA not in self.mesh.shape or self.mesh.shape[DATA] == 1:
            return None
        axes = self.rules.mesh_axes("expert") if "expert" in self.rules.rules else ()
        if not axes:
            return None
        if axes != (DATA,):
            raise ValueError(f"rules['expert']: experts are computed over the data axis {DATA!r} only, got {axes}")
        if self.config.num_experts % self.mesh.shape[DATA]:
            raise ValueError(
                f"expert parallelism: num_experts={self.config.num_experts} must divide over "
                f"{self.mesh.shape[DATA]} data-parallel devices"
            )
        return DATA

    @property
    def parts(self) -> LMParts:
        return LMParts(self.config)

    @property
    def data_axes(self) -> tuple[str, ...]:
        return self.adapter.data_axes

    # Parameters: structure, logical axes, shardings, creation.

    def logical_axes(self) -> PyTree:
        """Logical axis names of the pipeline-layout parameters (blocks `("stage", "layer", ...)`)."""
        return self.adapter.logical_axes()

    def abstract_params(self) -> PyTree:
        """`jax.ShapeDtypeStruct`s of the pipeline-layout parameters."""
        return self.adapter.abstract_params()

    def shardings(self, *, gathered: bool = False) -> PyTree:
        """`NamedSharding` of every pipeline-layout parameter on the mesh.

        With `gathered`, the sharding parameters have where they are used: without FSDP's split.
        """
        return self.adapter.shardings(gathered=gathered)

    @property
    def placement(self) -> StagePlacement:
        """Where the schedule puts each logical stage; block rows are stored in its device-major order."""
        return self.adapter.placement

    @property
    def padding(self) -> np.ndarray:
        """`[S, layers_per_stage]` bool, rows in storage order: True at padding slots of the blocks."""
        return self.adapter.padding

    def to_pipeline(self, model_params: PyTree) -> PyTree:
        """Model-layout params (blocks `[L, ...]`) -> pipeline layout (blocks `[S, slots, ...]`, device-major).

        With replicas, each logical stage's rows are a copy of its model stage's layers.
        """
        return self.adapter.to_pipeline(model_params)

    def to_model(self, params: PyTree) -> PyTree:
        """Pipeline layout -> model layout (e.g. to compare with, or load into, `GPT`).

        With replicas, each model stage is read from its first copy (the copies are equal).
        """
        return self.adapter.to_model(params)

    def place(self, model_params: PyTree) -> PyTree:
        """Model-layout params -> pipeline layout, placed on the mesh with `shardings()`."""
        return self.adapter.place(model_params)

    def init(self, seed: int = 0) -> PyTree:
        """Fresh parameters (those of `GPT(config, rngs=nnx.Rngs(seed))`), created directly sharded."""
        return self.adapter.init(seed)

    def stage_costs(self, batch: int = 1) -> StageCosts:
        """Measured F/B/I/W FLOPs and memory of this model's largest logical stage (one chunk) on one microbatch.

        Simulate with `.cost(per="chunk")` (the stage is one chunk of the schedule).

        `batch`: sequences of `config.seq_len` tokens per microbatch on one device (the microbatch
        batch divided by the data axis). Compiles each op alone for the default backend.
        """
        config = self.config
        return self.adapter.stage_costs(activation_shape(config, batch, config.seq_len))

    # The step.

    def value_and_grad(self, *, has_aux: bool = False) -> Callable:
        """`step(params, tokens, targets) -> (loss, grads)`, params in pipeline layout.

        tokens, targets: int `[m, B, T]` (m = `schedule.num_microbatches`; B divisible by the data
        axis). The loss is the mean over microbatches of the mean next-token cross-entropy (plus the
        weighted balance loss for moe); grads have the structure and sharding of params (padding
        slots get zero gradients). With `has_aux`, `step(...) -> ((loss, metrics), grads)`: metrics
        a dict of float32 arrays averaged over microbatches like the loss, the moe family's
        `jpipe.models.moe.routing_metrics` (`balance_loss`, `expert_load` `[E]`,
        `dropped_fraction`), empty for the other families.
        """
        step = self.adapter.value_and_grad()
        if has_aux == self.adapter.has_aux:
            return step

        def with_or_without_metrics(params: PyTree, tokens: jax.Array, targets: jax.Array) -> tuple:
            loss, grads = step(params, tokens, targets)
            return (_with_metrics(loss, has_aux), grads)

        with_or_without_metrics.program, with_or_without_metrics.plan = step.program, step.plan
        return with_or_without_metrics

    def evaluate(self, schedule: Schedule | None = None, *, has_aux: bool = False) -> Callable:
        """`loss_of(params, tokens, targets) -> mean loss`, forwards only (see `PipelinedModel.evaluate`);
        with `has_aux`, `-> (mean loss, metrics)` as `value_and_grad`'s."""
        loss_of = self.adapter.evaluate(schedule)
        if has_aux == self.adapter.has_aux:
            return loss_of

        def with_or_without_metrics(params: PyTree, tokens: jax.Array, targets: jax.Array):
            return _with_metrics(loss_of(params, tokens, targets), has_aux)

        with_or_without_metrics.program = loss_of.program
        return with_or_without_metrics


def _with_metrics(loss: jax.Array | tuple, has_aux: bool) -> jax.Array | tuple:
    """A step's loss as asked: `(loss, metrics)` with `has_aux` (no metrics: `{}`), else the loss alone."""
    if has_aux:
        return loss if isinstance(loss, tuple) else (loss, {})
    return loss[0] if isinstance(loss, tuple) else loss
