"""Lightning internals ZeroStrategy relies on, each in one function (or class alias) with the reason and a contract
test (``tests/unit/test_compat.py``). Verified on Lightning 2.5.0 and 2.6.6.

A missing internal raises a ``RuntimeError`` naming the symbol, the installed Lightning and the fix when it is used,
never at ``import lightning_zero``: the launcher base classes, needed when ``strategy.py`` is imported, fall back to a
class that raises when it is built.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = ["LAUNCHER_METHODS", "MultiProcessingLauncher", "StrategyRegistry", "SubprocessScriptLauncher",
           "check_overrides", "collect_rng_states", "compiled_by_lightning", "configured_optimizers", "convert_fp_tensor",
           "convert_precision_flag", "default_dtype", "default_process_group_backend", "distributed_is_initialized",
           "evaluate_under_no_grad", "guard_zero_grad", "route_checkpoint_state_dict", "route_model_summary",
           "set_rng_states", "start_children", "state_dict_for_results", "sync_ddp_if_available",
           "tensor_shape_unknown", "train_dataloader", "trainer_precision_argument", "unwrap_optimizer"]


def _version() -> str:
    import lightning

    return lightning.__version__


def _missing(symbol: str, used_for: str) -> RuntimeError:
    from lightning_zero._compat.versions import requirement

    return RuntimeError(f"Lightning {_version()} has no `{symbol}`, which lightning_zero uses {used_for} (see"
                        " lightning_zero/_compat/lightning.py). Install a Lightning version in the range lightning_zero"
                        f" supports (`pip install '{requirement('lightning')}'`).")


def _private(module: str, name: str, used_for: str) -> Any:
    """``module.name``, or a RuntimeError naming it when this Lightning has none."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _missing(f"{module}.{name}", used_for) from None


def _base_class(module: str, name: str, used_for: str) -> type:
    """A Lightning class to subclass; when this Lightning has none, a class that raises when it is built (so that
    ``import lightning_zero`` keeps working)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            raise _missing(f"{module}.{name}", used_for)

        return type(f"Missing{name}", (), {"__init__": __init__})


# --- launchers ---------------------------------------------------------------------------------------------------

#: Why: ``ZeroStrategy``'s popen launcher starts the other ranks early (``trainer.init_module()`` at stage 3) and
#: prechecks the config before they start. Verified: Lightning 2.5.0, 2.6.6.
SubprocessScriptLauncher: type = _base_class("lightning.pytorch.strategies.launchers", "_SubprocessScriptLauncher",
                                             "to start the ranks of Trainer(strategy=ZeroStrategy(...)) with popen")
#: Why: the spawn launcher hands the full (gathered) weights back to the main process and exits each worker without
#: running the gloo/DeepSpeed C++ destructors (``_wrapping_function``, ``_collect_rank_zero_results`` overridden).
#: Verified: Lightning 2.5.0, 2.6.6.
MultiProcessingLauncher: type = _base_class("lightning.pytorch.strategies.launchers", "_MultiProcessingLauncher",
                                            "to spawn the ranks of Trainer(strategy=ZeroStrategy(...))")

# The private methods ZeroStrategy's launchers override or call, with the parameters they are called with.
LAUNCHER_METHODS: dict[str, dict[str, tuple[str, ...]]] = {
    "_MultiProcessingLauncher": {
        "_wrapping_function": ("self", "process_idx", "trainer", "function", "args", "kwargs", "return_queue",
                               "global_states"),
        "_collect_rank_zero_results": ("self", "trainer", "results"),
    },
    "_SubprocessScriptLauncher": {"_call_children_scripts": ("self",)},
}
_checked: set[type] = set()


def check_overrides(base: type) -> None:
    """Raise unless ``base`` (a Lightning launcher) still has the private methods ZeroStrategy overrides or calls, with
    the same parameters. Why: an override of a renamed method is never called, so the worker would silently send back
    partitioned weights (or abort at exit). Checked once per class. Verified: Lightning 2.5.0, 2.6.6."""
    import inspect

    if base in _checked:
        return
    for name, params in LAUNCHER_METHODS.get(base.__name__, {}).items():
        method = getattr(base, name, None)
        if not callable(method) or tuple(inspect.signature(method).parameters) != params:
            raise _missing(f"{base.__name__}.{name}({', '.join(params[1:])})",
                           "in ZeroStrategy's launcher (its override would never be called)")
    _checked.add(base)


def start_children(launcher: Any) -> None:
    """Start the popen launcher's other ranks now and watch them (what ``_SubprocessScriptLauncher.launch`` does when
    they are not started yet). Why: ``trainer.init_module()`` at stage 3 needs the process group before ``fit``.
    Verified: Lightning 2.5.0, 2.6.6 (``_call_children_scripts``, ``_launch_process_observer``)."""
    observe = _private("lightning.pytorch.strategies.launchers.subprocess_script", "_launch_process_observer",
                       "to watch the ranks ZeroStrategy starts early")
    check_overrides(SubprocessScriptLauncher)
    launcher._call_children_scripts()
    observe(launcher.procs)


@contextmanager
def state_dict_for_results(lightning_module: Any, state_dict: dict[str, Any]) -> Iterator[None]:
    """Inside, ``lightning_module.state_dict()`` returns ``state_dict`` (this instance only).

    Why: ``_MultiProcessingLauncher._collect_rank_zero_results`` saves ``trainer.lightning_module.state_dict()`` for
    the main process; at stage 3 that is the (empty) partitioned view, so the full weights are handed in instead.
    Verified: Lightning 2.5.0, 2.6.6 (the contract test checks that the method still calls it)."""
    original = lightning_module.__dict__.get("state_dict")
    lightning_module.state_dict = lambda *a, **k: state_dict
    try:
        yield
    finally:
        if original is None:
            del lightning_module.state_dict
        else:
            lightning_module.state_dict = original


# --- strategy registry, collectives, optimizers, data -----------------------------------------------------------

if TYPE_CHECKING:
    from lightning.fabric.strategies.registry import _StrategyRegistry as StrategyRegistry
else:
    #: Why: the type of the registry ``register_strategies`` receives (Lightning exports only its instance,
    #: ``StrategyRegistry``). Verified: Lightning 2.5.0, 2.6.6.
    StrategyRegistry = Any


def distributed_is_initialized() -> bool:
    """Why: Lightning's private ``_distributed_is_initialized``, as an own copy (torch's ``is_initialized`` exists only
    where ``torch.distributed`` is available). Verified: Lightning 2.5.0, 2.6.6 (same body)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def default_process_group_backend(device: torch.device) -> str:
    """The process-group backend Lightning picks for ``device`` (``"nccl"`` for CUDA, ``"gloo"`` for CPU).
    Why: ZeroStrategy uses the backend Lightning's own strategies use. Verified: Lightning 2.5.0, 2.6.6."""
    return _private("lightning.fabric.utilities.distributed", "_get_default_process_group_backend_for_device",
                    "to choose the process-group backend")(device)


def sync_ddp_if_available(tensor: Tensor, group: Any | None = None, reduce_op: Any = "mean") -> Tensor:
    """Lightning's reduction of a tensor over the processes (a no-op without a process group).
    Why: ``Strategy.reduce`` behaves as in Lightning's DDP/DeepSpeed strategies (``"mean"``, ``"sum"``, ``ReduceOp``;
    integer tensors). Verified: Lightning 2.5.0, 2.6.6."""
    return _private("lightning.fabric.utilities.distributed", "_sync_ddp_if_available",
                    "to reduce tensors over the processes")(tensor, group, reduce_op=reduce_op)


def configured_optimizers(lightning_module: Any) -> tuple[list[Optimizer], list[Any]]:
    """``configure_optimizers()`` parsed and validated as Lightning does: ``(optimizers, LRSchedulerConfigs)``, without
    Lightning's placeholder for "no optimizer" (``_MockOptimizer``).
    Why: the same accepted return values as every Lightning strategy. Verified: Lightning 2.5.0, 2.6.6."""
    init = _private("lightning.pytorch.core.optimizer", "_init_optimizers_and_lr_schedulers",
                    "to read configure_optimizers()")
    mock = _private("lightning.pytorch.core.optimizer", "_MockOptimizer", "to read configure_optimizers()")
    optimizers, schedulers = init(lightning_module)
    return [o for o in optimizers if not isinstance(o, mock)], schedulers


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a ``LightningOptimizer`` (``self.optimizers()``), or ``optimizer`` itself.
    Why: was ``LightningOptimizer._optimizer``; the public ``LightningOptimizer.optimizer`` property returns it.
    Verified: Lightning 2.5.0, 2.6.6."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def guard_zero_grad(lightning_optimizer: Any, check: Callable[[], None]) -> None:
    """Make ``lightning_optimizer.zero_grad()`` call ``check()`` first (this instance only).
    Why: ``self.optimizers()`` returns Lightning's wrapper, whose ``zero_grad`` is the torch optimizer's; ZeroStrategy
    refuses a ``zero_grad`` that would drop gradients DeepSpeed already took in. Verified: Lightning 2.5.0, 2.6.6."""
    original = lightning_optimizer.zero_grad

    def zero_grad(*args: Any, **kwargs: Any) -> None:
        check()
        original(*args, **kwargs)

    lightning_optimizer.zero_grad = zero_grad


def train_dataloader(trainer: Any) -> Any | None:
    """The train DataLoader of a ``fit`` before Lightning loads it (None when there is none).
    Why: DeepSpeed needs the micro-batch size when the engines are built, in ``setup``, before the fit loop asks
    ``trainer.fit_loop._data_source`` for the loader. Verified: Lightning 2.5.0, 2.6.6."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if not callable(getattr(source, "is_defined", None)) or not callable(getattr(source, "dataloader", None)):
        raise _missing("Trainer.fit_loop._data_source.is_defined()/.dataloader()",
                       "to read the train DataLoader's batch size at setup")
    return source.dataloader() if source.is_defined() else None


def collect_rng_states(include_cuda: bool) -> dict[str, Any]:
    """Why: each rank's RNG states (torch, CUDA, numpy, Python) in a checkpoint, as Lightning's ``seed_everything``
    workers and Fabric save them. Verified: Lightning 2.5.0, 2.6.6 (``fabric.utilities.seed._collect_rng_states``)."""
    return _private("lightning.fabric.utilities.seed", "_collect_rng_states", "to save RNG states")(
        include_cuda=include_cuda)


def set_rng_states(state: dict[str, Any]) -> None:
    """Why: restores what :func:`collect_rng_states` saved. Verified: Lightning 2.5.0, 2.6.6."""
    _private("lightning.fabric.utilities.seed", "_set_rng_states", "to restore RNG states")(state)


# --- precision ---------------------------------------------------------------------------------------------------

def convert_fp_tensor(tensor: Tensor, dst_type: torch.dtype) -> Tensor:
    """Why: own copy of Lightning's ``_convert_fp_tensor`` (floating tensors to ``dst_type``, others unchanged), as
    its precision plugins cast inputs. Verified: Lightning 2.5.0, 2.6.6 (same behaviour)."""
    return tensor.to(dst_type) if torch.is_floating_point(tensor) else tensor


class default_dtype:  # noqa: N801 - a context manager, used like a function
    """Inside, ``torch.get_default_dtype()`` is ``dtype``; the dtype before is the one when this was built.
    Why: own copy of Lightning's ``_DtypeContextManager`` ("-true" precisions). Verified: Lightning 2.5.0, 2.6.6."""

    def __init__(self, dtype: torch.dtype) -> None:
        self._previous = torch.get_default_dtype()
        self._new = dtype

    def __enter__(self) -> None:
        torch.set_default_dtype(self._new)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._previous)


def convert_precision_flag(value: Any) -> str:
    """``Trainer(precision=...)`` in Lightning's unified spelling (``16`` -> ``"16-mixed"``, ...).
    Why: ZeroStrategy reads the flag as the user wrote it (:func:`trainer_precision_argument`). Verified: Lightning
    2.5.0, 2.6.6 (``fabric.connector._convert_precision_to_unified_args``)."""
    convert = _private("lightning.fabric.connector", "_convert_precision_to_unified_args",
                       "to read Trainer(precision=...)")
    return str(convert(value))


def trainer_precision_argument() -> tuple[bool, Any]:
    """``(found, value)``: the ``precision`` argument of the ``_AcceleratorConnector.__init__`` frame on the caller's
    stack; ``found`` is False when no such frame is there (the caller then warns).

    Why: on CPU Lightning rewrites ``precision="16-mixed"`` into a ``"bf16-mixed"`` plugin for every strategy but its
    own DeepSpeed, FSDP and XLA ones, and keeps only the rewritten value; the flag as written is only in the frame of
    the connector that builds the plugin (see ``precision.requested_precision``). Verified: Lightning 2.5.0, 2.6.6."""
    connector = _private("lightning.pytorch.trainer.connectors.accelerator_connector", "_AcceleratorConnector",
                         "to read Trainer(precision=...) as written")
    code = connector.__init__.__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    if frame is None:
        return False, None
    return True, frame.f_locals.get("precision")


# --- model summary, compiled modules -----------------------------------------------------------------------------

def tensor_shape_unknown(param: Tensor) -> bool:
    """Whether Lightning's summary counts ``param`` as of unknown size (an uninitialized lazy parameter; Lightning
    warns once). Why: ZeroSummary counts as Lightning's summary does. Verified: Lightning 2.5.0, 2.6.6
    (``model_summary._tensor_has_shape``, which despite its name is True for the unknown ones)."""
    return bool(_private("lightning.pytorch.utilities.model_summary.model_summary", "_tensor_has_shape",
                         "to count parameters in the model summary")(param))


def route_model_summary(callback: Any, build: Callable[[Any, int], Any], after_print: Callable[[], None]) -> bool:
    """Make a ``ModelSummary`` callback build its summary with ``build(pl_module, max_depth)`` and call
    ``after_print()`` after printing it (this instance only); False, with a warning, when this Lightning's callback
    has no such hooks (Lightning's own summary, which counts 0 for partitioned parameters, then stays).

    Why: Lightning's callback builds the summary in ``_summary`` from its ``_max_depth`` and picks its DeepSpeed
    variant only for its own ``DeepSpeedStrategy``. Verified: Lightning 2.5.0, 2.6.6. Idempotent."""
    if "_summary" in vars(callback):
        return True
    if not callable(getattr(type(callback), "_summary", None)) or not isinstance(vars(callback).get("_max_depth"),
                                                                                  int):
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(f"Lightning {_version()}'s {type(callback).__name__} has no `_summary`/`_max_depth`, so the"
                       " model summary counts stage-3 parameters as 0 (see lightning_zero/_compat/lightning.py). Use"
                       " `lightning_zero.ZeroSummary(model)` to print true sizes, or install a Lightning in the"
                       " supported range.")
        return False
    print_table = callback.summarize

    def _summary(trainer: Any, pl_module: Any) -> Any:
        return build(pl_module, callback._max_depth)

    def summarize(*args: Any, **kwargs: Any) -> None:
        print_table(*args, **kwargs)
        after_print()

    callback._summary = _summary
    callback.summarize = summarize
    return True


def compiled_by_lightning(model: Any) -> bool:
    """Whether ``model`` is a LightningModule that Lightning unwrapped from ``torch.compile`` (``_compiler_ctx``).
    Why: ZeroStrategy refuses it with its own way to compile before Lightning's DDP/FSDP-only message.
    Verified: Lightning 2.5.0, 2.6.6 (``utilities.compile.from_compiled``)."""
    return getattr(model, "_compiler_ctx", None) is not None



def route_checkpoint_state_dict(trainer: Any, state_dict: Callable[[], dict[str, Any]]) -> None:
    """Make the state dict Lightning puts into a checkpoint come from ``state_dict`` (this trainer only).

    Why: at stage 3 the weights are saved by the engines as shards, so the checkpoint's ``state_dict`` entry must not
    gather the whole model onto rank 0 at every save (a memory blow-up on large models), while
    ``strategy.lightning_module_state_dict()`` called by the user still returns the full weights. Lightning's
    ``_CheckpointConnector.dump_checkpoint`` asks ``self._get_lightning_module_state_dict()`` for that entry; it is
    the only caller. If Lightning renames it, this raises at setup instead of silently gathering at every save.
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    if not callable(getattr(type(connector), "_get_lightning_module_state_dict", None)):
        import lightning

        raise RuntimeError(
            f"Lightning {lightning.__version__} has no `Trainer._checkpoint_connector._get_lightning_module_state_dict`,"
            " which lightning_zero uses so that stage-3 checkpoints do not gather the whole model onto rank 0 (see"
            " lightning_zero/_compat/lightning.py). Install a Lightning version in the range lightning_zero supports"
            " (`pip install 'lightning>=2.5.0,<2.7'`)."
        )
    connector._get_lightning_module_state_dict = state_dict


def evaluate_under_no_grad(trainer: Any) -> None:
    """Run this trainer's validation, test and predict loops under ``torch.no_grad`` rather than
    ``torch.inference_mode`` (as Lightning does itself for FSDP and for gloo).

    Why: at stage 3 DeepSpeed gathers and releases ``param.data`` during each forward; under ``inference_mode`` the
    tensors it puts back are inference tensors, so a later ``requires_grad_(True)`` (unfreezing after ``predict``) or
    a backward through them fails ("Setting requires_grad=True on inference tensor outside InferenceMode"; seen on
    an H200, NCCL). Lightning's loops choose the context from their ``inference_mode`` attribute
    (``loops.utilities._no_grad_context``); if a loop no longer has it, this raises instead of silently keeping
    inference mode.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    loops = [getattr(trainer, name, None) for name in ("validate_loop", "test_loop", "predict_loop")]
    loops.append(getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None))
    for loop in loops:
        if not hasattr(loop, "inference_mode"):
            import lightning

            raise RuntimeError(
                f"Lightning {lightning.__version__}'s {type(loop).__name__} has no `inference_mode` attribute, which"
                " lightning_zero sets to False at ZeRO stage 3 (see lightning_zero/_compat/lightning.py). Install a"
                " Lightning version in the range lightning_zero supports (`pip install 'lightning>=2.5.0,<2.7'`), or"
                " pass Trainer(inference_mode=False)."
            )
        loop.inference_mode = False
