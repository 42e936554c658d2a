"""UnitFisher on bad input: every error names the layer, shape or fix; hooks never leak."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from biasshift import UnitFisher
from biasshift.fisher import NonFiniteError, SingularFisherError

DT = torch.float64


def net(bias_last: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ELU(), nn.Flatten(),
                         nn.Linear(3 * 16, 4), nn.ReLU(), nn.Linear(4, 3, bias=bias_last)).double()


def batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})))
            for n, m in model.named_modules()}


def test_unsupported_and_unknown_layers() -> None:
    model = net()
    with pytest.raises(TypeError, match=r"layer '1' is a ELU; UnitFisher supports nn\.Linear, "
                                         r"nn\.Conv2d"):
        UnitFisher(model, layers=["1"])
    with pytest.raises(KeyError, match="did you mean '3'"):
        UnitFisher(model, layers=["3x"])
    with pytest.raises(ValueError, match="not part of the model"):
        UnitFisher(model, layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no layer selected"):
        UnitFisher(nn.Sequential(nn.ReLU()))
    uf = UnitFisher(model)
    uf.accumulate(*batch())
    with pytest.raises(KeyError, match=r"unknown tracked layer '0x'.*did you mean '0'"):
        uf.matrix("0x")
    with pytest.raises(KeyError, match="did you mean"):
        uf.report(layers=["5x"])
    with pytest.raises(KeyError, match=r"[fF]isher kind"):
        UnitFisher(model, fisher="emprical")


def test_matrix_before_accumulate() -> None:
    uf = UnitFisher(net())
    for call in (lambda: uf.matrix("0"), uf.report, lambda: uf.moments("3"),
                 lambda: uf.natural_gradient("3", damping=1.0), lambda: uf.gradient("0")):
        with pytest.raises(RuntimeError, match=r"call accumulate\(inputs, targets\) before"):
            call()


@pytest.mark.parametrize("likelihood,targets,exc,match", [
    ("categorical", torch.zeros(5, dtype=DT), TypeError, "integer dtype"),
    ("categorical", torch.zeros(5, 3, dtype=DT), TypeError, "one-hot"),
    ("categorical", torch.zeros(5, 1, dtype=torch.long), ValueError, r"shape \(N,\) = \(5,\)"),
    ("categorical", torch.zeros(4, dtype=torch.long), ValueError, "targets hold 4"),
    ("gaussian", torch.zeros(5, 3, dtype=torch.long), TypeError, "floating point"),
    ("gaussian", torch.zeros(5, 4, dtype=DT), ValueError, r"output's shape \(5, 3\)"),
    ("bernoulli", torch.zeros(5, 2), ValueError, r"output's shape \(5, 3\)"),
])
def test_targets_of_wrong_shape_or_dtype(likelihood, targets, exc, match) -> None:
    model = net()
    before = hook_counts(model)
    uf = UnitFisher(model, likelihood=likelihood)
    with pytest.raises(exc, match=match):
        uf.accumulate(batch()[0], targets)
    assert hook_counts(model) == before
    assert uf.n_samples == 0
    with pytest.raises(TypeError, match="targets must be a tensor"):
        uf.accumulate(batch()[0], [0, 1, 2, 0, 1])


def test_out_of_range_targets_are_reported_at_read_time() -> None:
    uf = UnitFisher(net())
    x, y = batch()
    y[2] = 7
    uf.accumulate(x, y)  # no host sync here
    with pytest.raises(ValueError, match="targets out of range for the categorical"):
        uf.matrix("0")
    uf2 = UnitFisher(net(), nonfinite="raise")
    with pytest.raises(ValueError, match="targets out of range"):
        uf2.accumulate(x, y)
    assert uf2.n_samples == 0


def test_singular_fisher_without_damping() -> None:
    model = net()
    uf = UnitFisher(model, layers=["3"])
    uf.accumulate(*batch(5))  # 5 samples < 49 rows
    with pytest.raises(SingularFisherError) as err:
        uf.report()
    msg = str(err.value)
    assert "layer '3'" in msg and "smallest eigenvalue" in msg and "damping" in msg
    assert err.value.layer == "3" and abs(err.value.smallest_eigenvalue) < 1e-12
    with pytest.raises(SingularFisherError, match="smallest eigenvalue"):
        uf.natural_gradient("3")
    assert len(uf.report(damping=1e-3)) == 4
    with pytest.raises(ValueError, match=r"Woodbury.*damping is 0"):
        uf.natural_gradient("3", solver="woodbury")
    with pytest.raises(ValueError, match="damping must be"):
        uf.report(damping=-1.0)


def test_dead_unit_is_singular_and_named() -> None:
    model = net()
    with torch.no_grad():
        model[3].bias[2] = -1e3  # ReLU after it: unit 2 of layer 3 never passes δ ... to layer 5
        model[5].weight[:, 1] = 0  # δ of unit 1 of layer 3 is 0 for every sample
    uf = UnitFisher(model, layers=["3"])
    uf.accumulate(*batch(400))
    with pytest.raises(SingularFisherError, match=r"of 2 unit\(s\) \(unit 1, 2\)"):
        uf.report()


def test_nonfinite_inputs_deferred_and_raised() -> None:
    model = net()
    x, y = batch(6)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    uf.accumulate(bad, y)  # does not sync: reported at the next read
    with pytest.raises(NonFiniteError, match=r"layer '0': non-finite activations.*first: batch 1"):
        uf.matrix("3")
    assert uf._stores["0"].sum_w is not None and torch.isfinite(uf._stores["0"].sum_w).all()
    uf.reset()
    uf.accumulate(x, y)
    uf.matrix("3")

    strict = UnitFisher(model, nonfinite="raise")
    strict.accumulate(x, y)
    with pytest.raises(NonFiniteError, match=r"this batch was not added.*layer '0'"):
        strict.accumulate(bad, y)
    assert strict.n_samples == 6
    strict.matrix("0")


def test_nonfinite_weights_name_every_affected_layer() -> None:
    model = net()
    with torch.no_grad():
        model[3].weight[0, 0] = float("inf")
    uf = UnitFisher(model)
    uf.accumulate(*batch())
    with pytest.raises(NonFiniteError) as err:
        uf.report(damping=1e-3)
    msg = str(err.value)
    assert "layer '5': non-finite activations" in msg
    assert "layer '0': non-finite δ" in msg


def test_hooks_removed_after_use_and_on_exceptions() -> None:
    model = net()
    own = model[3].register_forward_hook(lambda *a: None)
    before = hook_counts(model)
    uf = UnitFisher(model, fisher="exact")
    uf.accumulate(*batch())
    assert hook_counts(model) == before

    class Boom(RuntimeError):
        pass

    def explode(_m, _i, _o):
        raise Boom("boom")

    h = model[4].register_forward_hook(explode)
    with_boom = hook_counts(model)
    with pytest.raises(Boom):
        uf.accumulate(*batch())
    assert hook_counts(model) == with_boom
    h.remove()
    own.remove()
    assert uf.n_samples == 5
    assert all(p.grad is None for p in model.parameters())  # parameters' .grad untouched


def test_batchnorm_refused_or_switched_to_eval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ELU(), nn.Linear(6, 3)).double()
    x = torch.randn(16, 4, dtype=DT)
    y = torch.randint(0, 3, (16,))
    model.train()
    model(x)  # give the running statistics a value
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' is in training mode.*"
                                         r"samples interact.*batchnorm='eval'"):
        UnitFisher(model).accumulate(x, y)
    uf = UnitFisher(model, batchnorm="eval")
    uf.accumulate(x, y)
    assert model.training and model[1].training  # restored
    model.eval()
    ref = UnitFisher(model)
    ref.accumulate(x, y)
    torch.testing.assert_close(uf.matrix("0"), ref.matrix("0"), rtol=0, atol=0)
    nostats = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False),
                            nn.Linear(6, 3)).double().eval()
    with pytest.raises(ValueError, match="no running statistics"):
        UnitFisher(nostats, batchnorm="eval").accumulate(x, y)


def test_shared_and_unused_layers() -> None:
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(lin, nn.Tanh(), lin).double()
    with pytest.raises(RuntimeError, match="called more than once"):
        UnitFisher(shared).accumulate(torch.randn(4, 3, dtype=DT), torch.zeros(4, dtype=torch.long))
    assert len(lin._forward_hooks) == 0

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="'unused' was not called"):
        UnitFisher(Partial().double()).accumulate(torch.randn(4, 3, dtype=DT),
                                                  torch.zeros(4, dtype=torch.long))


def test_layers_without_bias_in_report() -> None:
    model = net(bias_last=False)
    uf = UnitFisher(model)
    uf.accumulate(*batch(60))
    with pytest.warns(UserWarning, match="without bias.*skipped: 5"):
        df = uf.report(damping=1e-3)
    assert set(df.layer) == {"0", "3"}
    with pytest.raises(ValueError, match="layer '5' has no bias"):
        uf.report(layers=["5"], damping=1e-3)
    assert uf.matrix("5").shape == (3, 4, 4)
    assert uf.natural_gradient("5", damping=1e-3).shape == (3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uf.report(layers=["3"], damping=1e-3)


def test_bad_arguments() -> None:
    model = net()
    with pytest.raises(ValueError, match="mc_samples"):
        UnitFisher(model, fisher="mc", mc_samples=0)
    with pytest.raises(ValueError, match="either seed or generator"):
        UnitFisher(model, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="batchnorm"):
        UnitFisher(model, batchnorm="train")
    with pytest.raises(TypeError, match="floating"):
        UnitFisher(model, dtype=torch.int64)
    uf = UnitFisher(model)
    uf.accumulate(*batch(60))
    with pytest.raises(ValueError, match=r"gradient for layer '3' must be \(units, n\+1\)"):
        uf.report(gradients={"3": torch.zeros(4, 48)})
    with pytest.raises(ValueError, match=r"activation_means\['3'\]"):
        uf.report(activation_means={"3": torch.zeros(47)}, damping=1e-3)
    with pytest.raises(ValueError, match="positions"):
        uf.matrix("0", positions="mean")
    with pytest.raises(IndexError, match="has 3 units"):
        uf.matrix("0", [5])
    with pytest.raises(ValueError, match="solver"):
        uf.report(solver="lu")
    with pytest.raises(TypeError, match="output_transform"):
        UnitFisher(nn.Sequential(_Dict())).accumulate(torch.randn(2, 3),
                                                       torch.zeros(2, dtype=torch.long))


class _Dict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return {"logits": self.fc(x)}


def test_output_transform() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Dict())
    uf = UnitFisher(model, output_transform=lambda out: out["logits"])
    uf.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    assert uf.matrix("0.fc").shape == (2, 4, 4)


def test_report_is_one_host_transfer_and_still_names_singular_units() -> None:
    """``report()`` moves every value and the singular flags in one transfer (many chunks per
    layer: a tiny memory budget), and a singular unit in a later chunk and layer is still
    named; ``quantities(check=False)`` does not touch the host at all."""
    from tests.test_bias_shift_probe import _HostCounter

    model = net()
    uf = UnitFisher(model, memory_budget=1)  # one unit per chunk
    uf.accumulate(*batch(200))
    uf.report(damping=1e-3, condition=False)  # the first read checks the statistics once
    with _HostCounter() as count:
        df = uf.report(damping=1e-3, condition=False)
    assert count.calls == ["cpu"], count.calls
    with _HostCounter() as count:
        q = uf.quantities(damping=1e-3, condition=False, check=False)
    assert count.calls == [], count.calls
    assert all(not bool(v.bad.any()) for v in q.values())
    assert len(df) == 3 + 4 + 3  # the units of layers 0, 3 and 5
    with torch.no_grad():
        model[5].weight[:, 1] = 0  # unit 1 of layer 3: δ ≡ 0, singular without damping
    uf = UnitFisher(model, layers=["0", "3"], memory_budget=1)
    uf.accumulate(*batch(400))
    with pytest.raises(SingularFisherError, match=r"layer '3'.*\(unit 1\)"):
        uf.report(condition=False)
    with pytest.raises(SingularFisherError, match=r"layer '3'.*\(unit 1\)"):
        uf.quantities(condition=False)
    q = uf.quantities(condition=False, check=False)
    assert q["3"].bad.tolist() == [False, True, False, False]
