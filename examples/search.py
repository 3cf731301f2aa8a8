"""Search a schedule for a model whose stages do not cost the same, then run it on 4 fake CPU devices.

`python examples/search.py` (a few seconds). The last stage also runs the head and the loss, so it is slower
than the others; `jpipe.schedules.search_result` looks for the order with the least simulated (lockstep)
step time within a memory limit, starting from the best named schedule that fits, and returns a schedule
the executor runs like any other. `python -m jpipe.train --schedule auto` does this for the measured model.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # 4 fake CPU devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # set JAX_PLATFORMS to run on your accelerators instead
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jpipe  # noqa: E402
from jpipe import schedules  # noqa: E402

LAYERS, DEVICES, MICROBATCHES = 16, 4, 8
# FLOPs of one decoder layer's F, I and W and of the embedding and head (d_model 1024, seq 1024, 32000 tokens).
model = schedules.ModelCosts.transformer(d_model=1024, seq_len=1024, vocab_size=32000)


def cost(virtual: int) -> schedules.Cost:  # per logical stage, for `virtual` chunks per device
    stages = DEVICES * virtual
    return schedules.stage_costs([LAYERS // stages] * stages, model)


result = schedules.search_result(DEVICES, MICROBATCHES, cost, memory_limit=4, virtual=2, budget=4000)
print(schedules.render(result.schedule))
print(
    f"best named schedule within 4 stashes: {result.baseline.name}, makespan {result.baseline_makespan:.1f}; "
    f"searched: {result.makespan:.1f} ({result.makespan / result.baseline_makespan:.3f}x) in {result.seconds:.1f} s"
)
schedules.validate(result.schedule)  # what the search returns is a valid schedule of F, I and W actions


def layer_fn(w, x):  # a toy layer (the run checks the executor, not the costs above): w [D, D], x [B, D]
    return x + jnp.tanh(x @ w)


def loss_fn(head, y, target):  # on the last stage, per microbatch
    return jnp.mean((y @ head - target) ** 2)


schedule = result.schedule
mesh = jax.make_mesh((DEVICES,), ("stage",))
step = jax.jit(jpipe.value_and_grad(jpipe.layered(layer_fn), loss_fn, schedule=schedule, mesh=mesh))
rng = np.random.default_rng(0)
layers_per_stage = LAYERS // schedule.num_stages
params = jnp.asarray(0.2 * rng.normal(size=(schedule.num_stages, layers_per_stage, 8, 8)), jnp.float32)
head, x, y = (
    jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 1), (MICROBATCHES, 2, 8), (MICROBATCHES, 2, 1))
)
loss, (grads, head_grads, x_grads) = step(params, head, x, y)


def reference(params, head, x, y):  # the same model, unpipelined
    for w in params.reshape(-1, 8, 8):
        x = layer_fn(w, x)
    return jax.vmap(loss_fn, in_axes=(None, 0, 0))(head, x, y).mean()


print(f"ran the searched schedule: loss {loss:.6f} (unpipelined {reference(params, head, x, y):.6f})")
