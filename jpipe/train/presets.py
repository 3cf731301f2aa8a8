"""`TrainConfig` and named starting points for runs; a config file and flags apply on top (`jpipe.train.cli`)."""

from __future__ import annotations

import dataclasses

from jpipe.models.config import GPTConfig
from jpipe.train.config import AUTO, ConfigError, DataConfig, OptimizerConfig, ParallelConfig, RunConfig
from jpipe.train.schedule_arg import csv_schedule


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs: model, parallel layout and schedule, optimizer, data, run."""

    model: GPTConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    run: RunConfig

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.seq_len:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds the model's seq_len ({self.model.seq_len})")
        per_step = self.parallel.microbatches * self.parallel.data
        if self.data.batch_size % per_step:
            raise ConfigError(
                f"data.batch_size ({self.data.batch_size}) must divide into microbatches x data = "
                f"{self.parallel.microbatches} x {self.parallel.data}"
            )
        from jpipe.schedules import SCHEDULES, ScheduleError, build

        parallel = self.parallel
        if parallel.schedule == AUTO and self.model.moe:
            raise ConfigError("parallel.schedule: 'auto' does not measure model.family 'moe' yet; name a schedule")
        if parallel.schedule == AUTO:
            # The search starts from the named schedules that build for some virtual <= parallel.virtual.
            if not any(
                _builds(name, parallel.stage, parallel.microbatches, virtual)
                for name in SCHEDULES
                for virtual in range(1, parallel.virtual + 1)
            ):
                raise ConfigError(
                    f"parallel (schedule/stages/microbatches/virtual): no named schedule builds for "
                    f"{parallel.stage} stages and {parallel.microbatches} microbatches with virtual 1 to "
                    f"{parallel.virtual}, so schedule 'auto' has nothing to start its search from"
                )
        elif csv_schedule(parallel) is None:  # a CSV file's schedule is checked against the layout there
            try:
                build(
                    parallel.schedule,
                    parallel.stage,
                    parallel.microbatches,
                    parallel.virtual,
                    **parallel.schedule_options,
                )
            except ScheduleError as error:
                raise ConfigError(f"parallel (schedule/stages/microbatches/virtual): {error}") from error
        tensor = self.parallel.tensor
        split = {"model.num_heads": self.model.num_heads, "model.vocab_size": self.model.vocab_size}
        if self.model.num_kv_heads is not None:
            split["model.num_kv_heads"] = self.model.num_kv_heads
        split["MLP hidden units (model.mlp_ratio x model.d_model)"] = self.model.d_ff
        if self.model.moe:
            split["expert hidden units (model.expert_d_ff, or model.mlp_ratio x model.d_model)"] = (
                self.model.expert_width
            )
        if self.parallel.expert_parallel:
            if not self.model.moe:
                raise ConfigError(
                    f"parallel.expert_parallel: only for model.family 'moe', got model.family {self.model.family!r}"
                )
            if self.model.num_experts % self.parallel.data:
                raise ConfigError(
                    f"parallel.expert_parallel: {self.parallel.data} data-parallel devices must divide "
                    f"model.num_experts = {self.model.num_experts}"
                )
        for name, size in split.items():
            if size % tensor:
                raise ConfigError(f"parallel.tensor: {tensor} tensor-parallel devices must divide {name} = {size}")


def _builds(name: str, stages: int, microbatches: int, virtual: int) -> bool:
    from jpipe.schedules import ScheduleError, build

    try:
        build(name, stages, microbatches, virtual)
    except ScheduleError:
        return False
    return True


def _quickstart() -> TrainConfig:
    """The README's main job: a small byte-level GPT, data 2 x stage 4, 1f1b, 8 fake CPU devices."""
    return TrainConfig(
        model=GPTConfig(vocab_size=256, seq_len=64, d_model=64, num_heads=4, num_layers=8, mlp_ratio=4),
        parallel=ParallelConfig(data=2, stage=4, tensor=1, virtual=1, schedule="1f1b", microbatches=8),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20),
        data=DataConfig(seq_len=64, batch_size=32),
        run=RunConfig(out="runs/quickstart", steps=150, checkpoint_every=50, eval_every=50),
    )


def _tiny() -> TrainConfig:
    """For tests: seconds per run."""
    return TrainConfig(
        model=GPTConfig(vocab_size=256, seq_len=16, d_model=16, num_heads=2, num_layers=4, mlp_ratio=2),
        parallel=ParallelConfig(data=2, stage=2, tensor=1, virtual=1, schedule="1f1b", microbatches=2),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
        data=DataConfig(seq_len=16, batch_size=8, max_corpus_bytes=2_000_000),
        run=RunConfig(out="runs/tiny", steps=6, checkpoint_every=2, eval_every=3, eval_batches=1),
    )


PRESETS = {"quickstart": _quickstart, "tiny": _tiny}


def preset(name: str) -> TrainConfig:
    """The preset called `name`."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
