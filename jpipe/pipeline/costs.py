"""Measured op costs of a real stage: what `jpipe.schedules.simulate` and the split choice should use.

    costs = jpipe.measure_costs(stage_fn, one_stage_params, one_microbatch, remat="full")
    print(costs)                                  # FLOPs of F, B, I, W and the memory an op keeps
    sim = jpipe.schedules.simulate(schedule, costs.cost(), mode="lockstep")  # the stage: one device's

`StageCosts.cost()` reads the measured stage as one device stage (split over a v-chunk schedule's
chunks); `cost(per="chunk")` as one chunk of the schedule.

Each op (F, B, I, W: `jpipe.pipeline.stage.StageOps`) is compiled alone for the default backend and
XLA's `cost_analysis()` gives its FLOPs; `memory` gives the bytes of what F stashes and what I keeps
for W. Arguments may be arrays or `jax.ShapeDtypeStruct`s (nothing runs unless `time=True`).

XLA's `cost_analysis()` counts the body of a `lax.scan` once, whatever its length: for a
`jpipe.layered` stage the FLOPs are one layer's. The ratios between ops (what the simulator uses)
are unaffected; use `time=True` for absolute costs.
"""

from __future__ import annotations

import dataclasses
import time as _time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpipe.pipeline.stage import stage_ops
from jpipe.schedules.simulate import Cost

PyTree = Any
OPS = ("f", "b", "i", "w")


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Costs of one stage on one microbatch.

    Attributes:
      flops: per op ("f", "b", "i", "w"), XLA's FLOP count of the op compiled alone.
      seconds: per op, the median measured time (only with `measure_costs(..., time=True)`).
      stash_bytes: bytes of the residuals an F stashes for its backward (with `recompute`: its input).
      weight_residual_bytes: bytes of what an I keeps for its W.
      recomputed_bytes: with `recompute`, bytes of the residuals an R rebuilds (0 otherwise).

    With `measure_costs(..., recompute=True)` the ops are those of a schedule with R ops
    (`jpipe.schedules.recompute`): "r" is the recomputation, and B, I and W read its residuals.
    """

    flops: dict[str, float]
    stash_bytes: int
    weight_residual_bytes: int
    seconds: dict[str, float] | None = None
    recomputed_bytes: int = 0

    def cost(self, comm: float = 0.0, *, measure: str = "flops", per: str = "device") -> Cost:
        """A simulator `Cost` in units of the measured stage's F (F = 1), from FLOPs or from seconds.

        `comm` is in the same unit (a fraction of an F). `weight_residuals` is the weight-residual
        bytes relative to the stash bytes.

        `per` says what the measured stage is to the schedule it will be simulated with (the
        numbers are the same, only their meaning changes): "device" (the default) when it is one
        device stage, all of a device's layers (`measure_costs` measures whatever stage it is given;
        `jpipe.layered` stages of one device's blocks are the usual case): a v-chunk schedule then
        runs each chunk op in 1/v of these times, and makespans compare across `virtual` on the same
        model. "chunk" when it is one logical stage (chunk) of that schedule, e.g.
        `PipelinedLM.stage_costs` (the largest logical stage): times are then per chunk, in units of
        a chunk's forward, whatever `virtual`.
        """
        if measure not in ("flops", "seconds"):
            raise ValueError(f"measure: expected 'flops' or 'seconds', got {measure!r}")
        values = self.flops if measure == "flops" else self.seconds
        if values is None:
            raise ValueError("measure='seconds': these costs were measured without time=True")
        unit = values["f"] if values["f"] > 0 else 1.0
        ratio = self.weight_residual_bytes / self.stash_bytes if self.stash_bytes else 0.0
        rebuilt = self.recomputed_bytes / self.stash_bytes if self.stash_bytes else 0.0
        return Cost(
            f=values["f"] / unit,
            b=values["b"] / unit,
            i=values["i"] / unit,
            w=values["w"] / unit,
            comm=comm,
            weight_residuals=ratio,
            r=values.get("r", values["f"]) / unit,
            recomputed=rebuilt,
            per=per,
        )

    def __str__(self) -> str:
        f, b, i, w = (self.flops[k] for k in OPS)
        ratio = (i + w) / b if b else float("nan")
        text = (
            f"F {f:.3g}  B {b:.3g}  I {i:.3g}  W {w:.3g} FLOPs; (I + W) / B = {ratio:.3f}; "
            f"stash {self.stash_bytes / 2**20:.2f} MiB, weight residuals {self.weight_residual_bytes / 2**20:.2f} MiB"
        )
        if "r" in self.flops:
            text += f"; R {self.flops['r']:.3g} FLOPs, recomputed {self.recomputed_bytes / 2**20:.2f} MiB"
        if self.seconds:
            text += "; ms " + " ".join(f"{k.upper()} {1e3 * self.seconds[k]:.2f}" for k in OPS)
        return text


def xla_flops(compiled) -> float:
    """FLOPs of a compiled computation from XLA's `cost_analysis()` (0 when it reports none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _nbytes(tree: PyTree) -> int:
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def measure_costs(
    stage_fn: Callable[[PyTree, PyTree], PyTree],
    stage_params: PyTree,
    x: PyTree,
    remat: str | Callable | None = "none",
    *,
    time: bool = False,
    repeats: int = 5,
    recompute: bool = False,
) -> StageCosts:
    """F/B/I/W costs of `stage_fn` on one microbatch `x` with one stage's `stage_params`.

    Args:
      stage_fn: `(params, x) -> y` (or `jpipe.layered(...)`), as given to `jpipe.value_and_grad`.
      stage_params: one stage's parameters (no leading stage axis); arrays or ShapeDtypeStructs.
      x: one microbatch of the stage input; arrays or ShapeDtypeStructs.
      remat: the executor's `remat` option.
      time: also run each op `repeats` times on zeros and record the median wall time (on the
        default backend; on CPU fake devices this measures the host, not an accelerator).
      recompute: the ops of a schedule with R ops (the executor's `recompute=True`, which needs
        remat "full"): F keeps its input, R ("r") rebuilds the residuals of remat "none", and B, I,
        W are remat "none"'s, reading them.

    Returns:
      `StageCosts`; `.cost()` gives the simulator's `Cost`.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    ops = stage_ops(stage_fn, "none" if recompute else remat)
    params_spec, x_spec = _abstract(stage_params), _abstract(x)

    def forward(params, x):
        return ops.forward(params, x)

    y_spec, residual_spec = jax.eval_shape(forward, params_spec, x_spec)

    def backward(params, residuals, grad):
        return ops.backward(params, residuals, jax.tree.map(jnp.zeros_like, grad), grad)

    def input_grad(params, residuals, grad):
        return ops.input_grad(params, residuals, jax.tree.map(jnp.zeros_like, grad), grad)

    weight_spec = jax.eval_shape(input_grad, params_spec, residual_spec, y_spec)[1]

    def weight_grad(params, residuals, weight_residuals):
        return ops.weight_grad(params, residuals, jax.tree.map(jnp.zeros_like, x_spec), weight_residuals)

    calls = {
        "f": (forward, (params_spec, x_spec)),
        "b": (backward, (params_spec, residual_spec, y_spec)),
        "i": (input_grad, (params_spec, residual_spec, y_spec)),
        "w": (weight_grad, (params_spec, residual_spec, weight_spec)),
    }
    if recompute:
        calls["r"] = calls["f"]  # R is the forward with its residuals; F's are dead code there

        def forward_only(params, x):
            return ops.forward(params, x)[0]

        calls["f"] = (forward_only, (params_spec, x_spec))
    compiled = {name: jax.jit(fn).lower(*args).compile() for name, (fn, args) in calls.items()}
    seconds = None
    if time:
        seconds = {}
        for name, (_, args) in calls.items():
            concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), args)
            jax.block_until_ready(compiled[name](*concrete))
            samples = []
            for _ in range(repeats):
                start = _time.perf_counter()
                jax.block_until_ready(compiled[name](*concrete))
                samples.append(_time.perf_counter() - start)
            seconds[name] = float(np.median(samples))
    return StageCosts(
        flops={name: xla_flops(c) for name, c in compiled.items()},
        stash_bytes=_nbytes(x_spec if recompute else residual_spec),
        weight_residual_bytes=_nbytes(weight_spec),
        seconds=seconds,
        recomputed_bytes=_nbytes(residual_spec) if recompute else 0,
    )
