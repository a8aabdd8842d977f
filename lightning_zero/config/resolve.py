"""Constructor keywords -> knobs -> the final DeepSpeed config: the ``ZeroStrategy(...)`` keywords as a partial
config, merged into the user config, then filled from the Trainer flags (:func:`resolve_ds_config`)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_zero.config.features import check_zero_features, offload_device, zenflow_enabled
from lightning_zero.config.types import (
    _OFFLOAD_SECTIONS,
    AUTO,
    SUPPORTED_PRECISION,
    OffloadDevice,
    TrainerFlags,
    ZeroConfigError,
    _as_stage,
)

# Top-level sections the constructor keywords write into (merged key by key with the user config).
_KNOB_SECTIONS = ("zero_optimization", "aio", "activation_checkpointing", "bf16")


# --------------------------------------------------------------------------------------------------------------------
# Constructor keywords
# --------------------------------------------------------------------------------------------------------------------


def _offload_section(device: OffloadDevice, nvme_path: str | None, pin_memory: bool | None,
                     extra: Mapping[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device}
    if device == "nvme" and nvme_path is not None:
        section["nvme_path"] = nvme_path
    if pin_memory is not None:
        section["pin_memory"] = pin_memory
    section.update({k: v for k, v in extra.items() if v is not None})
    return section


def _check_offload_arg(name: str, value: Any) -> None:
    # identity for the booleans: 0, 1 and 1.0 compare equal to False/True but are not accepted
    if not (value is None or value is True or value is False or isinstance(value, str) and value in ("cpu", "nvme")):
        raise ZeroConfigError(f"ZeroStrategy({name}={value!r}) is not supported. Use False, \"cpu\" or \"nvme\".")


NVME_PATH_ENV_VAR = "LIGHTNING_ZERO_NVME_PATH"
# The registered strategy "zero_stage_3_offload_nvme" passes this as its nvme_path: read when the strategy is built.
NVME_PATH_FROM_ENV = f"${NVME_PATH_ENV_VAR}"
_LOG_LEVELS = {name: level for name, level in logging.getLevelNamesMapping().items() if name not in ("FATAL", "WARN")}
_REMOTE_DEVICES = (None, "cpu", "nvme")


def resolve_nvme_path(nvme_path: str | os.PathLike | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``nvme_path`` as a string; ``"$LIGHTNING_ZERO_NVME_PATH"`` (the ``zero_stage_3_offload_nvme`` strategy's
    default) is read from the environment, and refused naming the variable when it is not set."""
    if nvme_path is None:
        return None
    if not isinstance(nvme_path, (str, os.PathLike)):
        raise TypeError(f"ZeroStrategy(nvme_path={nvme_path!r}) must be a folder path (a str or os.PathLike), got"
                        f" {type(nvme_path).__name__}.")
    nvme_path = os.fspath(nvme_path)
    if nvme_path != NVME_PATH_FROM_ENV:
        return nvme_path
    environ = os.environ if environ is None else environ
    if not environ.get(NVME_PATH_ENV_VAR):
        raise ZeroConfigError(
            f"strategy=\"zero_stage_3_offload_nvme\" takes its NVMe folder from ${NVME_PATH_ENV_VAR}, which is not"
            f" set. Set it to a folder on a local NVMe drive (`export {NVME_PATH_ENV_VAR}=/local_nvme`, in every"
            " process's environment), or pass ZeroStrategy(stage=3, offload_optimizer=\"nvme\","
            " offload_parameters=\"nvme\", nvme_path=...) instead."
        )
    return environ[NVME_PATH_ENV_VAR]


def resolve_runtime_args(timeout: Any, remote_device: Any, logging_level: Any, stage: int | None,
                         merged: Mapping[str, Any]) -> tuple[timedelta, str | None, int]:
    """Check ``ZeroStrategy``'s ``timeout``, ``remote_device`` and ``logging_level``; return them normalised:
    ``(timeout, remote_device, logging level as an int)``. ``stage`` is None for ``stage="auto"``; ``merged`` is the
    user config merged with the keywords."""
    if timeout is None:
        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        timeout = default_pg_timeout
    if not isinstance(timeout, timedelta):
        example = f"timedelta(seconds={timeout!r})" if isinstance(timeout, (int, float)) and not isinstance(
            timeout, bool) else "timedelta(minutes=30)"
        raise TypeError(f"ZeroStrategy(timeout={timeout!r}) must be a datetime.timedelta (the process group"
                        f" timeout), got {type(timeout).__name__}. Use `from datetime import timedelta` and"
                        f" timeout={example}.")
    if timeout <= timedelta(0):
        raise ValueError(f"ZeroStrategy(timeout={timeout!r}) must be positive, e.g. timeout=timedelta(minutes=30).")
    if not (remote_device is None or isinstance(remote_device, str) and remote_device in _REMOTE_DEVICES):
        raise ValueError(f"ZeroStrategy(remote_device={remote_device!r}) is not supported. Use None (the parameter"
                         " offload device, else the GPU), \"cpu\" or \"nvme\": where zero.Init puts the"
                         " parameters created in configure_model at stage 3.")
    if remote_device is not None and stage is not None and stage != 3:
        raise ValueError(f"ZeroStrategy(remote_device={remote_device!r}) applies at stage 3 only (stage is {stage}):"
                         " zero.Init creates partitioned parameters only there. Remove it or use"
                         " ZeroStrategy(stage=3, ...).")
    if remote_device == "nvme" and offload_device(merged, "offload_param") != "nvme":
        raise ValueError("ZeroStrategy(remote_device=\"nvme\") needs the parameters offloaded to NVMe (zero.Init"
                         " takes the swap folder from there). Add offload_parameters=\"nvme\" and"
                         " nvme_path=..., or use remote_device=\"cpu\".")
    return timeout, remote_device, _log_level(logging_level)


def _log_level(level: Any) -> int:
    if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    if isinstance(level, str) and level.upper() in _LOG_LEVELS:
        return _LOG_LEVELS[level.upper()]
    raise ValueError(f"ZeroStrategy(logging_level={level!r}) is not a log level. Use a logging constant such as"
                     f" logging.INFO, or one of the names {list(_LOG_LEVELS)}.")


def resolve_knobs(
    stage: int | None = None,
    offload_optimizer: bool | OffloadDevice | None = None,
    offload_parameters: bool | OffloadDevice | None = None,
    nvme_path: str | None = None,
    pin_memory: bool | None = None,
    optimizer_buffer_count: int | None = None,
    params_buffer_count: int | None = None,
    params_buffer_size: int | None = None,
    max_in_cpu: int | None = None,
    aio: Mapping[str, Any] | None = None,
    partition_activations: bool | None = None,
    cpu_checkpointing: bool | None = None,
    contiguous_memory_optimization: bool | None = None,
    synchronize_checkpoint_boundary: bool | None = None,
    offload_optimizer_ratio: float | None = None,
    bf16_master_weights_and_grads: bool | None = None,
    bf16_optimizer_states: bool | None = None,
    **zero_keys: Any,
) -> dict[str, Any]:
    """Turn ``ZeroStrategy(...)`` keywords into a partial DeepSpeed config. ``None`` means "not given".

    Offload keywords go to ``zero_optimization.offload_*``, ``aio`` to the top-level ``aio`` section (NVMe async
    I/O), the activation checkpointing keywords to ``activation_checkpointing``, everything else (ZeRO++'s
    ``zero_hpz_partition_size``, ``zero_quantized_weights``, ``zero_quantized_gradients``, bucket sizes, ...) to
    ``zero_optimization``; ``offload_optimizer_ratio`` to ``offload_optimizer.ratio`` and the ``bf16_*`` keywords to
    the ``bf16`` section (low-precision master weights and optimizer states).
    """
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3)):
        raise ZeroConfigError(f"ZeroStrategy(stage={stage!r}) is not supported. Use 0, 1, 2 or 3. Or \"auto\""
                              " to let ZeroStrategy choose from the model size and the hardware.")
    _check_offload_arg("offload_optimizer", offload_optimizer)
    _check_offload_arg("offload_parameters", offload_parameters)
    nvme_path = resolve_nvme_path(nvme_path)
    if aio is not None and not isinstance(aio, Mapping):
        raise TypeError(f"ZeroStrategy(aio={aio!r}) must be a dict of DeepSpeed's aio keys, e.g."
                        " aio={'block_size': 1048576, 'queue_depth': 8, 'intra_op_parallelism': 1}.")
    activation = {"partition_activations": partition_activations, "cpu_checkpointing": cpu_checkpointing,
                  "contiguous_memory_optimization": contiguous_memory_optimization,
                  "synchronize_checkpoint_boundary": synchronize_checkpoint_boundary}
    bf16 = {"bf16_master_weights_and_grads": bf16_master_weights_and_grads,
            "bf16_optimizer_states": bf16_optimizer_states}
    for name, value in {**activation, **bf16}.items():
        if value is not None and not isinstance(value, bool):
            raise ZeroConfigError(f"ZeroStrategy({name}={value!r}) must be True or False.")
    _check_ratio_arg(offload_optimizer_ratio)
    if zero_keys.get("zenflow") is not None and not isinstance(zero_keys["zenflow"], Mapping):
        raise TypeError(f"ZeroStrategy(zenflow={zero_keys['zenflow']!r}) must be a dict of DeepSpeed's zenflow keys,"
                        " e.g. zenflow={'topk_ratio': 0.1, 'select_strategy': 'step', 'select_interval': 8,"
                        " 'update_interval': 4, 'overlap_step': True}.")
    # Keywords that only refine an offload keyword would otherwise be dropped without a word.
    orphans = []
    if nvme_path is not None and "nvme" not in (offload_optimizer, offload_parameters):
        orphans.append("nvme_path (needs offload_optimizer='nvme' or offload_parameters='nvme')")
    if aio is not None and "nvme" not in (offload_optimizer, offload_parameters):
        orphans.append("aio (needs offload_optimizer='nvme' or offload_parameters='nvme')")
    if pin_memory is not None and not (offload_optimizer or offload_parameters):
        orphans.append("pin_memory (needs offload_optimizer or offload_parameters)")
    orphans += [f"{name} (needs offload_optimizer)" for name, value in (
        ("optimizer_buffer_count", optimizer_buffer_count), ("offload_optimizer_ratio", offload_optimizer_ratio))
        if value is not None and not offload_optimizer]
    orphans += [f"{name} (needs offload_parameters)" for name, value in (
        ("params_buffer_count", params_buffer_count), ("params_buffer_size", params_buffer_size),
        ("max_in_cpu", max_in_cpu)) if value is not None and not offload_parameters]
    if orphans:
        raise ZeroConfigError(
            f"ZeroStrategy got {', '.join(orphans)} without the offload it configures, so it would be ignored. Add"
            " the offload keyword, or set the key inside the config's zero_optimization.offload_* section instead."
        )
    zero: dict[str, Any] = {k: v for k, v in zero_keys.items() if v is not None}
    if stage is not None:
        zero["stage"] = stage
    if offload_optimizer:
        device = "cpu" if offload_optimizer is True else offload_optimizer
        zero["offload_optimizer"] = _offload_section(device, nvme_path, pin_memory,
                                                     {"buffer_count": optimizer_buffer_count,
                                                      "ratio": offload_optimizer_ratio})
    if offload_parameters:
        device = "cpu" if offload_parameters is True else offload_parameters
        zero["offload_param"] = _offload_section(device, nvme_path, pin_memory, {
            "buffer_count": params_buffer_count, "buffer_size": params_buffer_size, "max_in_cpu": max_in_cpu})
    knobs: dict[str, Any] = {"zero_optimization": zero} if zero else {}
    if aio is not None:
        knobs["aio"] = copy.deepcopy(dict(aio))
    activation = {k: v for k, v in activation.items() if v is not None}
    if activation:
        knobs["activation_checkpointing"] = activation
    bf16 = {k: v for k, v in bf16.items() if v is not None}
    if bf16:
        knobs["bf16"] = bf16
    return knobs


def _check_ratio_arg(ratio: Any) -> None:
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ZeroConfigError(
            f"ZeroStrategy(offload_optimizer_ratio={ratio!r}) must be a number in (0, 1]: the share of the optimizer"
            " states that CPU Adam steps (1.0, the default, offloads them all; the rest stays on the GPU). For no"
            " offload at all, leave out offload_optimizer.")


def zero_stage(config: Mapping[str, Any]) -> int:
    """The ZeRO stage of a (resolved, merged or user) config: absent or ``"auto"`` means 2, like
    :func:`resolve_ds_config` (DeepSpeed's own default would be 0)."""
    return _as_stage(config.get("zero_optimization", {}).get("stage"))


def _merge_value(path: str, current: Any, value: Any, conflicts: list[str]) -> Any:
    """The merged value at ``path``: sections (offload_*) merge key by key, scalars must agree."""
    if isinstance(current, Mapping) and isinstance(value, Mapping):
        section = dict(current)
        for key, sub in value.items():
            section[key] = _merge_value(f"{path}.{key}", section.get(key, AUTO), sub, conflicts)
        return section
    if path == "zero_optimization.stage" and current != AUTO:
        try:
            current = _as_stage(current)  # "3" and 3 agree
        except ZeroConfigError:
            pass
    if current == AUTO or current == value:
        return copy.deepcopy(value)
    conflicts.append(f"{path}: ZeroStrategy(...) says {value!r}, the config says {current!r}")
    return current


def merge_knobs(user: Mapping[str, Any], knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge constructor keywords into the user config; keywords that contradict the config are errors, and so is
    an NVMe offload without a path."""
    conflicts: list[str] = []
    merged = copy.deepcopy(dict(user))
    merged.setdefault("zero_optimization", {})
    for name in _KNOB_SECTIONS:
        if name not in knobs and name != "zero_optimization":
            continue
        section = merged.setdefault(name, {})
        if not isinstance(section, dict):
            raise ZeroConfigError(f"{name!r} must be a JSON object (dict), got {type(section).__name__}:"
                                  f" {section!r}")
        for key, value in knobs.get(name, {}).items():
            section[key] = _merge_value(f"{name}.{key}", section.get(key, AUTO), value, conflicts)
    zero = merged["zero_optimization"]
    if conflicts:
        raise ZeroConfigError(
            "ZeroStrategy keywords contradict the DeepSpeed config:\n  - " + "\n  - ".join(conflicts)
            + "\nSet each value in one place only (either the keyword or the config)."
        )
    for name in _OFFLOAD_SECTIONS:
        section = zero.get(name)
        if isinstance(section, Mapping) and section.get("device") == "nvme" and not section.get("nvme_path"):
            raise ZeroConfigError(
                f"zero_optimization.{name} offloads to NVMe but names no nvme_path. Pass ZeroStrategy(nvme_path=...)"
                f" with the offload keyword, or set zero_optimization.{name}.nvme_path in the config."
            )
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Trainer flags
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Conflict:
    key: str
    config_value: Any
    trainer_value: Any
    fix: str
    trainer_text: str | None = None  # instead of "the Trainer says {trainer_value!r}"

    def __str__(self) -> str:
        trainer = self.trainer_text or f"the Trainer says {self.trainer_value!r}"
        return f"{self.key}: the DeepSpeed config says {self.config_value!r} but {trainer}. Fix: {self.fix}"


def _fill(config: dict[str, Any], key: str, value: Any, conflicts: list[_Conflict], fix: str) -> None:
    """Set ``config[key] = value`` unless the user set a different explicit value (then record a conflict)."""
    current = config.get(key, AUTO)
    if current == AUTO:
        config[key] = value
    elif current != value:
        conflicts.append(_Conflict(key, current, value, fix))


def _enabled(section: Any) -> bool | str | None:
    """``True``/``False``/``"auto"``/``None`` (not said) for an fp16/bf16 section.

    A section without ``"enabled"`` does not say: DeepSpeed reads it as disabled, and the Trainer decides.
    """
    if not isinstance(section, Mapping) or "enabled" not in section:
        return None
    value = section["enabled"]
    if isinstance(value, str) and value.lower() in ("true", "false"):  # pydantic accepts these too
        return value.lower() == "true"
    if isinstance(value, (bool, int)):
        return bool(value)
    return value


def _resolve_precision(config: dict[str, Any], precision: str, conflicts: list[_Conflict]) -> None:
    if precision not in SUPPORTED_PRECISION:
        raise ZeroConfigError(
            f"Trainer(precision={precision!r}) is not supported by ZeroStrategy. Use one of {SUPPORTED_PRECISION}."
        )
    want = {"fp16": precision.startswith("16-"), "bf16": precision.startswith("bf16-")}
    # DeepSpeed reads the legacy "bfloat16" section only when "bf16" is absent: fold it into "bf16".
    if "bfloat16" in config:
        legacy = config.pop("bfloat16")
        config.setdefault("bf16", legacy)
    for section in ("fp16", "bf16"):
        enabled = _enabled(config.get(section))
        if enabled is True and not want[section]:
            conflicts.append(_Conflict(f"{section}.enabled", True, precision,
                                       f"use Trainer(precision={'16-mixed' if section == 'fp16' else 'bf16-mixed'!r})"
                                       f" or remove the {section!r} section (or set its \"enabled\" to \"auto\")"))
        elif enabled is False and want[section]:
            conflicts.append(_Conflict(f"{section}.enabled", False, precision,
                                       f"use Trainer(precision='32-true') or set {section}.enabled to true/\"auto\""))
        if want[section]:
            config[section] = {**config.get(section, {}), "enabled": True}
        elif section in config:
            config[section] = {**config[section], "enabled": False}


def _resolve_clipping(config: dict[str, Any], flags: TrainerFlags, conflicts: list[_Conflict]) -> None:
    if flags.gradient_clip_algorithm not in (None, "norm"):
        raise ZeroConfigError(
            f"Trainer(gradient_clip_algorithm={flags.gradient_clip_algorithm!r}) is not supported: DeepSpeed clips"
            " by global norm only. Use Trainer(gradient_clip_algorithm='norm'), or switch to manual optimization"
            " and clip inside training_step."
        )
    if flags.gradient_clip_val is None:
        if config.get("gradient_clipping", AUTO) == AUTO:
            config["gradient_clipping"] = 0.0
        return
    _fill(config, "gradient_clipping", float(flags.gradient_clip_val), conflicts,
          f"use Trainer(gradient_clip_val={config.get('gradient_clipping')!r}) or remove 'gradient_clipping'"
          " from the config")


def _resolve_batch(config: dict[str, Any], flags: TrainerFlags, conflicts: list[_Conflict]) -> None:
    acc = flags.accumulate_grad_batches
    _fill(config, "gradient_accumulation_steps", acc, conflicts,
          f"use Trainer(accumulate_grad_batches={config.get('gradient_accumulation_steps')!r}) or remove"
          " 'gradient_accumulation_steps' from the config")
    micro = flags.micro_batch_size
    if micro is None:  # no dataloader batch size known (manual loops, iterable datasets): keep the user's or 1
        micro = config.get("train_micro_batch_size_per_gpu", AUTO)
        if micro == AUTO:
            train = config.get("train_batch_size", AUTO)
            per_step = acc * flags.world_size
            if train != AUTO and (train < per_step or train % per_step):
                conflicts.append(_Conflict(
                    "train_batch_size", train, None,
                    f"set train_batch_size to a multiple of {per_step}, or remove it and set the train DataLoader's"
                    " batch_size (or 'train_micro_batch_size_per_gpu')",
                    trainer_text=f"it must be a multiple of accumulate_grad_batches ({acc}) x world size"
                                 f" ({flags.world_size}) = {per_step}"))
                return
            micro = train // per_step if train != AUTO else 1
    _fill(config, "train_micro_batch_size_per_gpu", micro, conflicts,
          "make the train DataLoader's batch_size match, or remove 'train_micro_batch_size_per_gpu' from the config")
    _fill(config, "train_batch_size", micro * acc * flags.world_size, conflicts,
          f"train_batch_size must equal micro batch ({micro}) x accumulate_grad_batches ({acc}) x world size"
          f" ({flags.world_size}); remove it from the config or set it to \"auto\"")


def resolve_ds_config(user: Mapping[str, Any], knobs: Mapping[str, Any], flags: TrainerFlags, *,
                      deepcompile: bool = False) -> dict[str, Any]:
    """Return the DeepSpeed config to run with. ``user`` and ``knobs`` are not modified.

    Trainer ``flags`` fill every key the user left out or set to ``"auto"``. Explicit user values that agree are
    kept; every disagreement is collected and raised once, each with both values and the fix. ``deepcompile``: the
    engine runs DeepSpeed's DeepCompile (``ZeroStrategy(compile="deepcompile")``), which needs managed accumulation.
    """
    config = merge_knobs(user, knobs)
    config["zero_optimization"]["stage"] = _as_stage(config["zero_optimization"].get("stage"))
    conflicts: list[_Conflict] = []
    _resolve_precision(config, flags.precision, conflicts)
    _resolve_clipping(config, flags, conflicts)
    _resolve_batch(config, flags, conflicts)
    if conflicts:
        raise ZeroConfigError(
            f"The DeepSpeed config disagrees with the Trainer in {len(conflicts)} place(s):\n  - "
            + "\n  - ".join(str(c) for c in conflicts)
        )
    # "auto" left anywhere else (HF-style bucket sizes, steps_per_print, fp16.loss_scale, ...) means DeepSpeed's
    # default: drop it rather than hand DeepSpeed a string where it expects a number.
    config = {k: v for k, v in config.items() if v != AUTO}
    for section in ("zero_optimization", "fp16", "bf16"):
        if isinstance(config.get(section), Mapping):
            config[section] = {k: v for k, v in config[section].items() if v != AUTO}
    check_zero_features(config, flags)
    # The one place that decides it (a user value is refused, _OWNED_KEYS). The Trainer owns the accumulation boundary:
    # each optimizer step is one DeepSpeed step (see engines.py). DeepSpeed refuses its unmanaged accumulation with
    # DeepCompile; the registry sets the boundary per backward instead (EngineRegistry._deepcompile_boundary).
    # ZenFlow runs only under DeepSpeed's managed accumulation: its boundary is ZenFlow's update interval (zenflow/
    # engine.py is_zenflow_update_boundary); unmanaged, the selective AdamW steps a None gradient at the first step
    # (zenflow_torch_adam.py _single_tensor_adamw). _zenflow_problems keeps Trainer(accumulate_grad_batches=1) then.
    config["managed_gradient_accumulation"] = deepcompile or zenflow_enabled(config)
    config.setdefault("steps_per_print", 2**31 - 1)  # no per-step prints; Lightning's progress bar reports
    config.setdefault("zero_allow_untested_optimizer", True)
    stage = config["zero_optimization"]["stage"]
    if stage < 2:
        # DeepSpeed's unmanaged accumulation supports overlap_comm only where gradients are partitioned (stage >= 2)
        if config["zero_optimization"].get("overlap_comm") is True:
            raise ZeroConfigError(
                f"zero_optimization.overlap_comm=True needs stage 2 or 3 (stage is {stage}): gradients are reduced"
                " once per optimizer step at stages 0-1. Remove overlap_comm or use ZeroStrategy(stage=2)."
            )
        config["zero_optimization"]["overlap_comm"] = False
    return config
