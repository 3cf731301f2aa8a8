"""Layerwise ops, so that a braided tick can run two ops layer by layer in lockstep.

A *layerwise op* is a generator that computes one op. At each layer boundary it yields what its
next part depends on (for a `jpipe.layered` stage, before each layer: the carry, the activation in F
or the output gradient in B and I, with the layer's inputs; after the last layer: the carry),
continues with what it is sent back, and finally returns the op's result. An op that is not cut into
layers (a plain stage function, a scanned `jpipe.layered` stage) yields nothing (`no_layers`).

`run_alone` runs one to its end (what it yields goes straight back). `run_in_lockstep` runs two:
at each boundary, what both yielded passes through one `lax.optimization_barrier`, so neither op
starts its next layer before the other has finished its current one. The compiler's scheduler then
has, between two boundaries, one layer of each op and no data dependence between them: the
tensor-parallel all-reduces of one have the other's matmuls beside them, layer after layer, instead
of the two ops' layers drifting apart so that the first or last layers of one find nothing to run
beside their all-reduces (`experiments/tp_overlap.py` measures it on the TPU compiler).

("Step" means a training step elsewhere in jpipe; a schedule's row holds cells, `schedules.ir.Cell`.)
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from jax import lax

Result = TypeVar("Result")
Layerwise = Generator[Any, Any, Result]


def run_alone(op: Layerwise[Result]) -> Result:
    """Run a layerwise op alone to its end: its result."""
    try:
        carry = next(op)
        while True:
            carry = op.send(carry)
    except StopIteration as stop:
        return stop.value


def no_layers(value: Result) -> Layerwise[Result]:
    """A layerwise op with no layer boundaries that returns `value`."""
    return value
    yield  # a generator function


def run_in_lockstep(first: Layerwise, second: Layerwise) -> tuple[Any, Any]:
    """Run two layerwise ops in lockstep (see the module docstring): `(first's result, second's)`.

    When one has no layers left, the other runs its remaining layers alone.
    """
    generators = (first, second)
    results: list[Any] = [None, None]
    carries: list[Any] = [None, None]
    live = [True, True]

    def advance(index: int, value: Any, start: bool = False) -> None:
        try:
            carries[index] = next(generators[index]) if start else generators[index].send(value)
        except StopIteration as stop:
            results[index], live[index] = stop.value, False

    advance(0, None, start=True)
    advance(1, None, start=True)
    while all(live):
        first_carry, second_carry = lax.optimization_barrier((carries[0], carries[1]))
        advance(0, first_carry)
        advance(1, second_carry)
    for index in (0, 1):
        while live[index]:
            advance(index, carries[index])
    return results[0], results[1]
