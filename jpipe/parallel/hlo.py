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
    beside it) has none; an asynchronous one (`<kind>-start` ... `<kind>-done`) has what the
    schedule puts between the two.
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"kind: expected one of {COLLECTIVES}, got {kind!r}")
    comps = computations(hlo_text)
    in_loop = loop_computations(hlo_text)
    has_matmul: dict[str, bool] = {}

    def computes_matmul(name: str, seen: frozenset = frozenset()) -> bool:
        if name not in has_matmul:
            lines = comps.get(name, [])
            direct = any(
                (parsed := _parse(line)) and (parsed[1] in MATMUL_OPCODES or _runs_library_matmul(line, parsed[1]))
                for line in lines
            )
            called = _callees(lines) - seen - {name}
            has_matmul[name] = direct or any(computes_matmul(c, seen | {name}) for c in called)
        return has_matmul[name]

    def line_runs_matmul(line: str) -> bool:
        parsed = _parse(line)
        if parsed is None:
            return False
        return (
            parsed[1] in MATMUL_OPCODES
            or _runs_library_matmul(line, parsed[1])
            or any(computes_matmul(c) for c in _callees([line]))
        )

    def holds(name: str, seen: frozenset = frozenset()) -> bool:
        """Whether computation `name`, or anything it calls, holds a collective of `kind`."""
        lines = comps.get(name, [])
        if any((parsed := _parse(line)) and parsed[1] in (kind, f"{kind}-start") for line in lines):
            return True
        return any(holds(c, seen | {name}) for c in _callees(lines) - seen - {name})

    def collective_line(name: str, seen: frozenset = frozenset()) -> str:
        """The first line of a collective of `kind` in computation `name` or what it calls."""
        lines = comps.get(name, [])
        for line in lines:
            if (parsed := _parse(line)) and parsed[1] in (kind, f"{kind}-start"):
                return line
        for callee in sorted(_callees(lines) - seen - {name}):
            if found_line := collective_line(callee, seen | {name}):
                return found_line
        return ""

    def reachable(names: set[str]) -> set[str]:
        pending, seen = list(names), set()
        while pending:
            name = pending.pop()
            if name not in seen and name in comps:
                seen.add(name)
                pending.extend(_callees(comps[name]))
        return seen

    found = []
    # TPU async collective fusions: one chain (start ... done) per collective; the computations its
    # start, done and `async_collective_fusion` parts call are not searched for collectives again.
    in_chains: set[str] = set()
    for comp, lines in comps.items():
        for index, line in enumerate(lines):
            parsed = _parse(line)
            if parsed is None or not parsed[0].startswith("async-collective-start"):
                continue
            start_callees = _callees([line])
            if not any(holds(c) for c in start_callees):
                continue
            done_name = parsed[0].replace("async-collective-start", "async-collective-done", 1)
            in_flight, parts = [], set(start_callees)
            for later in lines[index + 1 :]:
                later_parsed = _parse(later)
                if later_parsed is None:
                    continue
                callees = _callees([later])
                if later_parsed[0] == done_name:
                    parts |= callees
                    break
                if any(c.startswith("async_collective_fusion") for c in callees):
                    parts |= {c for c in callees if c.startswith("async_collective_fusion")}
                if line_runs_matmul(later):
                    in_flight.append(later_parsed[0])
            in_chains |= reachable(parts)
            op_name = next((_op_name(hit) for c in sorted(start_callees) if (hit := collective_line(c))), "")
            found.append(CollectiveOverlap(kind, parsed[0], comp, comp in in_loop, tuple(in_flight), True, op_name))
    for comp, lines in comps.items():
        if comp in in_chains:
            continue
        for index, line in enumerate(lines):
            parsed = _parse(line)
            if parsed is None or parsed[1] not in (kind, f"{kind}-start"):
                continue
            name, opcode = parsed
            in_flight: list[str] = []
            if opcode == f"{kind}-start":
                done = re.compile(re.escape(kind) + r"-done\(%?" + re.escape(name) + r"\b")
                for later in lines[index + 1 :]:
                    if done.search(later):
                        break
                    if line_runs_matmul(later):
                        in_flight.append(_parse(later)[0])
            asynchronous = opcode == f"{kind}-start"
            found.append(
                CollectiveOverlap(kind, name, comp, comp in in_loop, tuple(in_flight), asynchronous, _op_name(line))
            )
    return found
