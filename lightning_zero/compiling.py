"""``ZeroStrategy(compile=...)``: torch.compile of the models the engines train, chosen by the strategy.

Lightning refuses a ``torch.compile``-d LightningModule for strategies other than DDP and FSDP, and compiling the
LightningModule itself would not help anyway: Lightning reroutes ``training_step`` through the engine by patching
``forward`` with a new closure on every step, which would make dynamo recompile every step. So the strategy compiles
the networks instead, in place (``nn.Module.compile``, or the ``forward`` of a torch.nn module, see
``_compile_in_place``): each engine's model, or, where an engine wraps the whole
LightningModule (or a group of submodules), each of its direct children that holds parameters. User code keeps
calling ``self.net(x)`` and gets the compiled version. Metrics and parameter-free children are left alone.

``ZeroStrategy(compile="deepcompile")`` (or ``"compile": {"deepcompile": true}`` in the DeepSpeed config) compiles the
same networks with DeepSpeed's DeepCompile backend instead, through ``DeepSpeedEngine.compile()``: the ZeRO
gathers, releases, reductions and prefetches become operations of the compiled graph rather than module hooks. The
engine keeps running each step's forward (Lightning's training_step goes through ``DeepSpeedEngine.forward``, which
advances DeepCompile's pass schedule), so DeepCompile needs one trained engine that wraps the whole LightningModule.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check_deepcompile", "check_deepcompile_runtime", "check_gradients_reduced_by_deepcompile", "compile_models",
           "deepcompile_engine", "evaluating_eagerly", "is_compiled", "refuse_compiled_lightning_module", "resolve_compile",
           "resume_deepcompile_schedule"]

DEEPCOMPILE_BACKENDS = ("inductor", "eager")  # the backends DeepSpeedEngine.compile accepts with DeepCompile


def _compile_parameters() -> list[str]:
    return [p for p in inspect.signature(torch.compile).parameters if p != "model"]


def resolve_compile(value: Any, config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any] | None, bool]:
    """``compile=`` (and the DeepSpeed config) -> ``(torch.compile keyword arguments or None when off, deepcompile)``.

    ``compile="deepcompile"``, or ``"compile": {"deepcompile": true}`` in the config, selects DeepCompile; a dict of
    ``torch.compile`` keyword arguments then still applies (e.g. ``backend="eager"``). Raises on bad input."""
    deepcompile = bool(((config or {}).get("compile") or {}).get("deepcompile", False))
    if isinstance(value, str) and value.lower() in ("deepcompile", "deepspeed"):
        return {}, True
    if value is None or value is False:
        return ({} if deepcompile else None), deepcompile
    if value is True:
        return {}, deepcompile
    if isinstance(value, str):
        raise ValueError(f"ZeroStrategy(compile={value!r}) is not supported. Use compile=True (torch.compile),"
                         " compile='deepcompile' (DeepSpeed's DeepCompile), or a dict of torch.compile keyword"
                         " arguments such as compile={'mode': 'max-autotune'}.")
    if not isinstance(value, Mapping):
        raise TypeError(f"ZeroStrategy(compile=...) must be True/False, 'deepcompile' or a dict of torch.compile"
                        f" keyword arguments, got {type(value).__name__}: {value!r}")
    allowed = _compile_parameters()
    unknown = [k for k in value if k not in allowed]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"ZeroStrategy(compile={dict(value)!r}): unknown torch.compile argument(s) {', '.join(hints)}."
                         f" torch.compile accepts: {', '.join(allowed)}.")
    return dict(value), deepcompile


def check_deepcompile(stage: int | None, kwargs: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """What DeepCompile cannot run, refused before any process starts (``stage`` None: decided later, "auto")."""
    if stage == 0:
        raise ValueError("ZeroStrategy(compile='deepcompile') needs ZeRO stage 1, 2 or 3 (stage is 0): DeepCompile"
                         " compiles ZeRO's partitioning into the graph. Use stage=1/2/3, or compile=True for"
                         " torch.compile.")
    backend = kwargs.get("backend", "inductor")
    if backend not in DEEPCOMPILE_BACKENDS:
        raise ValueError(f"ZeroStrategy(compile={dict(kwargs)!r}) with DeepCompile: backend {backend!r} is not"
                         f" supported; DeepCompile runs its passes on {' or '.join(map(repr, DEEPCOMPILE_BACKENDS))}.")
    if stage == 1 and int(config.get("gradient_accumulation_steps") or 1) > 1:
        raise ValueError(f"ZeroStrategy(stage=1, compile='deepcompile') with Trainer(accumulate_grad_batches="
                         f"{config['gradient_accumulation_steps']}): DeepSpeed's stage-1 DeepCompile aborts the"
                         " process when gradients are accumulated (measured with DeepSpeed 0.19.8 on an H100). Use"
                         " stage=2 or 3, accumulate_grad_batches=1, or compile=True (torch.compile).")
    zero = config.get("zero_optimization") or {}
    for section in ("offload_optimizer", "offload_param"):
        device = (zero.get(section) or {}).get("device")
        if device not in (None, "none"):
            raise ValueError(f"ZeroStrategy(compile='deepcompile') with ZeRO offload"
                             f" (zero_optimization.{section}.device is {device!r}) is not supported: that combination"
                             " is not verified on a GPU yet. Train without offload, use DeepCompile's own offload"
                             " passes (\"compile\": {\"offload_opt_states\": true} in the config, stage 3), or keep the"
                             " offload and use compile=True (torch.compile).")


def check_deepcompile_runtime(device: torch.device) -> None:
    """DeepCompile's native runtime is CUDA only (DeepSpeed's ``is_deepcompile_supported``)."""
    from deepspeed.compile.util import is_deepcompile_supported

    if device.type != "cuda" or not is_deepcompile_supported():
        raise ValueError(f"ZeroStrategy(compile='deepcompile') needs CUDA GPUs and torch >= 2.6: DeepSpeed's"
                         f" DeepCompile runtime is CUDA only, and this run's device is {str(device)!r}"
                         f" (torch {torch.__version__}). Use compile=True (torch.compile) here.")


def check_gradients_reduced_by_deepcompile(module: nn.Module) -> None:
    """After a backward under DeepCompile: no trainable parameter may hold a ``.grad``.

    DeepCompile reduces each gradient inside the compiled graph's backward and leaves ``.grad`` None; a parameter used
    where no compiled graph covers it (a network that ran eagerly, a graph break at that layer) gets a ``.grad`` that
    DeepCompile never reduces, and the step would use zeros (measured on an H100 at stages 1-2: the weights then
    differ from plain PyTorch by the learning rate after one step). Raise before that step."""
    eager = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is not None]
    if eager:
        listed = ", ".join(eager[:5]) + (f", ... ({len(eager)} in all)" if len(eager) > 5 else "")
        raise ValueError(
            f"ZeroStrategy(compile='deepcompile'): parameters got their gradients outside DeepCompile's compiled graphs"
            f" ({listed}), so DeepCompile would not reduce them and the optimizer step would not see them. The code"
            " that uses them ran eagerly: keep every parameter inside the networks ZeroStrategy compiles (the"
            " LightningModule's children), avoid graph breaks at those layers (torch._dynamo.explain), or use"
            " compile=True (torch.compile).")


def deepcompile_engine(engine: Any, module: nn.Module, kwargs: Mapping[str, Any]) -> list[nn.Module]:
    """``engine.compile()`` with DeepCompile, applied to ``module``'s networks rather than to ``module`` itself.

    ``DeepSpeedEngine.compile`` builds DeepCompile's backend (and hands the ZeRO hooks over to it), then calls
    ``self.module.compile(backend=...)``. ``module`` is the LightningModule, whose ``forward`` Lightning replaces on
    every step: compiled whole it would recompile each step. So that one call is redirected to its networks, as
    ``compile=True`` compiles them. Returns the modules compiled."""
    kwargs = dict(kwargs)
    backend = kwargs.pop("backend", "inductor")
    done: list[nn.Module] = []

    def compile_networks(**torch_kwargs: Any) -> None:
        done.extend(compile_models([(module, True)], torch_kwargs))

    from lightning_zero._compat.deepspeed import redirect_module_compile

    with redirect_module_compile(module, compile_networks):  # the engine calls self.module.compile(backend=...)
        engine.compile(backend=backend, compile_kwargs=kwargs)
    if not done:
        raise ValueError(f"ZeroStrategy(compile='deepcompile'): {type(module).__name__} has no child module with"
                         " parameters to compile. Keep the networks in submodules (self.net = ...).")
    return done


def resume_deepcompile_schedule(global_steps: int) -> None:
    """Shift DeepCompile's pass schedule to an engine resumed at ``global_steps``.

    DeepCompile keys its passes on absolute engine steps (DeepSpeed 0.19.8: step 0 installs the gather/reduce passes,
    stage 3 adds prefetching at step 5) and launches an entry only when ``global_steps`` equals its step. An engine
    restored from a checkpoint starts past step 0, so no pass set was ever launched and its first compile failed
    inside DeepSpeed ("'NoneType' object is not iterable", measured on an H100). Counting the schedule from the
    restored step gives the resumed run the same passes, and the same warm-up, as a fresh one. Call it after the
    checkpoint is loaded and before the first forward."""
    from lightning_zero._compat.deepspeed import shift_deepcompile_schedule

    shift_deepcompile_schedule(global_steps)


def evaluating_eagerly(deepcompile: bool) -> Any:
    """The context for an evaluation forward during a DeepCompile fit: the compiled networks run eagerly.

    A forward without gradients is a new graph for Dynamo; compiled through DeepCompile's backend during training, it
    left DeepCompile's reduce buckets inconsistent and the next backward aborted the process (DeepSpeed 0.19.8, H100,
    stages 2 and 3). Run eagerly, it reads the full weights at stages 1-2 and, at stage 3, the engine's forward gathers
    the weights it touches (DeepSpeed's ZeRO-3 eager fallback under DeepCompile); the compiled training graphs are
    left as they are."""
    import contextlib

    return torch.compiler.set_stance("force_eager") if deepcompile else contextlib.nullcontext()


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
            if is_compiled(target):
                continue
            _compile_in_place(target, kwargs)
            done.append(target)
    return done


def _compile_in_place(target: nn.Module, kwargs: Mapping[str, Any]) -> None:
    """``torch.compile`` of ``target``, in place (its parameters, hooks and state_dict keys stay as they are).

    ``nn.Module.compile()`` compiles ``_call_impl``. For a module whose ``forward`` is torch.nn's own (``Sequential``,
    ``Linear``, or a subclass that keeps it) dynamo then captures no graph (torch 2.11 and 2.13: the output's
    ``grad_fn`` stays ``AddmmBackward0``, not ``CompiledFunctionBackward``), so the module silently runs eagerly.
    Such a module gets its ``forward`` compiled instead, as an instance attribute, which does capture the graph."""
    if type(target).forward.__module__.startswith("torch.nn."):
        target.forward = torch.compile(target.forward, **kwargs)
    else:
        target.compile(**kwargs)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``compile_models`` compiled ``module`` (either way, see ``_compile_in_place``)."""
    return getattr(module, "_compiled_call_impl", None) is not None or \
        hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable")


def refuse_compiled_lightning_module(model: Any) -> None:
    """Refuse ``Trainer.fit(torch.compile(model))`` with ZeroStrategy's way to compile.

    Lightning unwraps the compiled module (setting ``_compiler_ctx``) and then refuses it for any strategy but DDP and
    FSDP, with a message that names only those; ZeroStrategy's ``_lightning_module`` setter calls this first.
    """
    from lightning_zero._compat.lightning import compiled_by_lightning

    if compiled_by_lightning(model):
        raise ValueError("The model passed to the Trainer is compiled (torch.compile). Lightning accepts compiled"
                         " modules only for DDP and FSDP: pass the LightningModule itself and use"
                         " ZeroStrategy(compile=True), which compiles its networks.")
