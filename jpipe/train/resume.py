"""`--resume`: continue a run from its saved `config.json`, changing only its layout.

A run writes its whole configuration to `<out>/config.json` when it starts (`jpipe.train.loop`).
Resuming starts from that file, not from a preset, so a run started with `--layers 12` resumes
with `--resume --out <out>` alone. Checkpoints are stored by layer, independent of how the model
is laid out over devices, so the layout may change on resume: every `parallel` field (schedule,
stages, virtual, microbatches, data, tensor, remat, fsdp, split_backward, ...), plus where the run
now lives (`run.out`), when to leave early (`run.stop_at_step`), which steps to profile
(`run.profile_steps`), when to save by the clock (`run.checkpoint_every_minutes`) and which signals
stop it cleanly (`run.preemption_signals`): none of these changes a loss. Any other change would
make a different run (another model, data, optimizer or length); it is refused, naming the flags.

`--resume` of a run that does not exist is an error (a mistyped `--out` must not train a new run
from step 0); `--resume auto` resumes the run when it exists and starts it otherwise, so a
requeued cluster job can run the same command every time.
"""

from __future__ import annotations

import argparse
import os
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
    """Whether the dotted field `key` may differ from the saved configuration on `--resume`."""
    return key.startswith("parallel.") or key in RESUMABLE_KEYS


def resume_config(saved: TrainConfig, overrides: Overrides, sources: dict[str, str], path: str) -> TrainConfig:
    """The saved configuration with `overrides` (from a config file and flags) applied.

    `sources` names where each override came from ("--layers", or a file's path), for messages;
    `path` is the saved file's. Raises ConfigError, one line naming every refused source with its
    saved and requested values, when an override changes a field that `may_change_on_resume` says
    may not change.
    """
    before = flatten(saved)
    refused = [
        f"{sources.get(key, key)} ({_show(before[key])} -> {_show(value)})"
        for key, value in overrides.items()
        if not may_change_on_resume(key) and value != before[key]
    ]
    if refused:
        allowed = ", ".join(flag_name(key) for key in before if may_change_on_resume(key))
        raise ConfigError(
            f"--resume: {', '.join(refused)} would change the run saved in {path}; only the layout, "
            f"where to stop, what to profile and when to save may change on resume ({allowed})"
        )
    return apply_overrides(saved, overrides)


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)
