"""Hugging Face ``transformers`` (and PEFT) at ZeRO stage 3, and initialisation that takes effect on partitioned
parameters.

The only module that imports ``transformers``, and only when it is installed. Checked with transformers 5.24,
accelerate 1.15, peft 0.21, DeepSpeed 0.19.8.

* :class:`HfZero3Link`: while a stage-3 engine or ``zero.Init`` is in force, transformers sees the resolved DeepSpeed
  config through a live ``transformers.integrations.HfDeepSpeedConfig`` (transformers keeps only a weak reference to
  it, so the link holds it). ``is_deepspeed_zero3_enabled()`` is then true: ``from_pretrained`` loads into the
  partitions (rank 0 reads the files, see ``modeling_utils._load_pretrained_model``), and ``generate`` sets
  ``synced_gpus`` itself. Deactivating restores whatever config transformers saw before (usually none), so a later
  stage-2 run in the same process sees no ZeRO-3.
* :func:`init_context`: the context ZeroStrategy enters around ``zero.Init``. zero.Init partitions each module's
  parameters when its constructor returns, so an initialisation written afterwards (Hugging Face's ``post_init``,
  PEFT's ``lora_B`` zeros, a user's ``nn.init.*`` or ``p.data.copy_(...)``) would land in an empty tensor. A
  ``TorchFunctionMode`` catches every in-place write to a partitioned parameter (or to its ``.data``), gathers that
  one parameter (``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``), applies the write on every rank (so
  the ranks' random streams stay in step, as at stage 0) and re-partitions it with rank 0's values. Hugging Face is
  told that zero.Init is already active (``transformers.modeling_utils.set_zero3_state``), so ``from_config`` /
  ``from_pretrained`` build the model in ZeroStrategy's zero.Init like any other module instead of nesting their own
  with their weight init switched off: the same seed gives the same initial weights as at stage 0.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["HfZero3Link", "init_context", "transformers_installed", "warn_lost_data_assignments"]

log = logging.getLogger(__name__)

# in-place methods that do not write a parameter's values
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "retain_grad", "detach_", "record_stream", "set_",
                         "resize_", "resize_as_", "as_strided_", "pin_memory_"})
_ALIAS = "_lightning_zero_partitioned_param"
# torch.nn.init functions that read the tensor's shape before writing (fans, dimensions): they see a partitioned
# parameter's empty data, so they are wrapped as a whole rather than caught write by write
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


class HfZero3Link:
    """Tells transformers that ZeRO-3 is on (``activate(config)``) and forgets it again (``deactivate()``)."""

    def __init__(self) -> None:
        self._config: Any = None  # the HfDeepSpeedConfig; transformers holds only a weak reference
        self._previous: Any = None

    @property
    def active(self) -> bool:
        return self._config is not None

    def activate(self, config: Mapping[str, Any]) -> None:
        if self._config is not None or not transformers_installed():
            return
        try:
            from transformers.integrations import deepspeed as hf_ds
            from transformers.integrations import HfDeepSpeedConfig
        except ImportError as error:  # pragma: no cover - a broken transformers install
            log.warning(f"ZeroStrategy(stage=3): transformers could not be told that ZeRO-3 is on ({error}).")
            return
        if importlib.util.find_spec("accelerate") is None:
            log.warning("ZeroStrategy(stage=3): transformers is installed but accelerate is not, so transformers"
                        " cannot be told that ZeRO-3 is on (`from_pretrained` would not load into the partitions and"
                        " `generate` would not synchronise the ranks). Install it: `pip install accelerate`.")
            return
        from lightning_zero._compat.transformers import current_hf_deepspeed_config

        self._previous = current_hf_deepspeed_config()  # what was set before (a user's own HfDeepSpeedConfig)
        import copy

        self._config = HfDeepSpeedConfig(copy.deepcopy(dict(config)))  # registers itself as transformers' config

    def deactivate(self) -> None:
        if self._config is None:
            return
        from transformers.integrations import deepspeed as hf_ds

        from lightning_zero._compat.transformers import current_hf_deepspeed_config

        if current_hf_deepspeed_config() is self._config:
            if self._previous is not None:
                hf_ds.set_hf_deepspeed_config(self._previous)
            else:
                hf_ds.unset_hf_deepspeed_config()
        self._config = self._previous = None


def _partitioned(tensor: Any) -> nn.Parameter | None:
    """The ZeRO-3 parameter whose values ``tensor`` stands for while they are partitioned away: the parameter
    itself, or the (empty) ``.data`` alias taken of it; None otherwise."""
    if not isinstance(tensor, torch.Tensor):
        return None
    param = tensor if hasattr(tensor, "ds_id") else getattr(tensor, _ALIAS, None)
    if param is None or (param is not tensor and tensor.numel() != 0):
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param if getattr(param, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE else None


def _is_data_getter(func: Any) -> bool:
    return getattr(func, "__name__", "") == "__get__" and getattr(func, "__self__", None) is torch.Tensor.data


class _WritesToPartitions(TorchFunctionMode):
    """Applies in-place writes to partitioned ZeRO-3 parameters on the gathered parameter (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.gathered: dict[int, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
            in_kwargs = not args and "tensor" in kwargs  # torch.nn.init.* hand the tensor on by keyword
            target = kwargs["tensor"] if in_kwargs else (args[0] if args else None)
            param = _partitioned(target)
            if param is not None:
                return self._write(func, param, target, args, kwargs, in_kwargs)
        out = func(*args, **kwargs)
        if _is_data_getter(func) and args and _partitioned(args[0]) is args[0]:
            setattr(out, _ALIAS, args[0])  # `p.data.normal_()` is caught through the alias
        return out

    def _write(self, func: Any, param: nn.Parameter, target: torch.Tensor, args: tuple, kwargs: dict,
               in_kwargs: bool) -> Any:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            value = param if target is param else param.data
            if in_kwargs:
                kwargs = {**kwargs, "tensor": value}
            else:
                args = (value, *args[1:])
            func(*args, **kwargs)
        self.gathered[param.ds_id] = self.gathered.get(param.ds_id, 0) + 1
        return target


def _half_precision(config: Mapping[str, Any]) -> bool:
    return any(isinstance(config.get(k), Mapping) and config[k].get("enabled") is True for k in ("bf16", "fp16"))


_warned_arange = False


def _warn_no_arange_guard() -> None:
    global _warned_arange
    if not _warned_arange:
        _warned_arange = True
        import transformers
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(f"transformers {transformers.__version__} has no `prevent_arange_dtype_change`: under a 16-bit"
                       " zero.Init, `torch.arange` in rotary embeddings runs in that dtype, so their frequencies lose"
                       " precision. Upgrade transformers (`pip install -U 'transformers>=5.24'`) or build the model at"
                       " 32-bit precision.")


@contextmanager
def init_context(link: HfZero3Link, config: Mapping[str, Any], zero_init: Any) -> Iterator[None]:
    """Enter ``zero_init`` (ZeroStrategy's ``deepspeed.zero.Init``) so that writes to partitioned parameters take
    effect and transformers (when installed) knows that ZeRO-3 and zero.Init are on. The link stays active afterwards
    (the strategy's teardown deactivates it): transformers needs it for loading, generating and resizing too."""
    with ExitStack() as stack:
        if transformers_installed():
            link.activate(config)
            if link.active:
                from transformers import modeling_utils
                from transformers.integrations import deepspeed as hf_ds

                # zero.Init casts torch.arange to the model dtype; rotary embeddings need their explicit dtype
                # (entered before zero.Init, as transformers does). Older transformers (5.17) have no such guard.
                guard = getattr(hf_ds, "prevent_arange_dtype_change", None)
                if guard is not None:
                    stack.enter_context(guard())
                elif _half_precision(config):
                    _warn_no_arange_guard()
                stack.enter_context(modeling_utils.set_zero3_state())
                stack.enter_context(_hf_init_gathers_each_module(modeling_utils.PreTrainedModel))
        stack.enter_context(zero_init)
        stack.enter_context(_init_functions_gather())
        stack.enter_context(_WritesToPartitions())
        yield


@contextmanager
def _hf_init_gathers_each_module(pretrained_cls: type) -> Iterator[None]:
    """Hugging Face's ``_initialize_weights(module)`` (called per module by ``post_init``) runs with that module's
    parameters and its direct children's gathered, as transformers' own ``initialize_weights_zero3`` does: one gather
    per module rather than per write, and ``_init_weights`` may index a weight (``weight[padding_idx]``)."""
    from lightning_zero._compat.transformers import initialize_weights_through

    def gathering(original: Any) -> Any:
        def initialize_gathered(self: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            params = [p for p in module.parameters(recurse=False)]
            params += [p for child in module.children() for p in child.parameters(recurse=False)]
            params = [p for p in params if _partitioned(p) is not None]
            if not params:
                return original(self, module, *args, **kwargs)
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                return original(self, module, *args, **kwargs)

        return initialize_gathered

    with initialize_weights_through(pretrained_cls, gathering):
        yield


def _gathering(init_fn: Any) -> Any:
    def gather_then_init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        param = _partitioned(tensor)
        if param is None:
            return init_fn(tensor, *args, **kwargs)
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            init_fn(param if tensor is param else param.data, *args, **kwargs)
        return tensor

    gather_then_init.__wrapped__ = init_fn  # type: ignore[attr-defined]
    return gather_then_init


@contextmanager
def _init_functions_gather() -> Iterator[None]:
    """``torch.nn.init.*`` on a partitioned parameter runs on the gathered parameter (all ranks; rank 0's values)."""
    originals = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name, fn in originals.items():
            setattr(nn.init, name, _gathering(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(nn.init, name, fn)


def warn_lost_data_assignments(module: nn.Module) -> None:
    """Warn, naming the parameters, where ``p.data = tensor`` replaced a partitioned parameter's (empty) data after
    zero.Init partitioned it: DeepSpeed ignores such a value and the next gather overwrites it."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    lost = [n for n, p in module.named_parameters()
            if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE and p.data.numel() != 0]
    if lost:
        names = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        rank_zero_warn(
            f"ZeroStrategy(stage=3): `.data` of {names} was replaced after zero.Init partitioned it, so that value is"
            " lost (DeepSpeed keeps its own shard). Write into the parameter instead, e.g. `with torch.no_grad():"
            " p.copy_(value)` or `nn.init.*_(p)` in configure_model (ZeroStrategy applies such writes on the gathered"
            " parameter), or `with deepspeed.zero.GatheredParameters(p, modifier_rank=0): p.data.copy_(value)`.")
