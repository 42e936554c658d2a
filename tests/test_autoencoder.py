"""The Fig. 3 autoencoder done right (issue 14): reconstruction losses against hand computations,
the summed squared error recorded whatever the loss, collapse detection, the second-moment
initialisation gain, and the analysis' runs, table and figure."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from torch import nn

from biasshift.activations import make_activation
from biasshift.data import ArrayDataset, load_dataset
from biasshift.models import autoencoder, mlp
from biasshift.models.init_gain import (
    activation_second_moment,
    second_moment_gain,
    second_moment_init_,
)
from biasshift.reproduce import ANALYSES, RunSpec, UsageError
from biasshift.reproduce.autoencoder import AE_COLUMNS, collapsed_runs, run_id
from biasshift.reproduce.runner import resolve_settings
from biasshift.train import Trainer
from biasshift.train.reconstruction import (
    CollapseMonitor,
    collapse_statistics,
    reconstruction_loss,
    summed_squared_error,
)


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset("digits").subset(192, 60)


# ------------------------------------------------------------------------------------ losses
def _hand(z: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """The three losses written out per pixel in float64 Python arithmetic."""
    n, d = x.shape
    bce = sse = 0.0
    for i in range(n):
        for j in range(d):
            zz, xx = float(z[i, j]), float(x[i, j])
            # -[x log y + (1 - x) log(1 - y)] with log y = -log(1 + e^-z), log(1-y) = -log(1 + e^z)
            bce += xx * math.log1p(math.exp(-zz)) + (1 - xx) * math.log1p(math.exp(zz))
            sse += (1 / (1 + math.exp(-zz)) - xx) ** 2
    return {"bce": bce / n, "sse": sse / n, "mse": sse / n / d}


def test_each_loss_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64) * 4
    x = torch.rand(5, 7, generator=g, dtype=torch.float64)
    x[0, :3] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # binary pixels too
    hand = _hand(z.numpy(), x.numpy())
    for loss in ("bce", "sse", "mse"):
        got = reconstruction_loss(z, x, loss, logits=True).item()
        assert got == pytest.approx(hand[loss], rel=1e-12), loss
        total = reconstruction_loss(z, x, loss, logits=True, reduction="sum").item()
        assert total == pytest.approx(5 * hand[loss], rel=1e-12), loss
    # without logits the model output is the reconstruction itself
    y = torch.sigmoid(z)
    assert reconstruction_loss(y, x, "sse").item() == pytest.approx(hand["sse"], rel=1e-12)
    assert reconstruction_loss(y, x, "mse").item() == pytest.approx(hand["mse"], rel=1e-12)
    per_image = summed_squared_error(z, x, logits=True)
    assert per_image.shape == (5,)
    assert per_image.mean().item() == pytest.approx(hand["sse"], rel=1e-12)


def test_bce_is_stable_for_saturated_logits() -> None:
    z = torch.tensor([[-200.0, 200.0, -200.0, 200.0]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    got = reconstruction_loss(z, x, "bce", logits=True)
    assert torch.isfinite(got) and got.item() == pytest.approx(400.0)  # two wrong pixels x 200
    z.requires_grad_(True)
    reconstruction_loss(z, x, "bce", logits=True).backward()
    assert torch.equal(z.grad, torch.tensor([[0.0, 0.0, -1.0, 1.0]]))  # sigmoid(z) - x


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_mse_is_sse_over_pixels_and_gradients_scale_by_d(n: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    sse = reconstruction_loss(z, x, "sse", logits=True)
    (g_sse,) = torch.autograd.grad(sse, z)
    mse = reconstruction_loss(z, x, "mse", logits=True)
    (g_mse,) = torch.autograd.grad(mse, z)
    assert mse.item() == pytest.approx(sse.item() / d, rel=1e-12)
    torch.testing.assert_close(g_mse * d, g_sse, rtol=1e-12, atol=1e-15)


def test_bad_loss_names_and_bce_without_logits_are_refused(digits: ArrayDataset) -> None:
    with pytest.raises(ValueError, match="unknown; choose one of sse, mse, bce"):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    with pytest.raises(ValueError, match="needs the model's logits"):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(2, 3), "bce")
    with pytest.raises(ValueError, match="reconstruction_logits=True"):
        Trainer(lambda: mlp(64, [8], 64), digits, loss="reconstruction",
                reconstruction_loss="bce", epochs=1)
    with pytest.raises(ValueError, match="unknown reconstruction_loss 'ce'"):
        Trainer(lambda: mlp(64, [8], 64), digits, loss="reconstruction",
                reconstruction_loss="ce", epochs=1)


@pytest.mark.parametrize("loss", ["bce", "sse", "mse"])
def test_trainer_records_the_sse_whatever_the_training_loss(digits: ArrayDataset,
                                                             loss: str) -> None:
    t = Trainer(lambda: mlp(64, [16], 64, "elu"), digits, loss="reconstruction",
                reconstruction_loss=loss, reconstruction_logits=True, lr=0.01, batch_size=32,
                epochs=2, seed=3, probe_size=0)
    h = t.fit().set_index(["epoch", "layer", "quantity"])["value"]
    model = copy.deepcopy(t.model).double().eval()
    for split in ("train", "test"):
        x = getattr(digits, f"{split}_x").double().reshape(-1, 64)
        with torch.no_grad():
            z = model(x)
        hand = _hand(z.numpy(), x.numpy())
        assert h[(2, "all", f"{split}_sse")] == pytest.approx(hand["sse"], rel=1e-5)
        assert h[(2, "all", f"{split}_loss")] == pytest.approx(hand[loss], rel=1e-5)
    assert {(0, "all", "train_sse"), (1, "all", "test_sse")} <= set(h.index)
    if loss == "sse":
        assert h[(2, "all", "test_loss")] == pytest.approx(h[(2, "all", "test_sse")], rel=1e-12)
    else:
        assert h[(2, "all", "test_loss")] != pytest.approx(h[(2, "all", "test_sse")], rel=1e-3)


def test_trainer_default_is_the_old_summed_squared_error(digits: ArrayDataset) -> None:
    """Without the new arguments: the model output is the reconstruction, loss = SSE."""
    t = Trainer(lambda: mlp(64, [16], 64, "relu"), digits, loss="reconstruction", epochs=1,
                probe_size=0)
    h = t.fit().set_index(["epoch", "layer", "quantity"])["value"]
    x = digits.test_x.double().reshape(-1, 64)
    with torch.no_grad():
        err = (copy.deepcopy(t.model).double()(x) - x).square().sum(1).mean().item()
    assert h[(1, "all", "test_loss")] == pytest.approx(err, rel=1e-5)
    assert h[(1, "all", "test_sse")] == pytest.approx(err, rel=1e-5)


# ------------------------------------------------------------------------------------ collapse
class Constant(nn.Module):
    """Logits ``c`` for every pixel of every image: the saturated, collapsed output."""

    def __init__(self, d: int, c: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.fill_(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(x.shape[0], -1))


class Identity(nn.Module):
    """Logits of the image itself (a perfect reconstruction, up to the clamp)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).clamp(1e-4, 1 - 1e-4)
        return self.w * torch.logit(x)


def test_collapse_statistics_on_collapsed_and_healthy_models(digits: ArrayDataset) -> None:
    x = digits.test_x
    dead = collapse_statistics(Constant(64, -30.0), x, logits=True)
    assert dead["recon_var_ratio"].item() == 0.0 and dead["saturated_frac"].item() == 1.0
    good = collapse_statistics(Identity(), x, logits=True)
    assert good["recon_var_ratio"].item() == pytest.approx(1.0, abs=1e-3)
    # brute force: variance across images of the reconstruction over that of the images
    net = autoencoder("elu", in_features=64, encoder=[32, 8], output="linear")
    got = collapse_statistics(net, x, logits=True, batch_size=7)
    with torch.no_grad():
        z = net(x).double()
    y = torch.sigmoid(z)
    ratio = y.var(0).sum() / x.reshape(len(x), -1).double().var(0).sum()
    assert got["recon_var_ratio"].item() == pytest.approx(ratio.item(), rel=1e-9)
    assert got["saturated_frac"].item() == pytest.approx((z.abs() > 15).double().mean().item())
    assert got["recon_var_ratio"].item() > 1e-2  # a fresh net is not collapsed
    # probabilities instead of logits: the same statistics
    prob = nn.Sequential(net, nn.Sigmoid())
    again = collapse_statistics(prob, x, logits=False)
    assert again["recon_var_ratio"].item() == pytest.approx(ratio.item(), rel=1e-5)
    assert collapse_statistics(nn.Sequential(Constant(64, 30.0), nn.Sigmoid()), x,
                               logits=False)["saturated_frac"].item() == 1.0
    with pytest.raises(ValueError, match="at least two images"):
        collapse_statistics(net, x[:1], logits=True)


def _flags(t: Trainer) -> pd.Series:
    h = t.history
    return h[h["quantity"] == "collapsed"].set_index("epoch")["value"]


def test_collapse_flag_fires_on_a_collapsed_model_and_not_on_a_healthy_one(
        digits: ArrayDataset) -> None:
    # saturated logistic outputs under the summed squared error: the gradient through the
    # sigmoid is ~1e-13, the model stays collapsed, and every epoch is flagged
    dead = Trainer(lambda: Constant(64, -30.0), digits, loss="reconstruction",
                   reconstruction_loss="sse", reconstruction_logits=True, lr=0.1, epochs=2,
                   probe_size=0, plugins=[CollapseMonitor(50, logits=True)])
    dead.fit()
    assert _flags(dead).to_dict() == {0: 1.0, 1: 1.0, 2: 1.0}
    assert not dead.diverged  # a collapse is not a divergence: the run goes on
    healthy = Trainer(lambda: autoencoder("elu", in_features=64, encoder=[32, 8],
                                          output="linear"), digits, loss="reconstruction",
                      reconstruction_loss="bce", reconstruction_logits=True, lr=0.01, epochs=2,
                      probe_size=0, plugins=[CollapseMonitor(50, logits=True)])
    healthy.fit()
    assert _flags(healthy).to_dict() == {0: 0.0, 1: 0.0, 2: 0.0}
    ratio = healthy.history.query("quantity == 'recon_var_ratio'")["value"]
    assert (ratio > 1e-2).all()


def test_collapse_monitor_is_not_logged_twice_on_resume(digits: ArrayDataset, tmp_path) -> None:
    def make(epochs: int) -> Trainer:
        return Trainer(lambda: Constant(64, -30.0), digits, loss="reconstruction",
                       reconstruction_logits=True, lr=0.1, epochs=epochs, probe_size=0,
                       checkpoint_dir=tmp_path, plugins=[CollapseMonitor(50, logits=True)])
    make(1).fit()
    again = make(2)
    again.fit(resume=True)
    h = again.history
    assert not h.duplicated(["epoch", "layer", "quantity"]).any()
    assert sorted(_flags(again).index) == [0, 1, 2]


# ------------------------------------------------------------------------------------ init gain
def _closed_forms() -> dict[str, float]:
    p1, p2 = norm.cdf(-1.0), norm.cdf(-2.0)
    return {
        "relu": 0.5,
        "lrelu": (1 + 0.1 ** 2) / 2,
        # E[(e^z - 1)^2; z < 0] = e^2 Phi(-2) - 2 e^(1/2) Phi(-1) + 1/2
        "elu": 0.5 + math.e ** 2 * p2 - 2 * math.exp(0.5) * p1 + 0.5,
        # E[z^2; -1 < z < 0] = [Phi(z) - z phi(z)] from -1 to 0, plus P(z < -1) * 1
        "srelu": 0.5 + (0.5 - (p1 + norm.pdf(1.0))) + p1,
    }


def test_second_moments_match_closed_forms_and_monte_carlo() -> None:
    closed = _closed_forms()
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, value in closed.items():
        m = activation_second_moment(name)
        assert m == pytest.approx(value, abs=1e-12), name
        f2 = make_activation(name)(z).square()
        se = f2.std().item() / math.sqrt(len(z))
        assert abs(f2.mean().item() - m) < 5 * se, name
    assert activation_second_moment("relu") == pytest.approx(0.5, abs=1e-14)
    # a non-default alpha: Monte Carlo only
    f2 = make_activation("elu", alpha=0.5)(z).square()
    m = activation_second_moment("elu", alpha=0.5)
    assert abs(f2.mean().item() - m) < 5 * f2.std().item() / math.sqrt(len(z))
    assert second_moment_gain("relu") == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("act", ["elu", "relu", "lrelu", "srelu"])
def test_second_moment_init_gives_the_documented_second_moment(act: str) -> None:
    torch.manual_seed(5)
    he = autoencoder(act, output="linear")
    torch.manual_seed(5)
    sm = autoencoder(act, output="linear", init="second-moment")
    m = activation_second_moment(act)
    layers = dict(sm.named_children())
    fed_by_act = {"enc2", "enc3", "enc4", "dec2", "dec3", "out"}
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            continue
        w_he = dict(he.named_children())[name].weight
        fan_in = layer.weight.shape[1]
        if name in fed_by_act:
            torch.testing.assert_close(layer.weight, w_he * math.sqrt(1 / (2 * m)))
            var = layer.weight.double().square().mean().item()
            assert var * fan_in * m == pytest.approx(1.0, rel=0.03), name
        else:  # fed by the data (enc1) or the linear code (dec1): He's, unchanged
            assert torch.equal(layer.weight, w_he), name
    # the property: units f(z), z ~ N(0, 1), into a layer give net inputs with E[net^2] = 1
    layer = layers["dec3"]
    z = torch.randn(4000, layer.weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        net = (make_activation(act)(z) @ layer.weight.T)
    assert net.square().mean().item() == pytest.approx(1.0, rel=0.05)
    if act == "relu":  # He's initialisation is the ReLU's second-moment one
        for a, b in zip(he.parameters(), sm.parameters()):
            assert torch.equal(a, b)


def test_second_moment_init_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="init must be 'he' or 'second-moment'"):
        autoencoder("elu", init="xavier")
    net = mlp(4, [3], 2, "elu", flatten=False)
    before = net.fc1.weight.clone()
    second_moment_init_(net, "elu")
    assert torch.equal(net.fc1.weight, before)  # fed by the data


# ------------------------------------------------------------------------------------ analysis
def test_run_specs_are_activations_x_losses_x_inits_x_lrs_x_seeds() -> None:
    s = resolve_settings("autoencoder", quick=True, seeds=2, activations=["elu", "relu"],
                         lrs=["1e-2", "1e-3"],
                         options={"losses": "bce,sse", "inits": "he,second-moment",
                                  "train_size": "100", "test_size": "50"})
    specs = ANALYSES["autoencoder"].run_specs(s)
    assert len(specs) == 2 * 2 * 2 * 2 * 2 and len({sp.run for sp in specs}) == len(specs)
    assert specs[0].run == "elu-lr0.01-seed0"
    assert run_id("relu", 1e-3, 1, "sse", "second-moment") == "relu-sse-sm-lr0.001-seed1"
    assert specs[-1].run == "relu-sse-sm-lr0.001-seed1"
    assert all((sp.train_size, sp.test_size) == (100, 50) for sp in specs)
    assert {sp.options["loss"] for sp in specs} == {"bce", "sse"}
    paper = resolve_settings("autoencoder")
    assert paper.options["losses"] == ("bce",) and paper.options["inits"] == ("he",)
    assert paper.seeds == 3


@pytest.mark.parametrize(("options", "message"), [
    ({"losses": "bce,l1"}, "option losses=bce,l1"),
    ({"losses": "bce,bce"}, "distinct"),
    ({"inits": "xavier"}, "option inits=xavier"),
    ({"train_size": "-1"}, "train_size=-1"),
    ({"collapse_images": "1"}, "collapse_images=1"),
    ({"collapse_threshold": "0"}, "collapse_threshold=0"),
])
def test_bad_options_are_usage_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_settings("autoencoder", quick=True, options=options)


def _table(collapse: str | None = None, diverge: str | None = None) -> pd.DataFrame:
    rows = []
    for act in ("elu", "relu"):
        for seed in (0, 1):
            run = RunSpec.run_id(act, 0.01, seed)
            for e in range(4):
                v = 50.0 / (e + 1) + seed
                flag = 0.0
                if run == collapse and e >= 2:
                    v, flag = 137.0, 1.0
                if run == diverge and e == 3:
                    v = float("nan")
                for q in ("train_loss", "test_loss", "train_sse", "test_sse"):
                    rows.append(("autoencoder", run, "mnist", act, seed, 0.01, e, "all", pd.NA,
                                 q, v, "bce", "he"))
                rows.append(("autoencoder", run, "mnist", act, seed, 0.01, e, "all", pd.NA,
                             "collapsed", flag, "bce", "he"))
                if run == diverge and e == 3:
                    rows.append(("autoencoder", run, "mnist", act, seed, 0.01, e, "all", pd.NA,
                                 "diverged", 1.0, "bce", "he"))
    df = pd.DataFrame(rows, columns=list(AE_COLUMNS))
    df["unit"] = df["unit"].astype("Int64")
    return df


def test_collapsed_runs_are_drawn_apart_and_left_out_of_the_band() -> None:
    analysis = ANALYSES["autoencoder"]
    s = resolve_settings("autoencoder", epochs=3, seeds=2, activations=["elu", "relu"],
                         lrs=["1e-2"], options={"train_size": "20000"})
    df = _table(collapse="elu-lr0.01-seed1", diverge="relu-lr0.01-seed1")
    assert collapsed_runs(df) == {"elu-lr0.01-seed1": 2}
    fig = analysis.plot(df, s)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "ELU (1/2 collapsed)" in labels and "ReLU (1/2 diverged)" in labels
    assert "first 20000 training / all test images" in fig._suptitle.get_text()
    # the collapsed run has its own dash-dot line (epochs 0-3), and a star at epoch 2
    dashdot = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-."]
    assert any(list(ln.get_ydata()) == [50.0 + 1, 25.0 + 1, 137.0, 137.0] for ln in dashdot)
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*" and len(ln.get_xdata())]
    assert [list(ln.get_xdata()) for ln in stars] == [[2.0]]
    # the ELU mean line is seed 0 alone (the collapsed seed is left out)
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"
             and ln.get_label() == "ELU (1/2 collapsed)"]
    assert list(solid[0].get_ydata()) == [50.0, 25.0, 50 / 3, 12.5]
    summ = analysis.summary(df, s)
    (entry,) = summ["results"]
    assert entry["activations"]["elu"] == {"test_sse_mean": 12.5, "test_sse_sd": None, "n": 1,
                                           "runs": 2, "collapsed": 1, "diverged": 0}
    assert entry["activations"]["relu"]["diverged"] == 1


# ------------------------------------------------------------------------------------ scripts
def _script(name: str):
    from _analyses import load_analysis

    return load_analysis(name)


def test_bench_flop_count_matches_torch_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    bench = _script("bench_autoencoder")
    shapes = bench.layer_shapes()
    assert shapes[0] == (784, 1000) and shapes[4] == (30, 250) and shapes[-1] == (1000, 784)
    net = autoencoder("elu", output="linear")
    x = torch.rand(8, 784)
    with FlopCounterMode(display=False) as counter:
        reconstruction_loss(net(x), x, "bce", logits=True).backward()
    assert counter.get_total_flops() == bench.step_flops(8, shapes)
    assert 6 * sum(i * o for i, o in shapes) / 1e6 == pytest.approx(16.9, abs=0.1)  # the issue


def test_init_script_writes_the_variance_table(tmp_path) -> None:
    init = _script("autoencoder_init")
    assert init.main(["--dataset", "digits", "--images", "40", "--seeds", "1",
                      "--out", str(tmp_path / "init")]) == 0
    df = pd.read_csv(tmp_path / "init.csv")
    v = df.set_index(["activation", "init", "seed", "layer", "quantity"])["value"]
    # ReLU: the second-moment gain is He's; ELU and SReLU: it lowers the output variance
    assert v[("relu", "he", 0, "all", "logit_var")] == v[("relu", "second-moment", 0, "all",
                                                          "logit_var")]
    for act in ("elu", "srelu"):
        assert v[(act, "second-moment", 0, "out", "net_sq")] < v[(act, "he", 0, "out", "net_sq")]
    # logit_var against a brute-force forward pass of the same initial net
    x = load_dataset("digits").test_x[:40].reshape(40, -1)
    from biasshift.train import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "init"))
        net = autoencoder("elu", in_features=64, output="linear")
    with torch.no_grad():
        var = net(x).double().var().item()
    assert v[("elu", "he", 0, "all", "logit_var")] == pytest.approx(var, rel=1e-6)


def test_the_train_size_option_reaches_the_runs_and_the_record(tmp_path) -> None:
    import json

    from biasshift.reproduce.runner import run_analysis

    s = resolve_settings("autoencoder", quick=True, epochs=1, seeds=1, activations=["elu"],
                         lrs=["1e-3"], out=tmp_path / "o", work_dir=tmp_path / "w",
                         options={"train_size": "100", "test_size": "30",
                                  "collapse_images": "20"})
    res = run_analysis(s, progress=False)
    record = json.loads((tmp_path / "o" / "autoencoder.json").read_text())
    assert record["n_train"] == 100
    done = json.loads((tmp_path / "w" / "elu-lr0.001-seed0" / "done.json").read_text())
    assert done["data"].startswith("digits:100/30:")
    assert record["summary"]["train_size"] == 100
    assert set(res.frame["loss"]) == {"bce"} and set(res.frame["init"]) == {"he"}
