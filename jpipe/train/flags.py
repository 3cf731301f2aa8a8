"""Command-line flags derived from the configuration dataclasses (`jpipe.train.fields`).

Every field of every section gets a flag named by its dotted key (`--model.num-layers`,
`--optimizer.weight-decay`); the common ones also have a short name (`--layers`, `--stages`). The
type comes from the field's annotation, the help text from its documentation, and the default
shown in `--help` from the configuration the run would start from (the preset, with the config
file applied). Parsed values stay None unless given, so callers see exactly which flags the user
passed (`given_overrides`): flags override the config file, which overrides the preset.

argparse rather than a generated-CLI library: errors must be one line naming the flag (exit 2),
the caller must know which flags were given (to layer them over a file, or over a saved run on
`--resume`), and the established short names stay as they are.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from jpipe.train.fields import FieldSpec, config_fields

# Short names of common fields (dotted key -> flag without "--"; also the attribute on the namespace).
SHORT_NAMES = {
    "parallel.schedule": "schedule",
    "parallel.stage": "stages",
    "parallel.virtual": "virtual",
    "parallel.microbatches": "microbatches",
    "parallel.data": "data",
    "parallel.tensor": "tensor",
    "parallel.remat": "remat",
    "parallel.fsdp": "fsdp",
    "parallel.split_backward": "split_backward",
    "parallel.overlap_sends": "overlap_sends",
    "parallel.two_stream_memory": "two_stream_memory",
    "parallel.balance_ticks": "balance_ticks",
    "parallel.recompute": "recompute",
    "parallel.offload": "offload",
    "parallel.memory_limit": "memory_limit",
    "parallel.search_time": "search_time",
    "parallel.skip_ratio": "skip_ratio",
    "parallel.expert_parallel": "expert_parallel",
    "parallel.overlap_pairs": "overlap_pairs",
    "run.steps": "steps",
    "run.checkpoint_every": "checkpoint_every",
    "run.checkpoint_every_minutes": "checkpoint_every_minutes",
    "run.keep_checkpoints": "keep_checkpoints",
    "run.eval_every": "eval_every",
    "run.out": "out",
    "run.seed": "seed",
    "run.stop_at_step": "stop_at_step",
    "run.profile_steps": "profile_steps",
    "run.preemption_signals": "preemption_signals",
    "optimizer.learning_rate": "learning_rate",
    "optimizer.warmup_steps": "warmup_steps",
    "optimizer.decay_steps": "decay_steps",
    "data.batch_size": "batch_size",
    "data.seq_len": "seq_len",
    "data.path": "data_path",
    "data.cross_document_attention": "cross_document_attention",
    "model.family": "model",
    "model.num_kv_heads": "kv_heads",
    "model.num_layers": "layers",
    "model.d_model": "d_model",
    "model.num_heads": "heads",
    "model.compute_dtype": "compute_dtype",
}

# Placeholders in `--help` for fields whose type alone says too little (default: INT, FLOAT, STR).
METAVARS = {
    "run.profile_steps": "N..M",
    "run.checkpoint_every_minutes": "MINUTES",
    "run.preemption_signals": "SIGNALS",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `error: <what> (see --help)`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to options whose help does not state its default already.

    The configuration flags state theirs (the preset's value: their parsed default is None).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def dest(key: str) -> str:
    """The namespace attribute of the field `key`: its short name, else the dotted key itself."""
    return SHORT_NAMES.get(key, key)


def flag_name(key: str) -> str:
    """The flag users know the field `key` by: `--stages` for "parallel.stage", else `--model.norm-eps`."""
    return "--" + dest(key).replace("_", "-")


def _option_strings(key: str) -> list[str]:
    dotted = "--" + key.replace("_", "-")
    return [flag_name(key), dotted] if key in SHORT_NAMES else [dotted]


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_bool_or_auto(text: str) -> bool | str:
    """`--split-backward` values: true/false (also yes/no, on/off, 1/0) or auto."""
    lowered = text.lower()
    if lowered == "auto":
        return "auto"
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")


def _add_field(group: argparse._ArgumentGroup, spec: FieldSpec, default: Any) -> None:
    help_text = f"{spec.doc} (default: {_show(default)})".strip().replace("%", "%%")
    options = _option_strings(spec.key)
    common = {"dest": dest(spec.key), "default": None, "help": help_text}
    kinds = spec.kinds
    if kinds == (bool,):
        group.add_argument(*options, action=argparse.BooleanOptionalAction, **common)
    elif set(kinds) == {bool, str}:
        group.add_argument(
            *options, type=parse_bool_or_auto, nargs="?", const=True, metavar="{auto,true,false}", **common
        )
    elif set(kinds) == {float, str}:
        # A number or a text form of one (`--memory-limit 4` or `512MiB`): the field's check parses it.
        group.add_argument(*options, type=str, metavar="VALUE", **common)
    elif len(kinds) == 1 and kinds[0] in (int, float, str):
        metavar = METAVARS.get(spec.key, kinds[0].__name__.upper())
        group.add_argument(*options, type=kinds[0], metavar=metavar, **common)
    else:
        raise TypeError(f"no command-line form for {spec.key}: {spec.annotation!r}")


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Any = None) -> None:
    """`--preset`, `--config` and one flag per configuration field, grouped by section.

    `defaults` (a `TrainConfig`, default the quickstart preset) is what `--help` shows as each
    flag's default; every parsed value is None unless given (see `given_overrides`).
    """
    from jpipe.train.presets import PRESETS, preset

    defaults = preset("quickstart") if defaults is None else defaults
    parser.add_argument(
        "--preset",
        default=None,
        help=f"starting configuration: {', '.join(PRESETS)} (default: the config file's preset, else quickstart)",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="experiment file: TOML tables [model], [parallel], [optimizer], [data], [run] with field = value, "
        "optionally preset = NAME; it overrides the preset and flags override it (default: none)",
    )
    fields = config_fields(defaults)
    for section in ("model", "parallel", "optimizer", "data", "run"):
        section_config = getattr(defaults, section)
        summary = (type(section_config).__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(f"{section} ({type(section_config).__name__})", summary)
        for spec in fields.values():
            if spec.section == section:
                _add_field(group, spec, getattr(section_config, spec.name))


def given_overrides(args: argparse.Namespace, defaults: Any = None) -> dict[str, Any]:
    """Dotted key -> value for each configuration flag given on the command line."""
    from jpipe.train.presets import preset

    fields = config_fields(preset("quickstart") if defaults is None else defaults)
    return {key: getattr(args, dest(key)) for key in fields if getattr(args, dest(key), None) is not None}


def name_flags(message: str, given: dict[str, str]) -> str:
    """Prefix `message` with whatever set the fields it names: `--stages: parallel.stage: must be ...`.

    `given` maps dotted keys to their source (a flag like "--stages", or a file's path). A field is
    named by its dotted key anywhere in `message` ("parallel.stage"), or by its bare name in a
    message about its section ("model: d_model=16 must divide by num_heads=3"). A message naming
    none of the given fields is returned unchanged.
    """
    named = {f"{s}.{f}" for s, f in re.findall(r"\b(model|parallel|optimizer|data|run)\.(\w+)", message)}
    section = re.match(r"(model|parallel|optimizer|data|run)[.:]", message)
    if section:
        named |= {
            key
            for key in given
            if key.startswith(section.group(1) + ".") and re.search(rf"\b{key.split('.')[1]}\b", message)
        }
    sources = list(dict.fromkeys(source for key, source in given.items() if key in named))
    return f"{', '.join(sources)}: {message}" if sources else message
