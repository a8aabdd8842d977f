"""Pure DeepSpeed config resolution: user config + constructor keywords + Trainer flags -> one new dict.

Nothing here touches a Trainer, a process group or a device. Every function returns a new dict and never
modifies its inputs, so the whole resolution is unit-testable in milliseconds.

Vocabulary: the *user config* is what the user wrote (a dict, a JSON file or ``$LIGHTNING_ZERO_CONFIG``);
*knobs* are the ``ZeroStrategy(...)`` keywords; *flags* are the Trainer's own settings (:class:`TrainerFlags`).

Layout: :mod:`.types` holds the shared names (the error, the flags, ``"auto"``, the stage parser); :mod:`.schema`
loads and validates the user config; :mod:`.resolve` turns keywords into knobs and resolves the final config;
:mod:`.features` checks which offload / ZeRO++ / ZenFlow settings can work together; :mod:`.strategy_args` checks and
resolves the ``ZeroStrategy(...)`` arguments in one call. Import from here
(``lightning_zero.config``): the split into modules is an implementation detail.
"""

from __future__ import annotations

from lightning_zero.config.features import (
    check_auto_stage,
    check_zero_features,
    inference_config,
    offload_device,
    offload_ratio,
    zenflow_enabled,
)
from lightning_zero.config.resolve import (
    NVME_PATH_ENV_VAR,
    NVME_PATH_FROM_ENV,
    merge_knobs,
    resolve_ds_config,
    resolve_knobs,
    resolve_nvme_path,
    resolve_runtime_args,
    zero_stage,
)
from lightning_zero.config.schema import (
    CONFIG_ENV_VAR,
    KNOWN_TOP_LEVEL_KEYS,
    load_user_config,
    supported_optimizer_types,
    validate_user_config,
)
from lightning_zero.config.strategy_args import StrategyArgs, resolve_strategy_args
# AUTO, OffloadDevice and SUPPORTED_PRECISION are not in __all__ but stay importable from here, as before the split
from lightning_zero.config.types import (
    AUTO,
    SUPPORTED_PRECISION,
    OffloadDevice,
    PrecisionInput,
    TrainerFlags,
    ZeroConfigError,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "KNOWN_TOP_LEVEL_KEYS",
    "NVME_PATH_ENV_VAR",
    "NVME_PATH_FROM_ENV",
    "PrecisionInput",
    "StrategyArgs",
    "TrainerFlags",
    "ZeroConfigError",
    "check_auto_stage",
    "check_zero_features",
    "inference_config",
    "load_user_config",
    "merge_knobs",
    "offload_device",
    "offload_ratio",
    "resolve_ds_config",
    "resolve_knobs",
    "resolve_nvme_path",
    "resolve_runtime_args",
    "resolve_strategy_args",
    "supported_optimizer_types",
    "validate_user_config",
    "zenflow_enabled",
    "zero_stage",
]
