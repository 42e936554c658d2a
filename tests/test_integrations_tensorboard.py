"""biasshift.integrations.tensorboard: what is written is read back with tensorboard's
EventAccumulator and compared with statistics computed independently from the activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from biasshift import ActivationMonitor, BiasShiftProbe, probe_statistics
from biasshift.integrations.tensorboard import (
    log_measurement,
    log_monitor,
    log_probe_statistics,
    summary_writer,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ELU(), nn.Linear(6, 4), nn.ReLU(),
                         nn.Linear(4, 3))


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_monitor_scalars_and_histograms_read_back(tmp_path) -> None:
    net = _net()
    with torch.no_grad():
        net[2].bias[:2] = -50.0  # two dead ReLUs
    mon = ActivationMonitor(net, histogram=dict(bins=8, range=(-1.0, 1.0)))
    xs = [torch.randn(16, 5) * 2 for _ in range(3)]
    outs: dict[str, list[torch.Tensor]] = {"1": [], "3": []}
    hooks = [net[i].register_forward_hook(lambda m, i, o, k=str(k): outs[k].append(o.detach()))
             for i, k in ((1, 1), (3, 3))]
    with mon, torch.no_grad():
        for x in xs:
            net(x)
    for h in hooks:
        h.remove()
    writer = summary_writer(tmp_path)
    log_monitor(writer, mon, step=7)
    writer.close()
    acc = _read(tmp_path)
    for name in ("1", "3"):
        a = torch.cat(outs[name]).double().numpy()  # (samples, units)
        expect = {
            "median_unit_mean": np.median(a.mean(0)),
            "frac_negative": (a < 0).mean(0).mean(),
            "dead_units": (a.max(0) == a.min(0)).mean(),
            "mean_unit_std": a.std(0).mean(),
        }
        for key, value in expect.items():
            events = acc.Scalars(f"biasshift/{name}/{key}")
            assert [e.step for e in events] == [7]
            assert events[0].value == pytest.approx(value, rel=1e-5, abs=1e-6), key
        h = acc.Histograms(f"biasshift/{name}/activations")[0]
        assert h.step == 7
        hv = h.histogram_value
        counts = np.histogram(np.clip(a, -1.5, 1.5), bins=[-np.inf, *np.linspace(-1, 1, 9)[:-1],
                                                           1.0, np.inf])[0]
        # [lo, hi) bins: values equal to an edge go right, as np.histogram does except at hi
        assert list(hv.bucket) == list(counts.astype(float))
        assert hv.num == a.size and hv.min == pytest.approx(a.min())
        assert hv.max == pytest.approx(a.max())
        assert hv.sum == pytest.approx(a.sum(), rel=1e-6)  # float32 batch sums
        assert hv.sum_squares == pytest.approx((a**2).sum(), rel=1e-6)
    assert acc.Scalars("biasshift/3/dead_units")[0].value == pytest.approx(0.5)


def test_probe_statistics_and_measurement_read_back(tmp_path) -> None:
    net = _net()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    ps = probe_statistics(net, x)
    probe = BiasShiftProbe(net, x, y, damping=1e-3)
    nn.functional.cross_entropy(net(x), y).backward()
    with probe.measure() as m:
        torch.optim.SGD(net.parameters(), lr=0.1).step()
    writer = summary_writer(tmp_path)
    log_probe_statistics(writer, ps, step=3)
    log_measurement(writer, m, step=3)
    writer.close()
    acc = _read(tmp_path)
    for name in ("1", "3"):
        got = acc.Scalars(f"biasshift/{name}/probe_median_unit_mean")[0].value
        assert got == pytest.approx(float(ps.mean[name].median()) if ps.mean[name].numel() % 2
                                    else float(np.median(ps.mean[name].numpy())), rel=1e-6)
    frame = m.frame()
    for layer in probe.layers:
        for q in ("cos_grad_ng", "cos_ng_uncorrected", "k"):
            v = frame[(frame.layer == layer) & (frame.quantity == q)]["value"].to_numpy()
            got = acc.Scalars(f"biasshift/{layer}/{q}")[0].value
            assert got == pytest.approx(np.nanmedian(v), rel=1e-6), (layer, q)
        v = frame[(frame.layer == layer) & (frame.quantity == "bias_shift_ng")]["value"]
        got = acc.Scalars(f"biasshift/{layer}/abs_bias_shift_ng")[0].value
        assert got == pytest.approx(np.median(np.abs(v.to_numpy())), rel=1e-6)
        hist = acc.Histograms(f"biasshift/{layer}/cos_grad_ng_units")[0].histogram_value
        cos = frame[(frame.layer == layer) & (frame.quantity == "cos_grad_ng")]["value"]
        assert hist.num == np.isfinite(cos.to_numpy()).sum() > 0  # units with a cosine
