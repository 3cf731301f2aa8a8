"""What the configuration dataclasses declare about their fields: types, documentation, sections.

The command line (`jpipe.train.flags`) and the config files (`jpipe.train.configfile`) are both
derived from these dataclasses, so a field added to a section gets a flag, a TOML key, a checked
type and its `--help` text without further code. Fields are addressed by dotted keys
`"<section>.<field>"` (`"model.num_layers"`, `"parallel.stage"`), the sections being
`TrainConfig`'s fields (model, parallel, optimizer, data, run).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

from jpipe.train.config import ConfigError

SECTIONS = ("model", "parallel", "optimizer", "data", "run")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field of one configuration section.

    Attributes:
      section: the section's name in `TrainConfig` ("model", "parallel", ...).
      name: the field's name in the section's dataclass.
      annotation: its resolved type (`int`, `float`, `str`, `bool`, `int | None`, `bool | str`, ...).
      doc: its description from the dataclass's "Attributes:" docstring section ("" when missing).
    """

    section: str
    name: str
    annotation: Any
    doc: str

    @property
    def key(self) -> str:
        """The dotted key, `"<section>.<field>"`."""
        return f"{self.section}.{self.name}"

    @property
    def kinds(self) -> tuple[type, ...]:
        """The non-None types the annotation admits, e.g. `(int,)` for `int | None`, `(bool, str)`."""
        args = typing.get_args(self.annotation) if _is_union(self.annotation) else (self.annotation,)
        return tuple(arg for arg in args if arg is not type(None))

    @property
    def optional(self) -> bool:
        """Whether None (unset) is a valid value."""
        return _is_union(self.annotation) and type(None) in typing.get_args(self.annotation)

    def check(self, value: Any, where: str) -> Any:
        """`value` (from a TOML or JSON file) as this field's type; raises ConfigError naming `where`.

        An int is accepted for a float field (and converted); a bool is never taken for an int.
        """
        if value is None and self.optional:
            return None
        for kind in self.kinds:
            if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
        expected = " or ".join(kind.__name__ for kind in self.kinds) + (" or unset" if self.optional else "")
        raise ConfigError(f"{where}{self.key}: expected {expected}, got {value!r}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> description, from the Google-style "Attributes:" section of `cls`'s docstring.

    A description may continue on more deeply indented lines; they are joined with spaces.
    """
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return docs
    indent = None
    current = None
    for line in lines[lines.index("Attributes:") + 1 :]:
        if not line.strip():
            if docs:
                break
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        match = re.match(r"(\w+)(?: \(.*?\))?: ?(.*)", line.strip()) if depth == indent else None
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None:
            docs[current] = f"{docs[current]} {line.strip()}".strip()
    return docs


def section_fields(section: str, cls: type) -> list[FieldSpec]:
    """The fields of section `section`, whose dataclass is `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    return [
        FieldSpec(section, field.name, hints[field.name], docs.get(field.name, ""))
        for field in dataclasses.fields(cls)
        if field.init
    ]


def config_fields(config: Any) -> dict[str, FieldSpec]:
    """Dotted key -> FieldSpec for every field of every section of `config` (a `TrainConfig`).

    The section classes are taken from `config` itself, so a section holding another model class
    than the default yields that class's fields.
    """
    return {spec.key: spec for section in SECTIONS for spec in section_fields(section, type(getattr(config, section)))}


def flatten(config: Any) -> dict[str, Any]:
    """Dotted key -> value for every field of `config` (a `TrainConfig`)."""
    return {key: getattr(getattr(config, spec.section), spec.name) for key, spec in config_fields(config).items()}
