"""ActivationMonitor's contract: hooks in and out, bad input, history, checkpoints, no host sync,
torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _monitor_reference import assert_frame_matches, collect_outputs
from torch import nn

import biasshift
from biasshift import ActivationMonitor
from biasshift.activations import ELU
from biasshift.models import paper_mlp
from biasshift.monitor import STAT_COLUMNS, HistogramSpec

COLUMNS = ["module", "unit", *STAT_COLUMNS]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return paper_mlp("elu", depth=3, width=8, in_features=6)


def _hook_table(model: nn.Module) -> dict[str, tuple]:
    return {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks),
            dict(m._forward_hooks_with_kwargs), dict(m._forward_hooks_always_called),
            dict(m._backward_hooks))
        for n, m in model.named_modules()
    }


def _global_hooks() -> tuple:
    mod = torch.nn.modules.module
    return (dict(mod._global_forward_hooks), dict(mod._global_forward_pre_hooks))


def test_public_import_and_exports() -> None:
    assert biasshift.ActivationMonitor is ActivationMonitor
    from biasshift.monitor import ActivationMonitor as again

    assert again is ActivationMonitor


# -- hooks ----------------------------------------------------------------------------------------
def test_hooks_removed_on_exit_with_user_hooks_present() -> None:
    model = _mlp()
    seen: list[int] = []
    user = model.act1.register_forward_hook(lambda m, i, o: seen.append(1))
    pre = model.act2.register_forward_pre_hook(lambda m, i: None)
    before, glob = _hook_table(model), _global_hooks()
    monitor = ActivationMonitor(model)
    with monitor as entered:
        assert entered is monitor and monitor.active
        assert len(model.act1._forward_hooks) == 2
        model(torch.randn(4, 6))
    assert not monitor.active
    assert _hook_table(model) == before and _global_hooks() == glob
    assert seen == [1]
    model(torch.randn(4, 6))
    assert monitor.stats()["count"].max() == 4  # detached: the second forward is not counted
    user.remove()
    pre.remove()


def test_hooks_removed_when_the_body_raises() -> None:
    model = _mlp()
    model.act3.register_forward_hook(lambda m, i, o: None)
    before = _hook_table(model)
    monitor = ActivationMonitor(model)
    with pytest.raises(ZeroDivisionError), monitor:
        model(torch.randn(2, 6))
        1 / 0
    assert _hook_table(model) == before
    # ... and when the error comes from the monitor's own hook
    bad = ActivationMonitor(model, unit_dim=5)
    with pytest.raises(ValueError), bad:
        model(torch.randn(2, 6))
    assert _hook_table(model) == before


def test_entering_twice_is_an_error_and_cleans_up() -> None:
    model = _mlp()
    before = _hook_table(model)
    monitor = ActivationMonitor(model)
    with monitor:
        with pytest.raises(RuntimeError, match="already attached"), monitor:
            pass  # pragma: no cover
        model(torch.randn(3, 6))  # still monitored once
    assert _hook_table(model) == before
    assert (monitor.stats()["count"] == 3).all()
    with monitor:  # re-entering after exit continues the statistics
        model(torch.randn(2, 6))
    assert (monitor.stats()["count"] == 5).all()


def test_attach_detach_without_with() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model).attach()
    model(torch.randn(3, 6))
    monitor.detach()
    monitor.detach()  # idempotent
    assert (monitor.stats()["count"] == 3).all()
    assert "act1" in repr(monitor) and "detached" in repr(monitor)


# -- selection and bad input -----------------------------------------------------------------------
def test_no_module_matched_lists_monitorable_modules() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"0 \(Linear\)"):
        ActivationMonitor(model)
    with pytest.raises(ValueError, match="predicate matched no module"):
        ActivationMonitor(_mlp(), modules=lambda n, m: False)
    with pytest.raises(ValueError, match="act1 \\(ELU\\)"):
        ActivationMonitor(_mlp(), modules=[])


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(KeyError, match="act1"):
        ActivationMonitor(_mlp(), modules=["act11"])
    with pytest.raises(KeyError, match="act2"):
        ActivationMonitor(_mlp(), unit_dim={"actt2": 1})


def test_module_selection_kinds() -> None:
    model = _mlp()
    assert ActivationMonitor(model, modules=["act2", "fc1"]).modules == ["fc1", "act2"]
    assert ActivationMonitor(model, modules=[model.act3]).modules == ["act3"]
    assert ActivationMonitor(model, modules=lambda n, m: n.startswith("fc")).modules == [
        "fc1", "fc2", "fc3"]
    with pytest.raises(ValueError, match="not part of the model"):
        ActivationMonitor(model, modules=[nn.ReLU()])


@pytest.mark.parametrize("unit_dim", [5, 0, -3])
def test_unit_dim_out_of_range_names_module_and_shape(unit_dim: int) -> None:
    monitor = ActivationMonitor(_mlp(), unit_dim=unit_dim)
    with monitor, pytest.raises(ValueError, match=r"act1.*\(4, 8\)"):
        monitor.model(torch.randn(4, 6))


def test_unit_dim_override_per_module() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    x = torch.randn(3, 5, 4)
    monitor = ActivationMonitor(model, unit_dim={"1": 1})  # time steps as units, on purpose
    with monitor:
        out = collect_outputs(model, {"1": 1}, lambda: model(x))
    assert_frame_matches(monitor.stats(), out, rtol=2e-6)
    assert len(monitor.stats()) == 5


def test_unit_count_change_is_an_error_naming_shapes() -> None:
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 5), act)
    monitor = ActivationMonitor(model)
    assert monitor.modules == ["1"]
    with monitor, pytest.raises(ValueError, match=r"'1'.*\(2, 5\).*\(2, 4\)"):
        model(torch.randn(2, 3))


class _TupleAct(nn.Module):
    biasshift_activation = True

    def forward(self, x: torch.Tensor):
        return x, x


class _IntAct(nn.Module):
    biasshift_activation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).long()


@pytest.mark.parametrize("act, match", [(_TupleAct(), "returned tuple"), (_IntAct(), "int64")])
def test_non_float_tensor_outputs_are_rejected(act: nn.Module, match: str) -> None:
    model = nn.Sequential(nn.Linear(2, 3), act)
    with ActivationMonitor(model), pytest.raises(TypeError, match=match):
        model(torch.randn(2, 2))


def test_output_without_unit_dim_is_rejected() -> None:
    model = nn.Sequential(nn.Flatten(0), nn.ReLU())
    with ActivationMonitor(model), pytest.raises(ValueError, match=r"'1'.*1 dimension"):
        model(torch.randn(2, 3))


@pytest.mark.parametrize("kw, err", [
    (dict(compute_dtype=torch.float16), ValueError), (dict(buffer_bytes=-1), ValueError),
    (dict(histogram=3), TypeError), (dict(histogram=dict(bins=0)), ValueError),
])
def test_bad_options(kw: dict, err: type[Exception]) -> None:
    with pytest.raises(err):
        ActivationMonitor(_mlp(), **kw)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ActivationMonitor(lambda x: x)  # type: ignore[arg-type]


# -- results ---------------------------------------------------------------------------------------
def test_stats_before_any_forward_is_empty_with_columns() -> None:
    df = ActivationMonitor(_mlp()).stats()
    assert df.empty and list(df.columns) == COLUMNS
    assert df["count"].dtype == np.int64 and df["mean"].dtype == np.float64


def test_stats_columns_types_and_population_variance() -> None:
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    x = torch.tensor([[1.0, -1.0], [3.0, 0.0], [5.0, 2.0], [7.0, math.nan]])
    monitor = ActivationMonitor(model, modules=["1"])
    with monitor:
        model(x)
    df = monitor.stats()
    assert list(df.columns) == COLUMNS
    assert df["count"].tolist() == [4, 3] and df["nonfinite"].tolist() == [0, 1]
    assert df["var"].tolist() == [5.0, pytest.approx(8 / 9)]  # M2 / count, not M2 / (count - 1)
    assert df["std"].tolist() == [math.sqrt(5.0), pytest.approx(math.sqrt(8 / 9))]
    assert df["frac_zero"].tolist() == [0.0, 2 / 3]
    assert df["frac_negative"].tolist() == [0.0, 0.0]
    assert df.dtypes["count"] == np.int64 and df.dtypes["nonfinite"] == np.int64


def test_modules_never_called_have_no_rows() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model)
    with monitor:
        model[:4](torch.randn(3, 6))  # flatten, fc1, act1, fc2: only act1 runs
    assert monitor.stats()["module"].unique().tolist() == ["act1"]


def test_histograms_through_the_monitor() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model, histogram=dict(bins=16, range=(-2.0, 6.0)),
                                buffer_bytes=512)
    with monitor:
        outs = collect_outputs(model, {"act1": 1, "act2": 1, "act3": 1},
                               lambda: [model(torch.randn(20, 6)) for _ in range(5)])
    h = monitor.histograms()
    assert list(h.columns) == ["module", "unit", "bin", "bin_left", "bin_right", "count"]
    spec = HistogramSpec(16, (-2.0, 6.0))
    edges = spec.edges()
    for name, v in outs.items():
        for u in range(v.shape[1]):
            hist, _ = np.histogram(v[:, u], bins=edges)
            got = h[(h.module == name) & (h.unit == u)].sort_values("bin")["count"].to_numpy()
            assert got[0] == (v[:, u] < -2).sum() and got[-1] == (v[:, u] >= 6).sum()
            np.testing.assert_array_equal(got[1:-1], hist)
    agg = monitor.histograms(aggregate=True)
    assert agg.groupby("module")["count"].sum().tolist() == [100 * 8] * 3
    with pytest.raises(RuntimeError, match="histogram="):
        ActivationMonitor(model).histograms()


# -- history ---------------------------------------------------------------------------------------
def test_snapshot_history_tidy_format() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model, histogram=dict(bins=4, range=(-1.0, 1.0)))
    assert list(monitor.history().columns) == COLUMNS
    with monitor:
        for epoch in range(3):
            for _ in range(2):
                model(torch.randn(5, 6))
            monitor.snapshot(epoch=epoch, step=torch.tensor((epoch + 1) * 2), phase="train")
            if epoch == 1:
                expected_mid = monitor.stats()
    monitor.snapshot(note="final")
    hist = monitor.history()
    assert list(hist.columns) == ["epoch", "step", "phase", "note", *COLUMNS]
    assert len(hist) == 4 * 3 * 8
    assert hist["step"].dropna().unique().tolist() == [2, 4, 6]
    mid = hist[hist.epoch == 1].drop(columns=["epoch", "step", "phase", "note"])
    pd.testing.assert_frame_equal(mid.reset_index(drop=True), expected_mid, check_exact=True)
    assert (hist.groupby("epoch", dropna=False)["count"].max().tolist() == [10, 20, 30, 30])
    hh = monitor.histogram_history(aggregate=True)
    assert list(hh.columns) == ["epoch", "step", "phase", "note", "module", "bin", "bin_left",
                                "bin_right", "count"]
    assert hh[hh.epoch == 0].groupby("module")["count"].sum().tolist() == [80, 80, 80]
    monitor.reset()
    assert monitor.stats().empty and len(monitor.history()) == len(hist)
    monitor.reset(history=True)
    assert monitor.history().empty


@pytest.mark.parametrize("tags, err", [
    (dict(mean=1), ValueError), (dict(module="x"), ValueError), (dict(epoch=[1]), TypeError),
    (dict(epoch=torch.ones(2)), TypeError),
])
def test_snapshot_tag_validation(tags: dict, err: type[Exception]) -> None:
    with pytest.raises(err):
        ActivationMonitor(_mlp()).snapshot(**tags)


def test_snapshot_is_a_copy() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model, buffer_bytes=0)
    with monitor:
        model(torch.randn(3, 6))
        monitor.snapshot(i=0)
        model(torch.randn(3, 6))
    assert (monitor.history()["count"] == 3).all()


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("buffer_bytes", [0, 2048, 4 << 20])
def test_state_dict_resume_is_bit_identical(buffer_bytes: int, tmp_path) -> None:
    torch.manual_seed(11)
    batches = [torch.randn(13, 6) * 2 for _ in range(12)]
    kw = dict(histogram=dict(bins=8, range=(-2.0, 6.0)), buffer_bytes=buffer_bytes)

    model = _mlp()
    full = ActivationMonitor(model, **kw)
    with full:
        for i, x in enumerate(batches):
            model(x)
            if i % 4 == 3:
                full.snapshot(step=i, loss=torch.tensor(0.5 * i))

    model = _mlp()
    first = ActivationMonitor(model, **kw)
    with first:
        for i, x in enumerate(batches[:6]):
            model(x)
            if i % 4 == 3:
                first.snapshot(step=np.int64(i), loss=torch.tensor(0.5 * i))
    torch.save(first.state_dict(), tmp_path / "monitor.pt")

    model = _mlp()
    resumed = ActivationMonitor(model, **kw)
    resumed.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    with resumed:
        for i, x in enumerate(batches[6:], start=6):
            model(x)
            if i % 4 == 3:
                resumed.snapshot(step=i, loss=0.5 * i)
    pd.testing.assert_frame_equal(resumed.stats(), full.stats(), check_exact=True)
    pd.testing.assert_frame_equal(resumed.history(), full.history(), check_exact=True)
    pd.testing.assert_frame_equal(resumed.histograms(), full.histograms(), check_exact=True)


def test_state_dict_is_a_copy_and_load_replaces() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model)
    with monitor:
        model(torch.randn(3, 6))
        sd = monitor.state_dict()
        model(torch.randn(3, 6))
    assert (monitor.stats()["count"] == 6).all()
    monitor.load_state_dict(sd)
    assert (monitor.stats()["count"] == 3).all()


def test_load_state_dict_errors() -> None:
    model = _mlp()
    monitor = ActivationMonitor(model)
    with monitor:
        model(torch.randn(3, 6))
    sd = monitor.state_dict()
    with pytest.raises(ValueError, match="not an ActivationMonitor"):
        monitor.load_state_dict({"modules": {}})
    with pytest.raises(ValueError, match="version"):
        monitor.load_state_dict({**sd, "version": 99})
    with pytest.raises(ValueError, match="histogram"):
        ActivationMonitor(model, histogram=True).load_state_dict(sd)
    with pytest.raises(KeyError, match="act1"):
        ActivationMonitor(model, modules=["act2", "act3"]).load_state_dict(sd)


# -- no host synchronisation -----------------------------------------------------------------------
@pytest.mark.parametrize("finite_first", [False, True])
@pytest.mark.parametrize("buffer_bytes", [0, 1024, 1 << 20])
def test_hooks_never_read_tensor_values_on_the_host(buffer_bytes: int, finite_first: bool,
                                                    monkeypatch) -> None:
    """Inside forward passes (flushes included) no tensor value reaches Python, except, with
    finite-first reductions (the CPU's default), exactly one ``tolist`` of the tiles' finiteness
    per reduction; a hook that only stages a batch reads nothing."""
    from biasshift.monitor import running

    monkeypatch.setattr(running, "FINITE_FIRST_DEVICES",
                        frozenset({"cpu"}) if finite_first else frozenset())
    model = nn.Sequential(nn.Conv2d(2, 3, 3), ELU(), nn.Flatten(), nn.Linear(3 * 16, 4), ELU())
    monitor = ActivationMonitor(model, histogram=True, buffer_bytes=buffer_bytes)
    xs = [torch.randn(5, 2, 6, 6) for _ in range(4)]
    with monitor:
        model(xs[0])  # first call allocates; then forbid every value transfer
        calls: list[str] = []
        reductions: list[int] = []

        def forbid(name: str):
            def f(*a, **k):
                calls.append(name)
                raise AssertionError(f"host sync via Tensor.{name}")

            return f

        reduce, real = running._reduce_fused, torch.Tensor.tolist

        def counted(*a, **k):
            reductions.append(1)
            with monkeypatch.context() as allowed:
                if a[-1]:  # finite_first: its one read is allowed, and counted
                    def tolist(t):
                        calls.append("tolist")
                        return real(t)

                    allowed.setattr(torch.Tensor, "tolist", tolist)
                return reduce(*a, **k)

        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                         "__index__"):
                mp.setattr(torch.Tensor, name, forbid(name))
            mp.setattr(running, "_reduce_fused", counted)
            for x in xs[1:]:
                model(x)
        if finite_first:
            assert calls == ["tolist"] * len(reductions)
        else:
            assert calls == []
        if buffer_bytes == 0:
            assert len(reductions) == 2 * 3  # both modules, every batch
        elif buffer_bytes == 1 << 20:
            assert reductions == []  # staged only
    assert (monitor.stats().groupby("module")["count"].max() == [4 * 5 * 16, 4 * 5]).all()


@pytest.mark.cuda
def test_no_synchronisation_on_cuda() -> None:
    model = paper_mlp("elu", depth=3, width=16, in_features=12).cuda()
    monitor = ActivationMonitor(model, histogram=True, buffer_bytes=4096)
    xs = [torch.randn(64, 12, device="cuda") for _ in range(20)]
    with monitor:
        model(xs[0])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in xs[1:]:
                model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert (monitor.stats()["count"] == 20 * 64).all()


@pytest.mark.cuda
def test_checkpoint_from_cpu_resumes_on_cuda() -> None:
    torch.manual_seed(12)
    batches = [torch.randn(8, 6) for _ in range(4)]
    model = _mlp()
    ref = ActivationMonitor(model)
    with ref:
        for x in batches:
            model(x)
    half = ActivationMonitor(model)
    with half:
        for x in batches[:2]:
            model(x)
    sd = half.state_dict()
    model = model.cuda()
    resumed = ActivationMonitor(model)
    resumed.load_state_dict(sd)
    with resumed:
        for x in batches[2:]:
            model(x.cuda())
    assert resumed._acc["act1"].device.type == "cuda"
    pd.testing.assert_frame_equal(resumed.stats(), ref.stats(), rtol=1e-5, atol=1e-6)


# -- torch.compile ---------------------------------------------------------------------------------
def _compile_case(backend: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(6, 8), ELU(), nn.Linear(8, 5), nn.ReLU())
    xs = [torch.randn(16, 6) for _ in range(4)]
    eager = ActivationMonitor(model)
    with eager:
        for x in xs:
            model(x)
    torch._dynamo.reset()
    compiled_monitor = ActivationMonitor(model)
    with compiled_monitor:  # hooks first, then compile
        compiled = torch.compile(model, backend=backend)
        for x in xs:
            compiled(x)
    torch._dynamo.reset()
    return eager.stats(), compiled_monitor.stats()


def test_torch_compile_with_monitor_matches_eager() -> None:
    pytest.importorskip("torch._dynamo")
    eager, compiled = _compile_case("aot_eager")  # dynamo + AOT autograd, no code generation
    pd.testing.assert_frame_equal(compiled, eager, check_exact=True)


def test_torch_compile_breaks_the_graph_at_each_monitored_module() -> None:
    """The eager hook skips ``torch.compiler.disable``'s wrapper; under dynamo it must still
    enter the disabled path, so that each monitored module ends a graph."""
    pytest.importorskip("torch._dynamo")
    model = nn.Sequential(nn.Linear(6, 8), ELU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3),
                          ELU())
    monitor = ActivationMonitor(model)
    assert len(monitor.modules) == 3
    with monitor:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(torch.randn(16, 6))
    torch._dynamo.reset()
    assert explained.graph_count == 3  # a graph up to each monitored module's hook
    assert (monitor.stats()["count"] == 16).all()


@pytest.mark.slow
def test_torch_compile_inductor_with_monitor() -> None:
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    eager, compiled = _compile_case("inductor")
    # inductor fuses Linear + ELU, so activations may differ from eager in the last bits
    pd.testing.assert_frame_equal(compiled, eager, rtol=1e-5)
