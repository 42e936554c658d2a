"""Many runs as one model (issue 16): a stack of members equals their single runs, resumes
mid-epoch bit-identically, isolates a diverging member, and sizes itself from a byte budget."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from biasshift.data import ArrayDataset, load_dataset
from biasshift.models import autoencoder, cifar_conv11, mlp
from biasshift.models.stacked import StackedSequential, stackable
from biasshift.train import Plugin, Trainer
from biasshift.train.batched import BatchedTrainer, batchable, member_bytes, stack_size
from biasshift.train.checkpoint import load_checkpoint

ACTS = ("elu", "relu", "lrelu", "srelu")


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset("digits").subset(150, 40)


def net(act: str) -> nn.Module:
    return mlp(64, [16, 12, 12], 10, act)


def make(ds: ArrayDataset, act: str, seed: int, lr: float, **kw: Any) -> Trainer:
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 16)
    kw.setdefault("probe_size", 50)
    model = kw.pop("model", functools.partial(net, act))
    return Trainer(model, ds, lr=lr, seed=seed, run_name=f"{act}-{seed}", **kw)


MEMBERS = [("elu", 1, 0.05), ("relu", 2, 0.02), ("lrelu", 3, 0.05), ("srelu", 4, 0.1),
           ("elu", 5, 0.01)]


def _compare(single: Trainer, member: Trainer, rtol: float = 2e-5, atol: float = 1e-6,
             drop: tuple[str, ...] = ()) -> None:
    for a, b in zip(single.model.parameters(), member.model.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    hs, hm = single.history, member.history
    hs = hs[~hs["quantity"].isin(drop)].reset_index(drop=True)
    hm = hm[~hm["quantity"].isin(drop)].reset_index(drop=True)
    assert list(hm["run"].unique()) == [single.run_name]
    pd.testing.assert_frame_equal(hs.drop(columns="value"), hm.drop(columns="value"))
    torch.testing.assert_close(torch.tensor(hm["value"].to_numpy()),
                               torch.tensor(hs["value"].to_numpy()), rtol=rtol * 10, atol=atol)
    assert member.step == single.step and member.epoch == single.epoch
    assert member.diverged == single.diverged


def test_members_equal_their_single_runs(digits) -> None:
    singles = [make(digits, a, s, lr) for a, s, lr in MEMBERS]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(digits, a, s, lr) for a, s, lr in MEMBERS])
    hist = bt.fit()
    assert sorted(hist["run"].unique()) == sorted(t.run_name for t in singles)
    for single, member in zip(singles, bt.trainers):
        _compare(single, member)
        # probe statistics of the member's view equal the single run's
        torch.testing.assert_close(member.last_probe.mean["act2"],
                                   single.last_probe.mean["act2"], rtol=1e-4, atol=1e-5)


def sgd(**hp: Any) -> Any:
    """An optimizer factory: ``torch.optim.SGD`` at the trainer's lr (passed as ``lr``)."""
    return lambda lr: (lambda m: torch.optim.SGD(m.parameters(), lr=lr, **hp))


# every combination torch.optim.SGD allows, and a plain member beside them
SGD_MEMBERS = [("elu", 1, 0.05, dict(momentum=0.9, weight_decay=5e-4)),
               ("relu", 2, 0.02, dict(momentum=0.9, nesterov=True)),
               ("lrelu", 3, 0.05, dict(momentum=0.5, dampening=0.3, weight_decay=1e-2)),
               ("srelu", 4, 0.1, {}),
               ("elu", 5, 0.01, dict(weight_decay=1e-3))]


def test_momentum_and_weight_decay_members_equal_their_single_runs(digits, tmp_path) -> None:
    """Each member keeps its own SGD hyperparameters; its momentum buffers are in its own
    optimizer's state (a single-run checkpoint), and equal the single run's."""
    singles = [make(digits, a, s, lr, optimizer=sgd(**hp)(lr)) for a, s, lr, hp in SGD_MEMBERS]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(digits, a, s, lr, optimizer=sgd(**hp)(lr),
                              checkpoint_dir=tmp_path / f"{a}-{s}")
                         for a, s, lr, hp in SGD_MEMBERS])
    bt.fit()
    for single, member in zip(singles, bt.trainers):
        _compare(single, member)
        a, b = single.optimizer.state_dict(), member.optimizer.state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:
            torch.testing.assert_close(b["state"][i]["momentum_buffer"],
                                       a["state"][i]["momentum_buffer"], rtol=2e-5, atol=1e-6)
    # the plain member and the decay-only member have no buffers, as in their single runs
    assert not bt.trainers[3].optimizer.state_dict()["state"]
    # a member's checkpoint resumes in the single-run Trainer with its momentum
    a, s, lr, hp = SGD_MEMBERS[0]
    single = make(digits, a, s, lr, optimizer=sgd(**hp)(lr), epochs=3,
                  checkpoint_dir=tmp_path / f"{a}-{s}")
    single.fit(resume=True)
    ref = make(digits, a, s, lr, optimizer=sgd(**hp)(lr), epochs=3)
    ref.fit()
    _compare(ref, single)


class Recorder(Plugin):
    """A stackable plug-in that records its callbacks (name, step, batch shape, loss)."""

    stackable = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append(("fit_start", trainer.lr))

    def on_before_step(self, trainer, step, x, y, loss) -> None:
        self.calls.append(("before", step, tuple(x.shape), float(loss.detach()),
                           trainer.optimizer.param_groups[0]["lr"]))

    def on_after_step(self, trainer, step, x, y, loss) -> None:
        self.calls.append(("after", step, trainer.step))

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        self.calls.append(("epoch_end", epoch, round(metrics["train_loss"], 4)))
        trainer.log("recorded", float(len(self.calls)))

    def on_fit_end(self, trainer: Trainer) -> None:
        self.calls.append(("fit_end", trainer.epoch))


def noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=gen, device=x.device)


def schedule_kw(lr: float, **hp: Any) -> dict[str, Any]:
    """Momentum SGD, a step schedule, a recorder, the timer and an augmentation: what the
    conv-activations analysis trains with."""
    from biasshift.reproduce.conv_activations import IterationTimer
    from biasshift.train.schedule import StepLearningRate

    return dict(optimizer=sgd(momentum=0.9, weight_decay=5e-4, **hp)(lr), augment=noise,
                plugins=[StepLearningRate([7, 15], [lr, lr / 10, lr / 100]), Recorder(),
                         IterationTimer()])


def test_members_with_plugins_schedules_and_augmentation_equal_single_runs(digits) -> None:
    runs = MEMBERS[:3]
    singles = [make(digits, a, s, lr, **schedule_kw(lr)) for a, s, lr in runs]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(digits, a, s, lr, **schedule_kw(lr)) for a, s, lr in runs])
    bt.fit()
    timer = "train_seconds_per_step"
    for single, member in zip(singles, bt.trainers):
        assert member.stack_members == 3 and single.stack_members == 1
        # the timer records the member's share of the stacked step; the rest is the single run
        h = member.history
        times = h.loc[h["quantity"] == timer, "value"]
        assert len(times) == 2 and (times > 0).all()
        _compare(single, member, drop=(timer,))
        a, b = single.plugins[1].calls, member.plugins[1].calls
        assert [c[:3] for c in a] == [c[:3] for c in b]  # callbacks, steps, shapes in order
        for ca, cb in zip(a, b):
            if ca[0] == "before":
                assert cb[4] == ca[4]  # the schedule set the member's own lr
                assert abs(cb[3] - ca[3]) < 1e-4 * max(1.0, abs(ca[3]))
        assert member.optimizer.param_groups[0]["lr"] == runs[bt.trainers.index(member)][2] / 100


def dropout_mlp(act: str) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), make_act(act), nn.Dropout(0.3),
                         nn.Linear(16, 12),
                         make_act(act), nn.Dropout(0.5), nn.Linear(12, 10))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_dropout_members_draw_their_single_runs_masks(digits, tmp_path, kind) -> None:
    """On the CPU each member's dropout masks come from its own generator, seeded as its
    single run's global one: the member trains on the single run's masks (the conv net in
    the channel layout), and its checkpoint's RNG state continues that stream alone."""
    def model(a: str) -> Any:
        return (functools.partial(dropout_mlp, a) if kind == "mlp" else
                functools.partial(cifar_conv11, a, num_classes=10, in_channels=1,
                                  width=1 / 16, pooled_stacks=2, dropout=True))

    image = digits  # (N, 1, 8, 8)
    runs = [("elu", 1, 0.05), ("srelu", 2, 0.05)]
    singles = [make(image, a, s, lr, model=model(a)) for a, s, lr in runs]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(image, a, s, lr, model=model(a),
                              checkpoint_dir=tmp_path / f"{a}-{s}") for a, s, lr in runs])
    bt.fit()
    for single, member in zip(singles, bt.trainers):
        _compare(single, member)
    # one draw over the stack instead: other masks, other weights
    other = BatchedTrainer([make(image, a, s, lr, model=model(a)) for a, s, lr in runs])
    with pytest.raises(ValueError, match="1 generators for 2 members"):
        other.stack.use_member_generators([torch.Generator()])
    other.stack.use_member_generators(None)
    other.fit()
    assert not torch.allclose(next(other.trainers[0].model.parameters()),
                              next(singles[0].model.parameters()), atol=1e-3)
    # the member's checkpoint resumes alone on its single run's dropout stream
    a, s, lr = runs[0]
    alone = make(image, a, s, lr, model=model(a), epochs=3, checkpoint_dir=tmp_path / f"{a}-{s}")
    alone.fit(resume=True)
    ref = make(image, a, s, lr, model=model(a), epochs=3)
    ref.fit()
    _compare(ref, alone)


def test_unstackable_plugins_are_refused_by_name(digits) -> None:
    from biasshift import ActivationMonitor
    from biasshift.train import MonitorPlugin

    model = net("elu")
    t = make(digits, "elu", 1, 0.1, model=lambda: model,
             plugins=[MonitorPlugin(ActivationMonitor(model))])
    assert "MonitorPlugin is not stackable" in (batchable(t) or "")
    with pytest.raises(ValueError, match="MonitorPlugin is not stackable"):
        BatchedTrainer([t, make(digits, "elu", 2, 0.1)])


def test_autoencoder_members_equal_single_runs(digits) -> None:
    def ae(act: str) -> nn.Module:
        return autoencoder(act, in_features=64, encoder=(24, 12, 6))

    kw = dict(loss="reconstruction", probe_size=0, epochs=1)
    runs = [("elu", 1, 1e-3), ("relu", 2, 2e-3)]
    singles = [make(digits, a, s, lr, model=functools.partial(ae, a), **kw) for a, s, lr in runs]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(digits, a, s, lr, model=functools.partial(ae, a), **kw)
                         for a, s, lr in runs])
    bt.fit()
    for single, member in zip(singles, bt.trainers):
        _compare(single, member)


def test_initial_weights_and_data_order_are_the_single_runs(digits) -> None:
    singles = [make(digits, a, s, lr) for a, s, lr in MEMBERS[:3]]
    bt = BatchedTrainer([make(digits, a, s, lr) for a, s, lr in MEMBERS[:3]])
    for k, t in enumerate(singles):
        for a, b in zip(t.model.parameters(), bt.trainers[k].model.parameters()):
            assert torch.equal(a, b)
        assert torch.equal(bt.epoch_orders(3)[k], t.epoch_order(3))


@pytest.mark.parametrize("kind", ["mlp", "conv-bn", "mlp-momentum", "mlp-plugins"])
def test_resume_mid_epoch_is_bit_identical(digits, tmp_path, monkeypatch, kind) -> None:
    """Also for conv nets with batch norm, whose running statistics live in the stack, and for
    members with momentum, whose buffers do."""
    def model(a: str) -> Any:
        return (functools.partial(small_conv, a, True, 2) if kind == "conv-bn"
                else functools.partial(net, a))

    def opt(i: int, lr: float) -> dict[str, Any]:
        if kind == "mlp-plugins":  # also the augmentation generators' state mid-epoch
            kw = schedule_kw(lr)
            kw["plugins"] = kw["plugins"][:1]  # the schedule (the others' rows hold times)
            return kw
        return {"optimizer": sgd(**SGD_MEMBERS[i][3])(lr)} if kind == "mlp-momentum" else {}

    def members(root):
        return [make(digits, a, s, lr, epochs=3, checkpoint_dir=root / f"{a}-{s}",
                     model=model(a), **opt(i, lr)) for i, (a, s, lr) in enumerate(MEMBERS[:3])]

    ref = BatchedTrainer(members(tmp_path / "ref"), checkpoint_dir=tmp_path / "ref",
                         checkpoint_every=2)
    ref.fit()

    class Killed(Exception):
        pass

    calls = {"n": 0}
    orig = BatchedTrainer._save_stack

    def save_then_die(self, position):
        orig(self, position)
        if position is not None:
            calls["n"] += 1
            if calls["n"] == 6:  # inside epoch 2 (150 samples / 16 = 10 steps: 4 saves/epoch)
                raise Killed

    root = tmp_path / "cut"
    monkeypatch.setattr(BatchedTrainer, "_save_stack", save_then_die)
    cut = BatchedTrainer(members(root), checkpoint_dir=root, checkpoint_every=2)
    with pytest.raises(Killed):
        cut.fit()
    monkeypatch.setattr(BatchedTrainer, "_save_stack", orig)
    again = BatchedTrainer(members(root), checkpoint_dir=root, checkpoint_every=2)
    again.fit(resume=True)
    assert again.resumed_from == (1, 64)  # epoch 1 done, 2nd save of epoch 2 at sample 64
    for a, b in zip(ref.trainers, again.trainers):
        for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
            assert torch.equal(p, q)
        pd.testing.assert_frame_equal(a.history, b.history)
        assert a.step == b.step
    # each member's own checkpoint is a single-run one: the single Trainer resumes it
    saved = load_checkpoint(root / "elu-1" / "checkpoint.pt")["optimizer"]["state"]
    kept = again.trainers[0].optimizer.state_dict()["state"]
    assert saved.keys() == kept.keys() and (kind not in ("mlp-momentum", "mlp-plugins")
                                             or saved)
    for i in saved:
        assert torch.equal(saved[i]["momentum_buffer"], kept[i]["momentum_buffer"])
    single = make(digits, "elu", 1, 0.05, epochs=4, checkpoint_dir=root / "elu-1",
                  model=model("elu"), **opt(0, 0.05))
    single.fit(resume=True)
    assert single.resumed_from == 3 and single.epoch == 4


def test_a_member_checkpoint_holds_only_its_member(digits, tmp_path) -> None:
    """Member views share the stack's storage; torch.save would write the whole stack into
    every member's checkpoint (K times the bytes). Each one must be the single run's size."""
    wide = functools.partial(mlp, 64, [96, 96], 10, "elu")
    single = make(digits, "elu", 1, 0.05, epochs=1, model=wide, checkpoint_dir=tmp_path / "s")
    single.fit()
    bt = BatchedTrainer([make(digits, "elu", s, 0.05, epochs=1, model=wide,
                              checkpoint_dir=tmp_path / f"m{s}") for s in range(6)],
                        checkpoint_dir=tmp_path / "stack")
    bt.fit()
    one = (tmp_path / "s" / "checkpoint.pt").stat().st_size
    for s in range(6):
        assert (tmp_path / f"m{s}" / "checkpoint.pt").stat().st_size < 1.1 * one
    # the stack's own checkpoint holds every member once
    assert (tmp_path / "stack" / "stack.pt").stat().st_size < 6.6 * one


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_diverging_member_is_isolated(digits, momentum) -> None:
    """Also with momentum: the frozen member's NaN buffers never reach its weights."""
    runs = [("elu", 1, 0.05), ("lrelu", 2, 1e3), ("srelu", 3, 0.05)]
    def opt(lr: float) -> dict[str, Any]:
        return {"optimizer": sgd(momentum=momentum)(lr)} if momentum else {}

    singles = [make(digits, a, s, lr, epochs=3, **opt(lr)) for a, s, lr in runs]
    for t in singles:
        t.fit()
    assert singles[1].diverged and not singles[0].diverged
    bt = BatchedTrainer([make(digits, a, s, lr, epochs=3, **opt(lr)) for a, s, lr in runs])
    frozen: dict[str, torch.Tensor] = {}
    orig = bt._record

    def record(epoch, running, seconds):
        orig(epoch, running, seconds)
        if bt.trainers[1].diverged and not frozen:
            frozen.update({k: v.clone() for k, v in bt.trainers[1].model.state_dict().items()})

    bt._record = record  # type: ignore[method-assign]
    bt.fit()
    bad = bt.trainers[1]
    assert bad.diverged and bad.epoch == singles[1].epoch < 3
    h = bad.history
    assert h.loc[h.quantity == "diverged", "epoch"].tolist() == [bad.epoch]
    assert h["epoch"].max() == bad.epoch
    # frozen: the weights after the divergence epoch did not change (NaN compared as equal)
    for k, v in bad.model.state_dict().items():
        assert torch.equal(torch.nan_to_num(v, 7.0), torch.nan_to_num(frozen[k], 7.0)), k
    for i in (0, 2):
        _compare(singles[i], bt.trainers[i])


def stacked_step_bytes(stack: nn.Module, x: torch.Tensor) -> int:
    """What one stacked step really holds: parameters, gradients, every tensor autograd saves
    for the backward pass, and the output."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stack(x)
    out.square().sum().backward()
    params = sum(p.numel() * p.element_size() for p in stack.parameters())
    return 2 * params + sum(saved) + out.numel() * out.element_size()


def test_memory_from_a_budget(digits) -> None:
    model = net("elu")
    per = member_bytes(model, batch_size=16, eval_batch_size=64)
    assert stack_size(10 * per + per // 2, per, runs=20) == 10
    assert stack_size(10 * per, per, runs=4) == 4
    assert stack_size(per // 3, per, runs=4) == 1
    with pytest.raises(ValueError, match="per_member"):
        stack_size(100, 0, 3)
    # the estimate bounds what one stacked step really holds: parameters, gradients and every
    # tensor autograd saves for the backward pass
    K = 6
    stack = StackedSequential([net(a) for a in ("elu", "relu", "lrelu", "srelu", "elu", "elu")])
    used = stacked_step_bytes(stack, torch.randn(K, 16, 64))
    assert used <= K * per, (used, K * per)
    assert K * per <= 4 * used  # and is not absurdly loose


def test_stackable_and_batchable_name_the_problem(digits) -> None:
    assert stackable(net("elu")) is None
    # nested nn.Sequential and convolutions stack; other containers, padding modes and
    # modules that mix channels are refused with the module's name
    assert stackable(nn.Sequential(nn.Sequential(nn.Linear(2, 2)))) is None
    assert stackable(nn.Sequential(nn.Conv2d(1, 1, 1))) is None
    assert "container" in (stackable(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))) or "")
    why = stackable(nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 3, padding_mode="reflect"))))
    assert why is not None and "'0.0'" in why and "reflect" in why
    from biasshift.models.conv import SpatialPyramidPool
    assert "SpatialPyramidPool" in (stackable(nn.Sequential(SpatialPyramidPool())) or "")
    t = make(digits, "elu", 1, 0.1, optimizer=lambda m: torch.optim.Adam(m.parameters()))
    assert "Adam" in (batchable(t) or "")
    with pytest.raises(ValueError, match=r"cannot be stacked.*Adam"):
        BatchedTrainer([t])
    with pytest.raises(ValueError, match="batch_size"):
        BatchedTrainer([make(digits, "elu", 1, 0.1),
                        make(digits, "elu", 2, 0.1, batch_size=8)])
    with pytest.raises(ValueError, match="architecture"):
        StackedSequential([net("elu"), mlp(64, [16, 12], 10, "elu")])


def test_analysis_with_batch_runs_equals_one_by_one(tmp_path) -> None:
    """The whole analysis stacked vs one by one.  ELU only: with the 8x128 ReLU/SReLU nets a
    single run is itself chaotic at rounding level on digits (a 1-ulp change of one weight
    changes its weights by 5% after 10 steps, when a kink is crossed), so only the smooth unit
    can be compared over whole epochs; kinked units are compared over a few steps above."""
    from biasshift.reproduce import resolve_settings, run_analysis
    from biasshift.reproduce.registry import get_analysis
    from biasshift.reproduce.runner import plan_stacks

    def read_csv(path):
        return pd.read_csv(path, dtype={"unit": "Int64"})

    def run(tag: str, batch_runs):
        s = resolve_settings("activation-median", quick=True, epochs=2, seeds=2,
                             activations=["elu"], lrs=[0.01, 0.02], out=tmp_path / tag / "out",
                             work_dir=tmp_path / tag / "runs", jobs=1, threads=1,
                             batch_runs=batch_runs)
        return s, run_analysis(s, progress=False)

    s1, _ = run("one", 1)
    s2, auto = run("auto", None)  # activation-median's default: stacked
    assert s1.batch_runs == 1 and s2.batch_runs == 0
    a = get_analysis("activation-median")
    assert [len(u) for u in plan_stacks(a, a.run_specs(s2), s2, load_dataset("digits"))] == [4]
    f1 = read_csv(s1.out / "activation-median.csv")
    f2 = read_csv(s2.out / "activation-median.csv")
    pd.testing.assert_frame_equal(f1.drop(columns="value"), f2.drop(columns="value"))
    torch.testing.assert_close(torch.tensor(f2["value"].to_numpy()),
                               torch.tensor(f1["value"].to_numpy()), rtol=1e-4, atol=1e-5)
    assert [o.status for o in auto.outcomes] == ["finished"] * 4
    assert not any(p.name.startswith("stack-") for p in (tmp_path / "auto" / "runs").iterdir())
    # a stacked run folder is an ordinary one: --resume reuses it on the single path too
    s3 = resolve_settings("activation-median", quick=True, epochs=2, seeds=2,
                          activations=["elu"], lrs=[0.01, 0.02], out=tmp_path / "auto" / "out",
                          work_dir=tmp_path / "auto" / "runs", jobs=1, threads=1,
                          batch_runs=1, resume=True)
    again = run_analysis(s3, progress=False)
    assert all(o.reused for o in again.outcomes)


def test_member_views_are_live_and_seen_as_own_models() -> None:
    from biasshift import UnitFisher
    from biasshift.monitor import probe_statistics

    models = [net(a) for a in ("elu", "srelu", "srelu")]
    stack = StackedSequential(models)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    for k, m in enumerate(models):
        view = stack.member(k)
        assert [n for n, _ in view.named_modules()] == [n for n, _ in m.named_modules()]
        torch.testing.assert_close(view(x), m(x))
        torch.testing.assert_close(stack.forward_shared(x)[k], m(x), rtol=1e-6, atol=1e-6)
        a, b = UnitFisher(m, layers=["fc2"]), UnitFisher(view, layers=["fc2"])
        a.accumulate(x, y)
        b.accumulate(x, y)
        torch.testing.assert_close(b.matrix("fc2"), a.matrix("fc2"))
        pa, pb = probe_statistics(m, x), probe_statistics(view, x)
        torch.testing.assert_close(pb.mean["act1"], pa.mean["act1"])
    # live: an in-place change of the stack is seen by the view
    view = stack.member(1)
    with torch.no_grad():
        stack.layers["fc1"].bias[1].add_(1.0)
    torch.testing.assert_close(view.fc1.bias, models[1].fc1.bias + 1.0)


def test_runs_with_trainer_options_are_never_stacked(monkeypatch) -> None:
    """The autoencoder's runs carry trainer options (its reconstruction loss) that a stack
    would not pass on: ``plan_stacks`` keeps each alone whatever ``--batch-runs`` says, also
    without the plug-ins that would keep them alone anyway."""
    from biasshift.reproduce import resolve_settings
    from biasshift.reproduce.registry import get_analysis
    from biasshift.reproduce.runner import plan_stacks

    s = resolve_settings("autoencoder", quick=True, seeds=2, batch_runs=4)
    a = get_analysis("autoencoder")
    monkeypatch.setattr(a, "plugins", lambda spec: [])
    specs = a.run_specs(s)
    assert len(specs) >= 2 and all(a.trainer_options(x) for x in specs)
    assert [len(u) for u in plan_stacks(a, specs, s, load_dataset("digits"))] == [1] * len(specs)


def test_bce_reconstruction_members_are_refused(digits) -> None:
    """A stack trains the summed squared error only: a member on the Bernoulli cross-entropy
    (the autoencoder preset's loss) is refused with the reason, an SSE member is not."""
    def ae(act: str) -> nn.Module:
        return autoencoder(act, in_features=64, encoder=(24, 12, 6))

    bce = make(digits, "elu", 0, 1e-3, model=functools.partial(ae, "elu"),
               loss="reconstruction", reconstruction_loss="bce", reconstruction_logits=True)
    why = batchable(bce)
    assert why is not None and "'bce'" in why
    sse = make(digits, "elu", 0, 1e-3, model=functools.partial(ae, "elu"), loss="reconstruction")
    assert batchable(sse) is None
    with pytest.raises(ValueError, match="bce"):
        BatchedTrainer([bce, make(digits, "relu", 1, 1e-3, model=functools.partial(ae, "relu"),
                                  loss="reconstruction", reconstruction_loss="bce",
                                  reconstruction_logits=True)])


# ---------------------------------------------------------------- conv nets (channel layout)
def small_conv(act: str, batch_norm: bool = False, pooled_stacks: int = 3) -> nn.Module:
    """The paper's 11-layer net at 1/16 width on 8x8 digits (3 pooled stacks), no dropout."""
    from biasshift.models import cifar_conv11

    return cifar_conv11(act, num_classes=10, in_channels=1, width=1 / 16,
                        pooled_stacks=pooled_stacks, dropout=False, batch_norm=batch_norm)


def odd_conv(act: str) -> nn.Module:
    """Every stacked layer kind once: grouped, strided and dilated convolutions, zero padding,
    batch norm in 2-d and 1-d (no bias before it: its gradient is exactly 0, and rounding noise),
    pooling, flatten, linear layers, and dropout at rate 0."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), make_act(act),
        nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 6, 2, stride=2, groups=2),
                      make_act(act), nn.Dropout(0.0)),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 7, bias=False), nn.BatchNorm1d(7),
        make_act(act), nn.Linear(7, 3))


def make_act(act: str) -> nn.Module:
    from biasshift.activations import make_activation

    return make_activation(act)


@pytest.mark.parametrize("build", [odd_conv, small_conv,
                                   functools.partial(small_conv, batch_norm=True)],
                         ids=["every-layer", "conv11", "conv11-bn"])
def test_conv_stack_forward_and_gradients_equal_each_member(build) -> None:
    """Each member of a stacked conv net, on its own batch, gives its own model's output and
    the gradient of its own loss (autograd on the member alone), in training mode (batch
    norm on batch statistics) and in eval mode (on running statistics, shared batch).  In
    float64: batch norm over 1x1 maps of 6 samples amplifies float32 rounding to 1e-4."""
    torch.manual_seed(0)
    acts = ["elu", "relu", "srelu", "srelu", "lrelu"]
    models = [build(a).double() for a in acts]
    stack = StackedSequential(models)
    K = len(models)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(K, 6, 10 if build is not odd_conv else 3, generator=g, dtype=torch.float64)
    out = stack(x)
    (out * w).sum().backward()
    names = [n for n, _ in models[0].named_parameters()]
    for k, m in enumerate(models):
        ref = m(x[k])
        torch.testing.assert_close(out[k], ref, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad((ref * w[k]).sum(), list(m.parameters()))
        view = stack.member(k)
        for name, gr in zip(names, grads):
            # the stack's gradient, read through the member view's parameter of that name
            vp = dict(view.named_parameters())[name]
            sp = next(p for p in stack.parameters()
                      if p.data.untyped_storage().data_ptr() == vp.untyped_storage().data_ptr())
            got = sp.grad[k]
            got = got.T if got.shape != gr.shape else got
            torch.testing.assert_close(got, gr, rtol=1e-9, atol=1e-11)
        # the running statistics advanced exactly as the member's own batch norm did
        for (n, a), b in zip(m.named_buffers(), view.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=n)
    stack.eval()
    shared = stack.forward_shared(x[0])
    for k, m in enumerate(models):
        m.eval()
        torch.testing.assert_close(shared[k], m(x[0]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stack.member(k)(x[0]), m(x[0]), rtol=1e-10, atol=1e-12)
    # a member fed NaN (a diverged run) reaches no other member: groups and channels of the
    # convolutions and batch norms never mix members
    bad = x.clone()
    bad[2] = float("nan")
    stack.train()
    stack.zero_grad()
    out = stack(bad)
    (out * w).sum().backward()
    others = [k for k in range(K) if k != 2]
    assert torch.isfinite(out[others]).all() and torch.isnan(out[2]).all()
    for p in stack.parameters():
        assert torch.isfinite(p.grad[others]).all()


def test_conv_members_equal_their_single_runs(digits) -> None:
    """A stack of conv nets with batch norm trained by BatchedTrainer equals the single runs:
    weights, batch-norm statistics, history and probe statistics.  Not ReLU: a ReLU+BN single
    run is itself chaotic at rounding level here (a channel whose inputs all died is a
    constant that batch norm divides by sqrt(eps); a 1-ulp change of one initial weight moves
    the weights by 0.07 in 10 steps), which the float64 test above covers."""
    runs = [("elu", 1, 0.05), ("lrelu", 2, 0.02), ("srelu", 3, 0.05)]

    def build(a: str) -> functools.partial[nn.Module]:
        return functools.partial(small_conv, a, True, 2)

    singles = [make(digits, a, s, lr, model=build(a), epochs=1) for a, s, lr in runs]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(digits, a, s, lr, model=build(a), epochs=1) for a, s, lr in runs])
    bt.fit()
    for single, member in zip(singles, bt.trainers):
        _compare(single, member, rtol=1e-4, atol=1e-5)
        for (n, a), b in zip(single.model.named_buffers(), member.model.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)
        layer = next(iter(single.last_probe.mean))
        torch.testing.assert_close(member.last_probe.mean[layer],
                                   single.last_probe.mean[layer], rtol=1e-4, atol=1e-5)


def test_conv_memory_estimate_bounds_a_stacked_step() -> None:
    """``member_bytes`` sizes a conv member from a meta-device trace (``input_shape`` is
    required and named when missing) and bounds what a stacked step holds."""
    model = small_conv("elu", batch_norm=True)
    with pytest.raises(ValueError, match="input_shape"):
        member_bytes(model, batch_size=16, eval_batch_size=64)
    per = member_bytes(model, batch_size=16, eval_batch_size=64, input_shape=(1, 8, 8))
    K = 4
    stack = StackedSequential([small_conv(a, batch_norm=True) for a in ACTS])
    used = stacked_step_bytes(stack, torch.randn(K, 16, 1, 8, 8))
    assert used <= K * per, (used, K * per)
    assert K * per <= 6 * used


def test_conv_nets_are_stacked_on_the_cpu_only_when_asked(monkeypatch) -> None:
    """``--batch-runs auto`` leaves conv nets alone on the CPU (grouped convolutions are
    slower there); an explicit K stacks them."""
    from biasshift.reproduce import resolve_settings
    from biasshift.reproduce.registry import get_analysis
    from biasshift.reproduce.runner import plan_stacks

    a = get_analysis("activation-median")
    monkeypatch.setattr(a, "build_model", lambda spec, ds: small_conv(spec.activation))
    ds = load_dataset("digits")
    for cap, sizes in ((None, [1] * 8), (4, [4, 4])):
        s = resolve_settings("activation-median", quick=True, seeds=2, batch_runs=cap, jobs=1)
        assert [len(u) for u in plan_stacks(a, a.run_specs(s), s, ds)] == sizes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_conv_stack_equals_members_on_cuda() -> None:
    """On CUDA (cuDNN's grouped convolutions): outputs and gradients of a stacked conv net
    with batch norm equal each member's own, in float32."""
    torch.manual_seed(0)
    models = [small_conv(a, True, 2).cuda() for a in ("elu", "relu", "srelu", "lrelu")]
    stack = StackedSequential(models)
    x = torch.randn(4, 16, 1, 8, 8, device="cuda")
    out = stack(x)
    out.square().sum().backward()
    for k, m in enumerate(models):
        ref = m(x[k])
        torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-4)
        grads = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
        for sp, gr in zip(stack.parameters(), grads):
            torch.testing.assert_close(sp.grad[k], gr, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_momentum_schedule_members_equal_single_runs_on_cuda(digits) -> None:
    """On CUDA: momentum SGD with weight decay, a step schedule and an augmentation (no
    dropout: on CUDA the stack's masks are one draw, not the single runs')."""
    runs = MEMBERS[:3]
    singles = [make(digits, a, s, lr, device="cuda", **schedule_kw(lr)) for a, s, lr in runs]
    for t in singles:
        t.fit()
    bt = BatchedTrainer([make(digits, a, s, lr, device="cuda", **schedule_kw(lr))
                         for a, s, lr in runs])
    bt.fit()
    for single, member in zip(singles, bt.trainers):
        _compare(single, member, rtol=1e-4, atol=1e-5, drop=("train_seconds_per_step",))


def test_conv_activations_stacks_on_request_and_equals_one_by_one(tmp_path) -> None:
    """The conv-net analysis (momentum SGD with weight decay, the paper's step schedule, the
    step timer, dropout, its own dataset preparation) stacks with ``--batch-runs K`` and gives
    the one-by-one results; its ActivationMonitor plug-in (``monitor`` on) keeps runs alone."""
    from biasshift.reproduce import resolve_settings, run_analysis
    from biasshift.reproduce.registry import get_analysis
    from biasshift.reproduce.runner import plan_stacks

    def settings(tag: str, batch_runs: int | None, monitor: str = "off"):
        return resolve_settings("conv-activations", quick=True, seeds=2, batch_runs=batch_runs,
                                options={"arms": "elu,srelu", "monitor": monitor},
                                out=tmp_path / tag / "out", work_dir=tmp_path / tag / "runs",
                                jobs=1, threads=1)

    a = get_analysis("conv-activations")
    ds = load_dataset("digits")
    s2 = settings("stacked", 2)
    assert [len(u) for u in plan_stacks(a, a.run_specs(s2), s2, ds)] == [2, 2]
    auto = settings("auto", None)  # the analysis's default: on the CPU conv runs go alone
    assert auto.batch_runs == 0
    assert [len(u) for u in plan_stacks(a, a.run_specs(auto), auto, ds)] == [1, 1, 1, 1]
    with_monitor = settings("monitor", 2, "on")
    assert [len(u) for u in plan_stacks(a, a.run_specs(with_monitor), with_monitor, ds)] \
        == [1, 1, 1, 1]
    one = run_analysis(settings("one", 1), progress=False).frame
    two = run_analysis(s2, progress=False).frame
    timer = "train_seconds_per_step"
    f1 = one[one["quantity"] != timer].reset_index(drop=True)
    f2 = two[two["quantity"] != timer].reset_index(drop=True)
    assert len(f1) and f1["run"].nunique() == 4
    pd.testing.assert_frame_equal(f1.drop(columns="value"), f2.drop(columns="value"))
    torch.testing.assert_close(torch.tensor(f2["value"].to_numpy()),
                               torch.tensor(f1["value"].to_numpy()), rtol=1e-4, atol=1e-5)
    assert (two.loc[two["quantity"] == timer, "value"] > 0).all()
