"""Layerwise ops: one alone, two run in lockstep (`jpipe.pipeline.lockstep`)."""

import jax.numpy as jnp
import numpy as np

from jpipe.pipeline.lockstep import no_layers, run_alone, run_in_lockstep


def counter(name: str, steps: int, log: list, scale: float):
    """Adds `scale` per step; logs each step; returns (name, total)."""
    total = jnp.zeros(())
    for step in range(steps):
        log.append((name, step))
        total = yield total + scale
    return name, total


def test_run_steps_sends_back_what_is_yielded():
    log = []
    name, total = run_alone(counter("a", 3, log, 2.0))
    assert name == "a" and float(total) == 6.0
    assert log == [("a", 0), ("a", 1), ("a", 2)]


def test_returns_has_no_steps():
    assert run_alone(no_layers(7)) == 7


def test_braid_steps_alternates_and_finishes_the_longer_alone():
    log = []
    first, second = run_in_lockstep(counter("a", 2, log, 1.0), counter("b", 4, log, 10.0))
    assert first[0] == "a" and float(first[1]) == 2.0
    assert second[0] == "b" and float(second[1]) == 40.0
    # Lockstep: neither starts step s + 1 before both have run step s.
    assert log == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2), ("b", 3)]


def test_braid_steps_with_a_generator_without_steps():
    log = []
    first, second = run_in_lockstep(no_layers("plain"), counter("b", 2, log, 1.0))
    assert first == "plain" and float(second[1]) == 2.0
    np.testing.assert_equal(log, [("b", 0), ("b", 1)])
