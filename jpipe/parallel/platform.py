"""Which JAX platforms to start: keep an installed libtpu from starting on a machine without TPUs.

jax loads an installed libtpu's plugin whenever it starts its backends, TPU chips or not (seen with
jax 0.10.2). Without chips, libtpu 0.0.42.1 prints start-up errors that are harmless but read like failures
(`E0000 ... common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname ...`,
`=== Source Location Trace: ===`). libtpu is installed beside CPU runs by the `tpu` and `test`
extras (`python -m jpipe.compile` uses its compiler, no chip needed), so the training command asks
JAX for the CPU alone when libtpu is installed and the machine shows no accelerator at all.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id
# Device files of NVIDIA GPUs (CUDA), AMD GPUs (ROCm) and GPUs under WSL.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _has_tpu() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _has_gpu() -> bool:
    return any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def cpu_only_without_accelerators() -> bool:
    """Before JAX starts its backends: ask it for the CPU alone when the machine has no TPU or GPU.

    Sets `jax_platforms` (and `JAX_PLATFORMS`, for processes started from this one) to "cpu" when
    libtpu is installed, `JAX_PLATFORMS` is not set and no TPU or GPU device is visible. Returns
    whether it did. Call it after `import jax` and before the first `jax.devices()`; importing jax
    starts no backend.
    """
    if importlib.util.find_spec("libtpu") is None or os.environ.get("JAX_PLATFORMS") or _has_tpu() or _has_gpu():
        return False
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    return True
