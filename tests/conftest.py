"""Test setup: 8 fake CPU devices requested once, strict numerics, an empty corpus cache of the run's
own, a mesh helper that skips."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Must happen before the JAX backend starts; both spellings for robustness.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The test extra installs libtpu (for deviceless TPU compiles, which need no TPU backend): keep every
# test process, and the subprocesses it starts, from probing for TPU hardware first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The corpus cache of this test run only (every test, and every process it starts, builds its corpora
# afresh): a shared ~/.cache/jpipe must never hide a change to a data fixture.
_TEST_CACHE = tempfile.mkdtemp(prefix="jpipe-test-cache-")
os.environ["JPIPE_CACHE"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

NUM_FAKE_DEVICES = 8


def make_mesh_or_skip(
    shape: tuple[int, ...], axis_names: tuple[str, ...], axis_types: tuple | None = None
) -> jax.sharding.Mesh:
    """A mesh of `shape` over the first prod(shape) devices; skips the test when devices are short.

    `axis_types` defaults to JAX's (explicit); pass `jax.sharding.AxisType.Auto` entries for axes the
    compiler should shard (data and tensor parallelism around the pipeline).
    """
    needed = 1
    for size in shape:
        needed *= size
    if len(jax.devices()) < needed:
        pytest.skip(f"needs {needed} devices, have {len(jax.devices())}")
    return jax.make_mesh(shape, axis_names, axis_types=axis_types, devices=jax.devices()[:needed])


@pytest.fixture
def mesh_factory():
    return make_mesh_or_skip


@pytest.fixture
def key():
    return jax.random.key(0)
