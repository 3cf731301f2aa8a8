"""`jpipe` / `python -m jpipe.train`: train a pipelined GPT from a preset, a config file and flags.

    jpipe --preset quickstart --schedule zbv --stages 4 --virtual 2 \\
        --microbatches 16 --data 2 --tensor 1 --steps 200 --checkpoint-every 10 --out runs/x
    jpipe --config exp.toml --steps 500       # flags override the file, the file the preset
    jpipe --out runs/x --resume --stages 2     # the run's config.json, with a new layout
    jpipe --out runs/x --resume auto           # resume the run, or start it where there is none
    jpipe --out runs/x --resume --steps 400    # extend it (the learning rate stays at its final value)

Every configuration field has a flag (`jpipe.train.flags`); `--help` shows each one's documentation
and the value the run would use. Every value, and every multi-host flag, is checked before JAX
starts: a user error is one line naming the flag, exit status 2.

Exit status: 0 done, 2 a user error, 3 the loss diverged, 128 + the signal's number when one of
`--preemption-signals` stopped the run with the reached step saved (143 for SIGTERM, 130 for SIGINT,
138 for SIGUSR1): what a shell or Kubernetes reports for a process ended by that signal, so a
requeue rule written for the signal keeps working, and not 0, which would end a Kubernetes Job as
succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from jpipe.train.config import ConfigError
from jpipe.train.configfile import ConfigFile, apply_overrides, read_saved_config, read_toml
from jpipe.train.data import check_data_size, resolve_data
from jpipe.train.flags import (
    HelpFormatter,
    OneLineErrorParser,
    add_config_arguments,
    flag_name,
    given_overrides,
    name_flags,
)
from jpipe.train.init_from import InitSource, check_model, parse_init_from
from jpipe.train.preemption import SignalWatch, exit_status, parse_signals
from jpipe.train.presets import TrainConfig, preset
from jpipe.train.resume import check_missing_run, extension_note, resume_config, resume_mode, resumes
from jpipe.train.schedule_arg import resolve_schedule_flag


def parser(defaults: TrainConfig | None = None, prog: str = "python -m jpipe.train") -> argparse.ArgumentParser:
    """The training command line; `--help` shows `defaults` (default: the quickstart preset)."""
    result = OneLineErrorParser(
        prog=prog,
        usage="%(prog)s [options]",
        formatter_class=HelpFormatter,
        description="Train a GPT or Llama on text or token files with pipeline (x data x tensor) parallelism. "
        "Each option's default is the preset's value (with --config's applied; with --resume, the saved run's). "
        "On SIGTERM or SIGINT (--preemption-signals) the step in flight finishes and is saved, and the run exits "
        "with status 128 + the signal's number (143 for SIGTERM); a second signal exits at once, keeping the last "
        "committed checkpoint.",
    )
    add_config_arguments(result, defaults)
    result.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=resume_mode,
        metavar="auto",
        help="continue the run in --out from its newest checkpoint and its config.json (an error when "
        "there is none); --resume auto starts the run when it does not exist yet (a requeued job's "
        "command); only layout flags (parallel section) may change",
    )
    result.add_argument(
        "--init-from",
        default=None,
        metavar="RUN",
        help="start a new run from the weights of a run folder's newest checkpoint, or of RUN/checkpoints/STEP "
        "(same model, any layout); the optimizer state starts afresh. Ignored when --resume continues a run "
        "(default: unset, random initial weights)",
    )
    result.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="fake CPU devices per process (default: data x stages x tensor / processes)",
    )
    multi = result.add_argument_group("multi-host (jax.distributed)")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with the cluster's own settings (Cloud TPU, SLURM, ...)",
    )
    multi.add_argument(
        "--coordinator",
        default=os.environ.get("JPIPE_COORDINATOR"),
        metavar="HOST:PORT",
        help="address of process 0; needs --num-processes and --process-id (default: $JPIPE_COORDINATOR)",
    )
    multi.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("JPIPE_NUM_PROCESSES"),
        metavar="N",
        help="processes in the run (default: $JPIPE_NUM_PROCESSES, else 1)",
    )
    multi.add_argument(
        "--process-id",
        type=int,
        default=_env_int("JPIPE_PROCESS_ID"),
        metavar="I",
        help="this process's index, 0 to --num-processes - 1 (default: $JPIPE_PROCESS_ID)",
    )
    multi.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        metavar="SECONDS",
        help="seconds after which a silent peer is declared dead and every process stops with an error (default: 30)",
    )
    return result


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}: expected an integer, got {value!r}") from None


def _config_file(args: argparse.Namespace) -> ConfigFile | None:
    if getattr(args, "config", None) is None:
        return None
    return read_toml(args.config, preset("quickstart"))


def _default_virtual(overrides: dict, sources: dict) -> None:
    """A named schedule given without `--virtual` runs with its own chunks per device (zbv 2, bitpipe 4).

    Only when the virtual is given nowhere (flag or config file); unknown names are left to the
    config's own validation, which lists the known ones.
    """
    name = overrides.get("parallel.schedule")
    if name is None or "parallel.virtual" in overrides:
        return
    from jpipe import schedules

    if name in schedules.SCHEDULES or name in schedules.ROUTED_SCHEDULES or name in schedules.COMPOSITE_SCHEDULES:
        overrides["parallel.virtual"] = schedules.default_virtual(name)
        sources["parallel.virtual"] = sources.get("parallel.schedule", "--schedule")


def build_config(args: argparse.Namespace, *, training: bool = False) -> TrainConfig:
    """The configuration `args` ask for (raises ConfigError naming the flag or file at fault).

    The preset (`--preset`, else the file's `preset`, else quickstart), then the config file's
    values (`--config`), then the flags given. With `--resume` and a `config.json` in the run's
    folder, that file replaces preset and config file as the start, and only layout fields may
    change (`jpipe.train.resume`). The model's vocabulary is the data's (`jpipe.train.data`);
    `training` also checks that the data holds a batch (compiling a step reads none).
    """
    file = _config_file(args)
    flags = given_overrides(args)
    sources = {key: file.path for key in file.overrides} if file else {}
    sources.update({key: flag_name(key) for key in flags})
    overrides = {**(file.overrides if file else {}), **flags}
    resolve_schedule_flag(overrides, sources)  # torch class names, CSV files
    _default_virtual(overrides, sources)
    base = preset(args.preset or (file.preset if file else None) or "quickstart")
    try:
        config = _configured(args, base, overrides, sources, training)
        if training:
            check_data_size(config.data)
        return config
    except ConfigError as error:
        message = str(error)
        if message.startswith("--"):
            raise
        raise ConfigError(name_flags(message, sources)) from error


def _configured(
    args: argparse.Namespace, base: TrainConfig, overrides: dict, sources: dict, training: bool
) -> TrainConfig:
    """`base` (or, with `--resume`, the saved run) with `overrides`; the model's vocabulary the data's."""
    if getattr(args, "resume", False):
        out = overrides.get("run.out", base.run.out)
        saved = read_saved_config(out, base)
        if saved is not None:
            # The saved run's vocabulary is the data's it trained on: it must still be.
            config = resume_config(saved, overrides, sources, os.path.join(out, "config.json"))
            return resolve_data(config, True, training)
        check_missing_run(args.resume, out)
    return resolve_data(apply_overrides(base, overrides), "model.vocab_size" in overrides, training)


def parse(argv: list[str], prog: str = "python -m jpipe.train") -> argparse.Namespace:
    """Parse `argv`, showing in `--help` the values this very command would start from.

    A first pass reads only `--preset`, `--config`, `--resume` and `--out` to build that
    configuration; the second parses everything against a parser showing it.
    """
    first = argparse.ArgumentParser(add_help=False)
    for option in ("--preset", "--config", "--out"):
        first.add_argument(option, default=None)
    first.add_argument("--resume", nargs="?", const=True, default=False)
    known, _ = first.parse_known_args(argv)
    defaults = preset("quickstart")
    if "-h" in argv or "--help" in argv:
        try:
            defaults = build_config(known)
        except ConfigError:
            pass  # the second pass reports it, unless --help ends the program first
    return parser(defaults, prog).parse_args(argv)


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5})$")


def check_processes(args: argparse.Namespace) -> int:
    """The number of processes the multi-host flags describe; raises ConfigError naming a bad flag.

    Without `--distributed` (where the cluster supplies the settings), more than one process needs
    `--coordinator`, `--num-processes` and `--process-id` together.
    """
    if args.coordinator is not None:
        match = _ADDRESS.match(args.coordinator)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ConfigError(f"--coordinator: expected HOST:PORT with a port in 1-65535, got {args.coordinator!r}")
    if args.num_processes is not None and args.num_processes < 1:
        raise ConfigError(f"--num-processes: must be >= 1, got {args.num_processes}")
    if args.process_id is not None:
        if args.process_id < 0:
            raise ConfigError(f"--process-id: must be >= 0, got {args.process_id}")
        if args.process_id >= (args.num_processes or 1):
            raise ConfigError(
                f"--process-id: must be below --num-processes ({args.num_processes or 1}), got {args.process_id}"
            )
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise ConfigError(f"--cpu-devices: must be >= 1, got {args.cpu_devices}")
    processes = args.num_processes or 1
    if not args.distributed:
        if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
            raise ConfigError("--coordinator: needs --num-processes and --process-id as well")
        if processes > 1 and args.coordinator is None:
            raise ConfigError(
                f"--num-processes {processes}: needs --coordinator HOST:PORT (process 0's address) and "
                "--process-id, or --distributed on a cluster that supplies them"
            )
    return processes


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module's documentation)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "jpipe" if os.path.basename(sys.argv[0] if sys.argv else "") == "jpipe" else "python -m jpipe.train"
    try:
        args = parse(argv, prog)
        config = build_config(args, training=True)
        processes = check_processes(args)
        init_from = initial_weights(args, config)
        note = _extension_note(args, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if note is not None and not args.process_id:  # process 0 prints
        print(note, flush=True)
    parallel = config.parallel
    if parallel.num_devices % processes:
        print(
            f"error: --num-processes: data {parallel.data} x stages {parallel.stage} x tensor {parallel.tensor} = "
            f"{parallel.num_devices} devices do not divide over {processes} processes",
            file=sys.stderr,
        )
        return 2
    return _run(args, config, processes, init_from)


def initial_weights(args: argparse.Namespace, config: TrainConfig) -> InitSource | None:
    """`--init-from`'s source, checked against `config`'s model; None without it or when the run resumes."""
    if args.init_from is None or resumes(args.resume, config.run.out):
        return None
    source = parse_init_from(args.init_from)
    check_model(source, config)
    return source


def _extension_note(args: argparse.Namespace, config: TrainConfig) -> str | None:
    """With `--resume` of an existing run and new `--steps`: what the learning rate does (`resume.extension_note`)."""
    out = config.run.out
    if not resumes(args.resume, out):
        return None
    saved = read_saved_config(out, config)
    return None if saved is None else extension_note(saved, config, out)


def _run(args: argparse.Namespace, config: TrainConfig, processes: int, init_from: InitSource | None = None) -> int:
    """Watch the preemption signals, start JAX (fake CPU devices, jax.distributed when asked) and train."""
    # Before the JAX backend starts: libtpu then leaves these signals' handlers alone.
    signals = parse_signals(config.run.preemption_signals)
    watch = SignalWatch.install(signals) if signals else None
    try:
        return _start_and_train(args, config, processes, watch, init_from)
    finally:
        if watch is not None:
            watch.uninstall()


def _start_and_train(
    args: argparse.Namespace,
    config: TrainConfig,
    processes: int,
    watch: SignalWatch | None,
    init_from: InitSource | None,
) -> int:
    parallel = config.parallel
    devices = args.cpu_devices or parallel.num_devices // processes
    # Fake CPU devices must be requested before JAX starts its backend.
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
    import jax

    jax.config.update("jax_num_cpu_devices", devices)  # only the CPU backend reads it
    from jpipe.parallel.platform import cpu_only_without_accelerators

    cpu_only_without_accelerators()  # an installed libtpu stays silent on a machine without TPUs
    if args.coordinator or args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        # One signal mechanism: ours (`jpipe.train.preemption`), not also JAX's SIGTERM handler.
        jax.config.update("jax_enable_preemption_service", False)
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
        )
    if len(jax.devices()) < parallel.num_devices:
        print(
            f"error: --data {parallel.data} x --stages {parallel.stage} x --tensor {parallel.tensor} needs "
            f"{parallel.num_devices} devices, {len(jax.devices())} available",
            file=sys.stderr,
        )
        return 2
    from jpipe.train.loop import TrainingDivergedError, train

    try:
        summary = train(config, resume=resumes(args.resume, config.run.out), signals=watch, init_from=init_from)
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (FileExistsError, ConfigError) as error:  # ConfigError: e.g. no schedule fits --memory-limit
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if summary.stopped_by is None else exit_status(summary.stopped_by)
