"""`--resume`: continue a run from its saved `config.json`, changing only its layout.

A run writes its whole configuration to `<out>/config.json` when it starts (`jpipe.train.loop`).
Resuming starts from that file, not from a preset, so a run started with `--layers 12` resumes
with `--resume --out <out>` alone. Checkpoints are stored by layer, independent of how the model
is laid out over devices, so the layout may change on resume: every `parallel` field (schedule,
stages, virtual, microbatches, data, tensor, remat, fsdp, split_backward, ...), plus where the run
now lives (`run.out`), when to leave early (`run.stop_at_step`), which steps to profile
(`run.profile_steps`), when to save by the clock (`run.checkpoint_every_minutes`) and which signals
stop it cleanly (`run.preemption_signals`): none of these changes a loss. Any other change would
make a different run (another model, data or optimizer); it is refused, naming the flags.

The length may change too: `--resume --steps N` extends a run (finished or not) to N steps, or
ends it earlier, at no less than its newest checkpoint's step. The learning-rate schedule keeps
its horizon: `optimizer.decay_steps` is set to the run's old steps (unless set already), so the
steps past it train at the final learning rate and the steps already trained keep theirs.
`--decay-steps M` given with the new steps moves the decay's end instead (the cosine is
stretched; the learning rate jumps to the stretched curve's value at the resumed step).
`extension_note` says which in one line at the start.

`--resume` of a run that does not exist is an error (a mistyped `--out` must not train a new run
from step 0); `--resume auto` resumes the run when it exists and starts it otherwise, so a
requeued cluster job can run the same command every time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

from jpipe.train.config import ConfigError
from jpipe.train.configfile import Overrides, apply_overrides
from jpipe.train.fields import flatten
from jpipe.train.flags import flag_name
from jpipe.train.presets import TrainConfig

RESUMABLE_KEYS = (
    "run.out",
    "run.stop_at_step",
    "run.profile_steps",
    "run.checkpoint_every_minutes",
    "run.preemption_signals",
)  # besides every parallel.* field
LENGTH_KEYS = ("run.steps", "optimizer.decay_steps")  # may change on resume: the run's length, with the steps
RESUME_AUTO = "auto"  # `--resume auto`: resume when the run exists, else start it


def resume_mode(value: str) -> str:
    """argparse type of `--resume`'s optional value: only "auto" (plain `--resume` is True)."""
    if value != RESUME_AUTO:
        raise argparse.ArgumentTypeError(f"expected no value or {RESUME_AUTO!r}, got {value!r}")
    return value


def run_exists(out: str) -> bool:
    """Whether `out` holds a run to resume (its `config.json`, written when a run starts)."""
    return os.path.isfile(os.path.join(out, "config.json"))


def check_missing_run(mode: bool | str, out: str) -> None:
    """ConfigError for plain `--resume` (`mode` True) of a run that does not exist; `auto` passes."""
    if mode is True and not run_exists(out):
        raise ConfigError(
            f"--resume: no run to resume in {out} (no config.json there); check --out, or pass --resume "
            f"{RESUME_AUTO} to start the run where it does not exist yet"
        )


def resumes(mode: bool | str, out: str) -> bool:
    """Whether training resumes: `--resume`, or `--resume auto` where the run exists."""
    return bool(mode) and (mode is True or run_exists(out))


def may_change_on_resume(key: str) -> bool:
    """Whether the dotted field `key` may differ from the saved configuration on `--resume`.

    Besides these, `run.steps` may change, and `optimizer.decay_steps` with it (`resume_config`).
    """
    return key.startswith("parallel.") or key in RESUMABLE_KEYS


def newest_checkpoint_step(out: str | os.PathLike[str]) -> int | None:
    """The newest committed checkpoint's step in the run `out` (its `checkpoints/<step>` folders), or None.

    Read from the folder names alone (no JAX): orbax writes a step under a temporary name and renames
    it to `<step>` once committed (`jpipe.train.checkpoint`).
    """
    folder = pathlib.Path(out) / "checkpoints"
    steps = (
        [int(path.name) for path in folder.iterdir() if path.name.isdigit() and path.is_dir()]
        if folder.is_dir()
        else []
    )
    return max(steps, default=None)


def resume_config(saved: TrainConfig, overrides: Overrides, sources: dict[str, str], path: str) -> TrainConfig:
    """The saved configuration with `overrides` (from a config file and flags) applied.

    `sources` names where each override came from ("--layers", or a file's path), for messages;
    `path` is the saved file's. Raises ConfigError, one line naming every refused source with its
    saved and requested values, when an override changes a field that `may_change_on_resume` says
    may not change.
    """
    before = flatten(saved)
    new_length = overrides.get("run.steps", saved.run.steps) != saved.run.steps
    refused = [
        f"{sources.get(key, key)} ({_show(before[key])} -> {_show(value)})"
        for key, value in overrides.items()
        if not may_change_on_resume(key) and not (key in LENGTH_KEYS and new_length) and value != before[key]
    ]
    if refused:
        allowed = ", ".join(flag_name(key) for key in before if may_change_on_resume(key))
        raise ConfigError(
            f"--resume: {', '.join(refused)} would change the run saved in {path}; only the layout, "
            f"where to stop, what to profile and when to save may change on resume ({allowed}), and the "
            f"length: {flag_name('run.steps')} (with {flag_name('optimizer.decay_steps')} to move the decay's end)"
        )
    if new_length and "optimizer.decay_steps" not in overrides and saved.optimizer.decay_steps is None:
        overrides = {**overrides, "optimizer.decay_steps": saved.run.steps}  # the schedule keeps its horizon
    config = apply_overrides(saved, overrides)
    if new_length:
        out = os.path.dirname(path)
        newest = newest_checkpoint_step(out)
        if newest is not None and config.run.steps < newest:
            raise ConfigError(
                f"{sources.get('run.steps', 'run.steps')}: the run in {out} has a checkpoint at step {newest}; "
                f"resuming it needs --steps {newest} or more, got {config.run.steps}"
            )
    return config


def extension_note(saved: TrainConfig, config: TrainConfig, out: str) -> str | None:
    """One line saying what a change of the run's length does to the learning rate (None: no change).

    `saved` is the run's configuration before this resume, `config` the resumed one.
    """
    old, new = saved.run.steps, config.run.steps
    if old == new:
        return None
    start = newest_checkpoint_step(out) or 0
    optimizer = config.optimizer
    _, decay = optimizer.schedule_shape(new)
    final = optimizer.learning_rate * optimizer.min_learning_rate_ratio
    what = f"resume: {'extending' if new > old else 'shortening'} the run from {old} to {new} steps"
    if new <= start:
        return f"{what}: the checkpoint at step {start} is its end; nothing to train"
    if decay <= start:
        return (
            f"{what}; the learning-rate schedule keeps its horizon: its decay ended at step {decay}, so steps "
            f"{start + 1}..{new} train at the final learning rate {final:.3g} (add "
            f"{flag_name('optimizer.decay_steps')} {new} to stretch the decay to the new end instead)"
        )
    before = "" if start == 0 else f" (step {start} trained at {saved.optimizer.learning_rate_at(old, start - 1):.3g})"
    ends = f"after step {decay}" + (", past the run's end" if decay >= new else "")
    return (
        f"{what}; the learning-rate schedule decays until step {decay}: step {start + 1} trains at "
        f"{optimizer.learning_rate_at(new, start):.3g}{before}, and the rate is the final {final:.3g} {ends}"
    )


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)
