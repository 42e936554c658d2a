"""biasshift.integrations.lightning: the callback attaches the monitor (and the probe) to a
LightningModule, counts the training batches only, snapshots per epoch and logs through the
trainer's loggers (CPU, fast_dev_run and a short fit with a TensorBoard and a CSV logger)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from biasshift.integrations.lightning import BiasShiftCallback  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self, record: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 6), nn.ELU(), nn.Linear(6, 3))
        self.seen: list[torch.Tensor] = []  # the ELU's outputs in training batches
        if record:  # (a lambda hook cannot be pickled for ddp_spawn)
            self.net[1].register_forward_hook(
                lambda m, i, o: self.seen.append(o.detach().clone()) if self.training else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 40, seed: int = 1) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g),
                                        torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _trainer(**kw):
    kw.setdefault("devices", 2 if "strategy" in kw else 1)
    return pl.Trainer(accelerator="cpu", enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


def test_fast_dev_run_counts_the_training_batches_only() -> None:
    module = Net()
    cb = BiasShiftCallback(modules=["net.1"], reset_every_epoch=False)
    _trainer(fast_dev_run=2, callbacks=[cb]).fit(module, _loader(), _loader(16, seed=2))
    a = torch.cat(module.seen).double().numpy()
    assert a.shape == (16, 6)  # two training batches of 8; validation not counted
    hist = cb.monitor.history()
    assert hist["epoch"].unique().tolist() == [0] and hist["step"].unique().tolist() == [2]
    assert (hist["count"] == 16).all()
    np.testing.assert_allclose(hist["mean"], a.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hist["var"], a.var(0), rtol=1e-5)
    np.testing.assert_allclose(hist["frac_negative"], (a < 0).mean(0))
    assert not cb.monitor.active  # the hooks are gone after fit


def test_fit_logs_per_epoch_through_the_loggers_and_probes_on_schedule(tmp_path) -> None:
    tb = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = pl.loggers.CSVLogger(tmp_path, name="csv", version=0)
    g = torch.Generator().manual_seed(3)
    probe = (torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
    module = Net()
    cb = BiasShiftCallback(histogram=dict(bins=8, range=(-1.0, 1.0)), probe=probe,
                           probe_every_n_steps=2, probe_kwargs=dict(damping=1e-3))
    _trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=[tb, csv],
             log_every_n_steps=1, callbacks=[cb]).fit(module, _loader(), _loader(8, 2))
    hist = cb.monitor.history()
    assert sorted(hist["epoch"].unique()) == [0, 1]
    assert sorted(hist["step"].unique()) == [3, 6]
    # reset_every_epoch: each snapshot holds its own epoch's 3 batches of 8
    a = torch.cat(module.seen).double().numpy()
    assert a.shape == (48, 6)
    ep1 = hist[hist["epoch"] == 1]
    np.testing.assert_allclose(ep1["mean"], a[24:].mean(0), rtol=1e-5, atol=1e-7)
    # the probe measured the steps 0, 2 and 4 (global_step before each optimizer step)
    ph = cb.probe_history()
    assert sorted(ph["step"].unique()) == [0, 2, 4]
    # TensorBoard: scalars and histograms per epoch; probe cosines per measured step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"),
                           size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    med = acc.Scalars("biasshift/net.1/median_unit_mean")
    assert [e.step for e in med] == [3, 6]
    assert med[1].value == pytest.approx(np.median(a[24:].mean(0)), rel=1e-5)
    h = acc.Histograms("biasshift/net.1/activations")
    assert [e.step for e in h] == [3, 6] and h[0].histogram_value.num == 24 * 6
    cos = acc.Scalars("biasshift/net.0/cos_grad_ng")
    assert [e.step for e in cos] == [0, 2, 4]
    v = ph[(ph.step == 2) & (ph.layer == "net.0") & (ph.quantity == "cos_grad_ng")]["value"]
    assert cos[1].value == pytest.approx(float(np.nanmedian(v)), rel=1e-6)
    # the CSV logger got the same scalars
    csv.finalize("success")
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    col = metrics["biasshift/net.1/median_unit_mean"].dropna()
    np.testing.assert_allclose(col, [e.value for e in med], rtol=1e-6)


def test_a_probe_needs_the_modules_forward() -> None:
    class NoForward(Net):
        forward = pl.LightningModule.forward  # as if it defined none

    cb = BiasShiftCallback(probe=(torch.randn(8, 5), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(TypeError, match="defines no forward"):
        _trainer(fast_dev_run=1, callbacks=[cb]).fit(NoForward(), _loader())


@pytest.mark.distributed
@pytest.mark.slow
def test_under_ddp_the_logged_statistics_are_those_of_all_ranks(tmp_path) -> None:
    """Two CPU ranks (ddp_spawn, gloo), batches of 8 per rank: rank zero logs what one process
    logs with batches of 16 (the union of the ranks' batches; DDP averages equal shards)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def fit(name: str, batch: int, **kw) -> EventAccumulator:
        tb = pl.loggers.TensorBoardLogger(tmp_path, name=name, version=0)
        cb = BiasShiftCallback(histogram=dict(bins=8, range=(-1.0, 1.0)))
        if batch == 8:  # each rank its interleaved shard (DistributedSampler, in order)
            _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=tb,
                     callbacks=[cb], use_distributed_sampler=False, **kw).fit(ShardedNet())
        else:
            _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=tb,
                     callbacks=[cb], **kw).fit(Net(record=False), _loader16())
        acc = EventAccumulator(str(tmp_path / name / "version_0"),
                               size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        return acc

    one = fit("one", 16)
    two = fit("two", 8, strategy="ddp_spawn")
    for key in ("median_unit_mean", "frac_negative", "mean_unit_std"):
        a = two.Scalars(f"biasshift/net.1/{key}")
        b = one.Scalars(f"biasshift/net.1/{key}")
        assert [e.step for e in a] == [e.step for e in b] == [2]
        assert a[0].value == pytest.approx(b[0].value, rel=1e-5, abs=1e-7), key
    h2 = two.Histograms("biasshift/net.1/activations")[0].histogram_value
    h1 = one.Histograms("biasshift/net.1/activations")[0].histogram_value
    assert h2.num == h1.num == 2 * 16 * 6 and list(h2.bucket) == list(h1.bucket)


def _loader16() -> torch.utils.data.DataLoader:
    """The samples of `_loader()` in the order DistributedSampler gives two ranks' batches of 8
    together: rank 0 takes 0, 2, 4, ..., rank 1 takes 1, 3, 5, ...; batch t of the union holds
    rank 0's batch t and rank 1's batch t."""
    ds = _loader().dataset
    order = [i for t in range(2) for r in range(2) for i in range(16 * t + r, 16 * t + 16, 2)]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=16)


class ShardedNet(Net):
    def __init__(self) -> None:
        super().__init__(record=False)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ds = _loader().dataset
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)


def test_a_resumed_fit_continues_the_snapshots(tmp_path) -> None:
    """Two epochs, or one epoch, a checkpoint and a resumed second epoch: the same history."""
    def fit(epochs: int, ckpt: str | None = None, save: bool = False):
        cb = BiasShiftCallback(reset_every_epoch=False)
        extra = dict(enable_checkpointing=True, default_root_dir=tmp_path) if save else {}
        trainer = pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                             enable_model_summary=False, logger=False, max_epochs=epochs,
                             limit_train_batches=3, limit_val_batches=0, callbacks=[cb],
                             **({"enable_checkpointing": False} | extra))
        trainer.fit(Net(record=False), _loader(), ckpt_path=ckpt)
        return cb, trainer

    whole, _ = fit(2)
    _, first = fit(1, save=True)
    ckpt = first.checkpoint_callback.best_model_path
    assert ckpt
    resumed, _ = fit(2, ckpt=ckpt)
    pd.testing.assert_frame_equal(resumed.monitor.history(), whole.monitor.history())
