"""analyses/bench_batched.py runs (tiny sizes) and, on CUDA, its captured step equals eager."""

from __future__ import annotations

import pytest
import torch
from _analyses import load_analysis


def _module():
    return load_analysis("bench_batched")


def test_bench_batched_cpu_tiny(tmp_path) -> None:
    mod = _module()
    res = mod.main(["--nets", "mlp", "--k", "1,2", "--steps", "2", "--repeat", "1",
                    "--out", str(tmp_path / "b.json")])
    rows = res["nets"]["mlp"]["rows"]
    assert set(rows) == {"single", "stacked_K1", "stacked_K2", "stacked_elu_K2", "vmap_K2"}
    assert all(r["ms"] > 0 and r["pct_peak"] > 0 for r in rows.values())
    assert (tmp_path / "b.json").exists()


def test_bench_batched_conv_tiny() -> None:
    mod = _module()
    res = mod.main(["--nets", "conv", "--k", "2", "--steps", "1", "--repeat", "1", "--no-vmap"])
    rows = res["nets"]["conv"]["rows"]
    assert set(rows) == {"single", "stacked_K2"}
    # 11 convolutions of the 1/8-width net on 28x28: about 0.25 GFLOP forward per 64 samples
    assert 0.3 < res["nets"]["conv"]["gflop_per_step"] < 3


def test_capture_needs_cuda() -> None:
    mod = _module()
    with pytest.raises(SystemExit):
        mod.main(["--capture", "graph"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("capture", ["graph", "compile"])
def test_captured_step_equals_eager_on_cuda(capture) -> None:
    mod = _module()
    res = mod.main(["--device", "cuda", "--nets", "mlp", "--k", "4", "--steps", "8",
                    "--repeat", "1", "--no-vmap", "--capture", capture])
    row = res["nets"]["mlp"]["rows"][f"{capture}_K4"]
    assert row["max_rel_diff"] < 1e-5
