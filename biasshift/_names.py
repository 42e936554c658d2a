"""Resolving user-given names against a model, with helpful errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from torch import nn


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
        hint = "no close match."
    shown = ", ".join(repr(k) for k in known[:30]) + (" ..." if len(known) > 30 else "")
    return KeyError(f"unknown {kind} {name!r}; {hint} Known {plural(kind)}: {shown or '(none)'}")


def plural(noun: str) -> str:
    """The plural of the last word of ``noun``: analysis -> analyses, class -> classes,
    module -> modules, analysis option -> analysis options."""
    if noun.endswith("sis"):
        return noun[:-3] + "ses"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def select_modules(
    model: nn.Module,
    spec: object,
    *,
    kind: str,
    default: Callable[[str, nn.Module], bool],
    pool: Callable[[str, nn.Module], bool],
    listing: Callable[[], str],
) -> list[str]:
    """Resolve a module selection to qualified names in ``model.named_modules()`` order.

    ``spec`` is ``None`` (the modules for which ``default`` holds), a predicate
    ``(name, module) -> bool`` (applied to the modules for which ``pool`` holds), or an iterable
    of qualified names and/or module objects.  An empty result is returned as such; the caller
    words that error.  ``kind`` ("module", "layer") and ``listing()`` (what the model offers)
    go into the error messages.

    Raises:
        KeyError: an unknown name (with close names).
        ValueError: a module object that is not part of ``model``.
        TypeError: a single name or module instead of an iterable, or items of another type.
    """
    named = {n: m for n, m in model.named_modules() if n}
    if spec is None:
        return [n for n, m in named.items() if default(n, m)]
    if callable(spec) and not isinstance(spec, nn.Module):
        return [n for n, m in named.items() if pool(n, m) and spec(n, m)]
    if isinstance(spec, (str, nn.Module)) or not isinstance(spec, Iterable):
        raise TypeError(
            f"{kind}s must be None, an iterable of names or modules, or a predicate "
            f"(name, module) -> bool; got a single {type(spec).__name__}: wrap it in a list"
        )
    by_id = {id(m): n for n, m in named.items()}
    wanted: set[str] = set()
    for item in spec:
        if isinstance(item, str):
            if item not in named and item.startswith("module.") and item[7:] in named:
                item = item[7:]  # a DDP/DataParallel name, given for the wrapped module
            if item not in named:
                raise unknown_name_error(kind, item, list(named))
            wanted.add(item)
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(
                    f"{kind} {type(item).__name__} is not part of the model; {listing()}"
                )
            wanted.add(by_id[id(item)])
        else:
            raise TypeError(
                f"{kind}s must hold names (str) or nn.Module objects, got {type(item).__name__}"
            )
    return [n for n in named if n in wanted]
