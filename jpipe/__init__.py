"""jpipe: pipeline-parallel training in SPMD JAX, every major schedule from one executor.

    import jpipe
    schedule = jpipe.schedules.build("1f1b", num_devices=4, num_microbatches=8)
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh)
    loss, (stage_grads, loss_grads, input_grads) = jax.jit(step)(stage_params, loss_params, x, y)
"""

from jpipe import schedules
from jpipe.pipeline import forward, value_and_grad

__all__ = ["forward", "schedules", "value_and_grad"]
__version__ = "0.1.0"
