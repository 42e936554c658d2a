"""``natural-gradient-gap``: presets, runs, options, the per-run table, summary numbers against
independent computations, the figure, the CLI end to end, and the runner's extensions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from biasshift.cli import main
from biasshift.reproduce import (
    ANALYSES,
    TIDY_COLUMNS,
    RunSpec,
    UsageError,
    get_analysis,
    resolve_settings,
    run_one,
)
from biasshift.reproduce.natural_gradient_gap import CSV_QUANTITIES, NG_COLUMNS, SIGNED
from biasshift.train.tracking import BiasShiftTracker

NAME = "natural-gradient-gap"




# ------------------------------------------------------------------------- presets and runs
def test_registered_with_the_study_presets() -> None:
    a = get_analysis("natural_gradient_gap")
    assert a is ANALYSES[NAME] and a.tidy_columns == NG_COLUMNS
    assert set(TIDY_COLUMNS) < set(NG_COLUMNS)
    paper, quick = a.presets["paper"], a.presets["quick"]
    assert (paper.dataset, paper.epochs, paper.seeds, paper.lrs, paper.batch_size) == (
        "mnist", 15, 3, (0.01,), 64)
    assert paper.activations == ("elu", "relu", "lrelu", "srelu")
    assert paper.model == {"depth": 8, "width": 128}
    o = paper.options
    assert o["optimizers"] == ("sgd", "ung") and o["fisher"] == "exact"
    assert (o["track_probe"], o["per_decade"], o["track_ung"]) == (512, 8, True)
    assert quick.dataset == "digits" and quick.options["track_ung"] is False


def test_the_natural_gradient_runs_take_the_optimizers_defaults() -> None:
    """The presets' ``ung_*`` options are UnitNaturalGradient's defaults (so the study is
    rerun whenever they change), the factory passes every one of them, and a spec saved
    before ``ung_trust_region`` existed gets the block-model region it was run with."""
    import inspect

    from biasshift.optim import UnitNaturalGradient
    from biasshift.reproduce.natural_gradient_gap import ung_factory

    defaults = {k: v.default for k, v in
                inspect.signature(UnitNaturalGradient.__init__).parameters.items()}
    for preset in ("paper", "quick"):
        o = get_analysis(NAME).presets[preset].options
        for key in ("damping", "ema", "inverse_every", "update_every", "kl_clip",
                    "trust_region"):
            assert o[f"ung_{key}"] == defaults[key], (preset, key)
    assert defaults["damping_mode"] == "relative"
    s = resolve_settings(NAME, quick=True, options={"ung_trust_region": "units",
                                                    "ung_kl_clip": "0.02"})
    ung = next(sp for sp in get_analysis(NAME).run_specs(s) if sp.optimizer == "ung")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ELU(), torch.nn.Linear(4, 2))
    opt = ung_factory(ung)(model)
    hp = opt.param_groups[0]
    assert (hp["trust_region"], hp["kl_clip"], hp["damping"]) == ("units", 0.02, 0.1)
    old = RunSpec(**{**ung.__dict__, "options": {k: v for k, v in ung.options.items()
                                                 if k != "ung_trust_region"}})
    assert ung_factory(old)(model).param_groups[0]["trust_region"] == "units"


def test_run_specs_cross_activations_optimizers_and_seeds() -> None:
    s = resolve_settings(NAME, quick=True, seeds=2, activations=["elu", "relu"],
                         options={"ung_lr": "0.002", "track_ung": "yes"})
    specs = get_analysis(NAME).run_specs(s)
    assert [sp.run for sp in specs] == [
        "elu-lr0.01-seed0", "elu-lr0.01-seed1", "elu-ung-lr0.002-seed0", "elu-ung-lr0.002-seed1",
        "relu-lr0.01-seed0", "relu-lr0.01-seed1", "relu-ung-lr0.002-seed0",
        "relu-ung-lr0.002-seed1"]
    sgd, ung = specs[0], specs[2]
    assert (sgd.optimizer, sgd.lr, ung.optimizer, ung.lr) == ("sgd", 0.01, "ung", 0.002)
    assert sgd.options == {"tracked": True, "fisher": "exact", "damping": 1e-4,
                           "track_probe": 256, "per_decade": 4}
    assert ung.options["tracked"] and ung.options["ung_damping"] == s.options["ung_damping"]
    a = get_analysis(NAME)
    tracker = a.plugins(sgd)[0]
    assert isinstance(tracker, BiasShiftTracker) and tracker.probe_size == 256
    assert a.optimizer(sgd) is None
    untracked = resolve_settings(NAME, quick=True, options={"optimizers": "ung"})
    spec = a.run_specs(untracked)[0]
    assert a.plugins(spec) == [] and spec.options["tracked"] is False


def test_options_are_converted_and_checked() -> None:
    s = resolve_settings(NAME, quick=True, options={"damping": "1e-3", "optimizers": "sgd",
                                                    "per-decade": "2", "track_ung": "true"})
    assert s.options["damping"] == 1e-3 and s.options["optimizers"] == ("sgd",)
    assert s.options["per_decade"] == 2 and s.options["track_ung"] is True
    assert resolve_settings(NAME).options["track_probe"] == 512
    for bad, msg in (({"dampin": "1"}, "did you mean 'damping'"),
                     ({"per_decade": "2.5"}, "expected an integer"),
                     ({"damping": "abc"}, "expected a number"),
                     ({"track_ung": "maybe"}, "true or false"),
                     ({"optimizers": "sgd,adam"}, "choose distinct names from sgd,ung"),
                     ({"fisher": "true"}, "choose one of empirical, mc, exact"),
                     ({"damping": "-1"}, "must be >= 0"),
                     ({"ung_ema": "1"}, r"must be in \[0, 1\)"),
                     ({"ung_trust_region": "layer"}, "choose one of network, units")):
        with pytest.raises(UsageError, match=msg):
            resolve_settings(NAME, quick=True, options=bad)
    with pytest.raises(UsageError, match="activation-median takes no --option"):
        resolve_settings("activation-median", quick=True, options={"damping": "1"})


def test_old_spec_json_without_optimizer_fields_is_reused(tmp_path) -> None:
    spec = RunSpec(analysis="activation-median", run="elu-lr0.01-seed0", dataset="digits",
                   activation="elu", seed=0, lr=0.01, epochs=1, batch_size=256, probe_size=64,
                   model={"depth": 1, "width": 8})
    first = run_one(spec, work_dir=tmp_path)
    path = tmp_path / spec.run / "spec.json"
    old = json.loads(path.read_text())
    del old["optimizer"], old["options"]  # as written before these fields existed
    path.write_text(json.dumps(old))
    again = run_one(spec, work_dir=tmp_path, resume=True)
    assert again.reused
    pd.testing.assert_frame_equal(first.frame, again.frame, check_exact=True)


# ------------------------------------------------------------------------- summary and figure
def _frame(seed: int = 0, with_ung: bool = True) -> pd.DataFrame:
    """A synthetic study table: 2 activations x 2 seeds (x 2 optimizers)."""
    rng = np.random.default_rng(seed)
    rows = []
    layers = ["fc1", "fc2", "fc3", "out"]
    for act_i, act in enumerate(("elu", "relu")):
        for opt in ("sgd", "ung") if with_ung else ("sgd",):
            for s in (0, 1):
                lr = 0.01 if opt == "sgd" else 0.003
                run = RunSpec.run_id(act, lr, s, opt)
                base = (NAME, run, "digits", act, s, lr, opt)
                for e in range(4):
                    loss = (1 + act_i) * (1.0 if opt == "sgd" else 0.3) / (e + 1) + 0.01 * s
                    rows.append((*base, e, 10 * e, "all", pd.NA, "train_loss", "value", loss))
                if opt == "ung" and s == 1 and act == "relu":
                    rows.append((*base, 3, 30, "all", pd.NA, "diverged", "value", 1.0))
                for step in (1, 2, 5, 10, 20, 30):
                    epoch = (step - 1) // 10 + 1
                    for layer in [*layers, "all", "act_fed"]:
                        for q in CSV_QUANTITIES:
                            stats = ["median"] + (["q0.25", "q0.75"] if layer in ("all",
                                                  "act_fed") else [])
                            stats += ["median_abs"] if q in SIGNED else []
                            for st in stats:
                                v = float(rng.uniform(0.05, 0.9) if q == "cos_grad_ng"
                                          else rng.uniform(1, 10))
                                rows.append((*base, epoch, step, layer, pd.NA, q, st, v))
    df = pd.DataFrame(rows, columns=list(NG_COLUMNS))
    df["unit"] = df["unit"].astype("Int64")
    return df


def test_summary_numbers_match_independent_computations() -> None:
    df = _frame()
    s = resolve_settings(NAME, quick=True, epochs=3, seeds=2, activations=["elu", "relu"])
    out = get_analysis(NAME).summary(df, s)
    assert out["fisher"] == "exact" and out["damping"] == 1e-4
    for act in ("elu", "relu"):
        for opt in ("sgd", "ung"):
            sel = df[(df["activation"] == act) & (df["optimizer"] == opt)
                     & (df["layer"] == "act_fed")]
            want = sel[(sel["quantity"] == "cos_grad_ng") & (sel["stat"] == "median")]["value"]
            assert out["per_activation"][act][f"{opt}_median_cos_grad_ng"] == pytest.approx(
                float(np.median(want)))
            late = sel[(sel["quantity"] == "cos_grad_ng") & (sel["stat"] == "median")
                       & (sel["epoch"] > 1)]["value"]
            assert out["per_activation"][act][f"{opt}_median_cos_grad_ng_after_epoch1"] == \
                pytest.approx(float(np.median(late)))
            want = sel[(sel["quantity"] == "step_bias_shift_measured")
                       & (sel["stat"] == "median_abs")]["value"]
            assert out["per_activation"][act][f"{opt}_median_abs_bias_shift_measured"] == \
                pytest.approx(float(np.median(want)))
    # Spearman over (SGD run, layer other than the first, step) points
    pts = df[(df["optimizer"] == "sgd") & (df["stat"] == "median")
             & df["layer"].isin(["fc2", "fc3", "out"])]
    wide = pts.pivot_table(index=["run", "layer", "step"], columns="quantity", values="value")
    rho, _ = spearmanr(wide["norm_E_p_a"], wide["cos_grad_ng"])
    assert out["spearman"]["n"] == len(wide) == 2 * 2 * 3 * 6
    assert out["spearman"]["rho"] == pytest.approx(rho)
    # spread of the seed-mean training loss across activations
    loss = out["train_loss"]
    sgd_final = {a: ((1 + i) / 4 + 0.005) for i, a in enumerate(("elu", "relu"))}
    assert loss["sgd"]["final_mean_per_activation"] == pytest.approx(sgd_final)
    assert loss["sgd"]["range_at_epoch"]["3"] == pytest.approx(0.25)
    assert loss["sgd"]["ratio_at_epoch"]["3"] == pytest.approx(0.505 / 0.255)
    # UNG: relu's seed 1 diverged at epoch 3 (its finite rows still count; no NaN here)
    assert loss["ung"]["range_at_epoch"]["3"] == pytest.approx(0.3 * 0.25)
    assert loss["final_range_ung_over_sgd"] == pytest.approx(0.3)
    assert loss["final_ratio_ung_over_sgd"] == pytest.approx((0.155 / 0.08) / (0.505 / 0.255))


@pytest.mark.parametrize("quick", [True, False])
def test_figure_states_what_was_run(quick: bool, tmp_path) -> None:
    s = resolve_settings(NAME, quick=quick, epochs=3, seeds=2, activations=["elu", "relu"],
                         dataset="digits", options={"damping": "0.001"})
    fig = get_analysis(NAME).plot(_frame(), s)
    title = fig._suptitle.get_text()
    assert ("quick preset" in title) == quick
    for part in ("digits", "3 epochs", "2 seeds", "exact Fisher", "damping λ = 0.001",
                 "UNG lr 0.01", "relative damping 0.1", "kl_clip 0.1 (network region)"):
        assert part in title
    panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left")[0] for ax in panels] == list("abcdef")
    assert panels[0].get_xscale() == "log" and panels[1].get_yscale() == "log"
    assert "Spearman ρ" in panels[2].texts[0].get_text()
    labels = [t.get_text() for t in panels[3].get_legend().get_texts()]
    assert "ELU" in labels and "SGD" in labels and any(t.startswith("UNG") for t in labels)
    assert len(panels[4].lines) == 2  # SGD and UNG spread, against the loss level
    np.testing.assert_allclose(panels[4].lines[0].get_ydata(), [1 / 2, 1 / 3, 1 / 4])
    sgd_only = get_analysis(NAME).plot(_frame(with_ung=False), s)
    assert len([ax for ax in sgd_only.axes if ax.get_title(loc="left")]) == 6
    fig.savefig(tmp_path / "f.png")


# ------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_preset_end_to_end_and_reuse(tmp_path, capsys) -> None:
    argv = ["reproduce", NAME, "--quick", "--epochs", "1", "--seeds", "1", "--activations",
            "elu", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "runs"),
            "--no-progress", "--option", "track_probe=64", "--option", "per_decade=2",
            "--option", "track_ung=true", "--keep-checkpoints"]
    assert main(argv) == 0
    assert f"wrote {tmp_path / 'out' / NAME}" in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{NAME}.{ext}" for ext in ("csv", "json", "pdf", "png"))
    assert (out / f"{NAME}.png").read_bytes()[:4] == b"\x89PNG"
    df = pd.read_csv(out / f"{NAME}.csv", dtype={"unit": "Int64"})
    assert list(df.columns) == list(NG_COLUMNS)
    assert df["unit"].isna().all() and set(df["optimizer"]) == {"sgd", "ung"}
    assert sorted(df["run"].unique()) == ["elu-lr0.01-seed0", "elu-ung-lr0.01-seed0"]
    trainer_rows = df[df["stat"] == "value"]
    assert {"train_loss", "test_loss", "median_of_means"} <= set(trainer_rows["quantity"])
    assert set(trainer_rows["step"]) == {0, 23}  # digits: 1437 samples / 64 = 23 steps
    trk = df[df["stat"] != "value"]
    assert set(trk["quantity"]) == set(CSV_QUANTITIES)
    assert set(trk["layer"]) == {*(f"fc{i}" for i in range(1, 9)), "out", "all", "act_fed"}
    # log-spaced, 2 per decade (1, 3, 10) plus the epoch end (23)
    assert sorted(trk["step"].unique()) == [1, 3, 10, 23]
    assert set(trk["stat"]) == {"median", "q0.25", "q0.75", "median_abs"}
    assert not df.duplicated(["run", "step", "epoch", "layer", "quantity", "stat"]).any()
    cos = trk[(trk["quantity"] == "cos_grad_ng") & (trk["stat"] == "median")]["value"]
    assert ((cos > 0) & (cos <= 1)).all()

    record = json.loads((out / f"{NAME}.json").read_text())
    assert record["tidy_columns"] == list(NG_COLUMNS)
    assert record["settings"]["options"]["track_probe"] == 64
    summary = record["summary"]
    assert set(summary["per_activation"]["elu"]) >= {"sgd_median_cos_grad_ng",
                                                      "ung_median_cos_grad_ng"}
    assert "rho" in summary["spearman"] and "sgd" in summary["train_loss"]
    run_dir = tmp_path / "runs" / "elu-lr0.01-seed0"
    assert (run_dir / "tracking_summary.csv").exists()
    tracker = BiasShiftTracker.from_checkpoint(run_dir / "checkpoint.pt")
    assert tracker.tracked_steps == [1, 3, 10, 23] and tracker.run == "elu-lr0.01-seed0"
    assert len(tracker.frame()) == 4 * (len(tracker.quantities) * 1034 + 9)

    # --resume reuses every finished run and gives the same table
    assert main([*argv, "--resume"]) == 0
    again = pd.read_csv(out / f"{NAME}.csv", dtype={"unit": "Int64"})
    pd.testing.assert_frame_equal(df, again)
    (run_dir / "tracking_summary.csv").unlink()
    assert main([*argv, "--resume"]) == 2
    assert "lacks natural_gradient_gap.json or tracking_summary.csv" in \
        capsys.readouterr().err


def test_cli_option_syntax(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", NAME, "--quick", "--option", "damping"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["reproduce", NAME, "--quick", "--option", "dampng=1", "--out",
                 str(Path("/nonexistent"))]) == 2
    assert "did you mean 'damping'" in capsys.readouterr().err


def test_panel_a_legend_matches_what_is_drawn_and_the_heatmap_bar_is_labelled() -> None:
    s = resolve_settings(NAME, quick=True, epochs=3, seeds=2, activations=["elu", "relu"],
                         dataset="digits")
    for with_ung in (True, False):
        fig = get_analysis(NAME).plot(_frame(with_ung=with_ung), s)
        panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
        ax_a = panels[0]
        dashed = [ln for ln in ax_a.lines if ln.get_linestyle() == "--"]
        title = ax_a.get_title(loc="left")
        labels = [t.get_text() for t in ax_a.get_legend().get_texts()]
        if with_ung:  # UNG runs tracked: their dashed lines are drawn and explained
            assert len(dashed) == 2 and "UNG dashed" in title and "UNG" in labels
        else:  # the promise of dashed UNG lines is not made when none are drawn
            assert dashed == [] and "dashed" not in title and "UNG" not in labels
            assert "UNG runs untracked" in title  # quick preset: optimizers sgd and ung
        bar = [ax for ax in fig.axes if not ax.get_title(loc="left")]
        assert [b.get_ylabel() for b in bar] == ["median cos(g, (F+λI)⁻¹g)"]
