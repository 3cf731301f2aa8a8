"""Typed, frozen configuration for a training run; every check explains what is wrong.

A run is `TrainConfig(model=..., parallel=..., optimizer=..., data=..., run=...)`. Presets live in
`jpipe.train.presets`; the CLI starts from a preset and applies overrides with
`dataclasses.replace`, so an invalid override fails in `__post_init__` before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jpipe.pipeline.options import PipelineOptions
from jpipe.schedules.generators import COMPOSITE_SCHEDULES, ROUTED_SCHEDULES, SCHEDULES
from jpipe.train.preemption import SignalNameError, parse_signals

REMAT_CHOICES = ("none", "full", "dots")
AUTO = "auto"  # `parallel.schedule`: search a schedule for the measured model (`jpipe.train.auto`)

# Byte units of `parallel.memory_limit`, lower case: SI powers of 1000 and binary powers of 1024.
BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BYTES = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the rule and the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class MemoryLimit:
    """A per-device memory limit for the schedule search: stash units or bytes (one of the two).

    Attributes:
      stashes: microbatch x full device stage stashes (`jpipe.schedules.peak_memory`'s unit), or None.
      bytes: bytes per device, converted to stashes by the measured bytes of one stash, or None.
    """

    stashes: float | None = None
    bytes: int | None = None

    def __str__(self) -> str:
        if self.bytes is None:
            return f"{self.stashes:g} microbatch x stage stashes"
        return f"{format_bytes(self.bytes)} per device"


def parse_memory_limit(value: float | int | str) -> MemoryLimit:
    """`parallel.memory_limit`'s value: a number of stashes (`4`, `6.5`, `"4"`) or bytes with a unit.

    Units: B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), in any case,
    with or without a space: `"512MiB"`, `"2 GB"`, `"1.5GiB"`. Raises ValueError saying what is
    expected and what was given.
    """
    expected = (
        "expected a number of microbatch x stage stashes > 0 (e.g. 4 or 6.5) or bytes per device with a unit "
        f"(e.g. 512MiB, 2GB, 1.5GiB; units {', '.join(_UNIT_NAMES)})"
    )
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{expected}, got {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            match = _BYTES.match(value)
            if match is None or match.group(2).lower() not in BYTE_UNITS:
                raise ValueError(f"{expected}, got {value!r}") from None
            size = float(match.group(1)) * BYTE_UNITS[match.group(2).lower()]
            if not (math.isfinite(size) and size >= 1):
                raise ValueError(f"{expected}, got {value!r}") from None
            return MemoryLimit(bytes=int(size))
    else:
        number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{expected}, got {value!r}")
    return MemoryLimit(stashes=number)


_UNIT_NAMES = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size: float) -> str:
    """`size` bytes as GiB, MiB, KiB or B, three significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh and schedule: `data x stage x tensor` devices, `virtual` chunks per pipeline device.

    Every field here is layout: checkpoints are stored by layer, so a run may resume with others.

    Attributes:
      data: data-parallel replicas; each microbatch is split over them.
      stage: pipeline devices (the mesh's stage axis).
      tensor: tensor-parallel devices per stage (Megatron: attention heads, MLP hidden units and
        the vocabulary are split over them, so it must divide each).
      virtual: model chunks per pipeline device (2 for interleaved_1f1b, zbv, dualpipev, dualpipe;
        4 for bitpipe); the model has stage x virtual pipeline stages, or half as many with
        replicas (dualpipe, bitpipe: every model stage has two copies, on two devices). With
        schedule "auto": the most chunks per device the search may use (it tries 1 to virtual).
      schedule: the pipeline schedule (`jpipe.schedules.SCHEDULES`, or one with replicas or
        per-microbatch routes from `jpipe.schedules.ROUTED_SCHEDULES`: bitpipe, dualpipe,
        skippipe), or "auto": search one for the measured model within memory_limit
        (`jpipe.train.auto`; the run keeps it as schedule.csv).
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
      two_stream_memory: with overlap_sends true, the schedule may be built as its two-stream order
        (two half batches interleaved: shorter with the extra tick of send latency, about twice the
        stashed activations) only when its simulated peak activations are at most this multiple of
        the named order's. Default 1.25: the named order, so hidden sends cost no memory; e.g. 2.5
        trades the memory for the latency.
      recompute: with remat "full", run each forward's recomputation as an op of its own (R) right
        before its backward, which then no longer carries it (`jpipe.schedules.recompute`); the
        rebuilt residuals (remat "none"'s, for the whole stage) live from R to the weight gradient.
      offload: keep long-lived activation buffers in host memory (`jpipe.pipeline.offload`):
        "none" (default), "stash" (each forward's residuals, F to backward), "weights" (what an I
        keeps for its W) or "all". On TPU the copies are asynchronous in the tick loop; on CPU the
        host is the device (the same run).
      balance_ticks: cost-balanced ticks (`jpipe.schedules.fused_ticks`): a device runs two ops of
        different microbatches in one tick where they fit in its length under the measured costs:
        true, false (default), or "auto" (when the lockstep simulator finds it faster).
      memory_limit: schedule "auto" only: the most stash per device, as microbatch x stage stashes
        (a number, e.g. 4 or 6.5; one stash is one microbatch's forward residuals of a device's
        whole share of the layers) or bytes with a unit (e.g. 512MiB, 2GB: converted with the
        measured bytes of one stash). Unset: what 1F1B needs.
      search_time: schedule "auto" only: seconds the search may take (single-process runs).
      skip_ratio: schedule "skippipe" only: the share of stage visits the microbatches skip (the
        first and last stage are never skipped; `jpipe.schedules.skippipe`). Unset: its default.
      overlap_pairs: schedules "dualpipev" and "dualpipe" only: run DeepSeek's overlapped F&B
        pairs as braided ticks (`build(..., overlap=True)`), so one microbatch's expert all-to-alls
        can run under another's matmuls. Default false: each pair runs as its forward then its backward.
      expert_parallel: model family "moe" only: split the routed experts over the data axis
        (expert parallelism borrowing the data-parallel devices): each stores and computes
        num_experts / data experts, and tokens reach their experts and come back with all-to-alls.
        The data axis must divide model.num_experts.
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
    two_stream_memory: float = 1.25
    balance_ticks: bool | str = False
    recompute: bool = False
    offload: str = "none"
    memory_limit: float | str | None = None
    search_time: float = 30.0
    skip_ratio: float | None = None
    expert_parallel: bool = False
    overlap_pairs: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "stage", "tensor", "virtual", "microbatches"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"parallel.{name}: must be an integer >= 1, got {value!r}")
        _require(
            self.schedule in SCHEDULES
            or self.schedule in ROUTED_SCHEDULES
            or self.schedule in COMPOSITE_SCHEDULES
            or self.schedule == AUTO
            or str(self.schedule).lower().endswith(".csv"),  # a CSV file's schedule (`jpipe.train.schedule_arg`)
            f"parallel.schedule: unknown schedule {self.schedule!r}; known: "
            f"{', '.join(sorted(SCHEDULES) + sorted(ROUTED_SCHEDULES) + sorted(COMPOSITE_SCHEDULES))}, "
            f"a torch class name (ZBVZeroBubble, ...), a CSV file's path, or {AUTO!r} (searched)",
        )
        _require(
            self.skip_ratio is None or self.schedule == "skippipe",
            f"parallel.skip_ratio: only for schedule 'skippipe', got schedule {self.schedule!r}",
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
        _require(
            isinstance(self.two_stream_memory, (int, float))
            and not isinstance(self.two_stream_memory, bool)
            and self.two_stream_memory > 0,
            f"parallel.two_stream_memory: expected a number > 0, got {self.two_stream_memory!r}",
        )
        _require(
            self.recompute in (True, False),
            f"parallel.recompute: expected true or false, got {self.recompute!r}",
        )
        _require(
            not self.recompute or self.remat == "full",
            f"parallel.recompute: runs remat's recomputation as its own op: needs --remat full, got {self.remat!r}",
        )
        _require(
            self.overlap_pairs in (True, False),
            f"parallel.overlap_pairs: expected true or false, got {self.overlap_pairs!r}",
        )
        _require(
            not self.overlap_pairs or self.schedule in ("dualpipev", "dualpipe"),
            f"parallel.overlap_pairs: only schedules 'dualpipev' and 'dualpipe' have F&B pairs, got {self.schedule!r}",
        )
        _require(
            self.offload in ("none", "stash", "weights", "all"),
            f"parallel.offload: expected 'none', 'stash', 'weights' or 'all', got {self.offload!r}",
        )
        _require(
            self.balance_ticks in (True, False, "auto"),
            f"parallel.balance_ticks: expected true, false or 'auto', got {self.balance_ticks!r}",
        )
        if self.memory_limit is not None:
            try:
                limit = parse_memory_limit(self.memory_limit)
            except ValueError as error:
                raise ConfigError(f"parallel.memory_limit: {error}") from None
            if limit.stashes is not None:  # "4" from the command line is the number 4
                object.__setattr__(self, "memory_limit", limit.stashes)
        search_time = self.search_time
        _require(
            isinstance(search_time, (int, float)) and not isinstance(search_time, bool) and search_time > 0,
            f"parallel.search_time: must be seconds > 0, got {search_time!r}",
        )

    @property
    def memory(self) -> MemoryLimit | None:
        """`memory_limit` parsed; None when unset."""
        return None if self.memory_limit is None else parse_memory_limit(self.memory_limit)

    @property
    def num_devices(self) -> int:
        return self.data * self.stage * self.tensor

    @property
    def schedule_options(self) -> dict[str, Any]:
        """Keyword options for `jpipe.schedules.build(schedule, ...)`: skip_ratio, the pairs' overlap."""
        options = {} if self.skip_ratio is None else {"skip_ratio": self.skip_ratio}
        return options | ({"overlap": True} if self.overlap_pairs else {})

    @property
    def num_stages(self) -> int:
        return self.stage * self.virtual

    def pipeline_options(self) -> PipelineOptions:
        """The executor's options these fields set (remat, backward split, sends, ticks, recompute, offload)."""
        from jpipe.pipeline.options import PipelineOptions  # here: importing jpipe.pipeline starts JAX

        return PipelineOptions(
            remat=self.remat,
            split_backward=self.split_backward,
            overlap_sends=self.overlap_sends,
            balance_ticks=self.balance_ticks,
            recompute=self.recompute,
            offload=self.offload,
        )


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
      decay_steps: the step at which the cosine decay reaches its end (warmup included); the
        learning rate stays at its final value after it. Unset: run.steps. Extending a run
        (`--resume --steps N` above its steps) sets it to the run's old steps, so the extension
        trains at the final learning rate; give it with the new steps to stretch the decay instead.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"optimizer.learning_rate: must be > 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"optimizer.warmup_steps: must be >= 0, got {self.warmup_steps}")
        _require(
            0.0 <= self.min_learning_rate_ratio <= 1.0,
            f"optimizer.min_learning_rate_ratio: must be in [0, 1], got {self.min_learning_rate_ratio}",
        )
        _require(self.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm > 0, f"optimizer.clip_norm: must be > 0, got {self.clip_norm}")
        _require(
            self.decay_steps is None or self.decay_steps >= 1,
            f"optimizer.decay_steps: must be >= 1 (or unset: run.steps), got {self.decay_steps}",
        )

    def schedule_shape(self, total_steps: int) -> tuple[int, int]:
        """`(warmup, decay)` of a run of `total_steps`: the warmup steps and the schedule's length, warmup included.

        The length is `decay_steps`, or `total_steps` when unset; the warmup is cut to leave one decay step.
        """
        horizon = total_steps if self.decay_steps is None else self.decay_steps
        warmup = min(self.warmup_steps, max(horizon - 1, 0))
        return warmup, max(horizon, warmup + 1)

    def learning_rate_at(self, total_steps: int, count: int) -> float:
        """The learning rate at optimizer step count `count` (step `s` of a run, from 1, trains with `s - 1`).

        What `jpipe.train.optimizer.learning_rate_schedule` gives, in plain Python (usable before JAX starts).
        """
        warmup, decay = self.schedule_shape(total_steps)
        peak, end = self.learning_rate, self.learning_rate * self.min_learning_rate_ratio
        if count < warmup:
            return peak * count / warmup
        fraction = min(count - warmup, decay - warmup) / (decay - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * fraction))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Text (as bytes) or token files, memory-mapped; batches are a function of (seed, step).

    Attributes:
      path: a text file or folder (.py, .txt, .md, .rst files, read as bytes), or a token folder
        written by `python -m jpipe.data.prepare` (its vocabulary is the model's); unset means the
        Python standard library's sources (no download).
      seq_len: tokens (bytes of text) per example; at most the model's seq_len.
      batch_size: global examples per step, split into microbatches and over data replicas.
      seed: seed of the batch order (batches depend only on it and the step).
      eval_fraction: the last fraction of the corpus, held out for evaluation.
      max_corpus_bytes: read at most this many bytes of text (unset: all of it); a token folder is
        read whole.
      cross_document_attention: whether attention may cross a document boundary inside a window
        (windows pack documents). False: a token attends only to its own document (masked at the
        token folder's end-of-document token, which sets model.document_end); needs a token folder.
    """

    path: str | None = None
    seq_len: int = 64
    batch_size: int = 16
    seed: int = 0
    eval_fraction: float = 0.01
    max_corpus_bytes: int | None = None
    cross_document_attention: bool = True

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
      steps: optimizer steps; the learning-rate schedule spans them (unless optimizer.decay_steps is
        set). On --resume, a new value extends the run (or ends it earlier, not before its newest
        checkpoint) and keeps the schedule's horizon.
      checkpoint_every: save a checkpoint every this many steps (and at the last).
      checkpoint_every_minutes: also save after a step that ends this many minutes after the last
        save (process 0's clock decides, every process saves the same step); unset: by steps only.
      keep_checkpoints: keep the newest this many checkpoints.
      eval_every: evaluate on held-out data every this many steps (and at the last).
      eval_batches: held-out batches per evaluation.
      log_every: print the progress line every this many steps.
      seed: seed of the parameter initialisation.
      stop_at_step: leave after this step as if preempted (the schedule still spans `steps`);
        unset: run to the end.
      profile_steps: write a `jax.profiler` trace of steps N to M (both included), given as "N..M"
        or "N" for one step, to <out>/profile (TensorBoard's and xprof's format); unset: no trace.
      preemption_signals: signals that stop the run cleanly, comma-separated (TERM, INT, USR1, ...;
        "none": none): the step in flight finishes and is saved, then the run exits with status
        128 + the signal's number (143 for TERM); a second signal exits at once, keeping the last
        committed checkpoint. For SLURM's --signal=USR1@SECONDS add USR1.
    """

    out: str = "runs/default"
    steps: int = 200
    checkpoint_every: int = 50
    checkpoint_every_minutes: float | None = None
    keep_checkpoints: int = 3
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    seed: int = 0
    stop_at_step: int | None = None
    profile_steps: str | None = None
    preemption_signals: str = "TERM,INT"

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"run.steps: must be >= 1, got {self.steps}")
        _require(self.checkpoint_every >= 1, f"run.checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        _require(
            self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0,
            f"run.checkpoint_every_minutes: must be > 0, got {self.checkpoint_every_minutes}",
        )
        _require(self.keep_checkpoints >= 1, f"run.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        _require(self.eval_every >= 1, f"run.eval_every: must be >= 1, got {self.eval_every}")
        _require(self.eval_batches >= 1, f"run.eval_batches: must be >= 1, got {self.eval_batches}")
        _require(self.log_every >= 1, f"run.log_every: must be >= 1, got {self.log_every}")
        _require(
            self.stop_at_step is None or 1 <= self.stop_at_step <= self.steps,
            f"run.stop_at_step: must be in [1, steps={self.steps}], got {self.stop_at_step}",
        )
        if self.profile_steps is not None:
            parse_step_range(self.profile_steps, self.steps, "run.profile_steps")
        try:
            parse_signals(self.preemption_signals)
        except SignalNameError as error:
            raise ConfigError(f"run.preemption_signals: {error}") from None

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """`profile_steps` as `(first, last)` steps, both included; None when unset."""
        return None if self.profile_steps is None else parse_step_range(self.profile_steps, self.steps)


_STEP_RANGE = re.compile(r"^\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?$")


def parse_step_range(text: str, steps: int, name: str = "steps") -> tuple[int, int]:
    """`"N..M"` (or `"N"`, one step) -> `(N, M)` with `1 <= N <= M <= steps`; ConfigError naming `name` otherwise."""
    match = _STEP_RANGE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"{name}: expected N..M (the first and last step, e.g. 5..7) or N, got {text!r}")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    _require(first >= 1, f"{name}: the first step must be >= 1 (steps count from 1), got {text!r}")
    _require(first <= last, f"{name}: the first step comes after the last, got {text!r}")
    _require(last <= steps, f"{name}: the last step must be <= steps ({steps}), got {text!r}")
    return first, last


def as_dict(config: Any) -> dict:
    """A JSON-able dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)
