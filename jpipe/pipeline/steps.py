"""Ops as step generators, so that a braided tick can run two of them layer by layer in lockstep.

A *step generator* computes one op. At each step it yields what its next part depends on (for a
`jpipe.layered` stage, before each layer: the carry, the activation in F or the output gradient in
B and I, with the layer's inputs; after the last layer: the carry), continues with what it is sent
back, and finally returns the op's result. An op that is not cut into layers (a plain stage
function, a scanned `jpipe.layered` stage) has no steps.

`run_steps` runs one generator alone (what it yields goes straight back). `braid_steps` runs two
in lockstep: at each step, what both yielded passes through one `lax.optimization_barrier`, so
neither op starts its next layer before the other has finished its current one. The compiler's
scheduler then has, in every step, one layer of each op and no data dependence between them: the
tensor-parallel all-reduces of one have the other's matmuls beside them, step after step, instead
of the two ops' layers drifting apart so that the first or last layers of one find nothing to run
beside their all-reduces (`experiments/tp_overlap.py` measures it on the TPU compiler).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from jax import lax

Result = TypeVar("Result")
StepGenerator = Generator[Any, Any, Result]


def run_steps(steps: StepGenerator[Result]) -> Result:
    """Run a step generator alone to its end: its result."""
    try:
        carry = next(steps)
        while True:
            carry = steps.send(carry)
    except StopIteration as stop:
        return stop.value


def returns(value: Result) -> StepGenerator[Result]:
    """A step generator with no steps that returns `value`."""
    return value
    yield  # a generator function


def braid_steps(first: StepGenerator, second: StepGenerator) -> tuple[Any, Any]:
    """Run two step generators in lockstep (see the module docstring): `(first's result, second's)`.

    When one has no steps left, the other runs its remaining steps alone.
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
