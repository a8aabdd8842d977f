"""``ZeroStrategy(compile=...)``: torch.compile of the models the engines train, chosen by the strategy.

Lightning refuses a ``torch.compile``-d LightningModule for strategies other than DDP and FSDP, and compiling the
LightningModule itself would not help anyway: Lightning reroutes ``training_step`` through the engine by patching
``forward`` with a new closure on every step, which would make dynamo recompile every step. So the strategy compiles
the networks instead, in place (``nn.Module.compile``): each engine's model, or, where an engine wraps the whole
LightningModule (or a group of submodules), each of its direct children that holds parameters. User code keeps
calling ``self.net(x)`` and gets the compiled version. Metrics and parameter-free children are left alone.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["compile_models", "explain_compiled_modules", "resolve_compile"]


def _compile_parameters() -> list[str]:
    return [p for p in inspect.signature(torch.compile).parameters if p != "model"]


def resolve_compile(value: Any) -> dict[str, Any] | None:
    """``compile=`` -> the keyword arguments for ``torch.compile``, or None when off. Raises on bad input."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str):
        if value.lower() in ("deepcompile", "deepspeed"):
            raise ValueError(
                f"ZeroStrategy(compile={value!r}): DeepSpeed's DeepCompile is not supported. It compiles the graph"
                " that DeepSpeedEngine.forward runs, while Lightning calls training_step through a per-step patched"
                " forward and multi-model modules call their submodules directly, so the engine never sees the"
                " graph it compiled. Use ZeroStrategy(compile=True) (torch.compile of your networks) instead."
            )
        raise ValueError(f"ZeroStrategy(compile={value!r}) is not supported. Use compile=True, or a dict of"
                         " torch.compile keyword arguments such as compile={'mode': 'max-autotune'}.")
    if not isinstance(value, Mapping):
        raise TypeError(f"ZeroStrategy(compile=...) must be True/False or a dict of torch.compile keyword arguments,"
                        f" got {type(value).__name__}: {value!r}")
    allowed = _compile_parameters()
    unknown = [k for k in value if k not in allowed]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"ZeroStrategy(compile={dict(value)!r}): unknown torch.compile argument(s) {', '.join(hints)}."
                         f" torch.compile accepts: {', '.join(allowed)}.")
    return dict(value)


def _targets(model: nn.Module, whole: bool) -> list[nn.Module]:
    """``model`` itself, or (``whole``) its children that hold parameters; containers without a forward of their own
    (``ModuleList``, ``ModuleDict``) are looked into, since their members are what user code calls."""
    if not whole and not isinstance(model, (nn.ModuleList, nn.ModuleDict)):
        return [model]
    from torchmetrics import Metric

    out: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, Metric) or not any(True for _ in child.parameters()):
            continue
        out.extend(_targets(child, whole=False))
    return out


def compile_models(models: Iterable[tuple[nn.Module, bool]], kwargs: Mapping[str, Any]) -> list[nn.Module]:
    """Compile each ``(model, whole)`` in place; ``whole`` means "compile its children" (a LightningModule or a group).

    Returns the modules compiled now (already compiled ones, e.g. on validate after fit, are skipped)."""
    done = []
    for model, whole in models:
        for target in _targets(model, whole):
            if getattr(target, "_compiled_call_impl", None) is not None:
                continue
            target.compile(**kwargs)
            done.append(target)
    return done


def explain_compiled_modules() -> None:
    """Make Lightning's refusal of a compiled LightningModule name ZeroStrategy's way to compile.

    ``Trainer.fit(torch.compile(model))`` is checked by Lightning (``_verify_strategy_supports_compile``) before
    anything is launched; for ZeroStrategy its message would only say to use DDP or FSDP. Wraps that check once.
    """
    from lightning.pytorch.trainer import trainer as trainer_module

    original = trainer_module._verify_strategy_supports_compile
    if getattr(original, "_lightning_zero", False):
        return

    def verify(model: Any, strategy: Any) -> None:
        from lightning_zero.strategy import ZeroStrategy

        if isinstance(strategy, ZeroStrategy) and getattr(model, "_compiler_ctx", None) is not None:
            raise ValueError("The model passed to the Trainer is compiled (torch.compile). Lightning accepts compiled"
                             " modules only for DDP and FSDP: pass the LightningModule itself and use"
                             " ZeroStrategy(compile=True), which compiles its networks.")
        original(model, strategy)

    verify._lightning_zero = True  # type: ignore[attr-defined]
    trainer_module._verify_strategy_supports_compile = verify
