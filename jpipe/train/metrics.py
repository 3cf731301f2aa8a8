"""Metrics to JSONL and TensorBoard event files, a one-line progress display, and the loss-curve plot."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import IO, Any

import numpy as np

EVENT_FILE_PREFIX = "events.out.tfevents."  # TensorBoard's name for its event files


class MetricsWriter:
    """Appends one JSON object per record to `<out>/metrics.jsonl`, and its numbers to TensorBoard.

    Each record is a dict with an integer `step`; with `events` (a folder, normally the one holding
    `path`), every other field that is a number becomes a TensorBoard scalar of the same name at
    that step (`tensorboardX.SummaryWriter`), so `tensorboard --logdir <out>` plots what
    metrics.jsonl holds. Both are flushed at every write.

    On resume, records at or after the resumed step are dropped from metrics.jsonl first so the file
    never holds two records for one step, and the new event file starts with TensorBoard's purge
    marker (a `SessionLog.START` at that step), which hides the older files' events from that step
    on. A fresh run (no resume) deletes the folder's old metrics.jsonl and event files.
    """

    def __init__(self, path: pathlib.Path, resume_from_step: int | None = None, *, events: pathlib.Path | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None and path.exists():
            kept = [json.dumps(r) for r in read_metrics(path) if r["step"] < resume_from_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_from_step is None and path.exists():
            path.unlink()
        self._events: Any = None
        if events is not None:
            from tensorboardX import SummaryWriter

            if resume_from_step is None:
                for old in events.glob(EVENT_FILE_PREFIX + "*"):
                    old.unlink()
            # The file name holds the time in seconds: the suffix keeps two writers in one second apart.
            suffix = f".{os.getpid()}.from{resume_from_step or 1}"
            self._events = SummaryWriter(str(events), purge_step=resume_from_step, filename_suffix=suffix)
        self._file: IO[str] = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._events is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._events.add_scalar(name, value, record["step"])
            self._events.flush()

    def close(self) -> None:
        self._file.close()
        if self._events is not None:
            self._events.close()


def flat_metrics(metrics: dict) -> dict[str, float]:
    """A step's auxiliary metrics as flat scalars for `metrics.jsonl` and TensorBoard.

    A scalar keeps its name; a vector (e.g. the moe family's `expert_load` `[E]`) becomes its
    largest and smallest entries, `<name>_max` and `<name>_min`.
    """
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value, np.float64)
        if value.ndim == 0:
            flat[name] = float(value)
        else:
            flat[f"{name}_max"], flat[f"{name}_min"] = float(value.max()), float(value.min())
    return flat


def routing_summary(record: dict) -> str:
    """A short routing summary for a log line from a record's moe metrics ("" without them)."""
    if "balance_loss" not in record:
        return ""
    return (
        f"  balance {record['balance_loss']:.3f}  dropped {100 * record['dropped_fraction']:.1f}%"
        f"  expert load {record['expert_load_min']:.3f}-{record['expert_load_max']:.3f}"
    )


def read_metrics(path: pathlib.Path) -> list[dict]:
    """All complete records of a metrics.jsonl file (a line cut short by a crash is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Progress:
    """A single updating line: step, loss, tokens/s, step time (plain lines when not a terminal)."""

    def __init__(self, total_steps: int, stream: IO[str] | None = None):
        self.total = total_steps
        self.stream = sys.stdout if stream is None else stream
        self.interactive = stream.isatty()
        self.started = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_second: float, step_seconds: float, extra: str = "") -> None:
        width = 24
        done = int(width * step / self.total)
        bar = "#" * done + "." * (width - done)
        line = (
            f"[{bar}] step {step}/{self.total}  loss {loss:.4f}  {tokens_per_second:,.0f} tok/s  "
            f"{step_seconds * 1e3:.0f} ms/step{extra}"
        )
        if self.interactive:
            self.stream.write("\r" + line)
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.interactive:
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()


def plot_loss_curve(records: list[dict], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Training (and evaluation, when present) loss against step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/byte)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
