"""ZeroPrecision: Trainer precision -> compute dtype, input casting, and backward/step routed to the engines."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, get_args

import torch
from lightning.fabric.utilities.types import Steppable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import WarningCache
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_zero._compat.lightning import (convert_fp_tensor, convert_precision_flag, default_dtype,
                                              trainer_precision_argument)
from lightning_zero.config import SUPPORTED_PRECISION, PrecisionInput

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["ZeroPrecision", "check_cpu_precision", "requested_precision"]

_warning_cache = WarningCache()

_DTYPES = {
    "32-true": torch.float32,
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}
assert set(_DTYPES) == set(get_args(PrecisionInput))


class ZeroPrecision(Precision):
    """DeepSpeed keeps fp32 master weights itself, so "mixed" and "true" differ only in how modules are created.

    Args:
        precision: one of ``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ``"16-true"``, ``"bf16-true"``.
    """

    def __init__(self, precision: str) -> None:
        if precision not in SUPPORTED_PRECISION:
            raise ValueError(
                f"Trainer(precision={precision!r}) is not supported with ZeroStrategy. Use one of"
                f" {SUPPORTED_PRECISION}."
            )
        self.precision = precision  # type: ignore[assignment]
        self.dtype: torch.dtype = _DTYPES[precision]
        self.engines: Any = None  # the strategy's EngineRegistry, set at setup

    @override
    def convert_module(self, module: Module) -> Module:
        if self.precision.endswith("-true"):
            _cast_parameters_and_buffers(module, self.dtype)
        if self.dtype != torch.float32:
            _keep_metric_states_fp32(module, self.dtype)
        return module

    @override
    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=convert_fp_tensor, dtype=Tensor, dst_type=self.dtype)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return default_dtype(self.dtype) if self.precision.endswith("-true") else nullcontext()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @override
    def backward(self, tensor: Tensor, model: pl.LightningModule, optimizer: Steppable | None, *args: Any,
                 **kwargs: Any) -> None:
        if is_overridden("backward", model):
            _warning_cache.warn("You have overridden `LightningModule.backward`, but it will be ignored since DeepSpeed"
                                " handles the backward in its engines. Put code that must run around the backward"
                                " in the `on_before_backward` or `on_after_backward` hooks.")
        self.engines.backward(tensor, *args, automatic=model.automatic_optimization, **kwargs)

    @override
    def optimizer_step(self, optimizer: Steppable, model: pl.LightningModule, closure: Callable[[], Any],
                       **kwargs: Any) -> Any:
        if isinstance(optimizer, LBFGS):
            raise TypeError("LBFGS re-evaluates the closure inside step(), which DeepSpeed cannot do. Use an"
                            " optimizer without a closure loop (Adam, AdamW, SGD, ...) with ZeroStrategy.")
        with self.engines.stepping():
            closure_result = closure()
        self._after_closure(model, optimizer)
        if model.automatic_optimization and closure_result is None:
            raise ValueError("Returning None from training_step (skipping the backward) is not supported with"
                             " ZeroStrategy: every rank must take part in each step. Return a loss instead.")
        self.engines.step(optimizer)
        return closure_result

    @override
    def clip_gradients(self, optimizer: Optimizer, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        """DeepSpeed clips inside its step; this sets the norm it clips the next step at."""
        if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            raise ValueError("gradient_clip_algorithm='value' is not supported: DeepSpeed clips by global norm only."
                             " Use gradient_clip_algorithm='norm'.")
        if clip_val:
            self.engines.for_optimizer(optimizer).set_clip(float(clip_val))


def requested_precision(plugin: Precision) -> str:
    """The precision the user gave the Trainer, for the generic plugin the Trainer hands the strategy.

    On CPU, Lightning's accelerator connector turns ``precision="16-mixed"`` into a ``"bf16-mixed"`` plugin (warning
    that torch's CPU autocast has no float16) for every strategy but its own DeepSpeed, FSDP and XLA ones. DeepSpeed
    does not use autocast: its fp16 section casts the model and scales the loss itself, as Lightning's DeepSpeedStrategy
    lets it do on CPU. So ZeroStrategy takes the flag as written, and CPU and CUDA processes train the same fp16 model
    (``check_cpu_precision`` says when the CPU cannot). The flag is the ``precision`` argument of
    ``_AcceleratorConnector.__init__`` (Lightning 2.6), the frame that sets the plugin on the strategy; the rewritten
    value is all the plugin and the connector keep (``tests/unit/test_precision.py`` pins this; the frame is read in
    ``_compat.lightning.trainer_precision_argument``)."""
    precision = str(getattr(plugin, "precision", "32-true"))
    if precision != "bf16-mixed" or getattr(plugin, "device", None) != "cpu":
        return precision
    found, written = trainer_precision_argument()
    if not found:  # Lightning no longer builds the plugin there: say so rather than guess
        rank_zero_warn("ZeroStrategy could not read the precision given to the Trainer (Lightning's"
                       " _AcceleratorConnector.__init__ no longer sets the precision plugin; see"
                       " lightning_zero/_compat/lightning.py): on CPU it trains with the plugin's 'bf16-mixed', which"
                       " Lightning substitutes for '16-mixed'. Pass precision='bf16-mixed' explicitly to silence this.")
        return precision
    if written is None:
        return precision
    with warnings.catch_warnings():  # the connector already warned about legacy spellings (16, "16")
        warnings.simplefilter("ignore")
        written = convert_precision_flag(written)
    if written != precision:
        rank_zero_info(f"ZeroStrategy trains with precision={written!r} as given: DeepSpeed casts the model and scales"
                       f" the loss itself, without torch's autocast, so Lightning's 'Using precision={precision!r}"
                       " instead' does not apply.")
    return written


def check_cpu_precision(precision: str) -> None:
    """float16 on CPU processes needs DeepSpeed's CPU accelerator to support it (``is_fp16_supported``: oneDNN float16,
    i.e. AVX512-FP16 or AMX-FP16); elsewhere ``deepspeed.initialize`` fails on every rank. Say so once, before work."""
    if not precision.startswith("16-"):
        return
    from lightning_zero._imports import use_cpu_accelerator

    use_cpu_accelerator()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        return
    raise ValueError(
        f"Trainer(precision={precision!r}) on CPU processes: DeepSpeed's CPU accelerator supports float16 only on CPUs"
        " with oneDNN float16 (AVX512-FP16 or AMX-FP16), and this CPU has neither (DeepSpeed would stop with 'Type fp16"
        " is not supported on your device'). Use Trainer(precision='bf16-mixed') or 'bf16-true', which DeepSpeed runs"
        " on every CPU, or run on GPUs."
    )


def _cast_parameters_and_buffers(module: Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without torchmetrics states: ``Metric._apply`` casts its states on ``.to(dtype)``, which
    would accumulate sums and counts in half precision. Each module's own parameters and buffers are cast through the
    base ``Module._apply``; metric states are neither, so they keep their dtype."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    for m in module.modules():
        Module._apply(m, cast, recurse=False)


def _keep_metric_states_fp32(module: Module, dtype: torch.dtype) -> None:
    """Metrics created under the half-precision creation contexts (``configure_model`` with a "-true" precision, or
    stage 3's ``zero.Init``, which creates every floating tensor in the compute dtype) get float32 states back.

    Only the floating states in ``dtype`` change (``Metric.set_dtype`` would also turn integer counts into floats)."""
    from torchmetrics import Metric

    def up(value: Any) -> Any:
        if isinstance(value, list):
            return [up(v) for v in value]
        return value.float() if isinstance(value, Tensor) and value.dtype == dtype else value

    for m in module.modules():
        if not isinstance(m, Metric):
            continue
        for name, default in m._defaults.items():
            m._defaults[name] = up(default)
            setattr(m, name, up(getattr(m, name)))
        if m._dtype == dtype:  # the dtype torchmetrics creates new tensors in (the default dtype at creation)
            m._dtype = torch.float32
