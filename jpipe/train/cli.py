"""`python -m jpipe.train` / `jpipe`: train a pipelined GPT from a preset plus overrides.

    python -m jpipe.train --preset quickstart --schedule zbv --stages 4 --virtual 2 \\
        --microbatches 16 --data 2 --tensor 1 --steps 200 --checkpoint-every 10 --out runs/x

Every value is checked (config `__post_init__`) before JAX starts; errors name the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from jpipe.train.config import ConfigError

# flag -> (config section, field, type)
OVERRIDES = {
    "schedule": ("parallel", "schedule", str),
    "stages": ("parallel", "stage", int),
    "virtual": ("parallel", "virtual", int),
    "microbatches": ("parallel", "microbatches", int),
    "data": ("parallel", "data", int),
    "tensor": ("parallel", "tensor", int),
    "remat": ("parallel", "remat", str),
    "steps": ("run", "steps", int),
    "checkpoint_every": ("run", "checkpoint_every", int),
    "keep_checkpoints": ("run", "keep_checkpoints", int),
    "eval_every": ("run", "eval_every", int),
    "out": ("run", "out", str),
    "seed": ("run", "seed", int),
    "stop_at_step": ("run", "stop_at_step", int),
    "learning_rate": ("optimizer", "learning_rate", float),
    "warmup_steps": ("optimizer", "warmup_steps", int),
    "batch_size": ("data", "batch_size", int),
    "seq_len": ("data", "seq_len", int),
    "data_path": ("data", "path", str),
    "layers": ("model", "num_layers", int),
    "d_model": ("model", "d_model", int),
    "heads": ("model", "num_heads", int),
    "compute_dtype": ("model", "compute_dtype", str),
}


def add_config_arguments(result: argparse.ArgumentParser) -> None:
    """`--preset` and one flag per configuration override (`OVERRIDES`, `--fsdp`, `--split-backward`).

    `build_config` turns the parsed flags into a `TrainConfig`; `python -m jpipe.compile` shares both.
    """
    result.add_argument("--preset", default="quickstart", help="starting configuration (quickstart, tiny)")
    for flag, (section, field, kind) in OVERRIDES.items():
        result.add_argument("--" + flag.replace("_", "-"), type=kind, default=None, help=f"{section}.{field}")
    result.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="parallel.fsdp")
    result.add_argument(
        "--split-backward", action=argparse.BooleanOptionalAction, default=None, help="parallel.split_backward"
    )


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="python -m jpipe.train",
        description="Train a byte-level GPT with pipeline (x data x tensor) parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(result)
    result.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    result.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="fake CPU devices per process (default: data x stages x tensor / processes)",
    )
    multi = result.add_argument_group("multi-host (jax.distributed)")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with the cluster's own settings (Cloud TPU, SLURM, ...)",
    )
    multi.add_argument("--coordinator", default=os.environ.get("JPIPE_COORDINATOR"), help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int, default=_env_int("JPIPE_NUM_PROCESSES"))
    multi.add_argument("--process-id", type=int, default=_env_int("JPIPE_PROCESS_ID"))
    multi.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        help="seconds after which a silent peer is declared dead and every process stops with an error",
    )
    return result


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def build_config(args: argparse.Namespace):
    """The preset with the command line's overrides applied (raises ConfigError naming the flag)."""
    from jpipe.train.presets import preset

    config = preset(args.preset)
    sections = {name: getattr(config, name) for name in ("model", "parallel", "optimizer", "data", "run")}
    changes: dict[str, dict] = {name: {} for name in sections}
    for flag, (section, field, _) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            changes[section][field] = value
    if args.fsdp is not None:
        changes["parallel"]["fsdp"] = args.fsdp
    if args.split_backward is not None:
        changes["parallel"]["split_backward"] = args.split_backward
    if "seq_len" in changes["data"] and changes["data"]["seq_len"] > sections["model"].seq_len:
        changes["model"]["seq_len"] = changes["data"]["seq_len"]
    try:
        for name, fields in changes.items():
            if fields:
                sections[name] = dataclasses.replace(sections[name], **fields)
        return dataclasses.replace(config, **sections)
    except (ConfigError, ValueError) as error:
        flag_names = {f"{s}.{f}": "--" + flag.replace("_", "-") for flag, (s, f, _) in OVERRIDES.items()}
        message = str(error)
        for dotted, flag in flag_names.items():
            if message.startswith(dotted):
                message = f"{flag}: {message}"
                break
        raise ConfigError(message) from error


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = build_config(args)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parallel = config.parallel
    processes = args.num_processes or 1
    if args.coordinator and (args.num_processes is None or args.process_id is None):
        print("error: --coordinator needs --num-processes and --process-id", file=sys.stderr)
        return 2
    if parallel.num_devices % processes:
        print(f"error: {parallel.num_devices} devices do not divide over {processes} processes", file=sys.stderr)
        return 2
    devices = args.cpu_devices or parallel.num_devices // processes
    # Fake CPU devices must be requested before JAX starts its backend.
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
    import jax

    jax.config.update("jax_num_cpu_devices", devices)  # only the CPU backend reads it
    if args.coordinator or args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
        )
    if len(jax.devices()) < parallel.num_devices:
        print(
            f"error: data {parallel.data} x stages {parallel.stage} x tensor {parallel.tensor} needs "
            f"{parallel.num_devices} devices, {len(jax.devices())} available",
            file=sys.stderr,
        )
        return 2
    from jpipe.train.loop import TrainingDivergedError, train

    try:
        train(config, resume=args.resume)
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
