"""jpipe: pipeline-parallel training in SPMD JAX, every major schedule from one executor.

import jpipe
schedule = jpipe.schedules.build("1f1b", num_devices=4, num_microbatches=8)
step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh)
loss, (stage_grads, loss_grads, input_grads) = jax.jit(step)(stage_params, loss_params, x, y)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PipelinedModel", "forward", "forward_loss", "layered", "measure_costs", "schedules", "value_and_grad"]
__version__ = "0.1.0"

# Lazy attributes: `import jpipe.schedules` must work without importing jax.
_LAZY = {
    "schedules": ("jpipe.schedules", None),
    "pipeline": ("jpipe.pipeline", None),
    "parallel": ("jpipe.parallel", None),
    "forward": ("jpipe.pipeline", "forward"),
    "forward_loss": ("jpipe.pipeline", "forward_loss"),
    "value_and_grad": ("jpipe.pipeline", "value_and_grad"),
    "layered": ("jpipe.pipeline", "layered"),
    "measure_costs": ("jpipe.pipeline", "measure_costs"),
    "PipelinedModel": ("jpipe.models", "PipelinedModel"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'jpipe' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
