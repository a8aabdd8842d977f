"""The versions of torch, DeepSpeed, Lightning and torchmetrics that ZeroStrategy is proven on, and the check.

The ranges below are the ones ``pyproject.toml`` declares (``tests/unit/test_compat.py`` keeps the two equal) and that
the test suite proves: ``make test`` runs the pinned versions of ``constraints.txt`` (the upper end), ``make
test-compat`` the lowest versions of ``constraints-lowest.txt``; ``docs/compatibility.md`` records every combination
that ran, with its outcome.

Why each lower bound (measured, see docs/compatibility.md):

* DeepSpeed 0.19.8. 0.19.4 added ``managed_gradient_accumulation``: ZeroStrategy lets Lightning own the
  accumulation boundary (each Lightning optimizer step is one DeepSpeed step) and turns DeepSpeed's own accumulation
  off with that key. Older releases ignore the key and accumulate a second time: with 0.19.3 the 2-process parity run
  ends 5.6e-2 to 7.8e-2 away from plain PyTorch instead of ~5e-8. 0.19.4 to 0.19.7 have the key, but at stage 3 the
  parity run ended at garbage weights (1e22 to 1e38) in about one run in three (0.19.4 with torch 2.11 and 2.13,
  0.19.7 with torch 2.13; CPU processes); 0.19.8 passed every run. Below 0.19.8 is therefore an error.
* Lightning 2.5.0 and torchmetrics 1.4.0: the lowest releases the suite ran on (``make test-compat``).
* torch 2.11: the GPU machine's torch, on which the GPU tier and the compat subset ran.

Upper bounds are the newest releases that ran. A newer release is refused too, because ZeroStrategy reaches into
DeepSpeed and Lightning internals that a release may change without notice (``lightning_zero/_compat``); set
``LIGHTNING_ZERO_ALLOW_UNTESTED=1`` to run anyway (a warning then names the untested versions).
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["ALLOW_UNTESTED_ENV", "SUPPORTED", "check_versions", "installed_version", "out_of_range", "requirement"]

ALLOW_UNTESTED_ENV = "LIGHTNING_ZERO_ALLOW_UNTESTED"

# distribution -> (lowest proven, first release not proven). Keep in step with pyproject.toml (a unit test checks).
SUPPORTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11.0", "2.15"),
    "deepspeed": ("0.19.8", "0.20"),
    "lightning": ("2.5.0", "2.7"),
    "torchmetrics": ("1.4.0", "1.10"),
}

# Lower bounds below which results are known to be wrong: never overridable.
_WHY_LOWER = {
    "deepspeed": "DeepSpeed below 0.19.4 has no `managed_gradient_accumulation` switch and accumulates gradients a"
                 " second time on top of Lightning's (the weights end ~5e-2 away from plain PyTorch), and 0.19.4-0.19.7"
                 " ended ZeRO-3 runs at garbage weights in about one run in three",
}


def specifier(name: str) -> SpecifierSet:
    low, high = SUPPORTED[name]
    return SpecifierSet(f">={low},<{high}")


def requirement(name: str) -> str:
    """``"lightning>=2.5.0,<2.7"``: the proven range as a pip requirement, for error messages."""
    low, high = SUPPORTED[name]
    return f"{name}>={low},<{high}"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> Version:
    """``2.13.0+cpu`` and ``2.15.0.dev20261101`` compare as their release (a local or dev build of a proven release
    is that release)."""
    return Version(Version(version).base_version)


def out_of_range(versions: dict[str, str | None] | None = None) -> tuple[list[str], list[str]]:
    """``(too_old, too_new)``: one line per installed distribution outside its proven range. Pure given ``versions``."""
    if versions is None:
        versions = {name: installed_version(name) for name in SUPPORTED}
    too_old, too_new = [], []
    for name, version in versions.items():
        if version is None or name not in SUPPORTED:
            continue
        low, high = SUPPORTED[name]
        if _release(version) < Version(low):
            why = _WHY_LOWER.get(name, "it is below the range the test suite proves")
            too_old.append(f"{name} {version} (needs >= {low}: {why}); upgrade with `pip install -U '{name}>={low}'`")
        elif _release(version) >= Version(high):
            too_new.append(f"{name} {version} (proven: >={low},<{high}); install a proven release with"
                           f" `pip install '{name}<{high}'`")
    return too_old, too_new


def check_versions(versions: dict[str, str | None] | None = None, *, allow_untested: bool | None = None) -> None:
    """Raise one ``ImportError`` listing every installed distribution outside its proven range.

    Versions that are too new are allowed with a warning when ``$LIGHTNING_ZERO_ALLOW_UNTESTED=1``; versions that are
    too old never are.
    """
    too_old, too_new = out_of_range(versions)
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_UNTESTED_ENV, "").strip().lower() in ("1", "true", "yes")
    if too_new and allow_untested and not too_old:
        warnings.warn("lightning_zero runs with versions it was not tested on (" + "; ".join(too_new) + "), because"
                      f" ${ALLOW_UNTESTED_ENV} is set. Results may be wrong; report problems with `lightning-zero"
                      " env`.", stacklevel=3)
        return
    if too_old or too_new:
        lines = "\n  - ".join(too_old + too_new)
        hint = "" if too_old else (f"\nTo run anyway on these untested versions, set {ALLOW_UNTESTED_ENV}=1 (a warning"
                                   " then remains).")
        raise ImportError(f"ZeroStrategy is proven on {_ranges()} only; installed:\n  - {lines}{hint}")


def _ranges() -> str:
    return ", ".join(f"{name} {specifier(name)}" for name in SUPPORTED)
