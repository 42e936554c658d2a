"""Import an ``analyses/`` script as a module (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def load_analysis(name: str) -> ModuleType:
    """``analyses/<name>.py``, executed as a fresh module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, ANALYSES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
