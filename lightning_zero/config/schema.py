"""Loading and static validation of the user's DeepSpeed config (runs in ZeroStrategy.__init__, before any process
starts): top-level keys and their types, DeepSpeed's own section schemas, and the ``optimizer.type`` names."""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

from lightning_zero.config.types import AUTO, ZeroConfigError, _as_stage, _positive_int

CONFIG_ENV_VAR = "LIGHTNING_ZERO_CONFIG"

# Every top-level key DeepSpeed 0.18/0.19 reads (tests/unit/test_config.py checks this list against the installed
# DeepSpeed, so a new release that adds keys shows up as a test failure rather than as a false "unknown key" error).
KNOWN_TOP_LEVEL_KEYS: frozenset[str] = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sparse_attention",
    "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})

# Keys Lightning drives itself: the strategy owns the accumulation boundary (DeepSpeed's unmanaged mode), so a user
# value here would be silently ignored. They are rejected with the fix instead.
_OWNED_KEYS = {
    "managed_gradient_accumulation": "lightning_zero lets the Trainer own the accumulation boundary; remove the key",
}

# Scalar top-level keys and the Python types they accept (bool is excluded from the numbers on purpose).
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "train_batch_size": (int,),
    "train_micro_batch_size_per_gpu": (int,),
    "gradient_accumulation_steps": (int,),
    "gradient_clipping": (int, float),
    "steps_per_print": (int,),
    "zero_allow_untested_optimizer": (bool,),
    "zero_force_ds_cpu_optimizer": (bool,),
    "wall_clock_breakdown": (bool,),
    "prescale_gradients": (bool,),
    "gradient_predivide_factor": (int, float),
}
# Scalar keys that must be positive (>= 1) or non-negative (>= 0) when set.
_MINIMUM: dict[str, int] = {
    "train_batch_size": 1,
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0,
}
_SECTION_KEYS = ("zero_optimization", "fp16", "bf16", "bfloat16", "optimizer", "scheduler",
                 "activation_checkpointing", "aio")
# Keys DeepSpeed renamed: a user config with the old name would be silently ignored (DeepSpeed reads aio and
# activation_checkpointing with `get`, without a schema).
_RENAMED = {
    ("aio", "thread_count"): "intra_op_parallelism",
    ("activation_checkpointing", "partitioned_activations"): "partition_activations",
}


def load_user_config(config: Mapping[str, Any] | str | os.PathLike | None, environ: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """Return a deep copy of the user's DeepSpeed config: a dict, a JSON path, ``$LIGHTNING_ZERO_CONFIG`` or ``{}``."""
    environ = os.environ if environ is None else environ
    source = "ZeroStrategy(config=...)"
    if config is None and environ.get(CONFIG_ENV_VAR):
        config, source = environ[CONFIG_ENV_VAR], f"${CONFIG_ENV_VAR}"
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            hint = " It is a directory; pass the JSON file inside it." if path.is_dir() else ""
            raise ZeroConfigError(
                f"{source} points to {str(config)!r}, which is not a file.{hint} Pass a path to a DeepSpeed JSON"
                " config or a dict."
            )
        try:
            loaded = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ZeroConfigError(
                f"{source} points to {str(config)!r}, which is not valid JSON: {err}. Fix the file or pass a dict."
            ) from None
        if not isinstance(loaded, dict):
            raise ZeroConfigError(f"{source} file {str(config)!r} holds a {type(loaded).__name__}; it must hold a"
                                  " JSON object (a DeepSpeed config).")
        return loaded
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{source} got a {type(config).__name__}; pass a dict, a path to a DeepSpeed JSON config, or None."
        )
    return copy.deepcopy(dict(config))


def _suggest(key: str, known: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _model_fields(model: Any) -> set[str]:
    """The keys a pydantic model accepts: field names and their aliases."""
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def _nested_model(model: Any, path: tuple[Any, ...]) -> Any:
    """The pydantic model of the sub-section at ``path`` (e.g. ``("offload_optimizer",)``), or ``None``."""
    from pydantic import BaseModel

    for part in path:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        candidates = (field.annotation, *get_args(field.annotation))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _check_section(name: str, model: Any, section: Any, problems: list[str]) -> None:
    """Validate one config section with DeepSpeed's own pydantic model; reword its errors."""
    from pydantic import ValidationError

    if not isinstance(section, Mapping):
        problems.append(f"{name!r} must be a JSON object (dict), got {type(section).__name__}: {section!r}")
        return
    # "auto" is resolved later from the Trainer; validate the rest.
    concrete = {k: v for k, v in section.items() if v != AUTO}
    try:
        model(**concrete)
    except ValidationError as err:
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                parent = _nested_model(model, tuple(e["loc"][:-1]))
                hint = _suggest(str(e["loc"][-1]), _model_fields(parent)) if parent is not None else ""
                problems.append(f"unknown key '{name}.{loc}'.{hint}")
            elif name == "zero_optimization" and tuple(e["loc"]) == ("stage",):
                problems.append(f"'{name}.stage' = {e['input']!r}: must be 0, 1, 2 or 3")
            elif not loc:  # a check across keys of the section: the input is the whole section, do not echo it
                problems.append(f"'{name}': {e['msg'].removeprefix('Value error, ')}")
            else:
                problems.append(f"'{name}.{loc}' = {e['input']!r}: {e['msg']}")


def _plain_section_types(name: str) -> dict[str, type]:
    """Key -> type for the sections DeepSpeed reads without a schema, from DeepSpeed's own defaults."""
    if name == "aio":
        from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT as defaults
    else:
        from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT as defaults
    return {key: bool if isinstance(default, bool) else int for key, default in defaults.items()}


def _check_plain_section(name: str, section: Mapping[str, Any], problems: list[str]) -> None:
    """Validate ``aio`` / ``activation_checkpointing``: DeepSpeed reads them with ``get`` and would silently ignore a
    misspelled or renamed key."""
    types = _plain_section_types(name)
    for key, value in section.items():
        if key not in types:
            renamed = _RENAMED.get((name, key))
            hint = f" DeepSpeed calls it {renamed!r}." if renamed else _suggest(key, set(types))
            problems.append(f"unknown key '{name}.{key}'.{hint}")
        elif types[key] is bool and not isinstance(value, bool):
            problems.append(f"'{name}.{key}' must be true or false, got {type(value).__name__}: {value!r}")
        elif types[key] is int and not _positive_int(value):
            if not (key == "number_checkpoints" and value is None):
                problems.append(f"'{name}.{key}' must be a positive integer, got {type(value).__name__}: {value!r}")


def _without_partial_offload(zero: Mapping[str, Any]) -> Mapping[str, Any]:
    """``zero`` without ``offload_optimizer.ratio`` when the stage is not 3: DeepSpeed's schema asserts "Partial
    offloading only supported for ZeRO Stage 3." there; check_zero_features reports it with the fix instead."""
    section = zero.get("offload_optimizer")
    try:
        stage = _as_stage(zero.get("stage"))
    except ZeroConfigError:
        return zero  # the schema reports the stage
    if stage == 3 or not isinstance(section, Mapping) or "ratio" not in section:
        return zero
    return {**zero, "offload_optimizer": {k: v for k, v in section.items() if k != "ratio"}}


def supported_optimizer_types() -> list[str]:
    """The ``optimizer.type`` names DeepSpeed 0.19 builds: its own (matched case-insensitively) and the optimizer
    classes of ``torch.optim`` (matched by exact name), as ``DeepSpeedEngine._is_supported_optimizer`` decides."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    # a torch name that matches one of DeepSpeed's case-insensitively ("Adam") builds DeepSpeed's optimizer
    torch_optimizers = sorted(name for name in dir(torch.optim) if name != "Optimizer"
                              and name.lower() not in DEEPSPEED_OPTIMIZERS
                              and isinstance(getattr(torch.optim, name), type)
                              and issubclass(getattr(torch.optim, name), torch.optim.Optimizer))
    return [*DEEPSPEED_OPTIMIZERS, *torch_optimizers]


def _check_optimizer_type(section: Mapping[str, Any], problems: list[str]) -> None:
    """A config ``optimizer`` block must name an optimizer DeepSpeed builds (it would assert mid-setup otherwise)."""
    supported = supported_optimizer_types()
    if "type" not in section:
        problems.append(f"'optimizer' has no \"type\": name one of {supported}")
        return
    name = section["type"]
    if not isinstance(name, str):
        problems.append(f"'optimizer.type' must be a string, got {type(name).__name__}: {name!r}. Use one of"
                        f" {supported}")
        return
    own = {n for n in supported if n.islower()}
    if name.lower() in own or name in supported:
        return
    by_lower = {n.lower(): n for n in supported}
    close = difflib.get_close_matches(name.lower(), sorted(by_lower), n=1, cutoff=0.6)
    hint = f" Did you mean {by_lower[close[0]]!r}?" if close else ""
    problems.append(f"'optimizer.type' = {name!r} is not an optimizer DeepSpeed supports.{hint} Use one of"
                    f" {supported} (DeepSpeed's own names in any case, torch.optim classes by their exact name)")


def validate_user_config(user: Mapping[str, Any]) -> None:
    """Raise one :class:`ZeroConfigError` listing every unknown key and wrong type in ``user``."""
    problems: list[str] = []
    for key, value in user.items():
        if key not in KNOWN_TOP_LEVEL_KEYS:
            problems.append(f"unknown key {key!r}.{_suggest(key, KNOWN_TOP_LEVEL_KEYS)}")
        elif key in _OWNED_KEYS:
            problems.append(f"{key!r}: {_OWNED_KEYS[key]}")
        elif key in _SCALAR_TYPES and value != AUTO:
            types = _SCALAR_TYPES[key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                problems.append(f"{key!r} must be {_type_name(types)} (or \"auto\"), got {type(value).__name__}:"
                                f" {value!r}")
            elif key in _MINIMUM and value < _MINIMUM[key]:
                problems.append(f"{key!r} must be at least {_MINIMUM[key]}, got {value!r}")
        elif key in _SECTION_KEYS and not isinstance(value, Mapping):
            problems.append(f"{key!r} must be a JSON object (dict), got {type(value).__name__}: {value!r}")

    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for name, model in (("zero_optimization", DeepSpeedZeroConfig), ("fp16", DeepSpeedFP16Config),
                        ("bf16", DeepSpeedBF16Config), ("bfloat16", DeepSpeedBF16Config)):
        if isinstance(user.get(name), Mapping):
            section = _without_partial_offload(user[name]) if name == "zero_optimization" else user[name]
            _check_section(name, model, section, problems)
    for name in ("aio", "activation_checkpointing"):
        if isinstance(user.get(name), Mapping):
            _check_plain_section(name, user[name], problems)
    if isinstance(user.get("optimizer"), Mapping):
        _check_optimizer_type(user["optimizer"], problems)
    if problems:
        raise ZeroConfigError(
            "The DeepSpeed config has problems:\n  - " + "\n  - ".join(problems)
            + "\nFix these keys (see https://www.deepspeed.ai/docs/config-json/)."
        )
