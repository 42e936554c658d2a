"""Brute-force references shared by the monitor tests: plain hooks that store every output, and
per-unit statistics computed from the stored values in float64 numpy (exact sums via fsum)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from biasshift.monitor.running import STAT_COLUMNS


def collect_outputs(model: nn.Module, unit_dims: Mapping[str, int],
                    run: Callable[[], object]) -> dict[str, np.ndarray]:
    """Run ``run()`` with plain hooks on ``unit_dims``' modules; ``{name: (samples, units)}``."""
    store: dict[str, list[np.ndarray]] = {n: [] for n in unit_dims}
    named = dict(model.named_modules())

    def make(name: str, dim: int):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            v = out.detach().to(torch.float64).movedim(dim, -1).reshape(-1, out.shape[dim])
            store[name].append(v.cpu().numpy().copy())

        return hook

    handles = [named[n].register_forward_hook(make(n, d)) for n, d in unit_dims.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) for n, v in store.items() if v}


def reference_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-unit statistics of ``values`` (samples, units), brute force in float64."""
    v = np.asarray(values, dtype=np.float64)
    out: dict[str, list[float]] = {c: [] for c in STAT_COLUMNS}
    for u in range(v.shape[1]):
        col = v[:, u]
        x = col[np.isfinite(col)]
        n = x.size
        out["count"].append(n)
        out["nonfinite"].append(col.size - n)
        if n == 0:
            for c in ("mean", "var", "std", "min", "max", "frac_negative", "frac_zero"):
                out[c].append(math.nan)
            continue
        mean = math.fsum(x) / n
        var = math.fsum((x - mean) ** 2) / n
        out["mean"].append(mean)
        out["var"].append(var)
        out["std"].append(math.sqrt(var))
        out["min"].append(float(x.min()))
        out["max"].append(float(x.max()))
        out["frac_negative"].append(float((x < 0).sum()) / n)
        out["frac_zero"].append(float((x == 0).sum()) / n)
    return {c: np.asarray(out[c], dtype=np.float64) for c in STAT_COLUMNS}


def assert_frame_matches(df: pd.DataFrame, outputs: Mapping[str, np.ndarray], *,
                         rtol: float) -> None:
    """``df`` (monitor.stats()) has exactly the modules of ``outputs`` with brute-force values.

    Counts, extremes and fractions must be exact; mean (relative to the unit's spread), var and
    std within ``rtol``.
    """
    assert sorted(df["module"].unique()) == sorted(outputs), (df["module"].unique(), list(outputs))
    for name, values in outputs.items():
        got = df[df["module"] == name].sort_values("unit")
        ref = reference_stats(values)
        assert got["unit"].tolist() == list(range(values.shape[1])), name
        for c in ("count", "nonfinite", "min", "max", "frac_negative", "frac_zero"):
            np.testing.assert_array_equal(got[c].to_numpy(dtype=np.float64), ref[c],
                                          err_msg=f"{name}.{c}")
        spread = np.nan_to_num(ref["std"]).max()
        np.testing.assert_allclose(got["mean"].to_numpy(), ref["mean"], rtol=rtol,
                                   atol=rtol * spread, err_msg=f"{name}.mean")
        for c in ("var", "std"):
            np.testing.assert_allclose(got[c].to_numpy(), ref[c], rtol=rtol, atol=1e-300,
                                       err_msg=f"{name}.{c}")
