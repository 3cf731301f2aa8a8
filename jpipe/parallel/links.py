"""How long a pipeline message takes, relative to a forward: the send cost `overlap_sends="auto"` weighs.

    comm = (message bytes / link bandwidth) / (F FLOPs / device peak FLOP/s)

in units of one F (the simulator's `Cost.comm`). The link is the one between neighbouring stages:
NVLink between GPUs of one host, the inter-node network (one NIC per GPU) when the stage axis
crosses hosts, ICI between TPU chips of a slice. Bandwidths are per direction, from the vendors'
published figures; the peak is dense bf16. Both are rough: a forward rarely reaches peak, so the
estimate errs toward cheap sends; it is meant to tell sends that cost nothing (CPU, tiny messages)
from sends worth hiding, not to predict step time.
"""

from __future__ import annotations

GB = 1e9

PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # Trillium (v6e)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("B200", 2250e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)
"""Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind` (first match)."""

NVLINK: tuple[tuple[str, float], ...] = (("B200", 900 * GB), ("H100", 450 * GB), ("H200", 450 * GB), ("A100", 300 * GB))
"""NVLink bytes/s per GPU and direction (NVLink 5, 4, 4, 3: 1.8 TB/s, 900 GB/s, 900 GB/s, 600 GB/s both ways)."""

INTER_NODE: tuple[tuple[str, float], ...] = (("B200", 50 * GB), ("H100", 50 * GB), ("H200", 50 * GB), ("A100", 25 * GB))
"""Bytes/s per GPU and direction between hosts: one 400 Gb/s NIC per GPU (DGX H100/H200/B200), 200 Gb/s (DGX A100)."""

ICI: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 112 * GB),  # 3584 Gb/s per chip over 4 links
    ("TPU v5 lite", 50 * GB),  # 1600 Gb/s per chip over 4 links
    ("TPU v5", 100 * GB),  # v5p: 4800 Gb/s per chip over 6 links
    ("TPU v4", 50 * GB),  # 2400 Gb/s per chip over 6 links
)
"""ICI bytes/s of one link between neighbouring TPU chips (Cloud TPU's per-chip figure over its links)."""


def _lookup(table: tuple[tuple[str, float], ...], device_kind: str) -> float | None:
    return next((value for key, value in table if key in device_kind), None)


def link_bandwidth(device_kind: str, *, crosses_hosts: bool) -> float | None:
    """Bytes/s of the link a pipeline message between neighbouring stages takes; None when unknown (CPU)."""
    if device_kind.startswith("TPU"):
        return _lookup(ICI, device_kind)
    return _lookup(INTER_NODE if crosses_hosts else NVLINK, device_kind)


def stage_axis_crosses_hosts(mesh_devices, stage_axis: int) -> bool:
    """Whether some message between neighbouring stages (a ring along `stage_axis` of the mesh's
    device array) leaves its host."""
    import numpy as np

    hosts = np.vectorize(lambda d: d.process_index, otypes=[int])(np.asarray(mesh_devices))
    return bool((hosts != np.roll(hosts, 1, axis=stage_axis)).any())


def send_comm(message_bytes: float, f_flops: float, device_kind: str, *, crosses_hosts: bool = False) -> float:
    """A message's send time in units of one F (`Cost.comm`); 0.0 where the device or link is unknown (CPU).

    Args:
      message_bytes: one message (a microbatch's activation or its gradient) on one device.
      f_flops: one forward of the largest device stage on one microbatch (XLA's FLOP count).
      device_kind: `device.device_kind`, e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite".
      crosses_hosts: whether the message leaves its host (GPUs: the inter-node network, not NVLink).
    """
    peak = _lookup(PEAK_FLOPS, device_kind)
    bandwidth = link_bandwidth(device_kind, crosses_hosts=crosses_hosts)
    if peak is None or bandwidth is None or f_flops <= 0:
        return 0.0
    return (message_bytes / bandwidth) / (f_flops / peak)
