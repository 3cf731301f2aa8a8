"""`jpipe.parallel.links`: the send time `overlap_sends="auto"` weighs (message bytes over link bandwidth, in F)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from jpipe.parallel import links
from jpipe.pipeline.options import resolve_overlap
from jpipe.schedules import Cost, build


def test_nvlink_inside_a_host_and_the_network_between_hosts():
    assert links.link_bandwidth("NVIDIA H100 80GB HBM3", crosses_hosts=False) == 450e9
    assert links.link_bandwidth("NVIDIA H100 80GB HBM3", crosses_hosts=True) == 50e9
    assert links.link_bandwidth("NVIDIA A100-SXM4-80GB", crosses_hosts=False) == 300e9
    assert links.link_bandwidth("NVIDIA B200", crosses_hosts=False) == 900e9
    assert links.link_bandwidth("TPU v5 lite", crosses_hosts=False) == 50e9
    assert links.link_bandwidth("cpu", crosses_hosts=False) is None


def test_send_comm_is_the_send_time_over_the_forward_time():
    # 1 GFLOP forward on an H100 at peak: 1.011 us; 4.5 MB over NVLink: 10 us.
    assert links.send_comm(4.5e6, 1e9, "NVIDIA H100 80GB HBM3") == pytest.approx(10e-6 / (1e9 / 989e12))
    across = links.send_comm(4.5e6, 1e9, "NVIDIA H100 80GB HBM3", crosses_hosts=True)
    assert across == pytest.approx(9 * links.send_comm(4.5e6, 1e9, "NVIDIA H100 80GB HBM3"))
    assert links.send_comm(4.5e6, 1e9, "cpu") == 0.0 and links.send_comm(4.5e6, 0.0, "TPU v4") == 0.0


def test_stage_axis_crosses_hosts_only_when_neighbouring_stages_do():
    def device(host):
        return types.SimpleNamespace(process_index=host)

    # data 2 x stage 2 x tensor 1: each data replica's pipeline on one host / stages on two hosts.
    per_replica = np.array([[[device(0)], [device(0)]], [[device(1)], [device(1)]]], dtype=object)
    per_stage = np.array([[[device(0)], [device(1)]], [[device(0)], [device(1)]]], dtype=object)
    assert not links.stage_axis_crosses_hosts(per_replica, 1)
    assert links.stage_axis_crosses_hosts(per_stage, 1)


def test_auto_hides_sends_once_they_cost_time():
    schedule = build("1f1b", 4, 16)
    assert resolve_overlap(schedule, "auto", Cost(), split=False) is False  # free sends: no extra tick
    assert resolve_overlap(schedule, "auto", Cost(comm=1.0), split=False) is True
