"""The trainer: history, metrics against brute force, data order, seeding, plug-ins, divergence,
checkpoints and bit-identical resume."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biasshift.data import ArrayDataset, batch_indices, load_dataset
from biasshift.models import mlp
from biasshift.monitor import probe_statistics
from biasshift.train import (
    HISTORY_COLUMNS,
    CheckpointError,
    MonitorPlugin,
    Plugin,
    Trainer,
    derive_seed,
    load_checkpoint,
)


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset("digits").subset(192, 60)


def small_mlp(act: str = "elu") -> nn.Module:
    return mlp(64, [16, 12], 10, act)


def make(ds: ArrayDataset, **kw: Any) -> Trainer:
    kw.setdefault("epochs", 3)
    kw.setdefault("seed", 1)
    kw.setdefault("batch_size", 32)
    model = kw.pop("model", small_mlp)
    return Trainer(model, ds, **kw)


def params(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


class Recorder(Plugin):
    """Records callbacks, per-step losses, batch inputs and parameter snapshots (read-only)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.losses: list[torch.Tensor] = []
        self.batches: list[torch.Tensor] = []
        self.grads_seen: list[bool] = []
        self.param_before: list[torch.Tensor] = []
        self.param_after: list[torch.Tensor] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.events.append(("fit_start", trainer.epoch, trainer.step))

    def on_before_step(self, trainer, step, x, y, loss) -> None:
        self.events.append(("before", step, trainer.step))
        self.grads_seen.append(all(p.grad is not None for p in trainer.model.parameters()))
        self.param_before.append(next(trainer.model.parameters()).detach().clone())
        self.losses.append(loss.detach().clone())
        self.batches.append(x.detach().clone())

    def on_after_step(self, trainer, step, x, y, loss) -> None:
        self.events.append(("after", step, trainer.step))
        self.param_after.append(next(trainer.model.parameters()).detach().clone())

    def on_evaluate_start(self, trainer) -> None:
        self.events.append(("eval_start", trainer.model.training))

    def on_evaluate_end(self, trainer) -> None:
        self.events.append(("eval_end", trainer.model.training))

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        self.events.append(("epoch_end", epoch, trainer.step, tuple(sorted(metrics))))

    def on_fit_end(self, trainer) -> None:
        self.events.append(("fit_end", trainer.epoch, trainer.step))


class Counter(Plugin):
    """A stateful plug-in: counts steps in a device tensor and logs it per epoch."""

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.int64)

    def on_after_step(self, trainer, step, x, y, loss) -> None:
        self.count = self.count + 1

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        trainer.log("steps_seen", self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


# ------------------------------------------------------------------------------------ history
def test_history_columns_quantities_and_epochs(digits: ArrayDataset) -> None:
    h = make(digits, run_name="r1").fit()
    assert tuple(h.columns) == HISTORY_COLUMNS
    assert (h["run"] == "r1").all()
    assert str(h["unit"].dtype) == "Int64" and h["unit"].isna().all()
    assert h["epoch"].dtype == np.int64 and h["value"].dtype == np.float64
    assert sorted(h["epoch"].unique()) == [0, 1, 2, 3]
    whole = {"train_loss", "test_loss", "train_acc", "test_acc", "median_of_means"}
    for e in range(4):
        got = h[(h["epoch"] == e) & (h["layer"] == "all")]
        want = whole | ({"running_loss"} if e else set())
        assert set(got["quantity"]) == want and len(got) == len(want)
        per_layer = h[(h["epoch"] == e) & (h["layer"] != "all")]
        assert sorted(per_layer["layer"]) == ["act1", "act2"]
        assert set(per_layer["quantity"]) == {"median_of_means"}
    assert "diverged" not in set(h["quantity"])
    assert np.isfinite(h["value"]).all()


def test_reconstruction_history_has_no_accuracy(digits: ArrayDataset) -> None:
    t = make(digits, model=lambda: mlp(64, [16], 64, "relu"), loss="reconstruction",
             epochs=1, eval_initial=False)
    h = t.fit()
    # issue 14: the per-image summed squared error is recorded beside the training loss
    assert set(h["quantity"]) == {"train_loss", "test_loss", "running_loss", "median_of_means",
                                  "train_sse", "test_sse"}
    assert sorted(h["epoch"].unique()) == [1]


# ------------------------------------------------------------------------------------ metrics
def test_epoch_metrics_match_brute_force(digits: ArrayDataset) -> None:
    t = make(digits, probe_size=100, epochs=2)
    h = t.fit()
    last = h[(h["epoch"] == 2)].set_index(["layer", "quantity"])["value"]
    model = copy.deepcopy(t.model).double().eval()
    for split in ("train", "test"):
        x = getattr(digits, f"{split}_x").double()
        y = getattr(digits, f"{split}_y")
        with torch.no_grad():
            logits = model(x)
        ce = F.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).double().mean().item()
        assert last[("all", f"{split}_loss")] == pytest.approx(ce, rel=1e-5)
        assert last[("all", f"{split}_acc")] == pytest.approx(acc, abs=1.0 / len(y))

    # median over hidden units of each unit's mean activation on the probe subset, in numpy
    assert t.probe_index is not None and len(t.probe_index) == 100
    acts: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.numpy()))
             for n, m in model.named_modules() if n in ("act1", "act2")]
    with torch.no_grad():
        model(digits.train_x[t.probe_index].double())
    for hk in hooks:
        hk.remove()
    means = {n: a.mean(axis=0) for n, a in acts.items()}
    pooled = np.median(np.concatenate(list(means.values())))
    assert last[("all", "median_of_means")] == pytest.approx(pooled, rel=1e-5, abs=1e-6)
    for n, m in means.items():
        assert last[(n, "median_of_means")] == pytest.approx(np.median(m), rel=1e-5, abs=1e-6)


def test_reconstruction_loss_is_per_image_summed_squared_error(digits: ArrayDataset) -> None:
    t = make(digits, model=lambda: mlp(64, [16], 64, "elu"), loss="reconstruction", epochs=1)
    h = t.fit().set_index(["epoch", "layer", "quantity"])["value"]
    model = copy.deepcopy(t.model).double().eval()
    x = digits.test_x.double()
    with torch.no_grad():
        err = ((model(x) - x.reshape(len(x), -1)) ** 2).sum(dim=1).mean().item()
    assert h[(1, "all", "test_loss")] == pytest.approx(err, rel=1e-5)


def test_running_loss_is_the_size_weighted_mean_of_batch_losses(digits: ArrayDataset) -> None:
    rec = Recorder()
    t = make(digits, batch_size=50, epochs=2, plugins=[rec])  # 192 = 50 + 50 + 50 + 42
    h = t.fit().set_index(["epoch", "layer", "quantity"])["value"]
    sizes = [50, 50, 50, 42]
    for e in (1, 2):
        losses = [float(v) for v in rec.losses[4 * (e - 1) : 4 * e]]
        want = sum(v * s for v, s in zip(losses, sizes)) / 192
        assert h[(e, "all", "running_loss")] == pytest.approx(want, rel=1e-12)


def test_streaming_probe_means_equal_probe_statistics(digits: ArrayDataset) -> None:
    t = make(digits, probe_size=150, eval_batch_size=64)  # several chunks
    fast = t.probe()
    exact = probe_statistics(t.model, t.probe_x, batch_size=64)
    assert fast.median == {}
    for n in exact.mean:
        torch.testing.assert_close(fast.mean[n], exact.mean[n], rtol=1e-6, atol=1e-7)
        assert torch.equal(fast.nonfinite[n], exact.nonfinite[n])
        assert fast.samples[n] == exact.samples[n] == 150
    torch.testing.assert_close(fast.median_of_means(), exact.median_of_means())

    t2 = make(digits, probe_size=150, probe_medians=True)
    t2.model.load_state_dict(t.model.state_dict())
    full = t2.probe()
    for n in exact.median:
        torch.testing.assert_close(full.median[n], exact.median[n])


def test_streaming_probe_leaves_non_finite_activations_out() -> None:
    ds = ArrayDataset("toy", torch.randn(40, 3), torch.zeros(40, dtype=torch.int64),
                      torch.randn(8, 3), torch.zeros(8, dtype=torch.int64), 2)

    class Poison(nn.Module):
        biasshift_activation = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x).clone()
            y[:5, 0] = float("inf")  # unit 0 of the first five samples of each chunk
            return y

    model = nn.Sequential(nn.Linear(3, 4), Poison(), nn.Linear(4, 2))
    t = Trainer(model, ds, epochs=1, probe_size=None, eval_batch_size=20)
    fast, exact = t.probe(), probe_statistics(model, t.probe_x, batch_size=20)
    assert fast.nonfinite["1"].tolist() == [10, 0, 0, 0] == exact.nonfinite["1"].tolist()
    torch.testing.assert_close(fast.mean["1"], exact.mean["1"])
    assert torch.isfinite(fast.mean["1"]).all()


def test_evaluation_restores_every_training_flag(digits: ArrayDataset) -> None:
    t = make(digits, model=lambda: nn.Sequential(small_mlp(), nn.Dropout(0.5)))
    t.model.train()
    t.model[1].eval()  # the user froze one submodule
    t.evaluate()
    t.probe()
    assert t.model.training and t.model[0].training and not t.model[1].training


# ------------------------------------------------------------------------------------ order, seeds
def test_data_order_is_seeded_per_epoch_and_covers_the_set() -> None:
    n = 37
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1).repeat(1, 4)
    ds = ArrayDataset("ids", x, torch.zeros(n, dtype=torch.int64), x[:5].clone(),
                      torch.zeros(5, dtype=torch.int64), 3)

    def orders(seed: int, global_seed: int) -> list[list[int]]:
        torch.manual_seed(global_seed)  # must not matter
        rec = Recorder()
        Trainer(lambda: mlp(4, [8], 3, "relu"), ds, epochs=3, seed=seed, batch_size=10,
                plugins=[rec], probe_size=0).fit()
        ids = torch.cat(rec.batches)[:, 0].long().tolist()
        return [ids[i * n : (i + 1) * n] for i in range(3)]

    a, b, c = orders(5, 0), orders(5, 123), orders(6, 0)
    assert a == b
    assert a != c
    for epoch_ids in a:
        assert sorted(epoch_ids) == list(range(n))
    assert a[0] != a[1] != a[2]
    # the documented order: biasshift.data.batch_indices with derive_seed(seed, "data", epoch)
    for e in (1, 2, 3):
        g = torch.Generator().manual_seed(derive_seed(5, "data", e))
        assert torch.cat(list(batch_indices(n, 10, g))).tolist() == a[e - 1]


def test_derive_seed_is_stable_and_separates_streams() -> None:
    assert derive_seed(0, "data", 1) == derive_seed(0, "data", 1)
    seeds = {derive_seed(s, k, e) for s in range(3) for k in ("data", "init", "train")
             for e in range(3)}
    assert len(seeds) == 27
    assert all(0 <= v < 2**63 for v in seeds)
    # pinned: changing it would change every run's data order and initialisation
    assert derive_seed(0, "init") == 2182976526569939397


def test_factory_init_is_seeded_and_global_rng_is_left_alone(digits: ArrayDataset) -> None:
    torch.manual_seed(42)
    before = torch.get_rng_state()
    a, b, c = make(digits, seed=3), make(digits, seed=3), make(digits, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))
    assert not all(torch.equal(p, q) for p, q in zip(params(a), params(c)))
    a.fit()
    assert torch.equal(torch.get_rng_state(), before)


def test_a_given_module_is_used_as_it_is(digits: ArrayDataset) -> None:
    model = small_mlp()
    init = [p.detach().clone() for p in model.parameters()]
    t = Trainer(model, digits, epochs=1)
    assert t.model is model
    assert all(torch.equal(p, q) for p, q in zip(init, params(t)))


# ------------------------------------------------------------------------------------ plug-ins
def test_plugin_callback_order_and_what_they_see(digits: ArrayDataset) -> None:
    rec = Recorder()
    t = make(digits, batch_size=64, epochs=2, plugins=[rec])  # 3 steps per epoch
    t.fit()
    kinds = [e[0] for e in rec.events]
    evaluation = ["eval_start", "eval_end"]
    assert kinds == (["fit_start", *evaluation]
                     + (["before", "after"] * 3 + evaluation + ["epoch_end"]) * 2
                     + ["fit_end"])
    steps = [(e[1], e[2]) for e in rec.events if e[0] == "before"]
    assert steps == [(k, k) for k in range(6)]  # trainer.step counts steps already taken
    assert [(e[1], e[2]) for e in rec.events if e[0] == "after"] == [(k, k + 1)
                                                                     for k in range(6)]
    ends = [e for e in rec.events if e[0] == "epoch_end"]
    assert [(e[1], e[2]) for e in ends] == [(1, 3), (2, 6)]
    assert ends[0][3] == ("median_of_means", "running_loss", "test_acc", "test_loss",
                          "train_acc", "train_loss")
    assert all(rec.grads_seen)
    # before the step the parameters are those of the previous step's end; after, updated
    for k in range(1, 6):
        assert torch.equal(rec.param_before[k], rec.param_after[k - 1])
        assert not torch.equal(rec.param_before[k], rec.param_after[k])


def test_duck_typed_plugin_without_optional_callbacks(digits: ArrayDataset) -> None:
    class Duck:
        def __init__(self):
            self.calls = 0

        def on_fit_start(self, trainer): ...
        def on_before_step(self, trainer, step, x, y, loss): ...
        def on_after_step(self, trainer, step, x, y, loss):
            self.calls += 1

        def on_epoch_end(self, trainer, epoch, metrics): ...
        def on_fit_end(self, trainer): ...
        def state_dict(self):
            return {}

        def load_state_dict(self, state): ...

    duck = Duck()
    make(digits, epochs=1, plugins=[duck]).fit()
    assert duck.calls == 6


def test_read_only_plugin_does_not_change_the_trajectory(digits: ArrayDataset) -> None:
    class Snoop(Plugin):
        """Reads gradients, parameters and activations; logs per-step device tensors."""

        def on_fit_start(self, trainer):
            self.acts = []
            self.h = trainer.model[0].act1.register_forward_hook(
                lambda m, i, o: self.acts.append(o.detach().mean(0)))

        def on_before_step(self, trainer, step, x, y, loss):
            g = torch.stack([p.grad.norm() for p in trainer.model.parameters()])
            trainer.log("grad_norm", g.sum())

        def on_epoch_end(self, trainer, epoch, metrics):
            trainer.log("act1_mean", torch.stack(self.acts).mean(0), layer="act1")
            self.acts.clear()

        def on_fit_end(self, trainer):
            self.h.remove()

    plain = make(digits, model=lambda: nn.Sequential(small_mlp(), nn.Dropout(0.2)))
    snooped = make(digits, model=lambda: nn.Sequential(small_mlp(), nn.Dropout(0.2)),
                   plugins=[Snoop()])
    h0, h1 = plain.fit(), snooped.fit()
    assert all(torch.equal(p, q) for p, q in zip(params(plain), params(snooped)))
    extra = h1["quantity"].isin(["grad_norm", "act1_mean"])
    pd.testing.assert_frame_equal(h0, h1[~extra].reset_index(drop=True), check_exact=True)
    # per-step scalar rows: 6 steps x 3 epochs; per-unit rows: 16 units x 3 epochs
    assert (h1["quantity"] == "grad_norm").sum() == 18
    per_unit = h1[h1["quantity"] == "act1_mean"]
    assert len(per_unit) == 48 and per_unit["unit"].tolist() == list(range(16)) * 3
    assert (per_unit["layer"] == "act1").all()


def test_log_rejects_bad_values(digits: ArrayDataset) -> None:
    t = make(digits)
    with pytest.raises(ValueError, match="per-unit"):
        t.log("q", torch.zeros(2, 2))
    with pytest.raises(TypeError, match="number or a tensor"):
        t.log("q", "1.0")  # type: ignore[arg-type]


def test_on_fit_end_runs_when_training_fails(digits: ArrayDataset) -> None:
    class Boom(Plugin):
        ended = False

        def on_after_step(self, trainer, step, x, y, loss):
            if step == 4:
                raise RuntimeError("boom")

        def on_fit_end(self, trainer):
            self.ended = True

    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        make(digits, plugins=[boom]).fit()
    assert boom.ended


# ------------------------------------------------------------------------------------ divergence
def test_divergence_is_flagged_and_stops_the_run(digits: ArrayDataset, tmp_path) -> None:
    def linear_out() -> nn.Module:
        return mlp(64, [32], 64, "relu")  # linear output: the squared error can blow up

    t = make(digits, model=linear_out, loss="reconstruction", lr=10.0, epochs=30,
             batch_size=64, seed=0, checkpoint_dir=tmp_path)
    h = t.fit()
    assert t.diverged and t.epoch < 30
    flag = h[h["quantity"] == "diverged"]
    assert len(flag) == 1 and flag["epoch"].item() == t.epoch and flag["value"].item() == 1.0
    assert h["epoch"].max() == t.epoch
    last = h[(h["epoch"] == t.epoch) & (h["quantity"] == "train_loss")]["value"].item()
    assert not math.isfinite(last)  # recorded as it was, not dropped
    assert load_checkpoint(tmp_path / "checkpoint.pt")["diverged"] is True
    # a resume keeps it stopped
    again = make(digits, model=linear_out, loss="reconstruction", lr=10.0, epochs=30,
                 batch_size=64, seed=0, checkpoint_dir=tmp_path)
    h2 = again.fit(resume=True)
    assert again.diverged and again.epoch == t.epoch
    pd.testing.assert_frame_equal(h, h2, check_exact=True)


# ------------------------------------------------------------------------------------ resume
def _resume_case(ds: ArrayDataset, ckpt, *, epochs: int, crash_at: int | None = None,
                 **kw: Any) -> tuple[Trainer, Recorder]:
    rec = Recorder()
    plugins = [rec, Counter()]
    if crash_at is not None:
        class Crash(Plugin):
            def on_after_step(self, trainer, step, x, y, loss):
                if step == crash_at:
                    raise KeyboardInterrupt  # like a killed run

        plugins.append(Crash())
    t = make(ds, epochs=epochs, checkpoint_dir=ckpt, plugins=plugins, **kw)
    return t, rec


@pytest.mark.parametrize("variant", ["sgd", "momentum+dropout"])
def test_resume_is_bit_identical(digits: ArrayDataset, tmp_path, variant: str) -> None:
    kw: dict[str, Any] = {}
    if variant != "sgd":
        kw["model"] = lambda: nn.Sequential(small_mlp("lrelu"), nn.Dropout(0.3))
        kw["optimizer"] = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    full, rec_full = _resume_case(digits, tmp_path / "full", epochs=4, **kw)
    h_full = full.fit()

    first, _ = _resume_case(digits, tmp_path / "split", epochs=2, **kw)
    first.fit()
    second, rec_second = _resume_case(digits, tmp_path / "split", epochs=4, **kw)
    h_split = second.fit(resume=True)

    assert second.resumed_from == 2 and second.epoch == 4 and second.step == full.step
    assert all(torch.equal(p, q) for p, q in zip(params(full), params(second)))
    pd.testing.assert_frame_equal(h_full, h_split, check_exact=True)
    steps_per_epoch = 6
    assert len(rec_second.losses) == 2 * steps_per_epoch
    for a, b in zip(rec_full.losses[2 * steps_per_epoch :], rec_second.losses):
        assert torch.equal(a, b)
    assert torch.equal(full.plugins[1].count, second.plugins[1].count)
    if variant != "sgd":
        s_full, s_split = full.optimizer.state_dict(), second.optimizer.state_dict()
        for k in s_full["state"]:
            assert torch.equal(s_full["state"][k]["momentum_buffer"],
                               s_split["state"][k]["momentum_buffer"])


def test_killed_run_loses_at_most_the_epoch_in_progress(digits: ArrayDataset, tmp_path) -> None:
    full, _ = _resume_case(digits, tmp_path / "full", epochs=4)
    h_full = full.fit()

    killed, _ = _resume_case(digits, tmp_path / "killed", epochs=4, crash_at=15)  # epoch 3
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    state = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 12
    on_disk = pd.read_csv(tmp_path / "killed" / "history.csv")
    assert on_disk["epoch"].max() == 2

    resumed, _ = _resume_case(digits, tmp_path / "killed", epochs=4)
    h = resumed.fit(resume=True)
    assert resumed.resumed_from == 2
    assert all(torch.equal(p, q) for p, q in zip(params(full), params(resumed)))
    pd.testing.assert_frame_equal(h_full, h, check_exact=True)


def test_resume_without_checkpoint_starts_afresh(digits: ArrayDataset, tmp_path) -> None:
    a = make(digits, checkpoint_dir=tmp_path / "a").fit(resume=True)
    b = make(digits).fit()
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_resume_refuses_mismatches(digits: ArrayDataset, tmp_path) -> None:
    make(digits, epochs=2, checkpoint_dir=tmp_path).fit()
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.01, now 0\.02"):
        make(digits, epochs=3, lr=0.02, checkpoint_dir=tmp_path).fit(resume=True)
    with pytest.raises(CheckpointError, match="parameters"):
        make(digits, epochs=3, model=lambda: mlp(64, [8], 10), checkpoint_dir=tmp_path).fit(
            resume=True)
    with pytest.raises(CheckpointError, match="holds 2 epochs"):
        make(digits, epochs=1, checkpoint_dir=tmp_path).fit(resume=True)
    make(digits, epochs=2, checkpoint_dir=tmp_path / "c", plugins=[Counter()]).fit()
    with pytest.raises(CheckpointError, match=r"plug-ins \['Counter'\], but .* are \[\]"):
        make(digits, epochs=3, checkpoint_dir=tmp_path / "c").fit(resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        make(digits).fit(resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        make(digits, checkpoint_dir=tmp_path).fit(resume=True)


def test_fit_twice_is_an_error(digits: ArrayDataset) -> None:
    t = make(digits, epochs=1)
    t.fit()
    with pytest.raises(RuntimeError, match="already called"):
        t.fit()


def test_checkpoint_files(digits: ArrayDataset, tmp_path) -> None:
    t = make(digits, checkpoint_dir=tmp_path, plugins=[Counter()], run_name="cp")
    h = t.fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True
    assert state["epoch"] == 3 and state["step"] == 18 and state["run"] == "cp"
    assert state["plugins"][0]["type"] == "Counter"
    assert state["plugins"][0]["state"]["count"].item() == 18
    assert set(state["rng"]) == {"cpu", "cuda"}
    on_disk = pd.read_csv(tmp_path / "history.csv", dtype={"unit": "Int64"})
    pd.testing.assert_frame_equal(on_disk, h, check_exact=True, check_dtype=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "history.csv"]


# ------------------------------------------------------------------------------------ monitor
class FakeMonitor:
    """A minimal object following the ActivationMonitor contract."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entered = 0
        self.exited = 0
        self.handle = None
        self.calls = torch.zeros((), dtype=torch.int64)
        self.snaps: list[dict[str, Any]] = []

    def __enter__(self) -> FakeMonitor:
        self.entered += 1
        self.handle = self.model.act1.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited += 1
        self.handle.remove()

    def _hook(self, m, i, o) -> None:
        self.calls = self.calls + 1  # every forward call while attached

    def snapshot(self, **tags: Any) -> None:
        self.snaps.append({**tags, "calls": int(self.calls)})

    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.snaps)

    def reset(self) -> None:
        self.calls = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "snaps": [dict(s) for s in self.snaps]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]
        self.snaps = [dict(s) for s in state["snaps"]]


def test_monitor_plugin_with_a_contract_fake(digits: ArrayDataset, tmp_path) -> None:
    torch.manual_seed(0)
    model = small_mlp()
    mon = FakeMonitor(model)
    t = Trainer(model, digits, epochs=3, batch_size=32, plugins=[MonitorPlugin(mon)])
    h_plain = Trainer(copy.deepcopy(model), digits, epochs=3, batch_size=32).fit()
    h = t.fit()
    # entered for the fit, detached around the 4 evaluations: only training batches counted
    assert mon.entered == mon.exited == 1 + 4
    assert mon.snaps == [{"epoch": e, "step": 6 * e, "calls": 6 * e} for e in (1, 2, 3)]
    assert MonitorPlugin(mon).history().shape == (3, 3)
    pd.testing.assert_frame_equal(h, h_plain, check_exact=True)

    # step-interval snapshots with reset, and the state travels through a resume
    def run(epochs: int, resume: bool) -> FakeMonitor:
        torch.manual_seed(0)
        m = small_mlp()
        fm = FakeMonitor(m)
        Trainer(m, digits, epochs=epochs, batch_size=32, checkpoint_dir=tmp_path,
                plugins=[MonitorPlugin(fm, snapshot=4, reset_after_snapshot=True)]).fit(
                    resume=resume)
        return fm

    run(1, False)
    fm = run(3, True)
    assert [s["step"] for s in fm.snaps] == [4, 8, 12, 16]
    assert [s["calls"] for s in fm.snaps] == [4, 4, 4, 4]
    assert [s["epoch"] for s in fm.snaps] == [0, 1, 1, 2]  # epoch = last completed epoch

    # include_evaluation keeps the hooks during the 3 evaluation passes (train, test, probe)
    torch.manual_seed(0)
    m = small_mlp()
    fm = FakeMonitor(m)
    Trainer(m, digits, epochs=2, batch_size=32,
            plugins=[MonitorPlugin(fm, include_evaluation=True)]).fit()
    assert [s["calls"] for s in fm.snaps] == [6 + 3 * 2, 12 + 3 * 3]


def test_monitor_plugin_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="lacks"):
        MonitorPlugin(object())  # type: ignore[arg-type]
    mon = FakeMonitor(small_mlp())
    for bad in (0, -2, "step", True):
        with pytest.raises(ValueError, match="snapshot"):
            MonitorPlugin(mon, snapshot=bad)  # type: ignore[arg-type]


def test_monitor_plugin_with_the_real_activation_monitor(digits: ArrayDataset) -> None:
    import biasshift.monitor as monitor_pkg

    if not hasattr(monitor_pkg, "ActivationMonitor"):
        pytest.skip("biasshift.monitor does not export ActivationMonitor yet")
    torch.manual_seed(0)
    model = small_mlp()
    mon = monitor_pkg.ActivationMonitor(model)
    plain = Trainer(copy.deepcopy(model), digits, epochs=2, batch_size=32).fit()
    seen: list[torch.Tensor] = []
    tap = model.act1.register_forward_hook(
        lambda m, i, o: seen.append(o.detach().double().clone()) if m.training else None)
    h = Trainer(model, digits, epochs=2, batch_size=32, plugins=[MonitorPlugin(mon)]).fit()
    tap.remove()
    pd.testing.assert_frame_equal(h, plain, check_exact=True)  # monitoring is read-only
    hist = mon.history()
    assert isinstance(hist, pd.DataFrame) and len(hist) > 0
    assert {"epoch", "step", "module", "unit", "count", "mean"} <= set(hist.columns)
    assert sorted(hist["epoch"].unique()) == [1, 2]
    assert sorted(hist.loc[hist["epoch"] == 2, "step"].unique()) == [12]
    # only the training mini-batches: 192 samples per epoch, evaluation passes left out
    act1 = hist[hist["module"] == "act1"]
    assert set(act1.loc[act1["epoch"] == 1, "count"]) == {192}
    assert set(act1.loc[act1["epoch"] == 2, "count"]) == {384}
    want = torch.cat(seen[:6]).mean(0).numpy()  # epoch 1's six training batches
    got = act1[act1["epoch"] == 1].sort_values("unit")["mean"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ bad input
def test_bad_arguments_raise_clear_errors(digits: ArrayDataset) -> None:
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        make(digits, loss="mse")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr must be"):
            make(digits, lr=bad)
    with pytest.raises(ValueError, match="batch_size"):
        make(digits, batch_size=0)
    with pytest.raises(ValueError, match="probe_size"):
        make(digits, probe_size=-1)
    with pytest.raises(TypeError, match="lacks on_fit_start"):
        make(digits, plugins=[object()])
    with pytest.raises(TypeError, match="factory returned"):
        make(digits, model=lambda: 3)
    with pytest.raises(TypeError, match="ArrayDataset"):
        Trainer(small_mlp(), (digits.train_x, digits.train_y), epochs=1)  # type: ignore[arg-type]
    t = make(digits, model=lambda: mlp(64, [8], 10), loss="reconstruction")
    with pytest.raises(ValueError, match=r"flattened input.s shape \(\d+, 64\).*\(\d+, 10\)"):
        t.fit()
    with pytest.raises(RuntimeError, match="probe_size=0"):
        make(digits, probe_size=0).probe()


@pytest.mark.parametrize("case", ["column", "onehot", "float", "int32", "range", "negative",
                                  "test-range"])
def test_bad_labels_fail_at_construction_naming_dataset_and_shape(digits: ArrayDataset,
                                                                 case: str) -> None:
    import dataclasses

    y, ty = digits.train_y, digits.test_y
    n = y.shape[0]
    bad = {
        "column": dict(train_y=y.unsqueeze(1)),
        "onehot": dict(train_y=F.one_hot(y, 10)),
        "float": dict(train_y=y.float()),
        "int32": dict(train_y=y.int()),
        "range": dict(train_y=torch.where(y == 3, 10, y)),
        "negative": dict(train_y=torch.where(y == 3, -1, y)),
        "test-range": dict(test_y=torch.where(ty == 3, 12, ty)),
    }[case]
    ds = dataclasses.replace(digits, **bad)
    match = {
        "column": rf"dataset 'digits': train_y must be class indices of shape \(N,\) = \({n},\), "
                  rf"got shape \({n}, 1\).*reshape",
        "onehot": rf"train_y .*got shape \({n}, 10\).*argmax",
        "float": r"train_y must be int64 class indices, got dtype torch.float32.*y\.long\(\)",
        "int32": r"got dtype torch.int32",
        "range": r"train_y holds labels 0\.\.10, outside 0\.\.9 \(num_classes=10\)",
        "negative": r"train_y holds labels -1\.\.9, outside 0\.\.9",
        "test-range": r"test_y holds labels 0\.\.12",
    }[case]
    with pytest.raises(ValueError, match=match):
        make(ds)  # at construction, not at the first step
    # reconstruction does not use the labels
    make(ds, model=lambda: mlp(64, [8], 64), loss="reconstruction")


def test_model_with_too_few_logits_is_named(digits: ArrayDataset) -> None:
    t = make(digits, model=lambda: mlp(64, [8], 7), epochs=1)
    with pytest.raises(ValueError, match=r"model returns 7 logits but dataset 'digits' has 10"):
        t.fit()


def test_lr_true_is_refused(digits: ArrayDataset) -> None:
    for bad in (True, False, "0.1", None):
        with pytest.raises(ValueError, match=r"lr must be a positive finite number"):
            make(digits, lr=bad)
    assert make(digits, lr=1).lr == 1.0


def test_checkpoint_dir_that_is_a_file_fails_at_construction(digits: ArrayDataset,
                                                             tmp_path) -> None:
    f = tmp_path / "ckpt"
    f.write_text("a file")
    with pytest.raises(ValueError, match=rf"checkpoint_dir {f} is a file, not a folder"):
        make(digits, checkpoint_dir=f)
    with pytest.raises(ValueError, match=rf"checkpoint_dir {f / 'run'} lies under {f}, which is "
                                         "a file"):
        make(digits, checkpoint_dir=f / "run")
    # a folder that does not exist yet is fine (created at the first checkpoint)
    t = make(digits, checkpoint_dir=tmp_path / "new" / "run", epochs=1)
    assert not (tmp_path / "new").exists()
    t.fit()
    assert (tmp_path / "new" / "run" / "checkpoint.pt").is_file()


# ------------------------------------------------------------------------------------ devices
def test_fit_on_each_device_agrees_with_cpu(digits: ArrayDataset, device: torch.device) -> None:
    cpu = make(digits, epochs=2).fit()
    dev = make(digits, epochs=2, device=device)
    h = dev.fit()
    assert next(dev.model.parameters()).device.type == device.type
    assert h[["epoch", "layer", "quantity"]].equals(cpu[["epoch", "layer", "quantity"]])
    np.testing.assert_allclose(h["value"], cpu["value"], rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_training_steps_do_not_synchronise_with_the_host(digits: ArrayDataset) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    t = make(digits, device="cuda", epochs=1)
    t._train_epoch(1)  # warm-up (lazy initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t._train_epoch(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
