"""Optional-dependency and version checks, in one place."""

from __future__ import annotations

import importlib.metadata
import os

from lightning_zero._compat.versions import SUPPORTED, check_versions

__all__ = ["MIN_DEEPSPEED", "require_deepspeed", "use_cpu_accelerator"]

MIN_DEEPSPEED = SUPPORTED["deepspeed"][0]


def require_deepspeed() -> str:
    """Return the installed DeepSpeed version; raise with an install hint when it is missing, or when it (or torch,
    Lightning, torchmetrics) is outside the proven range (``_compat/versions.py``)."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"ZeroStrategy needs DeepSpeed >= {MIN_DEEPSPEED}. Install it with `pip install 'deepspeed>={MIN_DEEPSPEED}'`."
        ) from None
    check_versions()
    return version


def use_cpu_accelerator() -> None:
    """Make DeepSpeed run on CPU (gloo) in this process, unless the user chose an accelerator already.

    Must run before DeepSpeed resolves its accelerator (its first `get_accelerator()` call).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lightning_zero._compat.deepspeed import accelerator_chosen

    chosen = accelerator_chosen()
    if chosen is not None and chosen != "cpu":
        raise RuntimeError(
            f"Lightning runs on CPU but DeepSpeed already chose the {chosen!r} accelerator in this"
            " process. Set DS_ACCELERATOR=cpu before importing DeepSpeed, or use Trainer(accelerator='gpu')."
        )
