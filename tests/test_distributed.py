"""Statistics under torch.distributed: 2 gloo processes on the CPU (torch.multiprocessing spawn).

Every statistic read on every rank must equal the single-process statistic over the union of
the ranks' shards (uneven shards, a NaN on one rank only) to float64 rounding, and ``sync=False``
must give each rank's own statistics. The ranks' results are computed once per session (one
spawn) by tests/_distributed_worker.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _distributed_worker as W

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

SCENARIOS = ["monitor", "monitor_local", "traffic"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("dist")
    init = f"file://{out / 'rendezvous'}"
    ctx = mp.start_processes(W.worker, args=(str(out), SCENARIOS, init), nprocs=W.WORLD,
                             join=False, start_method="spawn")
    while not ctx.join(timeout=180):
        pass
    res = {}
    for name in SCENARIOS:
        res[name] = [torch.load(out / f"{name}.{r}.pt", weights_only=False)
                     for r in range(W.WORLD)]
        for r, got in enumerate(res[name]):
            if "error" in got:
                pytest.fail(f"scenario {name} failed on rank {r}:\n{got['error']}")
    return res


def _close(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-12) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-13, equal_nan=True, err_msg=c)
        else:
            assert (x == y).all(), c


def test_monitor_and_probe_equal_the_union_on_every_rank(ranks):
    parts = W.batches()
    ref = W.measure_monitor(parts, sync=None, probe=W.probe_shards())
    assert ref["stats"]["nonfinite"].sum() > 0  # the NaN on rank 1 reached the statistics
    for got in ranks["monitor"]:
        for key in ("stats", "hist", "history", "probe"):
            _close(got[key], ref[key])
    # identical on both ranks, bit for bit
    a, b = ranks["monitor"]
    for key in ("stats", "hist", "probe"):
        pd.testing.assert_frame_equal(a[key], b[key])
    # the exact medians are exact
    np.testing.assert_array_equal(a["probe"]["median"], ref["probe"]["median"])


def test_sync_false_gives_each_ranks_own_statistics(ranks):
    parts = W.batches()
    probe = W.probe_shards()
    for r, got in enumerate(ranks["monitor_local"]):
        ref = W.measure_monitor([parts[r]], sync=None, probe=[probe[r]])
        for key in ("stats", "hist", "history", "probe"):
            pd.testing.assert_frame_equal(got[key], ref[key])


def test_traffic_of_a_monitor_sync(ranks):
    units = 3 + 7  # ELU (3 channels) and ReLU (7 features)
    for got in ranks["traffic"]:
        # unit counts (2 modules x 2 int64), the float64 states: 72 bytes per unit
        assert got["bytes"] == 2 * 2 * 8 + 72 * units
        assert got["calls"] == 2
