"""The MoE model with expert parallelism 2 (stage 2 x data 2) under every schedule jpipe builds: the
plain (`SCHEDULES`), routed (`ROUTED_SCHEDULES`) and composite (`COMPOSITE_SCHEDULES`) ones, and
dualpipev's overlapped F&B pairs; loss and every gradient equal the one-device model's (float32, 1e-5).

A file of its own so that pytest-xdist (`--dist loadfile`) runs it beside test_moe.py; each case
compiles one pipelined step (the one-device reference is compiled once per worker): 7-26 s a case on
2 busy CPU cores (jax 0.10), about 3.5 minutes for the file.
"""

from __future__ import annotations

import pytest
from test_moe import MoECase, check_parity

from jpipe import schedules

VIRTUAL = {"interleaved_1f1b": 2, "looped_bfs": 2, "zbv": 2, "dualpipev": 2, "v_min": 2, "v_half": 2}


def _case(name: str, virtual: int | None = None, microbatches: int = 4, **options) -> MoECase:
    virtual = virtual or VIRTUAL.get(name, 1)
    options = tuple(options.items())
    return MoECase((2, 2, 1), name, virtual, False, True, options=options, microbatches=microbatches)


CASES = [
    *(_case(name) for name in schedules.SCHEDULES),
    _case("dualpipev", overlap=True),  # braided F&B pairs
    _case("1f1b_overlap"),  # braided steady-state F&B pairs
    _case("stp", 2, microbatches=8),  # STP needs m >= 3p - 1
    _case("dualpipe", 2),  # two replicas of each model stage, bidirectional
    _case("bitpipe", 4),  # 8 logical stages (bitpipe needs virtual 4) on 4 layers: padded stages
    # SkipPipe's skipped and reordered stages change the model the reference computes; with nothing
    # skipped or swapped it runs the executor's routed path on the full model.
    _case("skippipe", 2, skip_ratio=0.0, reorder=False),
]


def test_every_schedule_is_covered():
    names = {case.schedule for case in CASES}
    assert names >= {*schedules.SCHEDULES, *schedules.ROUTED_SCHEDULES, *schedules.COMPOSITE_SCHEDULES}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_pipelined_moe_matches_unpipelined(case):
    check_parity(case)
