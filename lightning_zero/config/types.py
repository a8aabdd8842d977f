"""The names every module of :mod:`lightning_zero.config` shares: :class:`ZeroConfigError`, :class:`TrainerFlags`,
``"auto"``, the Trainer precisions, the offload devices and sections, and the ZeRO stage parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

AUTO = "auto"
_DEFAULT_STAGE = 2  # the stage when neither the keywords nor the config name one (DeepSpeed's own default is 0)

PrecisionInput = Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
SUPPORTED_PRECISION: tuple[str, ...] = get_args(PrecisionInput)

OffloadDevice = Literal["cpu", "nvme"]
_OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")  # the zero_optimization sections that name a device


class ZeroConfigError(ValueError):
    """A DeepSpeed config or a ZeroStrategy argument that cannot work. The message names the fix."""


@dataclass(frozen=True)
class TrainerFlags:
    """The Trainer settings that map onto DeepSpeed keys. ``None`` means "the Trainer did not say"."""

    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    micro_batch_size: int | None = None
    world_size: int = 1
    devices_per_node: int | None = None  # processes per node (Trainer(devices=...))
    device_type: str | None = None  # "cpu", "cuda", ... (None: not known)


def _positive_int(value: Any) -> bool:
    """An int >= 1 (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_stage(stage: Any) -> int:
    """``stage`` as an int: DeepSpeed also accepts ``"3"`` and ``3.0``; absent or ``"auto"`` means the default (2)."""
    if stage is None or stage == AUTO:
        return _DEFAULT_STAGE
    if not isinstance(stage, bool):
        try:
            value = int(stage)
        except (TypeError, ValueError):
            value = None
        if value in (0, 1, 2, 3) and value == float(stage):
            return value
    raise ZeroConfigError(f"zero_optimization.stage = {stage!r} is not a ZeRO stage. Use 0, 1, 2 or 3.")
