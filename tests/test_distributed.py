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

SCENARIOS = ["monitor", "monitor_local", "traffic", "fisher", "fisher_factors", "fisher_local",
             "fisher_nan", "probe", "probe_local", "optimizer",
             "optimizer_local", "monitor_empty_rank", "fisher_cache"]


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
    res["_dir"] = out
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
        for key in ("stats", "hist", "history", "probe", "probe_means_only"):
            _close(got[key], ref[key])
    # identical on both ranks, bit for bit
    a, b = ranks["monitor"]
    for key in ("stats", "hist", "probe"):
        pd.testing.assert_frame_equal(a[key], b[key])
    # the exact medians are exact
    np.testing.assert_array_equal(a["probe"]["median"], ref["probe"]["median"])
    # snapshot(to=...): only rank 0 writes the combined rows; with sync=False every rank its own
    spilled = sorted(p.name for p in ranks["_dir"].glob("spill-*.csv")
                     if not p.name.endswith(".hist.csv"))
    assert spilled == ["spill-monitor.None.0.csv", "spill-monitor_empty_rank.None.0.csv",
                       "spill-monitor_local.False.0.csv", "spill-monitor_local.False.1.csv"]
    _close(pd.read_csv(ranks["_dir"] / "spill-monitor.None.0.csv", dtype={"module": str})
           .drop(columns="epoch"), ref["stats"])


def test_sync_false_gives_each_ranks_own_statistics(ranks):
    parts = W.batches()
    probe = W.probe_shards()
    for r, got in enumerate(ranks["monitor_local"]):
        ref = W.measure_monitor([parts[r]], sync=None, probe=[probe[r]])
        for key in ("stats", "hist", "history", "probe", "probe_means_only"):
            pd.testing.assert_frame_equal(got[key], ref[key])


def test_traffic_of_a_monitor_sync(ranks):
    units = 3 + 7  # ELU (3 channels) and ReLU (7 features)
    for got in ranks["traffic"]:
        # unit counts (2 modules x 2 int64), the float64 states: 72 bytes per unit
        assert got["bytes"] == 2 * 2 * 8 + 72 * units
        assert got["calls"] == 2


def _same_fisher(got: dict, ref: dict, rtol: float) -> None:
    for k, v in ref.items():
        if k == "dense":
            continue
        if isinstance(v, pd.DataFrame):
            _close(got[k], v, rtol=rtol)
        else:
            torch.testing.assert_close(got[k], v, rtol=rtol, atol=1e-14, msg=k)


@pytest.mark.parametrize("scenario,budget", [("fisher", 4 * 2**30), ("fisher_factors", 0)])
def test_unit_fisher_equals_the_union_on_every_rank(ranks, scenario, budget):
    ref = W.measure_fisher(W.batches(nan=False), sync=None, dense_budget=budget)
    if budget:  # both storage forms are exercised: the conv layer folded, the linear not
        assert ranks[scenario][0]["dense"] == {"0": True, "3": False, "5": False}
    for got in ranks[scenario]:
        _same_fisher(got, ref, rtol=1e-9)
    a, b = ranks[scenario]
    pd.testing.assert_frame_equal(a["report"], b["report"])


def test_unit_fisher_sync_false_and_nonfinite_on_one_rank(ranks):
    parts = W.batches(nan=False)
    for r, got in enumerate(ranks["fisher_local"]):
        _same_fisher(got, W.measure_fisher([parts[r]], sync=None), rtol=0)
    # rank 1's NaN poisons nothing: both ranks refuse the combined statistics with the same
    # error; rank 0's own statistics stay readable
    (e0, l0), (e1, l1) = (g["errors"] for g in ranks["fisher_nan"])
    assert e0 is not None and e0 == e1 and e0.startswith("NonFiniteError")
    assert l0 is None and l1 is not None


def test_bias_shift_probe_measures_on_the_union_of_the_probe_shards(ranks):
    probe = W.probe_shards()
    ref = W.measure_probe(probe, sync=None)["frame"]
    for got in ranks["probe"]:
        _close(got["frame"], ref, rtol=1e-9)
    pd.testing.assert_frame_equal(ranks["probe"][0]["frame"], ranks["probe"][1]["frame"])
    for r, got in enumerate(ranks["probe_local"]):
        pd.testing.assert_frame_equal(got["frame"], W.measure_probe([probe[r]], sync=None)["frame"])


def test_natural_gradient_preconditions_with_the_union_fisher(ranks):
    """Uneven but constant per-rank batches: the ranks' parameters after three steps and their
    combined running Fisher equal those of one process on the union of the batches."""
    ref = W.measure_optimizer(W.optimizer_shards(), sync=None)
    for got in ranks["optimizer"]:
        for p, q in zip(got["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        for n, F in ref["fisher"].items():
            torch.testing.assert_close(got["fisher"][n], F, rtol=1e-10, atol=1e-14)
    # sync=False: each rank preconditions with its own shard's Fisher, and the runs differ
    for got in ranks["optimizer_local"]:
        assert not torch.allclose(got["params"][0], ref["params"][0], rtol=1e-6, atol=0)


def test_a_rank_without_samples_adds_nothing(ranks):
    parts = W.batches()
    ref = W.measure_monitor([parts[0]], sync=None, probe=W.probe_shards())
    for got in ranks["monitor_empty_rank"]:
        for key in ("stats", "hist", "history"):
            pd.testing.assert_frame_equal(got[key], ref[key])


def test_unit_fisher_reuses_its_combination_until_some_rank_accumulates(ranks):
    from biasshift import UnitFisher

    ok = W.batches(nan=False)
    ref = UnitFisher(W.model(), fisher="empirical")
    for x, y in ok[0] + ok[1]:
        ref.accumulate(x, y)
    before = ref.report(damping=1e-3)
    ref.accumulate(*ok[0][0])  # rank 1's extra batch
    after = ref.report(damping=1e-3)
    for got in ranks["fisher_cache"]:
        _close(got["first"], before, rtol=1e-9)
        pd.testing.assert_frame_equal(got["again"], got["first"])
        assert got["cached_bytes"] == 8  # one int64: "did any rank change?"
        _close(got["third"], after, rtol=1e-9)
