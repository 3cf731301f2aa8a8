"""Layers per stage from per-layer, embedding and head costs, and the per-stage `Cost` that results.

A language model's pipeline stages are not alike: the first stage also embeds the tokens, the last
also runs the head and the loss. `ModelCosts` holds one layer's F/I/W times and those extras;
`stage_costs(counts, model)` gives the per-stage `Cost` the simulator and `search` read;
`balance_layers(num_layers, num_stages, model)` chooses how many consecutive layers each stage runs
so that the slowest stage is as fast as possible (uneven counts allowed). Its result is what
`jpipe.models.PipelinedLM(layout=...)` takes (a tuple of per-stage layer counts).

Where the extras land follows the executor: the embedding (the executor's `prologue`) runs inside
stage 0's F, its backward inside stage 0's I (or B); the head and loss run inside the last stage's F,
forward and backward both (the loss's gradient is what the last stage's I starts from).

Padding: `PipelinedLM` pads uneven stages to the largest count with identity layers that still
compute, so there every stage's layers cost `max(counts)` layers (`stage_costs(..., padded=True)`);
uneven counts then save nothing, and only a runtime that skips padding slots gains from
`balance_layers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jpipe.schedules.simulate import Cost


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Times of one microbatch through the model's parts, in any one unit (e.g. one layer's F = 1).

    Attributes:
      layer: one layer's `f`, `i`, `w` (and `b`, the whole backward); scalars.
      embed_f: the embedding's forward (runs in stage 0's F).
      embed_b: the embedding's backward (runs in stage 0's I or B).
      head_f: the head and loss forward (runs in the last stage's F).
      head_b: the head and loss backward (the executor runs it in the last stage's F too).
    """

    layer: Cost
    embed_f: float = 0.0
    embed_b: float = 0.0
    head_f: float = 0.0
    head_b: float = 0.0

    def __post_init__(self) -> None:
        if self.layer.num_stages is not None:
            raise ValueError("ModelCosts.layer: one layer's costs must be scalars")
        for name in ("embed_f", "embed_b", "head_f", "head_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"ModelCosts.{name}: expected a number >= 0, got {value!r}")

    @classmethod
    def transformer(cls, d_model: int, seq_len: int, vocab_size: int, mlp_ratio: int = 4) -> ModelCosts:
        """FLOP counts of a GPT decoder per token, in units of one layer's forward.

        Layer forward: attention projections `8 d^2`, MLP `4 r d^2`, scores and values `4 T d`;
        input gradient: the same matmuls plus attention's backward `8 T d`; weight gradient: the
        projection and MLP matmuls again. Head: `2 d V` forward, `4 d V` backward. The embedding is
        a lookup (`d` forward, `d` backward: next to nothing).
        """
        d, t, r = d_model, seq_len, mlp_ratio
        matmuls = 8 * d * d + 4 * r * d * d
        forward = matmuls + 4 * t * d
        input_grad = matmuls + 8 * t * d
        layer = Cost(f=1.0, b=(input_grad + matmuls) / forward, i=input_grad / forward, w=matmuls / forward)
        return cls(
            layer,
            embed_f=d / forward,
            embed_b=d / forward,
            head_f=2 * d * vocab_size / forward,
            head_b=4 * d * vocab_size / forward,
        )


def stage_costs(
    layer_counts: Sequence[int],
    model: ModelCosts,
    *,
    padded: bool = False,
    comm: float = 0.0,
    weight_residuals: float = 0.0,
) -> Cost:
    """The per-stage `Cost` of stages running `layer_counts[s]` consecutive layers each.

    Args:
      layer_counts: layers per logical stage (>= 0 each).
      model: the parts' costs.
      padded: every stage computes `max(layer_counts)` layers (`PipelinedLM`'s padding).
      comm, weight_residuals: copied into the `Cost`.
    """
    counts = _counts(layer_counts)
    if padded:
        counts = [max(counts)] * len(counts)
    layer = model.layer
    f = [n * layer.f for n in counts]
    b = [n * layer.b for n in counts]
    i = [n * layer.i for n in counts]
    w = [n * layer.w for n in counts]
    f[0] += model.embed_f
    b[0] += model.embed_b
    i[0] += model.embed_b
    f[-1] += model.head_f + model.head_b
    return Cost(f=tuple(f), b=tuple(b), i=tuple(i), w=tuple(w), comm=comm, weight_residuals=weight_residuals)


def stage_times(layer_counts: Sequence[int], model: ModelCosts, *, padded: bool = False) -> tuple[float, ...]:
    """Per stage, the time of one microbatch's F, I and W (the stage's share of a step)."""
    cost = stage_costs(layer_counts, model, padded=padded)
    return tuple(f + i + w for f, i, w in zip(cost.f, cost.i, cost.w))


def balance_layers(num_layers: int, num_stages: int, model: ModelCosts, *, min_layers: int = 1) -> tuple[int, ...]:
    """Layers per stage minimising the slowest stage's `stage_times` (then the next slowest, ...).

    Each layer goes, one at a time, to the stage whose time after taking it is least (ties: the
    earlier stage); with every layer costing the same this greedy filling is exact for the largest
    stage time, and it sorts the rest the same way.

    Args:
      num_layers: the model's layers.
      num_stages: logical stages (`Schedule.num_stages`).
      model: the parts' costs.
      min_layers: the fewest layers any stage gets.

    Returns:
      Per-stage layer counts summing to `num_layers`, for `PipelinedLM(layout=...)`.
    """
    if num_stages < 1 or num_layers < num_stages * min_layers or min_layers < 0:
        raise ValueError(
            f"balance_layers: cannot put {num_layers} layers on {num_stages} stages with at least {min_layers} each"
        )
    per_layer = model.layer.f + model.layer.i + model.layer.w
    extra = [0.0] * num_stages
    extra[0] += model.embed_f + model.embed_b
    extra[-1] += model.head_f + model.head_b
    counts = [min_layers] * num_stages
    for _ in range(num_layers - num_stages * min_layers):
        stage = min(range(num_stages), key=lambda s: (extra[s] + (counts[s] + 1) * per_layer, s))
        counts[stage] += 1
    return tuple(counts)


def _counts(layer_counts: Sequence[int]) -> list[int]:
    counts = [int(n) for n in layer_counts]
    if not counts or any(n < 0 for n in counts) or sum(counts) < 1:
        raise ValueError(f"layer_counts: expected counts >= 0 with at least one layer, got {tuple(layer_counts)}")
    return counts
