"""The reproduce framework: registry and presets, settings, run folders (reuse, resume,
mismatch), the median-change variance against brute force, aggregation and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from biasshift.data import cache_dir, load_dataset
from biasshift.models import paper_mlp
from biasshift.reproduce import (
    ANALYSES,
    TIDY_COLUMNS,
    RunSpec,
    UsageError,
    get_analysis,
    resolve_settings,
    run_analysis,
    run_one,
)
from biasshift.reproduce.median_variance import MedianChangeVariance
from biasshift.reproduce.plotting import save_figure, seed_band
from biasshift.train import Plugin, Trainer


# ------------------------------------------------------------------------------------ registry
def test_registry_holds_the_three_analyses_with_the_papers_presets() -> None:
    assert list(ANALYSES)[:4] == ["activation-median", "median-variance", "autoencoder",
                                  "natural-gradient-gap"]
    # later analyses follow the first four: issue 15's and issue 11's
    assert {"conv-activations", "bias-shift-mechanism"} <= set(ANALYSES)
    am = ANALYSES["activation-median"].presets["paper"]
    assert (am.dataset, am.epochs, am.seeds, am.lrs, am.batch_size, am.probe_size) == (
        "mnist", 300, 5, (0.01,), 64, 10_000)
    assert am.activations == ("elu", "relu", "lrelu", "srelu")
    assert am.model == {"depth": 8, "width": 128}
    mv = ANALYSES["median-variance"].presets["paper"]
    assert (mv.dataset, mv.epochs, mv.lrs, mv.probe_size, mv.model) == (
        "mnist", 200, (0.01,), None, {"depth": 5, "width": 256})
    assert set(mv.activations) == {"relu", "elu"}
    ae = ANALYSES["autoencoder"].presets["paper"]
    assert (ae.dataset, ae.epochs, ae.batch_size, ae.lrs) == (
        "mnist", 500, 64, (1e-2, 1e-3, 1e-4, 1e-5))
    assert list(ae.model["encoder"]) == [1000, 500, 250, 30]
    assert ANALYSES["autoencoder"].loss == "reconstruction"
    for a in ANALYSES.values():
        assert a.presets["quick"].dataset == "digits"
        assert a.description and a.figure


def test_unknown_analysis_lists_close_names() -> None:
    with pytest.raises(UsageError, match="did you mean 'activation-median'"):
        get_analysis("activation-medain")
    assert get_analysis("median_variance").name == "median-variance"


# ------------------------------------------------------------------------------------ settings
def test_settings_defaults_for_paper_and_quick() -> None:
    paper = resolve_settings("activation-median")
    assert (paper.preset, paper.dataset, paper.epochs, paper.seeds) == ("paper", "mnist", 300, 5)
    # run folders live in the user cache (issue 13, item 15); conftest counts one core
    cache = cache_dir() / "runs"
    assert paper.out == Path("figures") and paper.work_dir == cache / "activation-median"
    assert paper.threads == 1 and paper.jobs == 1 and not paper.quick
    quick = resolve_settings("autoencoder", quick=True)
    assert quick.quick and quick.dataset == "digits"
    assert quick.out == Path("figures/quick")
    assert quick.work_dir == cache / "quick" / "autoencoder"
    s = resolve_settings("autoencoder", quick=True, epochs=3, seeds=2, activations=["ELU"],
                         lrs=["1e-3"], probe_size="all", batch_size=16, out="o", work_dir="w")
    assert (s.epochs, s.seeds, s.activations, s.lrs, s.probe_size, s.batch_size) == (
        3, 2, ("elu",), (1e-3,), None, 16)
    assert resolve_settings("autoencoder", probe_size="12").probe_size == 12


@pytest.mark.parametrize(("kw", "message"), [
    ({"activations": ["elu", "tanhh"]}, r"unknown activation 'tanhh'.*'elu', 'relu'"),
    ({"activations": ["elu", "elu"]}, "more than once"),
    ({"dataset": "mnsit"}, "did you mean 'mnist'"),
    ({"lrs": ["0"]}, "positive and finite"),
    ({"lrs": ["fast"]}, "not a number"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"seeds": -1}, "seeds must be a positive integer"),
    ({"probe_size": "-3"}, "probe size must be >= 0"),
    ({"probe_size": "many"}, "integer or 'all'"),
    ({"device": "tpu"}, "device"),
    ({"jobs": 0}, "jobs"),
])
def test_bad_settings_raise_usage_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_settings("activation-median", quick=True, **kw)


def test_analysis_specific_checks() -> None:
    with pytest.raises(UsageError, match="--epochs >= 3"):
        resolve_settings("median-variance", quick=True, epochs=2)
    with pytest.raises(UsageError, match="probe"):
        resolve_settings("median-variance", quick=True, probe_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_settings("activation-median", device="cuda")


def test_run_specs_are_activations_x_lrs_x_seeds() -> None:
    s = resolve_settings("autoencoder", quick=True, seeds=2, activations=["elu", "relu"],
                         lrs=["1e-2", "1e-3", "1e-4"])
    specs = ANALYSES["autoencoder"].run_specs(s)
    assert len(specs) == 12
    assert len({sp.run for sp in specs}) == 12
    assert specs[0].run == "elu-lr0.01-seed0" and specs[-1].run == "relu-lr0.0001-seed1"
    assert all(sp.epochs == s.epochs and sp.dataset == "digits" for sp in specs)


# ------------------------------------------------------------------------------------ median change
class MedianTape(Plugin):
    def __init__(self) -> None:
        self.medians: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        self.medians.append({n: m.clone() for n, m in trainer.last_probe.median.items()})


@pytest.fixture(scope="module")
def digits_small():
    return load_dataset("digits").subset(160, 40)


def _mv_trainer(ds, epochs: int, ckpt=None) -> tuple[Trainer, MedianChangeVariance, MedianTape]:
    mcv, tape = MedianChangeVariance(), MedianTape()
    t = Trainer(lambda: paper_mlp("relu", depth=3, width=16, in_features=64), ds, epochs=epochs,
                batch_size=32, probe_size=None, probe_medians=True, plugins=[mcv, tape],
                checkpoint_dir=ckpt)
    return t, mcv, tape


def test_median_change_variance_matches_numpy(digits_small) -> None:
    t, _, tape = _mv_trainer(digits_small, epochs=6)
    h = t.fit()
    rows = h[h["quantity"] == "median_change_var"]
    assert sorted(rows["layer"].unique()) == ["act1", "act2", "act3"]
    assert (rows["epoch"] == 6).all()
    # independent medians: numpy on the whole training set after the last epoch
    acts: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.numpy()))
             for n, m in t.model.named_modules() if n.startswith("act")]
    t.model.eval()
    with torch.no_grad():
        t.model(digits_small.train_x)
    for hk in hooks:
        hk.remove()
    for n, a in acts.items():
        np.testing.assert_allclose(tape.medians[-1][n].numpy(), np.median(a, axis=0),
                                   rtol=1e-6, atol=1e-7)
        series = np.stack([m[n].double().numpy() for m in tape.medians])  # epochs 1..6
        want = np.var(np.diff(series, axis=0), axis=0, ddof=1)
        got = rows[rows["layer"] == n].sort_values("unit")
        assert got["unit"].tolist() == list(range(16))
        np.testing.assert_allclose(got["value"].to_numpy(), want, rtol=1e-10, atol=1e-15)


def test_median_change_variance_resumes_exactly(digits_small, tmp_path) -> None:
    full = _mv_trainer(digits_small, epochs=5)[0].fit()
    _mv_trainer(digits_small, epochs=3, ckpt=tmp_path)[0].fit()
    resumed = _mv_trainer(digits_small, epochs=5, ckpt=tmp_path)[0].fit(resume=True)
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)


def test_median_change_variance_needs_probe_medians(digits_small) -> None:
    t = Trainer(lambda: paper_mlp("relu", depth=2, width=8, in_features=64), digits_small,
                epochs=1, plugins=[MedianChangeVariance()])
    with pytest.raises(RuntimeError, match="probe_medians=True"):
        t.fit()


def test_too_few_changes_give_nan_rows_not_missing_rows(digits_small) -> None:
    t, _, _ = _mv_trainer(digits_small, epochs=2)
    rows = t.fit().query("quantity == 'median_change_var'")
    assert len(rows) == 48 and rows["value"].isna().all()


# ------------------------------------------------------------------------------------ run folders
def _spec(epochs: int = 2, **kw: Any) -> RunSpec:
    base = {"analysis": "activation-median", "run": "elu-lr0.01-seed0", "dataset": "digits",
            "activation": "elu", "seed": 0, "lr": 0.01, "epochs": epochs, "batch_size": 128,
            "probe_size": 200, "model": {"depth": 2, "width": 16}}
    base.update(kw)
    return RunSpec(**base)


def test_run_one_reuses_resumes_extends_and_refuses(tmp_path) -> None:
    calls: list[tuple[str, int]] = []
    # keep_checkpoint: a finished run keeps its checkpoint only when asked (issue 13, item 15)
    first = run_one(_spec(2), work_dir=tmp_path, keep_checkpoint=True,
                    progress=lambda r, e: calls.append((r, e)))
    assert not first.reused and first.status == "finished" and first.epochs_done == 2
    assert calls[0] == ("elu-lr0.01-seed0", 0) and calls[-1] == ("elu-lr0.01-seed0", 2)
    run_dir = tmp_path / "elu-lr0.01-seed0"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt", "done.json", "history.csv", "spec.json"]
    assert list(first.frame.columns) == list(TIDY_COLUMNS)

    again = run_one(_spec(2), work_dir=tmp_path, resume=True)
    assert again.reused
    pd.testing.assert_frame_equal(first.frame, again.frame, check_exact=True)

    longer = run_one(_spec(3), work_dir=tmp_path, resume=True, keep_checkpoint=True)
    assert not longer.reused and longer.resumed_from == 2 and longer.epochs_done == 3
    fresh = run_one(_spec(3), work_dir=tmp_path / "fresh")
    pd.testing.assert_frame_equal(longer.frame, fresh.frame, check_exact=True)

    with pytest.raises(UsageError, match="completed with 3 epochs"):
        run_one(_spec(2), work_dir=tmp_path, resume=True)
    with pytest.raises(UsageError, match=r"holds a different run .*lr"):
        run_one(_spec(3, lr=0.02), work_dir=tmp_path, resume=True)
    # without resume the folder is replaced only with overwrite (issue 13, item 6)
    with pytest.raises(UsageError, match=r"--resume .* or --overwrite"):
        run_one(_spec(2, lr=0.02), work_dir=tmp_path)
    redo = run_one(_spec(2, lr=0.02), work_dir=tmp_path, overwrite=True)
    assert not redo.reused and json.loads((run_dir / "spec.json").read_text())["lr"] == 0.02


@pytest.mark.slow
def test_parallel_jobs_give_the_same_table(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BIASSHIFT_CPUS", "2")  # two jobs without an oversubscription warning
    kw = {"quick": True, "epochs": 2, "seeds": 1, "activations": ["elu", "srelu"]}
    one = run_analysis(resolve_settings("activation-median", out=tmp_path / "o1",
                                        work_dir=tmp_path / "w1", **kw), progress=False)
    two = run_analysis(resolve_settings("activation-median", out=tmp_path / "o2",
                                        work_dir=tmp_path / "w2", jobs=2, **kw), progress=False)
    pd.testing.assert_frame_equal(one.frame, two.frame, check_exact=True)
    record = json.loads((tmp_path / "o2" / "activation-median.json").read_text())
    assert record["settings"]["jobs"] == 2 and record["n_runs"] == 2


# ------------------------------------------------------------------------------------ plots
def _frame(analysis: str, *, diverge: str | None = None, lrs=(0.01,)) -> pd.DataFrame:
    rows = []
    for act in ("elu", "relu"):
        for lr in lrs:
            for seed in (0, 1):
                run = RunSpec.run_id(act, lr, seed)
                for e in range(0, 4):
                    v = 1.0 / (e + 1) + 0.1 * seed
                    if diverge == run and e == 3:
                        v = float("nan")
                    for q in ("train_loss", "test_loss", "median_of_means"):
                        rows.append((analysis, run, "digits", act, seed, lr, e, "all", pd.NA,
                                     q, v))
                    if diverge == run and e == 3:
                        rows.append((analysis, run, "digits", act, seed, lr, e, "all", pd.NA,
                                     "diverged", 1.0))
                for layer in ("act1", "act2"):
                    for u in range(5):
                        rows.append((analysis, run, "digits", act, seed, lr, 3, layer, u,
                                     "median_change_var", 0.0 if u == 0 else 10.0 ** -u))
    df = pd.DataFrame(rows, columns=list(TIDY_COLUMNS))
    df["unit"] = df["unit"].astype("Int64")
    return df


# natural-gradient-gap's figure (extra columns) is tested in tests/test_natural_gradient_gap.py
@pytest.mark.parametrize("name", ["activation-median", "median-variance", "autoencoder"])
@pytest.mark.parametrize("quick", [True, False])
def test_plots_state_what_was_run(name: str, quick: bool, tmp_path) -> None:
    analysis = get_analysis(name)
    lrs = (0.01, 0.001) if name == "autoencoder" else (0.01,)
    s = resolve_settings(name, quick=quick, epochs=3, seeds=2, activations=["elu", "relu"],
                         lrs=lrs, dataset="digits")
    fig = analysis.plot(_frame(name, diverge="relu-lr0.01-seed1", lrs=lrs), s)
    title = fig._suptitle.get_text()
    assert ("quick preset" in title) == quick
    assert "digits" in title and "3 epochs" in title and "2 seeds" in title
    n_axes = {"activation-median": 2, "median-variance": 2, "autoencoder": 2}[name]
    assert len(fig.axes) == n_axes
    if name != "median-variance":
        labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
        assert "ReLU (1/2 diverged)" in labels and "ELU" in labels
    else:
        assert fig.axes[0].get_yscale() == "log"
        # units with zero variance are not hidden: their share is written above each box
        # (_frame: 1 of 5 units per layer and run has variance 0)
        shares = [t.get_text() for t in fig.axes[0].texts if t.get_text().endswith("%")]
        assert shares == ["20%"] * 4
    paths = save_figure(fig, tmp_path / name)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def test_seed_band_leaves_non_finite_values_out() -> None:
    df = pd.DataFrame({"activation": ["elu"] * 3, "epoch": [1, 1, 1],
                       "value": [1.0, 3.0, float("inf")]})
    band = seed_band(df, ["activation"]).iloc[0]
    assert (band["mean"], band["sd"], band["n"], band["nonfinite"]) == (
        2.0, pytest.approx(np.sqrt(2.0)), 2, 1)


# ------------------------------------------------------------- figure legibility (issue 13)
# Machado, Oliveira & Fernandes (2009) full-severity simulation matrices, on linear sRGB.
_CVD = {
    "normal": np.eye(3),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}


def _lab(color: str, vision: str) -> np.ndarray:
    """CIELAB (D65) of a hex colour as seen with ``vision`` (independent of matplotlib)."""
    c = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lin = np.clip(_CVD[vision] @ lin, 0, 1)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ lin / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


@pytest.mark.parametrize("vision", sorted(_CVD))
def test_unit_colours_are_distinct_also_for_colour_blind_readers(vision: str) -> None:
    """The four units differ by ΔE76 >= 40 in normal vision (the old ReLU/SReLU oranges: 26) and
    >= 15 under each dichromacy (old: 12.6 under deuteranopia); the colours other activations
    (controls) get stay >= 15 from every unit's."""
    from itertools import combinations

    from biasshift.reproduce.plotting import _EXTRA, activation_color

    units = [activation_color(a) for a in ("elu", "relu", "lrelu", "srelu")]
    assert len(set(units)) == 4
    pairs = min(np.linalg.norm(_lab(a, vision) - _lab(b, vision))
                for a, b in combinations(units, 2))
    assert pairs >= (40 if vision == "normal" else 15)
    controls = min(np.linalg.norm(_lab(a, vision) - _lab(b, vision))
                   for a in units for b in _EXTRA)
    assert controls >= 15
    for other in ("tanh", "identity", "gelu"):
        assert activation_color(other) not in units


def test_fig2b_overlapping_test_curves_are_told_apart_by_markers() -> None:
    s = resolve_settings("activation-median", quick=True, epochs=3, seeds=2,
                         activations=["elu", "relu"], dataset="digits")
    df = _frame("activation-median")  # both activations: identical losses, curves coincide
    fig = get_analysis("activation-median").plot(df, s)
    ax_b = fig.axes[1]
    test_lines = [ln for ln in ax_b.lines if ln.get_linestyle() == ":"]
    assert len(test_lines) == 2
    np.testing.assert_array_equal(test_lines[0].get_ydata(), test_lines[1].get_ydata())
    assert len({ln.get_marker() for ln in test_lines}) == 2  # one marker per activation
    assert len({ln.get_color() for ln in test_lines}) == 2
    legend = ax_b.get_legend()
    assert [h.get_marker() for h in legend.legend_handles] == [ln.get_marker()
                                                                for ln in test_lines]


def test_replot_redraws_from_the_csv_and_json_like_the_run(tmp_path) -> None:
    from biasshift.io import write_csv, write_json
    from biasshift.reproduce.plotting import read_result_csv, replot

    name = "activation-median"
    s = resolve_settings(name, quick=True, epochs=3, seeds=2, activations=["elu", "relu"],
                         dataset="digits")
    df = _frame(name, diverge="relu-lr0.01-seed1")
    stem = tmp_path / name
    write_csv(df, stem.with_suffix(".csv"))
    write_json({"analysis": name, "settings": s.to_dict()}, stem.with_suffix(".json"))
    back = read_result_csv(stem.with_suffix(".csv"))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["layer"].map(type).eq(str).all() and str(back["unit"].dtype) == "Int64"
    before = {p: p.stat().st_mtime_ns for p in (stem.with_suffix(".csv"),
                                                 stem.with_suffix(".json"))}
    paths = replot(stem)
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the data is left alone
    direct = get_analysis(name).plot(df, s)
    from matplotlib.image import imread

    png = tmp_path / "direct.png"
    save_figure(direct, tmp_path / "direct", formats=("png",))
    np.testing.assert_array_equal(imread(png), imread(paths[0]))
    from biasshift.reproduce import replot as replot_cli

    assert replot_cli.main([]) == 2
    assert replot_cli.main([str(stem.with_suffix(".csv"))]) == 0
    np.testing.assert_array_equal(imread(png), imread(paths[0]))
    # a table committed gzip-compressed (figures/NAME.csv.gz) redraws the same figure
    import gzip

    csv = stem.with_suffix(".csv")
    stem.with_suffix(".csv.gz").write_bytes(gzip.compress(csv.read_bytes()))
    csv.unlink()
    assert replot_cli.main([str(stem.with_suffix(".csv.gz"))]) == 0
    np.testing.assert_array_equal(imread(png), imread(paths[0]))
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad.csv").write_text("x\n")
    with pytest.raises(ValueError, match="not a biasshift result record"):
        replot(tmp_path / "bad")
