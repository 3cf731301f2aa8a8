"""Typed, frozen configuration for a training run; every check explains what is wrong.

A run is `TrainConfig(model=..., parallel=..., optimizer=..., data=..., run=...)`. Presets live in
`jpipe.train.presets`; the CLI starts from a preset and applies overrides with
`dataclasses.replace`, so an invalid override fails in `__post_init__` before anything compiles.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from jpipe.schedules.generators import SCHEDULES

REMAT_CHOICES = ("none", "full", "dots")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the rule and the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh and schedule: `data x stage x tensor` devices, `virtual` chunks per pipeline device.

    Every field here is layout: checkpoints are stored by layer, so a run may resume with others.

    Attributes:
      data: data-parallel replicas; each microbatch is split over them.
      stage: pipeline devices (the mesh's stage axis).
      tensor: tensor-parallel devices per stage (Megatron: attention heads, MLP hidden units and
        the vocabulary are split over them, so it must divide each).
      virtual: model chunks per pipeline device (2 for interleaved_1f1b, zbv, dualpipev); the model
        has stage x virtual pipeline stages.
      schedule: the pipeline schedule (`jpipe.schedules.SCHEDULES`).
      microbatches: microbatches per step; the batch size must divide by microbatches x data.
      fsdp: also store parameters and optimizer state split over the data axis (gathered once per
        step, outside the tick loop).
      remat: what a stage keeps from its forward for the backward: "none" (everything), "full"
        (only its input; recompute the rest) or "dots" (matmul outputs).
      split_backward: run each backward B as I then W: true, false, or "auto" (whichever the lockstep
        simulator finds faster under the measured stage costs).
      overlap_sends: send each tick's pipeline messages during the next tick's compute (hidden
        behind it, one more tick of latency): true, false, or "auto" (on when the lockstep
        simulator finds it no slower under the measured stage costs, whose send time is 0 unless
        measured, so "auto" is off).
    """

    data: int = 2
    stage: int = 4
    tensor: int = 1
    virtual: int = 1
    schedule: str = "1f1b"
    microbatches: int = 8
    fsdp: bool = False
    remat: str = "none"
    split_backward: bool | str = "auto"
    overlap_sends: bool | str = "auto"

    def __post_init__(self) -> None:
        for name in ("data", "stage", "tensor", "virtual", "microbatches"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"parallel.{name}: must be an integer >= 1, got {value!r}")
        _require(
            self.schedule in SCHEDULES,
            f"parallel.schedule: unknown schedule {self.schedule!r}; known: {', '.join(sorted(SCHEDULES))}",
        )
        _require(self.remat in REMAT_CHOICES, f"parallel.remat: expected one of {REMAT_CHOICES}, got {self.remat!r}")
        _require(
            self.split_backward in (True, False, "auto"),
            f"parallel.split_backward: expected true, false or 'auto', got {self.split_backward!r}",
        )
        _require(
            self.overlap_sends in (True, False, "auto"),
            f"parallel.overlap_sends: expected true, false or 'auto', got {self.overlap_sends!r}",
        )

    @property
    def num_devices(self) -> int:
        return self.data * self.stage * self.tensor

    @property
    def num_stages(self) -> int:
        return self.stage * self.virtual


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, and global-norm clipping.

    Attributes:
      learning_rate: peak learning rate, reached after the warmup.
      warmup_steps: steps of linear warmup from 0.
      min_learning_rate_ratio: the cosine decay ends at learning_rate x this at the last step.
      weight_decay: AdamW's decoupled weight decay.
      beta1: Adam's first-moment decay.
      beta2: Adam's second-moment decay.
      clip_norm: gradients are scaled down to this global norm when larger.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"optimizer.learning_rate: must be > 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"optimizer.warmup_steps: must be >= 0, got {self.warmup_steps}")
        _require(
            0.0 <= self.min_learning_rate_ratio <= 1.0,
            f"optimizer.min_learning_rate_ratio: must be in [0, 1], got {self.min_learning_rate_ratio}",
        )
        _require(self.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm > 0, f"optimizer.clip_norm: must be > 0, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Byte-level text, memory-mapped; batches are a function of (seed, step).

    Attributes:
      path: a text file or folder (.py, .txt, .md, .rst files); unset means the Python standard
        library's sources (no download).
      seq_len: tokens (bytes) per example; at most the model's seq_len.
      batch_size: global examples per step, split into microbatches and over data replicas.
      seed: seed of the batch order (batches depend only on it and the step).
      eval_fraction: the last fraction of the corpus, held out for evaluation.
      max_corpus_bytes: read at most this many bytes of text (unset: all of it).
    """

    path: str | None = None
    seq_len: int = 64
    batch_size: int = 16
    seed: int = 0
    eval_fraction: float = 0.01
    max_corpus_bytes: int | None = None

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, f"data.seq_len: must be >= 2, got {self.seq_len}")
        _require(self.batch_size >= 1, f"data.batch_size: must be >= 1, got {self.batch_size}")
        _require(0.0 < self.eval_fraction < 0.5, f"data.eval_fraction: must be in (0, 0.5), got {self.eval_fraction}")
        if self.path is not None:
            _require(pathlib.Path(self.path).exists(), f"data.path: {self.path!r} does not exist")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, output folder, checkpoint and evaluation cadence.

    Attributes:
      out: folder for everything the run writes (config.json, metrics.jsonl, checkpoints/, charts).
      steps: optimizer steps; the learning-rate schedule spans them.
      checkpoint_every: save a checkpoint every this many steps (and at the last).
      keep_checkpoints: keep the newest this many checkpoints.
      eval_every: evaluate on held-out data every this many steps (and at the last).
      eval_batches: held-out batches per evaluation.
      log_every: print the progress line every this many steps.
      seed: seed of the parameter initialisation.
      stop_at_step: leave after this step as if preempted (the schedule still spans `steps`);
        unset: run to the end.
    """

    out: str = "runs/default"
    steps: int = 200
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    seed: int = 0
    stop_at_step: int | None = None

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"run.steps: must be >= 1, got {self.steps}")
        _require(self.checkpoint_every >= 1, f"run.checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        _require(self.keep_checkpoints >= 1, f"run.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        _require(self.eval_every >= 1, f"run.eval_every: must be >= 1, got {self.eval_every}")
        _require(self.eval_batches >= 1, f"run.eval_batches: must be >= 1, got {self.eval_batches}")
        _require(self.log_every >= 1, f"run.log_every: must be >= 1, got {self.log_every}")
        _require(
            self.stop_at_step is None or 1 <= self.stop_at_step <= self.steps,
            f"run.stop_at_step: must be in [1, steps={self.steps}], got {self.stop_at_step}",
        )


def as_dict(config: Any) -> dict:
    """A JSON-able dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)
