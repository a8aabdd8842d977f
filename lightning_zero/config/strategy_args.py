"""``ZeroStrategy(...)``'s arguments checked and resolved in one pure function, before any process starts.

Everything here returns new values and sets nothing on the strategy: ``ZeroStrategy.__init__`` stores what
:func:`resolve_strategy_args` returns (``compile=`` is resolved there, by :mod:`lightning_zero.compiling`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_zero.config.features import check_auto_stage, check_zero_features
from lightning_zero.config.resolve import merge_knobs, resolve_knobs, resolve_runtime_args, zero_stage
from lightning_zero.config.schema import load_user_config, validate_user_config

__all__ = ["StrategyArgs", "resolve_strategy_args"]


@dataclass(frozen=True)
class StrategyArgs:
    """What ``ZeroStrategy.__init__`` keeps of its arguments. ``merged`` is the user config merged with the knobs."""

    user_config: dict[str, Any]
    knobs: dict[str, Any]
    merged: dict[str, Any]
    stage: int
    auto: bool
    auto_nvme_path: str | None
    timeout: timedelta
    remote_device: str | None
    logging_level: int


def resolve_strategy_args(stage: int | str | None, config: Mapping[str, Any] | str | os.PathLike | None, *,
                          start_method: Any, offload_optimizer: Any, offload_parameters: Any,
                          nvme_path: str | None, pin_memory: bool | None, remote_device: Any, logging_level: Any,
                          timeout: Any, zero_optimization: Mapping[str, Any]) -> StrategyArgs:
    """Check ``ZeroStrategy``'s arguments (everything that does not need the Trainer) and resolve them; raises on the
    first check that fails."""
    if start_method not in ("popen", "spawn", "fork"):
        raise ValueError(f"ZeroStrategy(start_method={start_method!r}) is not supported. Use 'popen', 'spawn'"
                         " or 'fork'.")
    user_config = load_user_config(config)
    # stage="auto" is decided at setup from the model and the hardware (see ZeroStrategy._plan_auto_stage)
    auto_nvme_path: str | None = None
    auto = isinstance(stage, str) and stage == "auto"
    if auto:
        check_auto_stage(user_config, dict(offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                                           pin_memory=pin_memory, **zero_optimization))
        stage, auto_nvme_path, nvme_path = None, nvme_path, None
    # validated once merged with the keywords: a section's cross-key checks need the keyword stage
    knobs = resolve_knobs(stage, offload_optimizer, offload_parameters, nvme_path, pin_memory, **zero_optimization)
    merged = merge_knobs(user_config, knobs)
    validate_user_config(merged)
    resolved_stage = zero_stage(merged)
    _check_offload_stage(offload_optimizer, offload_parameters, resolved_stage)
    check_zero_features(merged)  # offload / ZeRO++ / activation checkpointing keys set in the config file
    timeout, remote_device, logging_level = resolve_runtime_args(
        timeout, remote_device, logging_level, None if auto else resolved_stage, merged)
    return StrategyArgs(user_config=user_config, knobs=knobs, merged=merged, stage=resolved_stage, auto=auto,
                        auto_nvme_path=auto_nvme_path, timeout=timeout, remote_device=remote_device,
                        logging_level=logging_level)


def _check_offload_stage(offload_optimizer: Any, offload_parameters: Any, stage: int) -> None:
    if offload_parameters and stage != 3:
        raise ValueError(f"ZeroStrategy(offload_parameters={offload_parameters!r}) needs stage=3 (stage is"
                         f" {stage}): only ZeRO-3 partitions parameters. Use ZeroStrategy(stage=3, ...).")
    if offload_optimizer and stage == 0:
        raise ValueError(f"ZeroStrategy(offload_optimizer={offload_optimizer!r}) needs stage 1, 2 or 3: stage 0"
                         " has no optimizer partition to offload."
                         " Use ZeroStrategy(stage=2, offload_optimizer=...).")
