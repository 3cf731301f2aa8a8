"""Run a schedule written in torch.distributed.pipelining's CSV format, unchanged, on 4 fake CPU devices.

`python examples/torch_csv.py` (a few seconds). torch dumps a schedule with `schedule._dump_csv(path)`:
one row per rank, one cell per step (`<stage><F|B|I|W><microbatch>`, an empty cell for an idle step).
This script writes such a file by hand (a ZB-H1-style order for 2 ranks and 4 microbatches), loads it
with `jpipe.schedules.from_csv`, simulates it and runs it; then writes jpipe's ZB-V back out for torch.
"""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # 4 fake CPU devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # set JAX_PLATFORMS to run on your accelerators instead
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jpipe  # noqa: E402

CSV = """\
0F0,0F1,0F2,,0I0,0F3,0I1,0W0,0I2,0W1,0I3,0W2,0W3
,1F0,1I0,1W0,1F1,1I1,1F2,1I2,1F3,1I3,1W1,1W2,1W3
"""
path = pathlib.Path(tempfile.mkdtemp()) / "zbh1_2ranks.csv"
path.write_text(CSV)
schedule = jpipe.schedules.from_csv(path.read_text(), name=path.stem)  # placement and m read from the cells
print(jpipe.schedules.render(schedule))
sim = jpipe.schedules.simulate(schedule, mode="lockstep")
print(f"{schedule.num_devices} devices, {schedule.num_microbatches} microbatches: bubble {sim.bubble_fraction:.1%}")


def layer_fn(w, x):  # one layer: w [D, D], x [B, D]
    return x + jnp.tanh(x @ w)


def loss_fn(head, y, target):  # on the last stage, per microbatch
    return jnp.mean((y @ head - target) ** 2)


mesh = jax.make_mesh((2,), ("stage",), devices=jax.devices()[:2])  # one device per CSV row
step = jax.jit(jpipe.value_and_grad(jpipe.layered(layer_fn), loss_fn, schedule=schedule, mesh=mesh))
rng = np.random.default_rng(0)
params = jnp.asarray(0.3 * rng.normal(size=(2, 3, 16, 16)), jnp.float32)  # [stages, layers per stage, D, D]
head, x, y = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 1), (4, 4, 16), (4, 4, 1)))
loss, (grads, head_grads, x_grads) = step(params, head, x, y)
print(f"loss {loss:.6f}; gradients {grads.shape}")

zbv = jpipe.schedules.build("zbv", num_devices=4, num_microbatches=8)  # and back: a CSV torch can read
(path.parent / "zbv.csv").write_text(jpipe.schedules.to_csv(zbv, lockstep=True))  # columns = lockstep ticks
again = jpipe.schedules.from_csv((path.parent / "zbv.csv").read_text())
print("zbv round trip through CSV:", again.actions == zbv.actions, f"({path.parent / 'zbv.csv'})")
