"""analyses/bench_tracking.py: its flop and kernel floors run on a small net and add up."""

from __future__ import annotations

import math

import torch
from _analyses import load_analysis

from biasshift import BiasShiftProbe
from biasshift.models import paper_mlp


def test_floors_on_a_net_with_both_solver_kinds() -> None:
    """40 probe rows: the 64-input first layer is in sample space (P <= n), the 16-input
    hidden layers in parameter space; both floors have every part and add them up."""
    mod = load_analysis("bench_tracking")
    torch.manual_seed(0)
    model = paper_mlp("elu", depth=3, width=16, in_features=64)
    x, y = torch.randn(40, 64), torch.randint(0, 10, (40,))
    probe = BiasShiftProbe(model, x, y, fisher="exact", damping=1e-3)
    kf = mod.kernel_floor(probe, torch.device("cpu"), reps=1)
    assert set(kf["parts_s"]) == {"probe_pass", "gram", "cholesky"}
    parts = kf["parts_s"]
    assert parts["probe_pass"] > 0 and parts["gram"] > 0  # the factorisations' time is net
    assert parts["cholesky"] >= 0 and all(math.isfinite(v) for v in parts.values())  # of a copy
    assert kf["floor_s"] == sum(kf["parts_s"].values())
    ff = mod.flop_floor(model, 40, 10, torch.device("cpu"))
    assert ff["flops"]["sample_gram"] > 0 and ff["flops"]["gram"] > 0
    assert ff["floor_s"] > 0
