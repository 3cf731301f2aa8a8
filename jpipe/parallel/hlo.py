"""Reading compiled HLO text: which collectives a program runs, and whether inside a loop.

`jitted.lower(*args).compile().as_text()` is the partitioned per-device program. Collectives that
sit in a `while` body (or in anything a body calls: conditional branches, nested loops, fusions)
run once per iteration, e.g. once per pipeline tick; the others run once per step.
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
