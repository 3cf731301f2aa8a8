"""`--init-from`: start a new run from another run's weights (fine-tuning, continued pretraining).

The source is a run folder (its newest checkpoint) or one checkpoint, `<run>/checkpoints/<step>`.
Only the parameters are read; the optimizer state starts afresh and the new run counts its steps,
learning-rate schedule and batches from step 0. Checkpoints are stored by layer, so the source may
have been trained with any layout and schedule; its model must be this run's (checked against its
`config.json` before JAX starts, naming the fields that differ).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from jpipe.train.config import ConfigError, as_dict
from jpipe.train.presets import TrainConfig


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where `--init-from` reads weights: `run`'s checkpoint `step` (None: its newest)."""

    run: pathlib.Path
    step: int | None = None

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.run / "checkpoints"

    def describe(self) -> str:
        return f"{self.run} ({'newest checkpoint' if self.step is None else f'step {self.step}'})"


def parse_init_from(path: str) -> InitSource:
    """A run folder or `<run>/checkpoints/<step>` -> `InitSource`; ConfigError naming `--init-from`."""
    given = pathlib.Path(path)
    if given.parent.name == "checkpoints" and given.name.isdigit():
        if not given.is_dir():
            raise ConfigError(f"--init-from: no checkpoint {given}")
        return InitSource(given.parent.parent, int(given.name))
    if not (given / "checkpoints").is_dir():
        raise ConfigError(
            f"--init-from: expected a run folder (holding checkpoints/) or a checkpoint (<run>/checkpoints/<step>), "
            f"got {path!r}"
        )
    return InitSource(given)


def check_model(source: InitSource, config: TrainConfig) -> None:
    """ConfigError unless the source run's model (its `config.json`) is `config`'s, naming what differs."""
    path = source.run / "config.json"
    try:
        saved = json.loads(path.read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--init-from: cannot read the source run's model from {path} ({error})") from None
    ours = json.loads(json.dumps(as_dict(config)["model"], default=str))
    differ = [
        f"model.{key} ({saved.get(key)!r} there, {value!r} here)"
        for key, value in ours.items()
        if saved.get(key) != value
    ]
    if differ:
        raise ConfigError(
            f"--init-from: the model of {source.run} differs from this run's: {', '.join(differ)}; weights load only "
            "into the same model (the layout may differ)"
        )
