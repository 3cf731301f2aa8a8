"""A schedule of your own: register it, validate it, simulate it, run it on 4 fake CPU devices.

`python examples/custom_schedule.py` (a few seconds). A schedule is data: one list of actions per device,
F(stage, microbatch) forward, B backward (or I then W: input gradient, then weight gradient). This one is
1F1B with every backward run as I, its W's all deferred to the end: the simulator shows it no faster
than 1F1B and holding twice the activations, which is why ZB-H1 interleaves the W's instead.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # 4 fake CPU devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # set JAX_PLATFORMS to run on your accelerators instead
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jpipe  # noqa: E402
from jpipe.schedules import F, I, Schedule, W, loop_placement, register  # noqa: E402


@register("my_1f1b_iw")
def my_1f1b_iw(p: int, m: int, v: int) -> Schedule:
    """Device r warms up with p - 1 - r forwards, then alternates a forward and an input gradient."""
    rows = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        row = [F(r, i) for i in range(warm)]
        for i in range(m):
            if warm + i < m:
                row.append(F(r, warm + i))
            row.append(I(r, i))
        rows.append(row + [W(r, i) for i in range(m)])  # weight gradients fill the cool-down
    return Schedule(p, m, loop_placement(p, 1), rows)


schedule = jpipe.schedules.build("my_1f1b_iw", 4, 8)  # builds and validates (ScheduleError if invalid)
print(jpipe.schedules.render(schedule))
for name in ("my_1f1b_iw", "1f1b", "zb_h1"):  # unit costs: F = 1, B = 2, I = W = 1
    sim = jpipe.schedules.simulate(jpipe.schedules.build(name, 4, 8), mode="lockstep")
    peak = max(sim.peak_activations)  # stashed microbatches, the device holding most
    print(f"{name:>11}: makespan {sim.makespan:g}, bubble {sim.bubble_fraction:.1%}, peak activations {peak:g}")
broken = [[I(0, 0), F(0, 0), W(0, 0)], [F(1, 0), I(1, 0), W(1, 0)]]  # device 0: an input gradient first
try:  # an invalid schedule is refused, naming the action and device
    jpipe.schedules.validate(Schedule(2, 1, loop_placement(2, 1), broken))
except jpipe.schedules.ScheduleError as error:
    print("refused:", error)


def layer_fn(w, x):  # one layer: w [D, D], x [B, D]
    return x + jnp.tanh(x @ w)


def loss_fn(head, y, target):  # on the last stage, per microbatch
    return jnp.mean((y @ head - target) ** 2)


mesh = jax.make_mesh((4,), ("stage",))
step = jax.jit(jpipe.value_and_grad(jpipe.layered(layer_fn), loss_fn, schedule=schedule, mesh=mesh))
rng = np.random.default_rng(0)
params = jnp.asarray(0.3 * rng.normal(size=(4, 2, 16, 16)), jnp.float32)  # [stages, layers per stage, D, D]
head, x, y = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 1), (8, 4, 16), (8, 4, 1)))
loss, (grads, head_grads, x_grads) = step(params, head, x, y)  # x, y: [microbatches, B, ...]


def reference(params, head, x, y):  # the same model, unpipelined
    for w in params.reshape(-1, 16, 16):
        x = layer_fn(w, x)
    return jax.vmap(loss_fn, in_axes=(None, 0, 0))(head, x, y).mean()


expected, expected_grads = jax.value_and_grad(reference)(params, head, x, y)
difference = jnp.abs(grads - expected_grads).max()
print(f"loss {loss:.6f} (unpipelined {expected:.6f}); largest gradient difference {difference:.1e}")
