r"""Statistics and figure of ``bias-shift-mechanism`` (see its module docstring).

Everything here is a function of the tidy table (``NAME.csv``) and the settings, so
``python -m biasshift.reproduce.replot figures/bias-shift-mechanism`` redraws the figure and the
numbers can be recomputed from the committed CSV.

Run-level numbers (:func:`run_table`, one row per run)
    ``steps_to_<t>`` (and ``reached_<t>``) for every loss threshold ``t`` of ``thresholds`` and
    of the natural-gradient levels, from the run's ``loss_curve`` (log-log interpolation;
    censored at the run's last step); ``loss_at_<s>`` at every step of ``loss_steps``; and the
    mechanism quantities of the pooled ``act_fed`` layers, the median over the tracked steps of
    the first epoch of the per-step median over units: ``mean_scale_q_damped``,
    ``mean_scale_q``, ``cos_ng_uncorrected``, ``cos_grad_ng``, and the median ``|bias shift|``
    of the step (measured, first order).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from biasshift.reproduce.base import Settings
from biasshift.reproduce.plotting import activation_color, figure_title
from biasshift.stats import bootstrap_ci, paired_comparison, pooled_spearman
from biasshift.train.loss_curve import loss_at_steps, steps_to_threshold

__all__ = ["arm_color", "layer_points", "plot", "run_table", "shift_of", "summarize"]

MECHANISM = ("mean_scale_q_damped", "mean_scale_q", "cos_ng_uncorrected", "cos_grad_ng")
SHIFTS = ("step_bias_shift_measured", "step_bias_shift_first_order")
NG_LEVELS = (1.0, 0.5, 0.3)
#: Okabe-Ito colours for the controls (the paper's four keep theirs, see plotting.py)
_ARM_COLORS = {"elu-0.5": "#56B4E9", "elu+0.5": "#E69F00", "elu+1": "#000000",
               "crelu": "#D55E00"}
_SHIFT = re.compile(r"^elu([+-]\d*\.?\d+)?$")


def shift_of(activation: str) -> float | None:
    """The ``c`` of a shifted ELU name (``elu`` -> 0, ``elu+0.5`` -> 0.5); None otherwise."""
    m = _SHIFT.match(activation)
    if m is None:
        return None
    return float(m.group(1)) if m.group(1) else 0.0


def arm_color(arm: str) -> str:
    act = arm.split("/")[0]
    return _ARM_COLORS.get(act) or activation_color(act)


def _arm_style(arm: str) -> dict[str, Any]:
    mods = arm.split("/")[1:]
    ls = "-"
    if "bn" in mods:
        ls = "-."
    elif "ci" in mods:
        ls = ":"
    elif "ung" in mods:
        ls = "--"
    if arm.split("/")[0] == "crelu":
        ls = (0, (5, 1, 1, 1))
    return {"color": arm_color(arm), "ls": ls}


def _main_lr(settings: Settings) -> float:
    return float(settings.lrs[0])


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _levels(settings: Settings) -> tuple[float, ...]:
    o = settings.options
    return tuple(dict.fromkeys([float(t) for t in o["thresholds"]] + list(NG_LEVELS)))


def _phase(step: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    names = np.asarray(_phase_names(edges), dtype=object)
    return names[np.searchsorted(np.asarray(edges), step, side="left")]


def _phase_names(edges: Sequence[int]) -> list[str]:
    lo = [1, *[e + 1 for e in edges]]
    hi = [*edges, None]
    return [f"{a}-{b}" if b is not None else f">{a - 1}" for a, b in zip(lo, hi)]


def run_table(df: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """One row per run: the run-level numbers (see the module docstring)."""
    o = settings.options
    keys = ["run", "arm", "activation", "optimizer", "lr", "seed"]
    runs = df[keys].drop_duplicates("run").set_index("run")
    curve = df[df["quantity"] == "loss_curve"]
    rows: dict[str, dict[str, Any]] = {r: {} for r in runs.index}
    for run, g in curve.groupby("run"):
        g = g.sort_values("step")
        s, v = g["step"].to_numpy(np.float64), g["value"].to_numpy(np.float64)
        for t in _levels(settings):
            val, reached = steps_to_threshold(s, v, t)
            rows[run][f"steps_to_{t:g}"] = val
            rows[run][f"reached_{t:g}"] = reached
        for step, val in zip(o["loss_steps"], loss_at_steps(s, v, o["loss_steps"])):
            rows[run][f"loss_at_{step}"] = val
        rows[run]["last_step"] = float(s[-1])
    div = df[df["quantity"] == "diverged"]
    for run in div["run"].unique():
        rows.setdefault(run, {})["diverged"] = True
    trk = df[(df["layer"] == "act_fed") & df["quantity"].isin(MECHANISM + SHIFTS)]
    trk = trk[trk["epoch"] <= 1]
    for (run, q, stat), g in trk.groupby(["run", "quantity", "stat"]):
        if (q in MECHANISM and stat == "median") or (q in SHIFTS and stat == "median_abs"):
            v = g["value"].to_numpy(np.float64)
            v = v[np.isfinite(v)]
            name = q if q in MECHANISM else f"abs_{q}"
            rows[run][name] = float(np.median(v)) if v.size else float("nan")
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    out = runs.join(table).reset_index()
    if "diverged" not in out:
        out["diverged"] = False
    out["diverged"] = out["diverged"].fillna(False).astype(bool)
    return out


def _arm_runs(rt: pd.DataFrame, arm: str, lr: float | None = None) -> pd.DataFrame:
    sel = rt[rt["arm"] == arm]
    if lr is not None:
        sel = sel[np.isclose(sel["lr"], lr)]
    return sel.sort_values("seed")


def _paired(rt: pd.DataFrame, col: str, a: tuple[str, float], b: tuple[str, float],
            n_boot: int) -> dict[str, Any] | None:
    ra, rb = _arm_runs(rt, *a), _arm_runs(rt, *b)
    if ra.empty or rb.empty or col not in rt:
        return None
    m = ra[["seed", col]].merge(rb[["seed", col]], on="seed", suffixes=("_a", "_b"))
    if m.empty:
        return None
    res = paired_comparison(m[f"{col}_a"], m[f"{col}_b"], n_boot=n_boot).to_dict()
    res["a"], res["b"] = f"{a[0]} (lr {a[1]:g})", f"{b[0]} (lr {b[1]:g})"
    if col.startswith("steps_to_"):
        t = col.removeprefix("steps_to_")
        res["censored_a"] = int((~ra[f"reached_{t}"].astype(bool)).sum())
        res["censored_b"] = int((~rb[f"reached_{t}"].astype(bool)).sum())
    return res


def _arm_mean(rt: pd.DataFrame, arm: str, lr: float, col: str, n_boot: int
              ) -> dict[str, Any] | None:
    r = _arm_runs(rt, arm, lr)
    if r.empty or col not in r:
        return None
    est, lo, hi = bootstrap_ci(r[col].to_numpy(np.float64), n_boot=n_boot)
    out = {"mean": _finite(est), "low": _finite(lo), "high": _finite(hi),
           "n": int(np.isfinite(r[col].to_numpy(np.float64)).sum())}
    if col.startswith("steps_to_"):
        out["censored"] = int((~r[f"reached_{col.removeprefix('steps_to_')}"].astype(bool)).sum())
    return out


def _per_seed_slope(rt: pd.DataFrame, arms: list[str], lr: float, xcol: str, ycol: str,
                    n_boot: int) -> dict[str, Any] | None:
    """Per seed the least-squares slope of ``ycol`` on ``xcol`` over the arms; mean slope over
    seeds with a bootstrap CI and exact sign-flip / Wilcoxon p-values against 0."""
    from biasshift.stats import sign_flip_test, wilcoxon_exact

    sel = rt[rt["arm"].isin(arms) & np.isclose(rt["lr"], lr)]
    slopes = []
    for _, g in sel.groupby("seed"):
        x, y = g[xcol].to_numpy(np.float64), g[ycol].to_numpy(np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
            slopes.append(float(np.polyfit(x[ok], y[ok], 1)[0]))
    if len(slopes) < 2:
        return None
    est, lo, hi = bootstrap_ci(slopes, n_boot=n_boot)
    return {"x": xcol, "y": ycol, "n_seeds": len(slopes), "mean_slope": est, "low": lo,
            "high": hi, "p_sign_flip": sign_flip_test(slopes),
            "p_wilcoxon": _finite(wilcoxon_exact(slopes)), "slopes": slopes}


def layer_points(df: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Per (SGD run at the main lr, layer fc2..out, phase): the median over the phase's tracked
    steps of the layer median over units of every mechanism quantity (wide)."""
    o = settings.options
    lr = _main_lr(settings)
    t = df[(df["optimizer"] == "sgd") & np.isclose(df["lr"], lr) & (df["stat"] == "median")
           & df["quantity"].isin(MECHANISM) & ~df["layer"].isin(["all", "act_fed"])]
    if t.empty:
        return pd.DataFrame(columns=["run", "arm", "seed", "layer", "phase", *MECHANISM])
    first = {r: min(g["layer"].unique(), key=_layer_key) for r, g in t.groupby("run")}
    t = t[t["layer"] != t["run"].map(first)]
    t = t.assign(phase=_phase(t["step"].to_numpy(np.int64), o["phase_edges"]))
    wide = t.groupby(["run", "arm", "seed", "layer", "phase", "quantity"])["value"].median()
    return wide.unstack("quantity").reset_index()


def _layer_key(name: str) -> tuple[int, int]:
    if name == "out":
        return (1, 0)
    digits = "".join(ch for ch in name if ch.isdigit())
    return (0, int(digits) if digits else 10**6)


def summarize(df: pd.DataFrame, settings: Settings) -> dict[str, Any]:
    """The JSON ``summary``: per-arm means with CIs, the paired comparisons, the dose-response,
    the natural-gradient comparison and the pooled within-layer-and-phase correlations."""
    o = settings.options
    nb = int(o["n_boot"])
    lr = _main_lr(settings)
    rt = run_table(df, settings)
    out: dict[str, Any] = {
        "unit_of_replication": "run (seed); CIs: percentile bootstrap over seeds (95%); "
                               "comparisons paired by seed (same initial weights and batches)",
        "mechanism_definition": "act_fed layers (fc2..out), median over the tracked steps of "
                                "epoch 1 of the per-step median over units",
        "steps_definition": "steps until the training CE on a fixed training subset first "
                            "falls below the threshold (log-log interpolated); censored runs "
                            "count with their last step (a lower bound)",
        "n_runs": len(rt), "n_diverged": int(rt["diverged"].sum()),
        "measurement": {
            "probe": "BiasShiftProbe via BiasShiftTracker", "fisher": o["fisher"],
            "damping": o["damping"], "damping_mode": "relative (x each block's mean diagonal)",
            "probe_size": o["track_probe"], "per_decade": o["per_decade"],
            "epoch_ends": o.get("track_epoch_ends", True), "loss_curve_size": o["loss_size"],
            "loss_curve_per_decade": o["loss_per_decade"], "dtype": "float32 (refined)"},
        "learning_rates": {"sgd_arms": list(settings.lrs), "ng_arm_sgd": o["ng_sgd_lr"],
                           "ng_arm_ung": o["ung_lr"],
                           "sweep": "figures/bias-shift-mechanism-lr-sweep.json"},
    }
    levels = _levels(settings)
    cols = ([f"steps_to_{t:g}" for t in levels] + [f"loss_at_{s}" for s in o["loss_steps"]]
            + list(MECHANISM) + [f"abs_{q}" for q in SHIFTS])
    arms_out: dict[str, Any] = {}
    for (arm, alr), _ in rt.groupby(["arm", "lr"], sort=False):
        arms_out[f"{arm} lr{alr:g}"] = {c: _arm_mean(rt, arm, alr, c, nb) for c in cols
                                         if c in rt}
    out["arms"] = arms_out

    thr = [f"steps_to_{t:g}" for t in o["thresholds"]]
    early = [f"loss_at_{s}" for s in o["loss_steps"]]

    def comp(a: str, b: str, alr: float = lr, blr: float = lr,
             columns: Sequence[str] = (*thr, *early)) -> dict[str, Any]:
        return {c: _paired(rt, c, (a, alr), (b, blr), nb) for c in columns if c in rt}

    # dose-response
    dose = sorted({a for a in rt["arm"] if shift_of(a) is not None and "/" not in a},
                  key=lambda a: shift_of(a) or 0.0)
    rt = rt.assign(shift=[shift_of(a) if "/" not in a else None for a in rt["arm"]])
    main = thr[1] if len(thr) > 1 else thr[0]
    d: dict[str, Any] = {"arms": dose, "primary": main}
    if len(dose) >= 3:
        d["slope_steps_per_unit_shift"] = _per_seed_slope(rt, dose, lr, "shift", main, nb)
        for q in ("mean_scale_q_damped", "cos_ng_uncorrected", "cos_grad_ng"):
            d[f"slope_{q}_per_unit_shift"] = _per_seed_slope(rt, dose, lr, "shift", q, nb)
            d[f"slope_steps_per_{q}"] = _per_seed_slope(rt, dose, lr, q, main, nb)
        d["vs_elu"] = {a: comp(a, "elu") for a in dose if a != "elu"}
        sel = rt[rt["arm"].isin(dose) & np.isclose(rt["lr"], lr)]
        d["rank_within_seed"] = {"definition": (
            "per seed, Spearman's rho over the dose arms (4 points, ties from censoring "
            "share ranks); mean over seeds with a bootstrap CI over seeds (a plain mean: "
            "Fisher's z is undefined at |rho| = 1)")}
        from scipy.stats import spearmanr

        for q in ("shift", "mean_scale_q_damped", "cos_ng_uncorrected", "cos_grad_ng"):
            for y in (main, thr[0]):
                rhos = []
                for _, g in sel.groupby("seed"):
                    gx, gy = g[q].to_numpy(np.float64), g[y].to_numpy(np.float64)
                    ok = np.isfinite(gx) & np.isfinite(gy)
                    if ok.sum() >= 3 and np.ptp(gx[ok]) > 0 and np.ptp(gy[ok]) > 0:
                        rhos.append(float(spearmanr(gx[ok], gy[ok]).statistic))
                est, lo, hi = bootstrap_ci(rhos, n_boot=nb)
                d["rank_within_seed"][f"{q}~{y}"] = {"mean_rho": est, "low": lo, "high": hi,
                                                     "per_seed": rhos}
    out["dose_response"] = d

    # centring and the paper's units
    out["centring"] = {
        "crelu_vs_relu": comp("crelu", "relu"), "elu_vs_relu": comp("elu", "relu"),
        "crelu_vs_elu": comp("crelu", "elu"),
        "fraction_of_elu_speedup": _fraction(rt, lr, [*thr, *early], nb),
    }
    out["paper_units_vs_elu"] = {a: comp(a, "elu") for a in ("relu", "lrelu", "srelu")}
    out["batch_norm"] = {"relu/bn_vs_relu": comp("relu/bn", "relu"),
                         "elu/bn_vs_elu": comp("elu/bn", "elu"),
                         "elu/bn_vs_relu/bn": comp("elu/bn", "relu/bn")}
    out["centred_inputs"] = {"relu/ci_vs_relu": comp("relu/ci", "relu"),
                             "elu/ci_vs_elu": comp("elu/ci", "elu")}
    out["natural_gradient"] = _ng_summary(rt, settings, nb)
    out["correlations"] = _correlations(df, rt, settings)
    return _clean(out)


def _fraction(rt: pd.DataFrame, lr: float, cols: Sequence[str], nb: int) -> dict[str, Any]:
    """(relu − crelu) / (relu − elu) per column: the share of ELU's speed-up over ReLU that the
    centred ReLU reproduces; ratio of the seed means with a bootstrap CI over seeds."""
    out: dict[str, Any] = {}
    arms = {a: _arm_runs(rt, a, lr) for a in ("relu", "crelu", "elu")}
    if any(r.empty for r in arms.values()):
        return out
    for c in cols:
        if c not in rt:
            continue
        m = arms["relu"][["seed", c]].merge(arms["crelu"][["seed", c]], on="seed",
                                            suffixes=("", "_c"))
        m = m.merge(arms["elu"][["seed", c]].rename(columns={c: f"{c}_e"}), on="seed")
        a = (m[c] - m[f"{c}_c"]).to_numpy(np.float64)
        b = (m[c] - m[f"{c}_e"]).to_numpy(np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        if a.size < 2 or b.mean() == 0:
            continue
        rng = np.random.default_rng(0)
        idx = rng.integers(0, a.size, size=(nb, a.size))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = a[idx].mean(1) / b[idx].mean(1)
        r = r[np.isfinite(r)]
        lo, hi = np.quantile(r, [0.025, 0.975]) if r.size else (np.nan, np.nan)
        out[c] = {"fraction": float(a.mean() / b.mean()), "low": float(lo), "high": float(hi),
                  "n": int(a.size), "elu_speedup_mean": float(b.mean())}
    return out


def _ng_summary(rt: pd.DataFrame, settings: Settings, nb: int) -> dict[str, Any]:
    o = settings.options
    ulr, slr = float(o["ung_lr"]), float(o["ng_sgd_lr"])
    acts = [a for a in o["ng_arms"] if not _arm_runs(rt, f"{a}/ung", ulr).empty]
    out: dict[str, Any] = {"sgd_lr": slr, "ung_lr": ulr, "arms": acts,
                           "matched_levels": list(NG_LEVELS),
                           "definition": "steps to the same training loss (matched loss, "
                                         "not equal lr); per seed the log ratio of an arm's "
                                         "steps to ELU's, SGD vs UNG"}
    if not acts:
        return out
    for t in NG_LEVELS:
        col = f"steps_to_{t:g}"
        per: dict[str, Any] = {}
        for a in acts:
            per[a] = {"sgd": _arm_mean(rt, a, slr, col, nb),
                      "ung": _arm_mean(rt, f"{a}/ung", ulr, col, nb),
                      "ung_vs_sgd": _paired(rt, col, (f"{a}/ung", ulr), (a, slr), nb)}
        gaps: dict[str, Any] = {}
        base = "elu" if "elu" in acts else acts[0]
        for a in acts:
            if a == base:
                continue
            lr_s = {}
            for opt, arm_a, arm_b, alr in (("sgd", a, base, slr),
                                           ("ung", f"{a}/ung", f"{base}/ung", ulr)):
                ra, rb = _arm_runs(rt, arm_a, alr), _arm_runs(rt, arm_b, alr)
                m = ra[["seed", col]].merge(rb[["seed", col]], on="seed", suffixes=("_a", "_b"))
                lr_s[opt] = m.assign(logr=np.log(m[f"{col}_a"] / m[f"{col}_b"]))[["seed",
                                                                                 "logr"]]
            m = lr_s["sgd"].merge(lr_s["ung"], on="seed", suffixes=("_sgd", "_ung"))
            if len(m):
                comp = paired_comparison(m["logr_ung"].abs(), m["logr_sgd"].abs(),
                                         n_boot=nb).to_dict()
                gaps[f"{a}_vs_{base}"] = {
                    "log_ratio_sgd": bootstrap_ci(m["logr_sgd"], n_boot=nb),
                    "log_ratio_ung": bootstrap_ci(m["logr_ung"], n_boot=nb),
                    "abs_log_ratio_ung_minus_sgd": comp}
        out[f"loss_{t:g}"] = {"per_arm": per, "gap_between_arms": gaps}
    return out


_CORR_CACHE: dict[tuple[int, int, str], dict[str, Any]] = {}


def _correlations(df: pd.DataFrame, rt: pd.DataFrame, settings: Settings) -> dict[str, Any]:
    """See :func:`_correlations_uncached`; the figure reuses the summary's numbers."""
    key = (id(df), len(df), repr(sorted(settings.options.items())))
    if key not in _CORR_CACHE:
        _CORR_CACHE.clear()
        _CORR_CACHE[key] = _correlations_uncached(df, rt, settings)
    return _CORR_CACHE[key]


def _correlations_uncached(df: pd.DataFrame, rt: pd.DataFrame, settings: Settings
                           ) -> dict[str, Any]:
    o = settings.options
    pts = layer_points(df, settings)
    out: dict[str, Any] = {"points": "(SGD run at the main lr, layer fc2..out, phase): medians",
                           "phases": _phase_names(o["phase_edges"]),
                           "pooling": "Spearman within layer x phase across runs, Fisher-z "
                                      "pooled (weights n-3), bootstrap over seeds"}
    if pts.empty:
        return out
    nb = max(200, int(o["n_boot"]) // 10)
    main = f"steps_to_{float(o['thresholds'][1 if len(o['thresholds']) > 1 else 0]):g}"
    if main in rt:
        pts = pts.merge(rt[["run", main]], on="run", how="left")
    pairs = [("mean_scale_q_damped", "cos_ng_uncorrected"),
             ("mean_scale_q_damped", "cos_grad_ng"), ("cos_ng_uncorrected", "cos_grad_ng"),
             ("mean_scale_q_damped", main), ("cos_ng_uncorrected", main)]
    for x, y in pairs:
        if x in pts and y in pts:
            out[f"{x}~{y}"] = pooled_spearman(pts, x, y, ["layer", "phase"], n_boot=nb)
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ============================================================================== the figure
def _ci_points(ax: Any, rt: pd.DataFrame, arms: list[str], lr: float, xcol: str, ycol: str,
               nb: int) -> None:
    for arm in arms:
        r = _arm_runs(rt, arm, lr)
        if r.empty or xcol not in r or ycol not in r:
            continue
        st = _arm_style(arm)
        ax.scatter(r[xcol], r[ycol], s=12, alpha=0.45, color=st["color"], lw=0)
        xe, xl, xh = bootstrap_ci(r[xcol].to_numpy(np.float64), n_boot=nb)
        ye, yl, yh = bootstrap_ci(r[ycol].to_numpy(np.float64), n_boot=nb)
        if not (np.isfinite(xe) and np.isfinite(ye)):
            continue
        xerr = [[max(xe - xl, 0)], [max(xh - xe, 0)]] if np.isfinite(xl) else None
        yerr = [[max(ye - yl, 0)], [max(yh - ye, 0)]] if np.isfinite(yl) else None
        reached = f"reached_{ycol.removeprefix('steps_to_')}"
        cens = int((~r[reached].astype(bool)).sum()) if reached in r else 0
        ax.errorbar([xe], [ye], xerr=xerr, yerr=yerr, fmt="o", ms=6, color=st["color"],
                    mfc="white" if cens else st["color"], capsize=3,
                    label=arm + (f" ({cens}/{len(r)} censored: a lower bound)" if cens else ""))


def _curves(ax: Any, df: pd.DataFrame, arms: list[tuple[str, float]]) -> None:
    c = df[df["quantity"] == "loss_curve"]
    for arm, lr in arms:
        g = c[(c["arm"] == arm) & np.isclose(c["lr"], lr)]
        if g.empty:
            continue
        m = g.groupby("step")["value"].agg(["mean", "min", "max"])
        st = _arm_style(arm)
        ax.plot(m.index, m["mean"], lw=1.4, label=f"{arm} (lr {lr:g})", **st)
        ax.fill_between(m.index, m["min"], m["max"], color=st["color"], alpha=0.1, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training CE (fixed subset); band: min-max over seeds")


def _layer_traj(ax: Any, df: pd.DataFrame, arms: list[str], lr: float, quantity: str) -> None:
    from matplotlib import colormaps

    t = df[(df["quantity"] == quantity) & (df["stat"] == "median")
           & ~df["layer"].isin(["all", "act_fed"]) & np.isclose(df["lr"], lr)
           & df["arm"].isin(arms)]
    layers = sorted(t["layer"].unique(), key=_layer_key)
    cmap = colormaps["viridis"]
    for i, arm in enumerate(arms):
        for j, layer in enumerate(layers):
            g = t[(t["arm"] == arm) & (t["layer"] == layer)]
            if g.empty:
                continue
            m = g.groupby("step")["value"].median()
            ax.plot(m.index, m.to_numpy(), color=cmap(j / max(1, len(layers) - 1)),
                    ls=["-", "--", ":", "-."][i % 4], lw=1.1)
    ax.set_xscale("log")
    handles = [Line2D([], [], color=cmap(j / max(1, len(layers) - 1)), label=layer)
               for j, layer in enumerate(layers)][:: max(1, len(layers) // 5)]
    handles += [Line2D([], [], color="0.3", ls=["-", "--", ":", "-."][i % 4], label=a)
                for i, a in enumerate(arms)]
    ax.legend(handles=handles, fontsize="x-small", ncol=2)
    ax.set_xlabel("optimizer step")


def plot(df: pd.DataFrame, settings: Settings) -> Figure:
    o = settings.options
    lr = _main_lr(settings)
    nb = min(2000, int(o["n_boot"]))
    rt = run_table(df, settings)
    rt = rt.assign(shift=[shift_of(a) if "/" not in a else None for a in rt["arm"]])
    thr = [float(t) for t in o["thresholds"]]
    main = f"steps_to_{thr[1] if len(thr) > 1 else thr[0]:g}"
    fig = Figure(figsize=(19, 15), layout="constrained")
    axes = fig.subplots(3, 3)
    dose = sorted({a for a in rt["arm"] if shift_of(a) is not None and "/" not in a},
                  key=lambda a: shift_of(a) or 0.0)
    sgd_arms = list(dict.fromkeys(rt.loc[(rt["optimizer"] == "sgd") & np.isclose(rt["lr"], lr),
                                         "arm"]))

    # (a, b) dose-response
    for ax, xcol, xl in ((axes[0, 0], "mean_scale_q_damped",
                          "mean_scale_q (relatively damped), act_fed, epoch-1 median"),
                         (axes[0, 1], "cos_ng_uncorrected",
                          "cos(NG, NG without bias correction), act_fed, epoch-1 median")):
        _ci_points(ax, rt, dose, lr, xcol, main, nb)
        ax.set_xlabel(xl)
        ax.set_ylabel(f"steps to training CE < {main.removeprefix('steps_to_')}")
        if xcol == "mean_scale_q_damped":
            ax.set_xscale("log")
        if ax.has_data():
            ax.legend(fontsize="small", title="arm (mean, 95% CI over seeds)")
    axes[0, 0].set_title("a  dose-response: shifted ELU f(x) = ELU(x) + c", loc="left")
    axes[0, 1].set_title("b  dose-response vs the bias-correction turn", loc="left")

    # (c) steps to each threshold per SGD arm
    ax = axes[0, 2]
    for k, t in enumerate(thr):
        col = f"steps_to_{t:g}"
        for i, arm in enumerate(sgd_arms):
            r = _arm_runs(rt, arm, lr)
            if r.empty or col not in r:
                continue
            est, lo, hi = bootstrap_ci(r[col].to_numpy(np.float64), n_boot=nb)
            cens = int((~r[f"reached_{t:g}"].astype(bool)).sum())
            y = i + (k - 1) * 0.25
            st = _arm_style(arm)
            ax.errorbar([est], [y], xerr=[[max(est - lo, 0)], [max(hi - est, 0)]]
                        if np.isfinite(lo) else None, fmt=["o", "s", "^", "D"][k % 4],
                        color=st["color"], mfc="white" if cens else st["color"], ms=5,
                        capsize=2)
    ax.set_yticks(range(len(sgd_arms)), sgd_arms)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("steps to training CE below threshold (mean, 95% CI over seeds)")
    ax.legend(handles=[Line2D([], [], color="0.3", ls="none", marker=["o", "s", "^", "D"][k % 4],
                              label=f"CE < {t:g}") for k, t in enumerate(thr)]
              + [Line2D([], [], color="0.3", ls="none", marker="o", mfc="white",
                        label="some runs censored")], fontsize="small")
    ax.set_title(f"c  learning speed of the SGD arms (lr {lr:g})", loc="left")

    # (d, e) per-layer trajectories for the extreme doses
    ends = [a for a in (dose[0], "elu", dose[-1]) if a in dose] if dose else []
    ends = list(dict.fromkeys(ends))
    for ax, q, lab in ((axes[1, 0], "mean_scale_q_damped", "mean_scale_q (damped), layer median"),
                       (axes[1, 1], "cos_ng_uncorrected", "cos_ng_uncorrected, layer median")):
        _layer_traj(ax, df, ends, lr, q)
        ax.set_ylabel(lab + " (median over seeds)")
        if q == "mean_scale_q_damped":
            ax.set_yscale("log")
    axes[1, 0].set_title("d  per-layer trajectories (colour: layer; style: arm)", loc="left")
    axes[1, 1].set_title("e  per-layer trajectories of the bias-correction turn", loc="left")

    # (f) centring and the paper's units: loss curves
    ax = axes[1, 2]
    _curves(ax, df, [(a, lr) for a in ("elu", "relu", "crelu", "lrelu", "srelu", "relu/bn",
                                       "elu/bn", "relu/ci", "elu/ci") if a in sgd_arms])
    ax.legend(fontsize="x-small", ncol=2)
    ax.set_title("f  centred ReLU, the paper's units, BN, centred inputs", loc="left")

    # (g) SGD vs UNG loss curves, (h) steps to matched losses
    slr, ulr = float(o["ng_sgd_lr"]), float(o["ung_lr"])
    ng = [a for a in o["ng_arms"] if (rt["arm"] == f"{a}/ung").any()]
    _curves(axes[2, 0], df, [(a, slr) for a in ng] + [(f"{a}/ung", ulr) for a in ng])
    axes[2, 0].legend(fontsize="x-small")
    axes[2, 0].set_title("g  SGD (solid) vs unit natural gradient (dashed)", loc="left")
    ax = axes[2, 1]
    for k, t in enumerate(NG_LEVELS):
        col = f"steps_to_{t:g}"
        for i, a in enumerate(ng):
            for j, (arm, alr) in enumerate(((a, slr), (f"{a}/ung", ulr))):
                r = _arm_runs(rt, arm, alr)
                if r.empty or col not in r:
                    continue
                est, lo, hi = bootstrap_ci(r[col].to_numpy(np.float64), n_boot=nb)
                cens = int((~r[f"reached_{t:g}"].astype(bool)).sum())
                x = k + (i - (len(ng) - 1) / 2) * 0.12 + (j - 0.5) * 0.05
                ax.errorbar([x], [est], yerr=[[max(est - lo, 0)], [max(hi - est, 0)]]
                            if np.isfinite(lo) else None, fmt="os"[j], color=arm_color(a),
                            mfc="white" if cens else arm_color(a), ms=5, capsize=2)
    ax.set_xticks(range(len(NG_LEVELS)), [f"CE < {t:g}" for t in NG_LEVELS])
    ax.set_yscale("log")
    ax.set_ylabel("steps to the matched training loss (mean, 95% CI)")
    ax.legend(handles=[Line2D([], [], color=arm_color(a), ls="none", marker="o", label=a)
                       for a in ng]
              + [Line2D([], [], color="0.3", ls="none", marker="o", label=f"SGD lr {slr:g}"),
                 Line2D([], [], color="0.3", ls="none", marker="s", label=f"UNG lr {ulr:g}")],
              fontsize="small")
    ax.set_title("h  matched loss: SGD (o) vs UNG (s); hollow: some censored", loc="left")

    # (i) pooled within-layer-and-phase correlations
    ax = axes[2, 2]
    corr = _correlations(df, rt, settings)
    names = [k for k in corr if "~" in k]
    for i, k in enumerate(names):
        c = corr[k]
        if c.get("rho") is None:
            continue
        lo, hi = c.get("low"), c.get("high")
        ax.errorbar([c["rho"]], [i], xerr=[[c["rho"] - lo], [hi - c["rho"]]]
                    if lo is not None and hi is not None else None, fmt="o", color="0.2",
                    capsize=3)
        ax.text(1.02, i, f"{c['n_groups']} groups", va="center", fontsize="x-small",
                transform=ax.get_yaxis_transform())
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_yticks(range(len(names)), [k.replace("~", " ~\n") for k in names],
                  fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlabel("Spearman ρ within layer x phase, Fisher-z pooled (95% CI over seeds)")
    ax.set_title("i  within-layer-and-phase correlations (SGD arms)", loc="left")

    ung_ep = int(o["ung_epochs"]) or settings.epochs
    fig.suptitle(figure_title(
        f"Bias-shift mechanism: {settings.model.get('depth')}x{settings.model.get('width')} "
        f"MLP, SGD lr {lr:g}; NG arm: SGD lr {slr:g} vs UNG lr {ulr:g} ({ung_ep} epochs); "
        f"probe {o['track_probe']}, exact Fisher, relative damping {o['damping']:g}",
        settings, runs=f"{len(rt)} runs"))
    return fig
