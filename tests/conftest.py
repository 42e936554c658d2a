"""Shared fixtures: devices to test on and the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]

# `pytest -n 2` on 2 cores: each test process counts as one core, so analyses started with the
# default --jobs/--threads run one process with one thread (tests of parallel runs pass --jobs)
os.environ.setdefault("BIASSHIFT_CPUS", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> None:
    """One intra-op thread per test process: `pytest -n 2` on 2 cores must not oversubscribe.

    (Oversubscribed OpenMP on a loaded 2-core machine made some tests 50x slower, and this torch
    build's batched float64 ``linalg.solve`` hits an MKL error with several threads.)
    """
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords or "[cuda" in item.nodeid:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each test that takes ``device`` runs on the CPU and, when present, on CUDA."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)


def data_root() -> Path | None:
    """``$BIASSHIFT_DATA`` or ``../shared/data`` beside the repository, when it exists."""
    env = os.environ.get("BIASSHIFT_DATA")
    for cand in ([Path(env)] if env else []) + [_REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture
def real_data_root() -> Path:
    """The folder holding ``mnist/`` and ``fashion-mnist/``; skips the test when absent."""
    root = data_root()
    if root is None or not (root / "mnist").is_dir():
        pytest.skip("real MNIST data not found: set BIASSHIFT_DATA to a folder with mnist/ "
                    "(CI uses ../shared/data)")
    return root
