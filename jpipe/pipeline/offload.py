"""Activation offload: which of the executor's long-lived buffers live in host memory.

A forward's stash lives from its F to its backward, a weight stash from its I to its W: in 1F1B the
first stage holds p stashes at once, and the zero-bubble schedules' deferred W's hold their weight
residuals for many ticks. With offload, such a buffer is allocated in the host's memory space
(`jax.memory.Space.Host`, XLA's `S(5)` on TPU): the op that writes a slot copies its value to the
host, the op that reads it copies it back. Inside the tick loop the TPU compiler makes these
copies asynchronous (`dynamic-update-slice-start/done` into the host buffer), so they can run
under the other ops' compute; the device keeps only the slot being written or read.

On CPU the host is the device: the copies are no-ops, the program runs as without offload, and the
results are identical (what the test suite checks); `memory_analysis()` then reports no host bytes.

Choices (`PipelineOptions.offload`):
  "none": every buffer on the device (default);
  "stash": the forwards' stashes (`Buffer.STASH`);
  "weights": the weight stashes an I leaves its W (`Buffer.WEIGHT_STASH`);
  "all": both.
The residuals an R op rebuilds (`Buffer.RECOMPUTED`) stay on the device: they live from R to the
op right after it.
"""

from __future__ import annotations

from typing import Any

import jax

from jpipe.pipeline.state import Buffer

PyTree = Any

CHOICES = {
    "none": frozenset(),
    "stash": frozenset({Buffer.STASH}),
    "weights": frozenset({Buffer.WEIGHT_STASH}),
    "all": frozenset({Buffer.STASH, Buffer.WEIGHT_STASH}),
}


def offloaded(choice: str) -> frozenset[Buffer]:
    """The buffers `choice` (a key of `CHOICES`) puts in host memory."""
    if choice not in CHOICES:
        raise ValueError(f"offload: expected one of {', '.join(map(repr, CHOICES))}, got {choice!r}")
    return CHOICES[choice]


def to_host(tree: PyTree) -> PyTree:
    """`tree`'s leaves copied to the host memory space (inside `jit`: an XLA copy to host)."""
    return jax.device_put(tree, jax.memory.Space.Host)


def to_device(tree: PyTree) -> PyTree:
    """`tree`'s leaves copied back to device memory."""
    return jax.device_put(tree, jax.memory.Space.Device)
