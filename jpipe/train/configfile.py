"""Configuration files: an experiment's TOML file, a run's saved `config.json`, and applying overrides.

An experiment file names fields by section, as `TrainConfig` nests them, and may name its preset:

    preset = "tiny"            # optional; the command line's --preset wins
    [model]
    num_layers = 8
    [parallel]
    schedule = "zbv"
    virtual = 2

Keys, sections and value types are checked against the dataclasses (`jpipe.train.fields`);
anything unknown or mistyped is a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import tomllib

from jpipe.train.config import ConfigError
from jpipe.train.fields import SECTIONS, config_fields, flatten
from jpipe.train.presets import TrainConfig

Overrides = dict[str, Any]  # dotted key ("model.num_layers") -> value


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """An experiment file, read and type-checked.

    Attributes:
      path: where it was read from (errors name it).
      preset: the preset it names, or None.
      overrides: dotted key -> value for every field it sets.
    """

    path: str
    preset: str | None
    overrides: Overrides


def read_toml(path: str | pathlib.Path, base: TrainConfig) -> ConfigFile:
    """Read and check the TOML experiment file `path` against `base`'s section classes."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {error.strerror or error}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from error
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{path}: preset: expected a preset name, got {preset!r}")
    return ConfigFile(str(path), preset, nested_overrides(data, base, f"{path}: "))


def nested_overrides(data: dict[str, Any], base: TrainConfig, where: str) -> Overrides:
    """`{"model": {"num_layers": 8}, ...}` -> `{"model.num_layers": 8}`, each value type-checked.

    `where` prefixes error messages (e.g. "exp.toml: "). Unknown sections and fields are errors.
    """
    fields = config_fields(base)
    overrides: Overrides = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}unknown section {section!r}; expected preset, {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}{section}: expected a table of fields, got {values!r}")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in fields:
                known = ", ".join(spec.name for spec in fields.values() if spec.section == section)
                raise ConfigError(f"{where}{key}: unknown field; {section} has {known}")
            overrides[key] = fields[key].check(value, where)
    return overrides


def apply_overrides(config: TrainConfig, overrides: Overrides) -> TrainConfig:
    """`config` with the dotted `overrides` applied, validated as a whole.

    A `data.seq_len` above the model's `seq_len` raises the model's to match, unless
    `model.seq_len` is overridden too. Raises ConfigError (messages start with the dotted key of
    the field at fault where one is at fault, e.g. "parallel.stage: must be an integer >= 1").
    """
    overrides = dict(overrides)
    seq_len = overrides.get("data.seq_len")
    if seq_len is not None and "model.seq_len" not in overrides and seq_len > config.model.seq_len:
        overrides["model.seq_len"] = seq_len
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        changes.setdefault(section, {})[name] = value
    sections = {name: getattr(config, name) for name in SECTIONS}
    try:
        for name, fields in changes.items():
            sections[name] = dataclasses.replace(sections[name], **fields)
        return dataclasses.replace(config, **sections)
    except ValueError as error:  # ConfigError, or a model's own ValueError
        message = str(error)
        for name in SECTIONS:
            prefix = type(sections[name]).__name__  # "GPTConfig.num_layers: ..." -> "model.num_layers: ..."
            if message.startswith((prefix + ".", prefix + ":")):
                message = name + message[len(prefix) :]
        raise ConfigError(message) from error


def read_saved_config(out: str | pathlib.Path, like: TrainConfig) -> TrainConfig | None:
    """The configuration a run saved as `<out>/config.json` (see `jpipe.train.loop`), or None.

    Every field is read back from the file (a field the file lacks, added to jpipe since the run
    started, takes its dataclass default); `like` (any config with the same section classes)
    supplies the classes. A file that does not parse or names unknown fields is a ConfigError.
    """
    path = pathlib.Path(out) / "config.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: cannot read {path}: {error}") from error
    if not isinstance(data, dict) or set(data) != set(SECTIONS):
        raise ConfigError(f"--resume: {path} does not hold a training configuration (sections {', '.join(SECTIONS)})")
    overrides = nested_overrides(data, like, f"--resume: {path}: ")
    for key in set(flatten(like)) - set(overrides):  # a field added since the run started: its default
        section, name = key.split(".", 1)
        field = next(f for f in dataclasses.fields(getattr(like, section)) if f.name == name)
        if field.default is dataclasses.MISSING:
            raise ConfigError(f"--resume: {path} lacks {key}")
        overrides[key] = field.default
    return apply_overrides(like, overrides)
