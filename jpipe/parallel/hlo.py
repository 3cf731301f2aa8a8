"""Reading compiled HLO text: which collectives a program runs, whether inside a loop, and what overlaps them.

`jitted.lower(*args).compile().as_text()` is the partitioned per-device program. Collectives that
sit in a `while` body (or in anything a body calls: conditional branches, nested loops, fusions)
run once per iteration, e.g. once per pipeline tick; the others run once per step.

A compiled module is scheduled (`is_scheduled=true`): each computation lists its instructions in
execution order. An asynchronous collective is a `*-start` and a `*-done`; what the schedule puts
between them runs while the data is in flight (`collective_overlaps`, `permute_overlaps`).

The TPU compiler has a second form, its *async collective fusion* (on with
`--xla_tpu_enable_async_collective_fusion=true` and, for all-reduces,
`--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true` in `LIBTPU_INIT_ARGS`): fusions
named `async-collective-start.N` and `async-collective-done.N`, each calling a computation that
holds the collective, and between them fusions that call `async_collective_fusion.*` computations,
which run the collective's transfer fused with other compute. One such chain is one asynchronous
collective here; its in-flight matmuls are those of the instructions between its start and done.

An asynchronous all-to-all (the TPU compiler's under `--xla_tpu_enable_async_all_to_all=true`, the
GPU compiler's by default) is an `async-start` wrapping it: printed `all-to-all-start` ...
`all-to-all-done(%start)`, or in full `async-start(...), calls=%computation` ... `async-done`.
"""

from __future__ import annotations

import dataclasses
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# `%name = <result shape> <opcode>(...)`: the shape may hold parentheses itself (tuples, and TPU
# layouts such as `{2,1,0:T(8,128)}`): take the text up to the first collective opcode, never into
# quoted metadata.
_OP = re.compile(r"=\s+([^\"]*?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its kind, result shape text, computation, and if it is in a loop."""

    kind: str
    shape: str
    computation: str
    in_loop: bool


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    result: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            result[current] = []
        elif current is not None and line.startswith(" "):
            result[current].append(line)
    return result


def _callees(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        names.update(_CALLEE.findall(line))
        for group in _BRANCHES.findall(line):
            names.update(name.strip().lstrip("%") for name in group.split(","))
    return names


def loop_computations(hlo_text: str) -> set[str]:
    """Names of every computation that runs inside some `while` body."""
    comps = computations(hlo_text)
    pending = [name for lines in comps.values() for line in lines for name in _BODY.findall(line)]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        pending.extend(_callees(comps[name]))
    return seen


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in a compiled program's HLO text, with whether it runs inside a loop."""
    in_loop = loop_computations(hlo_text)
    found = []
    for name, lines in computations(hlo_text).items():
        for line in lines:
            op = _OP.search(line)
            if op:
                found.append(Collective(op.group(2), op.group(1), name, name in in_loop))
    return found


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
MATMUL_OPCODES = ("dot", "convolution")
# XLA's GPU compiler turns large matmuls into library calls: `custom-call`s to cuBLAS (`__cublas$gemm`,
# `__cublas$lt$matmul`, ...) or cuDNN (`__cudnn$convForward`, ...) instead of `dot`s.
_LIBRARY_MATMUL = re.compile(r'custom_call_target="(?:__cublas\$|__cudnn\$conv|__cudnn\$fmha)')


def _runs_library_matmul(line: str, opcode: str) -> bool:
    return opcode == "custom-call" and _LIBRARY_MATMUL.search(line) is not None


@dataclasses.dataclass(frozen=True)
class CollectiveOverlap:
    """One collective and the matmuls scheduled while it is in flight.

    Attributes:
      kind: the collective (`"collective-permute"`, `"all-reduce"`, ...; see `COLLECTIVES`).
      name: the `<kind>-start` instruction (or the synchronous `<kind>`).
      computation: the computation that holds it.
      in_loop: whether it runs inside a `while` body (once per pipeline tick).
      matmuls_in_flight: instructions between its start and done that run a matmul, directly or in
        anything they call (a fusion, a conditional's branches): empty for a synchronous collective
        or one whose start is directly followed by its done.
      asynchronous: whether it is a start/done pair (the compiler left a synchronous collective
        where it found nothing to run beside it).
      op_name: the `op_name` of its metadata: the JAX operations (and `jax.named_scope`s) that
        traced it, e.g. `"jit(step)/.../braided_tick/..."`; empty when the HLO has none.
    """

    kind: str
    name: str
    computation: str
    in_loop: bool
    matmuls_in_flight: tuple[str, ...]
    asynchronous: bool = False
    op_name: str = ""

    @property
    def hidden(self) -> bool:
        """Whether some matmul runs while the data travels."""
        return bool(self.matmuls_in_flight)


PermuteOverlap = CollectiveOverlap  # the name collective-permute overlaps had first


_OP_NAME = re.compile(r'\bop_name="([^"]*)"')


def _op_name(line: str) -> str:
    match = _OP_NAME.search(line)
    return match.group(1) if match else ""


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the `op_name` of its metadata (the JAX operations that traced it), for every
    instruction that has one: e.g. what a collective's `matmuls_in_flight` belong to."""
    names = {}
    for lines in computations(hlo_text).values():
        for line in lines:
            if (parsed := _parse(line)) and (op_name := _op_name(line)):
                names[parsed[0]] = op_name
    return names


def _parse(line: str) -> tuple[str, str] | None:
    """(instruction name, opcode) of an instruction line, or None."""
    match = _INSTRUCTION.match(line)
    return (match.group(1), match.group(2)) if match else None


def permute_overlaps(hlo_text: str) -> list[CollectiveOverlap]:
    """Every collective-permute of a scheduled module, with the matmuls in flight during it."""
    return collective_overlaps(hlo_text, "collective-permute")


def collective_overlaps(hlo_text: str, kind: str) -> list[CollectiveOverlap]:
    """Every collective of `kind` (e.g. `"all-reduce"`) in a scheduled module, with the matmuls in flight.

    A synchronous collective (`<kind>(...)`, which the compiler leaves when it found nothing to run
    beside it) has none; an asynchronous one has what the schedule puts between its start and done:
    `<kind>-start` ... `<kind>-done` (XLA prints an `async-start` that wraps one collective so, e.g.
    `all-to-all-start`), the unabridged `async-start` ... `async-done` whose computation holds the
    collective, or the TPU compiler's async collective fusion chain (the module docstring).
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"kind: expected one of {COLLECTIVES}, got {kind!r}")
    module = _Module(hlo_text)
    chains, in_chains = _fusion_chain_overlaps(module, kind)
    wrapped, in_async = _async_wrapper_overlaps(module, kind)
    return chains + wrapped + _direct_overlaps(module, kind, in_chains | in_async)


class _Module:
    """A scheduled module's computations, and (memoised) what they and their callees hold."""

    def __init__(self, hlo_text: str):
        self.comps = computations(hlo_text)
        self.in_loop = loop_computations(hlo_text)
        self._has_matmul: dict[str, bool] = {}

    def computes_matmul(self, name: str, seen: frozenset = frozenset()) -> bool:
        """Whether computation `name`, or anything it calls, runs a matmul."""
        if name not in self._has_matmul:
            lines = self.comps.get(name, [])
            direct = any((parsed := _parse(line)) and _is_matmul(line, parsed[1]) for line in lines)
            called = _callees(lines) - seen - {name}
            self._has_matmul[name] = direct or any(self.computes_matmul(c, seen | {name}) for c in called)
        return self._has_matmul[name]

    def runs_matmul(self, line: str) -> bool:
        """Whether instruction `line` runs a matmul itself or in a computation it calls."""
        parsed = _parse(line)
        if parsed is None:
            return False
        return _is_matmul(line, parsed[1]) or any(self.computes_matmul(c) for c in _callees([line]))

    def collective_line(self, name: str, kind: str, seen: frozenset = frozenset()) -> str:
        """The first line of a collective of `kind` in computation `name` or what it calls ("" if none)."""
        lines = self.comps.get(name, [])
        for line in lines:
            if (parsed := _parse(line)) and parsed[1] in (kind, f"{kind}-start"):
                return line
        for callee in sorted(_callees(lines) - seen - {name}):
            if found_line := self.collective_line(callee, kind, seen | {name}):
                return found_line
        return ""

    def reachable(self, names: set[str]) -> set[str]:
        """`names` and every computation they call, directly or not."""
        pending, seen = list(names), set()
        while pending:
            name = pending.pop()
            if name not in seen and name in self.comps:
                seen.add(name)
                pending.extend(_callees(self.comps[name]))
        return seen

    def in_flight(self, lines: list[str], index: int, is_done) -> list[str]:
        """Names of the matmul-running instructions after `lines[index]`, up to the first that `is_done`."""
        found = []
        for later in lines[index + 1 :]:
            if is_done(later):
                break
            if self.runs_matmul(later):
                found.append(_parse(later)[0])
        return found


def _is_matmul(line: str, opcode: str) -> bool:
    return opcode in MATMUL_OPCODES or _runs_library_matmul(line, opcode)


def _starts(module: _Module, prefix: str):
    """(computation, its lines, index, instruction name) of each instruction whose name starts with `prefix`."""
    for comp, lines in module.comps.items():
        for index, line in enumerate(lines):
            parsed = _parse(line)
            if parsed is not None and parsed[0].startswith(prefix):
                yield comp, lines, index, parsed[0]


def _fusion_chain_overlaps(module: _Module, kind: str) -> tuple[list[CollectiveOverlap], set[str]]:
    """The TPU async collective fusion chains of `kind`, and every computation they use (not searched again)."""
    found, in_chains = [], set()
    for comp, lines, index, name in _starts(module, "async-collective-start"):
        start_callees = _callees([lines[index]])
        hits = [hit for c in sorted(start_callees) if (hit := module.collective_line(c, kind))]
        if not hits:
            continue
        in_flight, parts = _chain(module, lines, index, name, start_callees)
        in_chains |= module.reachable(parts)
        overlap = CollectiveOverlap(kind, name, comp, comp in module.in_loop, tuple(in_flight), True, _op_name(hits[0]))
        found.append(overlap)
    return found, in_chains


def _chain(module: _Module, lines: list[str], index: int, start: str, start_callees: set[str]):
    """The matmuls between a fusion chain's start (`lines[index]`) and its done, and the computations
    its start, done and `async_collective_fusion` parts call."""
    done_name = start.replace("async-collective-start", "async-collective-done", 1)
    in_flight, parts = [], set(start_callees)
    for later in lines[index + 1 :]:
        parsed = _parse(later)
        if parsed is None:
            continue
        callees = _callees([later])
        if parsed[0] == done_name:
            parts |= callees
            break
        parts |= {c for c in callees if c.startswith("async_collective_fusion")}
        if module.runs_matmul(later):
            in_flight.append(parsed[0])
    return in_flight, parts


def _async_wrapper_overlaps(module: _Module, kind: str) -> tuple[list[CollectiveOverlap], set[str]]:
    """Collectives of `kind` run by a generic `async-start` ... `async-done(%start)`, and the computations
    those starts wrap (whose collective is not counted again as a synchronous one)."""
    found, wrapped = [], set()
    for comp, lines in module.comps.items():
        for index, line in enumerate(lines):
            parsed = _parse(line)
            if parsed is None or parsed[1] != "async-start":
                continue
            hits = [hit for c in sorted(_callees([line])) if (hit := module.collective_line(c, kind))]
            if not hits:
                continue
            wrapped |= module.reachable(_callees([line]))
            in_flight = module.in_flight(lines, index, _done_of("async", parsed[0]))
            overlap = CollectiveOverlap(
                kind, parsed[0], comp, comp in module.in_loop, tuple(in_flight), True, _op_name(hits[0])
            )
            found.append(overlap)
    return found, wrapped


def _done_of(prefix: str, start: str):
    """A test for the line of `<prefix>-done(%start)`: `start` whole, not `start.1`."""
    done = re.compile(re.escape(prefix) + r"-done\(%?" + re.escape(start) + r"(?![\w.\-])")
    return lambda line: done.search(line) is not None


def _direct_overlaps(module: _Module, kind: str, skip: set[str]) -> list[CollectiveOverlap]:
    """The `<kind>-start` ... `<kind>-done` pairs and synchronous `<kind>`s outside the computations in `skip`."""
    found = []
    for comp, lines in module.comps.items():
        if comp in skip:
            continue
        for index, line in enumerate(lines):
            parsed = _parse(line)
            if parsed is None or parsed[1] not in (kind, f"{kind}-start"):
                continue
            name, opcode = parsed
            asynchronous = opcode == f"{kind}-start"
            in_flight = module.in_flight(lines, index, _done_of(kind, name)) if asynchronous else []
            overlap = CollectiveOverlap(
                kind, name, comp, comp in module.in_loop, tuple(in_flight), asynchronous, _op_name(line)
            )
            found.append(overlap)
    return found
