"""Resolving user-given names against a model, with helpful errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_name_error(kind: str, name: str, known: Iterable[str]) -> KeyError:
    """A :class:`KeyError` for an unknown ``name`` that lists the closest ``known`` names.

    >>> raise unknown_name_error("module", "fetures.3", ["features.3", "features.4"])
    Traceback (most recent call last):
    KeyError: "unknown module 'fetures.3'; did you mean 'features.3', 'features.4'? ..."
    """
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if close:
        hint = "did you mean " + ", ".join(repr(c) for c in close) + "?"
    else:
        hint = "no close match"
    shown = ", ".join(repr(k) for k in known[:30]) + (" ..." if len(known) > 30 else "")
    return KeyError(f"unknown {kind} {name!r}; {hint} Known {kind}s: {shown or '(none)'}")
