"""What a forward keeps for its backward: the `remat` option of the executor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

REMAT_MODES = ("none", "full", "dots")


def apply_remat(stage_fn: Callable, remat: str | Callable | None) -> Callable:
    """Wrap `stage_fn` so that `jax.vjp` of it saves what `remat` asks for.

    Args:
      stage_fn: `(params, x) -> y`.
      remat: "none" (save every residual: no recomputation), "full" (save only the stage input and
        recompute the stage in its backward), "dots" (save matmul outputs, recompute the rest), or any
        `jax.checkpoint` policy (e.g. `jax.checkpoint_policies.save_only_these_names("attn")`).
    """
    if remat is None or remat == "none":
        return stage_fn
    policy: Any
    if remat == "full":
        policy = jax.checkpoint_policies.nothing_saveable
    elif remat == "dots":
        policy = jax.checkpoint_policies.dots_saveable
    elif callable(remat):
        policy = remat
    else:
        raise ValueError(f"remat: expected one of {REMAT_MODES} or a jax.checkpoint policy, got {remat!r}")
    return jax.checkpoint(stage_fn, policy=policy)
