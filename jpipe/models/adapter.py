"""Pipeline any Flax NNX model whose blocks are stacked on a leading layer axis (`nnx.vmap`).

    pipe = PipelinedModel(
        lambda rngs: MyLM(config, rngs=rngs),            # or a model instance
        blocks="blocks",                                  # the nnx.vmap-stacked blocks, [L, ...]
        prologue=lambda model, tokens: model.embed(tokens),
        loss=lambda model, x, targets: my_loss(model.head(model.norm(x)), targets),
        schedule=schedule, mesh=mesh,
    )
    params = pipe.init(seed=0)                            # or pipe.place(model)
    loss, grads = jax.jit(pipe.value_and_grad())(params, tokens, targets)   # tokens [m, B, T]

What runs where (see `jpipe.value_and_grad`): `prologue(model, tokens)` is the executor's
prologue (on the device of each microbatch's first stage), `layer(block, x)` runs once per layer
slot of a stage (`jpipe.layered`; by default `block(x)`, with `block` one layer of the stacked
blocks), and `loss(model, x, targets)` is the executor's loss (on the device of the last stage).
Each function gets an `nnx.Module` rebuilt (`nnx.merge`) from the parameters it is given, so it
runs the model's own code.

Parameters are the pure dict of the model's `nnx.Param`s (`nnx.to_pure_dict(nnx.state(model,
nnx.Param))`, the "model layout", blocks `[L, ...]`). In the pipeline layout the blocks are
`[S, layers_per_stage, ...]`, rows in device-major order (`jpipe.pipeline.StagePlacement`),
sharded over `stage`; uneven layer counts are padded with identity slots (`StageLayout`). The
prologue and the loss receive only the parameter leaves they read (found by tracing them once):
a parameter both read (tied embeddings) gets the sum of both gradients, one neither reads gets
zeros. Leaves the prologue reads are gathered once per step under FSDP.

Shardings come from each parameter's metadata: jpipe's `logical_axes`, or Flax's partitioning
names (`nnx.with_partitioning`, `out_sharding` / `sharding_names`), mapped to mesh axes by
`ShardingRules` (names a rule maps to an axis the mesh lacks are replicated along it). Without
metadata a parameter is replicated, except the blocks' stage axis. The blocks' layer axis needs no
name: `nnx.vmap` with or without `transform_metadata={nnx.PARTITION_NAME: ...}` both work.

Limits: every variable of the model must be an `nnx.Param` (no batch statistics or stored RNG
streams), and the blocks must be one stacked module.
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jpipe.models.layout import StageLayout, as_layout, masked_layer
from jpipe.parallel.mesh import DATA, STAGE
from jpipe.parallel.rules import ShardingRules
from jpipe.pipeline import executor
from jpipe.pipeline.costs import StageCosts, measure_costs
from jpipe.pipeline.options import PipelineOptions
from jpipe.pipeline.placement import StagePlacement
from jpipe.pipeline.stage import layered
from jpipe.schedules.ir import Schedule

PyTree = Any
Path = tuple[str | int, ...]
ModelSource = nnx.Module | Callable[[nnx.Rngs], nnx.Module]

# Metadata entries naming a parameter's dimensions, in order of preference.
_AXES_METADATA = ("logical_axes", "out_sharding", "sharding_names", "sharding")


def _as_path(blocks: str | Sequence[str | int]) -> Path:
    """A blocks path: "decoder.layers" or ("decoder", "layers"); digit parts index lists."""
    parts = blocks.split(".") if isinstance(blocks, str) else list(blocks)
    if not parts or any(p == "" for p in parts):
        raise ValueError(
            f"blocks: expected an attribute name or path like 'blocks' or 'decoder.layers', got {blocks!r}"
        )
    return tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in parts)


def _get(tree: Any, path: Path) -> Any:
    """The node at `path` in a module (attributes) or a pure dict (keys)."""
    for part in path:
        tree = tree[part] if isinstance(tree, dict) or isinstance(part, int) else getattr(tree, part)
    return tree


def _without(tree: dict, path: Path) -> dict:
    """`tree` (nested dicts) with the entry at `path` removed; shares the untouched subtrees."""
    head, *rest = path
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _without(tree[head], tuple(rest))}


def _with(tree: dict, path: Path, value: Any) -> dict:
    """`tree` (nested dicts) with `value` at `path`."""
    head, *rest = path
    return {**tree, head: value if not rest else _with(tree.get(head, {}), tuple(rest), value)}


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)


def _read_leaves(fn: Callable, leaves: list, *args: Any) -> list[int]:
    """Indices of `leaves` (abstract) that `fn(leaves, *args)` reads, by tracing it once."""
    jaxpr = jax.make_jaxpr(fn)(leaves, *args).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return [i for i, v in enumerate(jaxpr.invars[: len(leaves)]) if id(v) in read]


def _param_axes(variable: nnx.Variable, shape: tuple[int, ...], *, stacked: bool, what: str) -> tuple:
    """Logical names of one parameter's dimensions from its metadata (None entries if it has none).

    For stacked block parameters (`stacked`) the first name is the layer axis, named "layer"
    whether the metadata names it (`nnx.vmap` with `transform_metadata`) or leaves it out.
    """
    metadata = variable.get_metadata()
    names = next((metadata[k] for k in _AXES_METADATA if metadata.get(k) is not None), None)
    if names is None:
        return ("layer",) + (None,) * (len(shape) - 1) if stacked else (None,) * len(shape)
    names = tuple(names)
    if stacked and len(names) == len(shape) - 1:
        names = (None, *names)
    if len(names) != len(shape):
        raise ValueError(f"{what}: partitioning metadata {names} does not name the {len(shape)} dimensions of {shape}")
    return ("layer", *names[1:]) if stacked else names


def _fit_rules(rules: ShardingRules, mesh: jax.sharding.Mesh) -> ShardingRules:
    """`rules` with mesh axes the mesh lacks dropped (replicated along them)."""

    def fit(axes):
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.shape)
        return kept[0] if len(kept) == 1 else (kept or None)

    return dataclasses.replace(rules, rules={name: fit(axes) for name, axes in rules.rules.items()})


@dataclasses.dataclass(frozen=True)
class _Structure:
    """What the adapter derives once from the model: graph definitions, abstract params, names."""

    graphdef: Any  # the whole model's
    block_graphdef: Any  # the stacked blocks' (merged with one layer's params: one block)
    params: PyTree  # abstract model-layout params (pure dict of ShapeDtypeStruct)
    axes: PyTree  # logical names per model-layout param (blocks: ("layer", ...))
    num_layers: int


@dataclasses.dataclass(frozen=True, eq=False)
class PipelinedModel:
    """An NNX model with `nnx.vmap`-stacked blocks, trained with `schedule` on `mesh`.

    Attributes:
      model: an `nnx.Module` instance, or a constructor `(rngs: nnx.Rngs) -> nnx.Module` (then
        `init(seed)` creates the parameters directly sharded).
      blocks: attribute name or dotted path ("decoder.layers") of the stacked blocks: one module
        whose parameters all have a leading layer axis `[L, ...]`.
      prologue: `(model, inputs) -> x`, e.g. the embedding of token ids `[B, T]` into `[B, T, D]`.
      loss: `(model, x, targets) -> scalar`, e.g. final norm, head and mean cross-entropy; a mean
        over the batch (the data axis averages it).
      schedule: any schedule the executor runs; its `num_model_stages` model stages share the layers.
      mesh: a mesh with a `stage` axis of `schedule.num_devices`; a `data` axis, if present, splits
        each microbatch's batch.
      layer: `(block, x) -> x` with `block` one layer's module (default: `block(x)`).
      rules: logical -> mesh axes and FSDP on/off (`ShardingRules`).
      layout: layers per logical stage: a `StageLayout`, explicit counts, or None (balanced).
      options: the executor's options (`jpipe.pipeline.PipelineOptions`: remat, split_backward,
        overlap_sends, braid, and the cost that decides the "auto" ones).
      has_aux: `loss` returns `(loss, metrics)`, metrics a dict of float arrays (e.g. routing
        statistics) that the pipeline averages like the loss and returns beside it (the executor's
        `has_aux`); the steps then return `(loss, metrics)` where they returned the loss.
    """

    model: ModelSource
    blocks: str | Sequence[str | int]
    prologue: Callable[[nnx.Module, PyTree], PyTree]
    loss: Callable[[nnx.Module, PyTree, PyTree], jax.Array]
    schedule: Schedule
    mesh: jax.sharding.Mesh
    layer: Callable[[nnx.Module, PyTree], PyTree] | None = None
    rules: ShardingRules = dataclasses.field(default_factory=ShardingRules)
    layout: StageLayout | Sequence[int] | None = None
    options: PipelineOptions = PipelineOptions()
    has_aux: bool = False

    def __post_init__(self):
        if not isinstance(self.options, PipelineOptions):
            raise ValueError(f"options: expected a jpipe.pipeline.PipelineOptions, got {self.options!r}")
        for name in ("prologue", "loss") + (("layer",) if self.layer is not None else ()):
            if not callable(getattr(self, name)):
                raise ValueError(f"{name}: expected a function, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.model, nnx.Module) and not callable(self.model):
            raise ValueError(f"model: expected an nnx.Module or a constructor (rngs) -> Module, got {self.model!r}")
        if STAGE not in self.mesh.shape:
            raise ValueError(f"mesh: no {STAGE!r} axis (axes: {dict(self.mesh.shape)}); see jpipe.parallel.make_mesh")
        object.__setattr__(self, "blocks", _as_path(self.blocks))
        structure = self._structure  # validates the model and its blocks
        layout = as_layout(self.layout, structure.num_layers, self.schedule.num_model_stages)
        object.__setattr__(self, "layout", layout)

    # The model's structure.

    def _build(self, seed: int) -> nnx.Module:
        return self.model if isinstance(self.model, nnx.Module) else self.model(nnx.Rngs(seed))

    @functools.cached_property
    def _structure(self) -> _Structure:
        model = self.model if isinstance(self.model, nnx.Module) else nnx.eval_shape(lambda: self._build(0))
        if not isinstance(model, nnx.Module):
            raise ValueError(f"model: the constructor returned a {type(model).__name__}, not an nnx.Module")
        _, _, others = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(others):
            kinds = sorted({type(v).__name__ for v in jax.tree.leaves(others, is_leaf=_is_variable)})
            raise ValueError(
                f"model: holds non-parameter variables ({kinds}); "
                "the pipeline trains models whose variables are all nnx.Param"
            )
        name = ".".join(map(str, self.blocks))
        try:
            blocks = _get(model, self.blocks)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise ValueError(f"blocks: {type(model).__name__} has no attribute {name!r}") from None
        if not isinstance(blocks, nnx.Module):
            raise ValueError(
                f"blocks: {name!r} is a {type(blocks).__name__}, not an nnx.Module of blocks stacked with nnx.vmap"
            )
        block_state = nnx.state(blocks, nnx.Param)
        shapes = [tuple(v.shape) for v in jax.tree.leaves(block_state)]
        if not shapes or any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
            raise ValueError(
                f"blocks: the parameters of {name!r} are not stacked on a common leading "
                f"layer axis (shapes {shapes}); create the blocks with nnx.vmap"
            )
        graphdef, state = nnx.split(model)
        axes: dict = {}
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            stacked = tuple(path[: len(self.blocks)]) == self.blocks
            what = "param " + "".join(f"[{p!r}]" for p in path)
            axes = _with(axes, tuple(path), _param_axes(variable, tuple(variable.shape), stacked=stacked, what=what))
        return _Structure(graphdef, nnx.graphdef(blocks), _abstract(nnx.to_pure_dict(state)), axes, shapes[0][0])

    def _split(self, params: PyTree) -> tuple[PyTree, list, Any]:
        """params -> (blocks, the other leaves, their treedef)."""
        leaves, treedef = jax.tree.flatten(_without(params, self.blocks))
        return _get(params, self.blocks), leaves, treedef

    def _merge(self, blocks: PyTree, leaves: list, treedef: Any) -> PyTree:
        return _with(jax.tree.unflatten(treedef, leaves), self.blocks, blocks)

    def _module(self, leaves: dict[int, Any]) -> nnx.Module:
        """The model with the given non-block leaves (by index); zeros stand in for all others."""
        _, abstract, treedef = self._split(self._structure.params)
        full = [leaves[i] if i in leaves else jnp.zeros(a.shape, a.dtype) for i, a in enumerate(abstract)]
        blocks = _zeros(_get(self._structure.params, self.blocks))
        return nnx.merge(self._structure.graphdef, self._merge(blocks, full, treedef))

    def layer_fn(self, layer_params: PyTree, x: PyTree) -> PyTree:
        """One layer: `x -> x` (same shapes); `layer_params` is one layer of the blocks' params."""
        block = nnx.merge(self._structure.block_graphdef, layer_params)
        return block(x) if self.layer is None else self.layer(block, x)

    @property
    def data_axes(self) -> tuple[str, ...]:
        return (DATA,) if DATA in self.mesh.shape else ()

    # Parameters: structure, logical axes, shardings, creation.

    def logical_axes(self) -> PyTree:
        """Logical axis names of the pipeline-layout parameters (blocks `("stage", "layer", ...)`)."""
        axes = self._structure.axes
        blocks = jax.tree.map(lambda a: ("stage", *a), _get(axes, self.blocks), is_leaf=lambda x: isinstance(x, tuple))
        return _with(axes, self.blocks, blocks)

    def abstract_params(self) -> PyTree:
        """`jax.ShapeDtypeStruct`s of the pipeline-layout parameters."""
        return jax.eval_shape(self.to_pipeline, self._structure.params)

    def shardings(self, *, gathered: bool = False) -> PyTree:
        """`NamedSharding` of every pipeline-layout parameter on the mesh.

        With `gathered`, the sharding parameters have where they are used: without FSDP's split.
        """
        rules = _fit_rules(self.rules, self.mesh)
        rules = dataclasses.replace(rules, fsdp=False) if gathered else rules
        return rules.param_shardings(self.logical_axes(), self.abstract_params(), self.mesh)

    @property
    def placement(self) -> StagePlacement:
        """Where the schedule puts each logical stage; block rows are stored in its device-major order."""
        return StagePlacement.of(self.schedule)

    @property
    def padding(self) -> np.ndarray:
        """`[S, layers_per_stage]` bool, rows in storage order: True at padding slots of the blocks."""
        return self.placement.model_to_device(self.layout.mask) == 0

    def model_params(self, model: nnx.Module | nnx.State | PyTree) -> PyTree:
        """Model-layout params (pure dict) of a module, an `nnx.State` of it, or a pure dict (as is)."""
        if isinstance(model, nnx.Module):
            model = nnx.state(model, nnx.Param)
        return nnx.to_pure_dict(model) if isinstance(model, nnx.State) else model

    def to_pipeline(self, model_params: PyTree) -> PyTree:
        """Model-layout params (blocks `[L, ...]`) -> pipeline layout (blocks `[S, slots, ...]`, device-major).

        With replicas, each logical stage's rows are a copy of its model stage's layers.
        """
        model_params = self.model_params(model_params)
        stages = self.layout.to_stages(_get(model_params, self.blocks))  # [K, slots, ...]
        return _with(model_params, self.blocks, self.placement.model_to_device(stages))

    def to_model(self, params: PyTree) -> PyTree:
        """Pipeline layout -> model layout (pure dict; `nnx.merge` or `to_module` makes the module).

        With replicas, each model stage is read from its first copy (the copies are equal).
        """
        stages = self.placement.model_rows(_get(params, self.blocks))  # [K, slots, ...]
        return _with(params, self.blocks, self.layout.from_stages(stages))

    def to_module(self, params: PyTree) -> nnx.Module:
        """Pipeline-layout params -> the unpipelined model holding them."""
        return nnx.merge(self._structure.graphdef, self.to_model(params))

    def place(self, model: nnx.Module | nnx.State | PyTree) -> PyTree:
        """A model (module, state or model-layout params) -> pipeline layout, placed with `shardings()`."""
        return jax.jit(self.to_pipeline, out_shardings=self.shardings())(self.model_params(model))

    def init(self, seed: int | None = None) -> PyTree:
        """Fresh parameters (the constructor's with `nnx.Rngs(seed)`), created directly sharded.

        For a `model` instance (no seed): its parameters, placed.
        """
        if isinstance(self.model, nnx.Module):
            if seed is not None:
                raise ValueError("seed: the model is an instance with its own parameters; pass a constructor to seed")
            return self.place(self.model)
        create = lambda: self.to_pipeline(self._build(0 if seed is None else seed))  # noqa: E731
        return jax.jit(create, out_shardings=self.shardings())()

    def stage_costs(self, x: PyTree) -> StageCosts:
        """Measured F/B/I/W FLOPs and memory of the largest logical stage (one chunk) on one microbatch.

        Its `cost(per="chunk")` is the simulator's per-chunk `Cost`.

        `x`: one microbatch's activation on one device (arrays or `jax.ShapeDtypeStruct`s).

        XLA's `cost_analysis()` counts the body of the stage's scan over its layers once, so the
        FLOPs are scaled to the chunk's `layers` (absolute FLOPs matter where a send's time is
        expressed in forwards: `jpipe.parallel.links.send_comm`); their ratios are unchanged.
        """
        layers = max(self.layout.layer_counts)
        blocks = _get(self._structure.params, self.blocks)
        stage_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape[1:]), a.dtype), blocks)
        costs = measure_costs(
            layered(self.layer_fn),
            stage_params,
            _abstract(x),
            remat=self.options.remat,
            recompute=self.options.recompute,
        )
        return dataclasses.replace(costs, flops={op: flops * layers for op, flops in costs.flops.items()})

    # The step.

    def _reads(self, tokens: jax.Array, targets: jax.Array) -> tuple[list[int], list[int]]:
        """Indices of the non-block leaves the prologue and the loss read, for one microbatch."""
        _, abstract, _ = self._split(self._structure.params)
        tokens, targets = _abstract(tokens[0]), _abstract(targets[0])
        run_prologue = lambda leaves, t: self.prologue(self._module(dict(enumerate(leaves))), t)  # noqa: E731
        run_loss = lambda leaves, x, y: self.loss(self._module(dict(enumerate(leaves))), x, y)  # noqa: E731
        x = jax.eval_shape(run_prologue, abstract, tokens)
        return _read_leaves(run_prologue, abstract, tokens), _read_leaves(run_loss, abstract, x, targets)

    def _pipeline_functions(self) -> tuple[Callable, Callable, Callable, dict[str, list[int]]]:
        """The executor's stage, prologue and loss functions, and the leaf indices each end reads.

        `picked` is filled by `_arguments` when a step is traced.
        """
        stage_fn = layered(masked_layer(self.layer_fn) if self.layout.padded else self.layer_fn)
        picked: dict[str, list[int]] = {}  # leaf indices read by the prologue and the loss

        def prologue(leaves: list, inputs: PyTree) -> PyTree:
            """One microbatch's inputs -> activations, on the device of its first hop."""
            return self.prologue(self._module(dict(zip(picked["prologue"], leaves))), inputs)

        def loss_fn(leaves: list, x: PyTree, targets: PyTree) -> jax.Array:
            return self.loss(self._module(dict(zip(picked["loss"], leaves))), x, targets)

        return stage_fn, prologue, loss_fn, picked

    def _arguments(self, params: PyTree, inputs: PyTree, targets: PyTree, picked: dict[str, list[int]]):
        """`(stage_params, loss_leaves, inputs, targets, prologue_leaves, leaves, treedef)` for the executor."""
        batch = NamedSharding(self.mesh, P(None, *self.data_axes[:1]))
        inputs = jax.lax.with_sharding_constraint(inputs, batch)
        targets = jax.lax.with_sharding_constraint(targets, batch)
        picked["prologue"], picked["loss"] = self._reads(inputs, targets)
        _, in_use, _ = self._split(self.shardings(gathered=True))
        blocks, leaves, treedef = self._split(params)
        # FSDP: gather the prologue's parameters once per step, explicitly.
        first = [jax.lax.with_sharding_constraint(leaves[i], in_use[i]) for i in picked["prologue"]]
        last = [leaves[i] for i in picked["loss"]]
        stage_params = blocks  # device order, as stored
        if self.layout.padded:
            stage_params = {"layer": blocks, "active": self.placement.model_to_device(self.layout.mask)}
        return stage_params, last, inputs, targets, first, leaves, treedef

    def value_and_grad(self) -> Callable:
        """`step(params, inputs, targets) -> (loss, grads)`, params in pipeline layout.

        inputs, targets: leaves `[m, B, ...]` (m = `schedule.num_microbatches`; B divisible by the
        data axis). The loss is the mean over microbatches of `loss`; grads have the structure and
        sharding of params (padding slots get zero gradients). With `has_aux`, `loss` is
        `(loss, metrics)`, the metrics' mean over microbatches (float32).
        """
        stage_fn, prologue, loss_fn, picked = self._pipeline_functions()
        pipelined = executor.value_and_grad(
            stage_fn,
            loss_fn,
            schedule=self.schedule,
            mesh=self.mesh,
            data_axes=self.data_axes,
            stage_order="device",
            prologue=prologue,
            has_aux=self.has_aux,
            **self.options.keywords(),
        )
        shardings = self.shardings()

        def step(params: PyTree, inputs: PyTree, targets: PyTree) -> tuple[jax.Array | tuple, PyTree]:
            stage_params, last, inputs, targets, first, leaves, treedef = self._arguments(
                params, inputs, targets, picked
            )
            loss, (stage_grads, loss_grads, first_grads) = pipelined(stage_params, last, inputs, targets, first)
            grads = self._gradients(picked, leaves, treedef, stage_grads, loss_grads, first_grads)
            return loss, jax.lax.with_sharding_constraint(grads, shardings)

        step.program, step.plan = pipelined.program, pipelined.plan
        return step

    def _gradients(self, picked, leaves, treedef, stage_grads, loss_grads, first_grads) -> PyTree:
        """The model's gradient tree from a pipelined step's stage, loss and prologue gradients.

        `picked`, `leaves`, `treedef` are what `_pipeline_functions` and `_arguments` gave; a leaf
        neither end reads gets zeros.
        """
        grads = [None] * len(leaves)
        # A leaf both ends read (tied embeddings): the two contributions meet once per step.
        for i, g in [*zip(picked["prologue"], first_grads), *zip(picked["loss"], loss_grads)]:
            grads[i] = g if grads[i] is None else grads[i] + g
        grads = [jnp.zeros_like(a) if g is None else g for a, g in zip(leaves, grads)]
        block_grads = stage_grads["layer"] if self.layout.padded else stage_grads
        return self._merge(block_grads, grads, treedef)

    def evaluate(self, schedule: Schedule | None = None) -> Callable:
        """`loss_of(params, inputs, targets) -> mean loss`, forwards only (`jpipe.forward_loss`); with
        `has_aux`, `-> (mean loss, mean metrics)`.

        The loss `value_and_grad` computes, without backward ops, residuals or gradients: what an
        evaluation should cost. `schedule` (default: the training schedule) must place the stages
        as the training schedule does (the parameters are stored in its device order); e.g. a
        SkipPipe model is evaluated with every layer by `build("skippipe", ..., skip_ratio=0)`.
        """
        schedule = self.schedule if schedule is None else schedule
        if schedule.placement != self.schedule.placement or schedule.model_stage != self.schedule.model_stage:
            raise ValueError(
                f"schedule: {schedule.name!r} places the stages differently from the training schedule "
                f"{self.schedule.name!r}; evaluate with a schedule of the same placement and model stages"
            )
        stage_fn, prologue, loss_fn, picked = self._pipeline_functions()
        pipelined = executor.forward_loss(
            stage_fn,
            loss_fn,
            schedule=schedule,
            mesh=self.mesh,
            data_axes=self.data_axes,
            stage_order="device",
            prologue=prologue,
            has_aux=self.has_aux,
        )

        def loss_of(params: PyTree, inputs: PyTree, targets: PyTree) -> jax.Array | tuple:
            stage_params, last, inputs, targets, first, _, _ = self._arguments(params, inputs, targets, picked)
            return pipelined(stage_params, last, inputs, targets, first)

        loss_of.program = pipelined.program
        return loss_of
