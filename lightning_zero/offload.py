"""Offload glue: DeepSpeed's CPU Adam for offloaded torch Adam/AdamW, NVMe checks, activation checkpointing.

Vocabulary as in engines.py: the user's optimizer stays the *face* Lightning sees; DeepSpeed steps a private optimizer
built from it. When the optimizer is offloaded (ZeRO-Offload, ZeRO-Infinity) the step runs on the CPU, where
DeepSpeed insists on its vectorised ``DeepSpeedCPUAdam``: a torch ``Adam``/``AdamW`` face is stepped by a
``DeepSpeedCPUAdam`` with the same hyperparameters, and ``EngineSlot.sync_hyperparameters`` copies lr/betas/... from
the face to it before every step, exactly as it does for a plain clone.

Filesystem access goes through ``disk_usage`` so tests can fake a full drive.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_zero.config import ZeroConfigError, offload_device, offload_ratio, zenflow_enabled
from lightning_zero.engines import clone_optimizer

__all__ = [
    "build_stepped_optimizer",
    "check_aio_buildable",
    "check_nvme",
    "check_zenflow_parameters",
    "configure_activation_checkpointing",
    "count_parameters",
    "effective_offload_ratio",
    "nvme_swap_bytes",
    "partition_for_nvme",
    "route_zero_grad",
]

# Bytes per parameter DeepSpeed swaps to NVMe. Optimizer (ZeRO-Infinity's optimizer swapper): the fp32 master weights,
# fp32 gradients, exp_avg and exp_avg_sq. Parameters: one copy in the model's dtype.
_OPTIMIZER_SWAP_BYTES = 16
_SUB_GROUP_SIZE = 10**9  # DeepSpeed's default zero_optimization.sub_group_size
# System package that provides libaio's headers, by package manager (as DeepSpeed's AsyncIOBuilder suggests).
_LIBAIO_PACKAGES = (("dpkg", "apt install libaio-dev"), ("rpm", "yum install libaio-devel"),
                    ("pacman", "pacman -S libaio"))


# --------------------------------------------------------------------------------------------------------------------
# The optimizer DeepSpeed steps
# --------------------------------------------------------------------------------------------------------------------


def build_stepped_optimizer(face: Optimizer, config: Mapping[str, Any]) -> Optimizer:
    """The optimizer DeepSpeed steps for ``face``: a clone, or ``DeepSpeedCPUAdam`` when the optimizer is offloaded.

    Raises ``ValueError`` for an offloaded optimizer that DeepSpeed cannot step on the CPU, unless the config allows
    it with ``"zero_force_ds_cpu_optimizer": false``.
    """
    device = offload_device(config, "offload_optimizer")
    if device is None:
        return clone_optimizer(face)
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.lion import DeepSpeedCPULion

    ratio = offload_ratio(config)
    name = type(face).__name__
    if ratio < 1.0 and not isinstance(face, (DeepSpeedCPUAdam, torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"ZeroStrategy(offload_optimizer_ratio={ratio}) (partial offload) steps the offloaded share with"
            f" DeepSpeedCPUAdam and the rest with torch AdamW; {name} cannot be split that way. Use torch.optim.AdamW"
            " (or Adam), or leave out the ratio."
        )
    if ratio < 1.0:
        _warn_ratio_granularity(face, config, ratio)
    if isinstance(face, DeepSpeedCPUAdam):
        return _check_partial_decay(DeepSpeedCPUAdam(
            _groups(face, tuple(face.defaults)), **face.defaults, adamw_mode=face.adam_w_mode,
            fp32_optimizer_states=_fp32_states(config, face.fp32_optimizer_states)), ratio)
    if isinstance(face, DeepSpeedCPULion):
        return clone_optimizer(face)
    if type(face) in (torch.optim.Adam, torch.optim.AdamW):
        return _check_partial_decay(_cpu_adam(face, device, config), ratio)
    if config.get("zero_force_ds_cpu_optimizer") is False:
        rank_zero_info(f"ZeroStrategy: the optimizer is offloaded to {device}; your {name} steps there as it is"
                       " (\"zero_force_ds_cpu_optimizer\": false). DeepSpeedCPUAdam would be faster.")
        return clone_optimizer(face)
    raise ValueError(
        f"ZeroStrategy(offload_optimizer={device!r}) steps the optimizer on the CPU, where DeepSpeed uses its own"
        f" DeepSpeedCPUAdam; {name} cannot be translated to it. Use torch.optim.Adam or AdamW (ZeroStrategy then"
        f" steps DeepSpeedCPUAdam with the same hyperparameters), or keep {name} with a slower CPU step by adding"
        " \"zero_force_ds_cpu_optimizer\": false to the DeepSpeed config (ZeroStrategy(config={...}))."
    )


def _groups(face: Optimizer, keys: Iterable[str]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in g.items() if k in keys}, "params": list(g["params"])} for g in face.param_groups]


def _fp32_states(config: Mapping[str, Any], requested: bool = True) -> bool:
    """``fp32_optimizer_states`` for CPU Adam: False under ``bf16.bf16_optimizer_states`` (DeepSpeed asserts it)."""
    states = (config.get("bf16") or {}).get("bf16_optimizer_states") is True
    if states and requested:
        rank_zero_info("ZeroStrategy: bf16_optimizer_states=True, so DeepSpeedCPUAdam keeps its moments in bf16"
                       " (fp32_optimizer_states=False).")
    return requested and not states


def _check_partial_decay(optimizer: Optimizer, ratio: float) -> Optimizer:
    """Partial offload steps the GPU share with ``torch.optim.AdamW`` (DeepSpeed's ``backup_optimizer``, stage3.py),
    whatever the CPU Adam's mode: Adam's L2 weight decay would become decoupled decay there."""
    if ratio < 1.0 and not optimizer.adam_w_mode and any(g["weight_decay"] for g in optimizer.param_groups):
        raise ValueError(
            f"ZeroStrategy(offload_optimizer_ratio={ratio}) steps the share kept on the GPU with torch AdamW"
            " (decoupled weight decay), so Adam's L2 weight_decay would apply differently to the two shares. Use"
            " torch.optim.AdamW, weight_decay=0, or leave out the ratio."
        )
    return optimizer


def _warn_ratio_granularity(face: Optimizer, config: Mapping[str, Any], ratio: float) -> None:
    """Say so when DeepSpeed's sub-groups make the offloaded share differ from the ratio asked for."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    numels = [[-(-int(getattr(p, "ds_numel", p.numel())) // world) for p in g["params"] if p.requires_grad]
              for g in face.param_groups]
    sub_group_size = int((config.get("zero_optimization") or {}).get("sub_group_size", _SUB_GROUP_SIZE))
    actual = effective_offload_ratio(ratio, numels, sub_group_size)
    if abs(actual - ratio) > 0.05:
        per_rank = sum(map(sum, numels))
        rank_zero_warn(
            f"ZeroStrategy(offload_optimizer_ratio={ratio}): DeepSpeed offloads whole sub-groups of"
            f" sub_group_size={sub_group_size:,} elements, so {actual:.0%} of the optimizer states go to CPU Adam here"
            f" ({per_rank:,} elements per rank), not {ratio:.0%}. For a closer split pass a smaller"
            f" ZeroStrategy(sub_group_size=...), e.g. {max(1, per_rank // 20):,} (about 20 sub-groups)."
        )


def effective_offload_ratio(ratio: float, partition_numels: Iterable[Iterable[int]], sub_group_size: int) -> float:
    """The share of the optimizer states DeepSpeed's stage 3 actually offloads for ``ratio``.

    DeepSpeed splits each param group's partition into sub-groups of about ``sub_group_size`` elements and sends
    the last ``n - int((1 - ratio) * n)`` of the ``n`` sub-groups to CPU Adam (stage3.py ``_create_fp32_partitions``):
    the ratio counts sub-groups, not elements. ``partition_numels``: per param group, each parameter's elements on
    one rank (in order)."""
    sizes: list[int] = []
    for group in partition_numels:
        current, total = 0, [n for n in group if n]
        for i, numel in enumerate(total):
            current += numel
            if current >= sub_group_size or i == len(total) - 1:
                sizes.append(current)
                current = 0
    if not sizes:
        return ratio
    first_cpu = int((1 - ratio) * len(sizes))
    return sum(sizes[first_cpu:]) / sum(sizes)


def _cpu_adam(face: Optimizer, device: str, config: Mapping[str, Any] | None = None) -> Optimizer:
    """``DeepSpeedCPUAdam`` with the hyperparameters of a torch Adam/AdamW (AdamW and decoupled weight decay map to
    ``adamw_mode=True``, Adam's L2 penalty to ``adamw_mode=False``)."""
    name = type(face).__name__
    unsupported = []
    groups = face.param_groups
    if any(g.get("amsgrad") for g in groups):
        unsupported.append("amsgrad=True (DeepSpeedCPUAdam has no AMSGrad)")
    if any(g.get("maximize") for g in groups):
        unsupported.append("maximize=True (minimise the negated loss instead)")
    if any(isinstance(g.get(k), torch.Tensor) for g in groups for k in ("lr", "eps", "weight_decay")):
        unsupported.append("a Tensor lr/eps/weight_decay (pass floats)")
    modes = {bool(g.get("decoupled_weight_decay", isinstance(face, torch.optim.AdamW))) for g in groups}
    if len(modes) > 1:
        unsupported.append("param groups that mix decoupled and L2 weight decay (use one optimizer per kind)")
    if unsupported:
        raise ValueError(
            f"ZeroStrategy(offload_optimizer={device!r}) steps your {name} with DeepSpeedCPUAdam, which does not"
            f" support {'; '.join(unsupported)}. Change the optimizer's arguments, or do not offload the optimizer."
        )
    adamw_mode = modes.pop()
    d = face.defaults
    betas = tuple(float(b) for b in d["betas"])
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = DeepSpeedCPUAdam(_groups(face, ("lr", "betas", "eps", "weight_decay")), lr=float(d["lr"]),
                                 betas=betas, eps=float(d["eps"]), weight_decay=float(d["weight_decay"]),
                                 adamw_mode=adamw_mode, fp32_optimizer_states=_fp32_states(config or {}))
    rank_zero_info(
        f"ZeroStrategy: the optimizer is offloaded to {device}, so DeepSpeedCPUAdam(adamw_mode={adamw_mode}) steps in"
        f" place of your {name}, with the same hyperparameters (lr={d['lr']}, betas={betas}, eps={d['eps']},"
        f" weight_decay={d['weight_decay']}); your {name} stays the optimizer Lightning and your schedulers see."
    )
    return optimizer


def route_zero_grad(face: Optimizer, engine: Any, config: Mapping[str, Any]) -> None:
    """Make ``face.zero_grad()`` clear the model's gradients through DeepSpeed's ZeRO optimizer, for the config's
    optimizer (``face``: the optimizer DeepSpeed built, which Lightning sees) offloaded at stages 1-2.

    Its parameters are DeepSpeed's fp32 partitions, whose ``.grad`` is ZeRO-Offload's persistent CPU gradient buffer
    (DeepSpeed 0.19.8 stage_1_and_2.py ``initialize_optimizer_states``) that every boundary backward copies into. The
    ``zero_grad()`` Lightning calls before each accumulation would set it to None and the next backward fail
    ("'NoneType' object has no attribute 'view'", ``async_inplace_copy_grad_to_fp32_buffer_from_gpu``). DeepSpeed's
    own ``zero_grad`` clears the model's gradients instead, as under Lightning's DeepSpeedStrategy, whose optimizer is
    DeepSpeed's."""
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if offload_device(config, "offload_optimizer") is None or stage not in (1, 2) or engine.optimizer is face:
        return
    face.zero_grad = engine.optimizer.zero_grad  # type: ignore[method-assign]


def check_zenflow_parameters(module: torch.nn.Module, config: Mapping[str, Any]) -> None:
    """Refuse, before the engine is built, trainable parameters DeepSpeed 0.19.8's ZenFlow fails on in its first
    backward: it selects gradient columns of 2-D weights and steps 1-D parameters whole (zenflow_stage_1_and_2.py),
    and any other shape breaks its selective gradient copy."""
    if not zenflow_enabled(config):
        return
    bad = [f"{name} {tuple(p.shape)}" for name, p in module.named_parameters()
           if p.requires_grad and not (p.dim() == 1 or (p.dim() == 2 and p.shape[0] > 1))]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ZeroConfigError(
            f"ZeroStrategy(zenflow=...): DeepSpeed 0.19.8's ZenFlow steps trainable parameters that are 1-D or 2-D"
            f" with at least two rows; it fails in the first backward on {shown}. A one-row weight such as"
            " nn.Linear(n, 1).weight is copied as if it were a bias (\"The size of tensor a (8) must match the size of"
            " tensor b (16)\", zenflow_stage_1_and_2.py _process_selected_fp32_groups_grad); 0-D and 3-D+ parameters"
            " (convolution kernels) do not match ZenFlow's column layout (zenflow_utils.py _flatten_dense_tensors)."
            " Freeze them (requires_grad=False), give a one-row layer two rows (e.g. nn.Linear(n, 2) and use one"
            " output), hold the weight as a 2-D matrix, or remove zenflow.")


# --------------------------------------------------------------------------------------------------------------------
# NVMe offload (ZeRO-Infinity)
# --------------------------------------------------------------------------------------------------------------------


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of ``module``, each shared tensor once; full sizes also for stage-3 partitioned parameters."""
    return sum({id(p): int(getattr(p, "ds_numel", p.numel())) for p in module.parameters()}.values())


def _nvme_sections(config: Mapping[str, Any]) -> dict[str, str]:
    """offload section name -> nvme_path, for the sections that offload to NVMe."""
    zero = config.get("zero_optimization") or {}
    return {name: str(zero[name].get("nvme_path")) for name in ("offload_optimizer", "offload_param")
            if offload_device(config, name) == "nvme"}


def nvme_swap_bytes(config: Mapping[str, Any], num_params: int, ranks_on_node: int, world_size: int
                    ) -> dict[str, int]:
    """Bytes DeepSpeed swaps under each ``nvme_path`` on one node: each of the node's ``ranks_on_node`` ranks writes
    its 1/``world_size`` partition; the optimizer takes 16 bytes per parameter (fp32 weights, gradients, exp_avg,
    exp_avg_sq), the parameters 2 (fp16/bf16) or 4 (fp32)."""
    weight_bytes = 2 if any((config.get(s) or {}).get("enabled") is True for s in ("fp16", "bf16")) else 4
    per_node = -(-num_params // world_size) * ranks_on_node
    need: dict[str, int] = {}
    for name, path in _nvme_sections(config).items():
        need[path] = need.get(path, 0) + per_node * (_OPTIMIZER_SWAP_BYTES if name == "offload_optimizer"
                                                     else weight_bytes)
    return need


def partition_for_nvme(module: torch.nn.Module, config: Mapping[str, Any], device_type: str) -> None:
    """Partition a model created outside ``zero.Init`` before its engine is built, when its parameters go to NVMe on
    CPU. DeepSpeed 0.19's engine would convert it with ``Init(dtype=<model dtype>)``, which its CPU accelerator turns
    into bfloat16 (``Init._set_dtype``), so the NVMe swapper mixes bfloat16 buffers into a float32 model ("self and mat2
    must have the same dtype"). ``Init`` without a dtype takes it from the config, as in ``configure_model``."""
    if device_type != "cpu" or offload_device(config, "offload_param") != "nvme":
        return
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    if any(is_zero_param(p) for p in module.parameters()):
        return  # created (partly) under zero.Init: DeepSpeed converts the rest with that Init's settings
    import deepspeed

    deepspeed.zero.Init(module=module, config_dict_or_path=dict(config), remote_device="nvme")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_aio_buildable() -> None:
    """Raise when DeepSpeed's async I/O op (needed for NVMe offload) is neither installed nor buildable here."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("async_io"):
        return
    from deepspeed.ops.op_builder.cpu.async_io import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return
    install = next((cmd for manager, cmd in _LIBAIO_PACKAGES if shutil.which(manager)), "install libaio-dev"
                   " (Debian/Ubuntu) or libaio-devel (RHEL/Fedora)")
    raise ZeroConfigError(
        "NVMe offload needs DeepSpeed's async I/O op (async_io), which cannot be built here: the libaio headers and"
        f" library are missing. Install them with `{install}` (as root), or set CFLAGS/LDFLAGS to where libaio is"
        " installed; or offload to \"cpu\" instead."
    )


def check_nvme(config: Mapping[str, Any], num_params: int | None = None, ranks_on_node: int = 1,
               world_size: int = 1, disk_usage: Callable[[str], Any] = shutil.disk_usage) -> None:
    """Before any training: every ``nvme_path`` exists and is writable, the async I/O op can be built, and (given
    ``num_params``) the drive has room for what this node swaps."""
    sections = _nvme_sections(config)
    if not sections:
        return
    for name, path in sections.items():
        where = f"zero_optimization.{name}.nvme_path={path!r}"
        folder = Path(path)
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise ZeroConfigError(f"{where} {what}. Create the folder on a local NVMe drive (`mkdir -p {path}`) or"
                                  " pass another ZeroStrategy(nvme_path=...).")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise ZeroConfigError(f"{where} is not writable ({err.strerror}). Choose a folder this user can write"
                                  " to, or fix its permissions.") from None
    check_aio_buildable()
    if num_params is None:
        return
    for path, need in nvme_swap_bytes(config, num_params, ranks_on_node, world_size).items():
        free = disk_usage(path).free
        if need > free:
            raise ZeroConfigError(
                f"NVMe offload swaps about {_size(need)} to nvme_path={path!r} on this node ({num_params:,}"
                f" parameters, {ranks_on_node} of {world_size} ranks here), but only {_size(free)} is free there."
                " Free up space, use a larger drive, or offload less (offload_parameters=\"cpu\")."
            )


# --------------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------------------------


def configure_activation_checkpointing(config: Mapping[str, Any]) -> None:
    """Set up ``deepspeed.checkpointing`` from the config's ``activation_checkpointing`` section, as Lightning's
    DeepSpeedStrategy does. It applies where the model calls ``deepspeed.checkpointing.checkpoint(fn, *args)``."""
    section = config.get("activation_checkpointing")
    if not section:
        return
    import deepspeed

    deepspeed.checkpointing.configure(
        None,
        partition_activations=section.get("partition_activations"),
        contiguous_checkpointing=section.get("contiguous_memory_optimization"),
        num_checkpoints=section.get("number_checkpoints"),
        checkpoint_in_cpu=section.get("cpu_checkpointing"),
        synchronize=section.get("synchronize_checkpoint_boundary"),
        profile=section.get("profile"),
    )
