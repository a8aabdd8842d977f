"""Feature checks on a merged or resolved config: which offload, ZeRO++, activation checkpointing, partial offload,
bf16 master weights and ZenFlow settings can work together (and with the Trainer), plus the small readers of those
settings (:func:`offload_device`, :func:`offload_ratio`, :func:`zenflow_enabled`) and :func:`inference_config`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from lightning_zero.config.types import (_OFFLOAD_SECTIONS, AUTO, TrainerFlags, ZeroConfigError, _as_stage,
                                         _positive_int)

# ZeRO++ (https://www.deepspeed.ai/tutorials/zeropp/): each is a stage-3 feature that DeepSpeed ignores at stages 0-2.
_ZEROPP_KEYS = ("zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
                "zero_quantized_gradients")
_QUANTIZED_KEYS = _ZEROPP_KEYS[1:]


def offload_device(config: Mapping[str, Any], section: str) -> str | None:
    """``"cpu"``/``"nvme"`` for ``zero_optimization.<section>`` (``offload_optimizer``/``offload_param``), else None."""
    value = (config.get("zero_optimization") or {}).get(section)
    device = value.get("device") if isinstance(value, Mapping) else None
    return device if device in ("cpu", "nvme") else None


def check_auto_stage(user: Mapping[str, Any], keywords: Mapping[str, Any]) -> None:
    """``ZeroStrategy(stage="auto")`` chooses the stage and the offload itself: refuse keywords or config keys that
    would pin part of that choice (``nvme_path`` is allowed: it lets "auto" consider NVMe offload)."""
    pinned = [f"{k}={v!r}" for k, v in keywords.items()
              if v is not None and v is not False and (k in _ZEROPP_KEYS or k in (
                  "offload_optimizer", "offload_parameters", "pin_memory", "optimizer_buffer_count",
                  "params_buffer_count", "params_buffer_size", "max_in_cpu", "aio", "offload_optimizer_ratio",
                  "bf16_master_weights_and_grads", "bf16_optimizer_states", "zenflow"))]
    zero = user.get("zero_optimization") if isinstance(user.get("zero_optimization"), Mapping) else {}

    def pins(key: str, value: Any) -> bool:
        if value is None or value is False or isinstance(value, str) and value == AUTO:
            return False
        if key in _OFFLOAD_SECTIONS:
            return offload_device({"zero_optimization": {key: value}}, key) is not None
        return not (key == "zero_hpz_partition_size" and value is not True and value == 1)

    pinned += [f"config zero_optimization.{k}" for k in ("stage", *_OFFLOAD_SECTIONS, *_ZEROPP_KEYS)
               if pins(k, zero.get(k))]
    if pinned:
        raise ZeroConfigError(
            f"ZeroStrategy(stage=\"auto\") chooses the stage and the offload from the model size and the hardware, so"
            f" it cannot be combined with {', '.join(pinned)}. Remove them, or name the stage yourself (run"
            " `lightning-zero estimate` to see the choices)."
        )


def check_zero_features(config: Mapping[str, Any], flags: TrainerFlags | None = None) -> None:
    """Raise one :class:`ZeroConfigError` for offload, ZeRO++ and activation checkpointing settings that cannot
    work: a wrong stage, and with ``flags`` also the world size, devices per node and device type."""
    zero = config.get("zero_optimization") or {}
    try:
        stage = _as_stage(zero.get("stage"))
    except ZeroConfigError:
        return  # reported by validate_user_config / resolve_ds_config
    problems: list[str] = []
    param_device, optimizer_device = offload_device(config, "offload_param"), offload_device(config,
                                                                                            "offload_optimizer")
    if param_device and stage != 3:
        problems.append(f"zero_optimization.offload_param.device={param_device!r} needs stage 3 (stage is {stage}):"
                        " only ZeRO-3 partitions parameters. Use ZeroStrategy(stage=3) or remove offload_param")
    if optimizer_device and stage == 0:
        problems.append(f"zero_optimization.offload_optimizer.device={optimizer_device!r} needs stage 1, 2 or 3"
                        " (stage is 0): stage 0 has no optimizer partition to offload. Use ZeroStrategy(stage=2) or"
                        " remove offload_optimizer")
    if optimizer_device == "nvme" and stage in (1, 2):
        problems.append(f"zero_optimization.offload_optimizer.device='nvme' at stage {stage}: DeepSpeed swaps optimizer"
                        " state to NVMe at stage 3 only (ZeRO-Infinity); at stages 1-2 it would keep it in CPU memory"
                        " and ignore nvme_path. Use ZeroStrategy(stage=3) or offload_optimizer='cpu'")
    hpz = zero.get("zero_hpz_partition_size", 1)
    hpz = hpz if isinstance(hpz, int) and not isinstance(hpz, bool) else 1
    quantized = [key for key in _QUANTIZED_KEYS if zero.get(key) is True]
    zeropp = ([f"zero_hpz_partition_size={hpz}"] if hpz > 1 else []) + [f"{key}=True" for key in quantized]
    if zeropp and stage != 3:
        problems.append(f"zero_optimization {', '.join(zeropp)}: ZeRO++ works at stage 3 only (stage is {stage}) and"
                        " DeepSpeed would ignore it. Use ZeroStrategy(stage=3) or remove it")
    if flags is not None and hpz > 1:
        per_node = flags.devices_per_node or flags.world_size
        if per_node % hpz or flags.world_size % hpz:
            divisors = [d for d in range(per_node, 0, -1) if per_node % d == 0 and flags.world_size % d == 0]
            problems.append(f"zero_optimization.zero_hpz_partition_size={hpz} must divide the devices per node"
                            f" ({per_node}) and the world size ({flags.world_size}): hpZ keeps a secondary copy of"
                            f" the weights partitioned within each node. Use one of {divisors} (1 turns hpZ off)")
    on_cpu = flags is not None and flags.device_type == "cpu"
    if on_cpu and quantized:
        problems.append(f"zero_optimization {', '.join(f'{k}=True' for k in quantized)} needs a CUDA GPU: DeepSpeed's"
                        " quantization kernels (CUDAQuantizer) have no CPU implementation. Remove it for CPU runs, or"
                        " train with Trainer(accelerator='gpu')")
    aio = config.get("aio") if isinstance(config.get("aio"), Mapping) else {}
    if on_cpu and aio.get("use_gds") is True:
        problems.append("aio.use_gds=True needs a CUDA GPU (GPUDirect Storage). Remove it for CPU runs")
    act = config.get("activation_checkpointing") if isinstance(config.get("activation_checkpointing"), Mapping) else {}
    if act.get("contiguous_memory_optimization") is True:
        if act.get("partition_activations") is not True:
            problems.append("activation_checkpointing.contiguous_memory_optimization=True needs"
                            " partition_activations=True: DeepSpeed copies the partitioned checkpoints into the"
                            " contiguous buffer. Set ZeroStrategy(partition_activations=True) too")
        if not act.get("number_checkpoints"):
            problems.append("activation_checkpointing.contiguous_memory_optimization=True needs"
                            " activation_checkpointing.number_checkpoints (how many layers you checkpoint) to size its"
                            " buffer. Set it in the config")
    problems += _offload_mode_problems(config, stage, flags)
    if problems:
        raise ZeroConfigError("These ZeRO settings cannot work:\n  - " + "\n  - ".join(problems))


def zenflow_enabled(config: Mapping[str, Any]) -> bool:
    """The config turns on ZenFlow (a ``zero_optimization.zenflow`` section)."""
    return isinstance((config.get("zero_optimization") or {}).get("zenflow"), Mapping)


def offload_ratio(config: Mapping[str, Any]) -> float:
    """The share of the optimizer states CPU Adam steps: ``offload_optimizer.ratio`` (1.0 when offloaded without a
    ratio, 0.0 when the optimizer is not offloaded)."""
    if offload_device(config, "offload_optimizer") is None:
        return 0.0
    ratio = (config.get("zero_optimization") or {})["offload_optimizer"].get("ratio", 1.0)
    return float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else 1.0


def _optimizer_type(config: Mapping[str, Any]) -> str | None:
    section = config.get("optimizer")
    name = section.get("type") if isinstance(section, Mapping) else None
    return name if isinstance(name, str) else None


def _offload_mode_problems(config: Mapping[str, Any], stage: int, flags: TrainerFlags | None) -> list[str]:
    """Partial offload, bf16 master weights / optimizer states and ZenFlow: the combinations DeepSpeed 0.19 refuses
    mid-setup (asserts in runtime/zero/stage3.py, stage_1_and_2.py, base_optimizer.py, config.py) or ignores."""
    zero = config.get("zero_optimization") or {}
    device = offload_device(config, "offload_optimizer")
    optimizer_type = _optimizer_type(config)
    problems: list[str] = []
    ratio = offload_ratio(config)
    if device is not None and ratio < 1.0:
        where = f"zero_optimization.offload_optimizer.ratio={ratio!r} (partial offload)"
        if stage != 3:
            problems.append(f"{where} needs stage 3 (stage is {stage}): DeepSpeed splits the optimizer states between"
                            " the GPU and CPU Adam at stage 3 only. Use ZeroStrategy(stage=3, ...) or remove the"
                            " ratio")
        if device != "cpu":
            problems.append(f"{where} with offload_optimizer.device={device!r}: the offloaded share is stepped by CPU"
                            " Adam in CPU memory. Use offload_optimizer=\"cpu\", or leave out the ratio for NVMe")
        if optimizer_type is not None and optimizer_type.lower() not in ("adam", "adamw"):
            problems.append(f"{where} with optimizer.type={optimizer_type!r}: DeepSpeed's hybrid step supports"
                            " DeepSpeedCPUAdam only. Use \"AdamW\"/\"Adam\" or leave out the ratio")
    bf16 = config.get("bf16") if isinstance(config.get("bf16"), Mapping) else {}
    master, states = bf16.get("bf16_master_weights_and_grads") is True, bf16.get("bf16_optimizer_states") is True
    if master or states:
        keys = " and ".join(k for k, on in (("bf16.bf16_master_weights_and_grads=True", master),
                                            ("bf16.bf16_optimizer_states=True", states)) if on)
        if stage == 0:
            problems.append(f"{keys} needs ZeRO stage 1, 2 or 3 (stage is 0): the ZeRO optimizer keeps the master"
                            " weights. Use ZeroStrategy(stage=2, ...)")
        if states and not master:
            problems.append("bf16.bf16_optimizer_states=True needs bf16_master_weights_and_grads=True too: the Adam"
                            " moments take the master weights' dtype. Add ZeroStrategy(bf16_master_weights_and_grads="
                            "True)")
        if master and not states and device is None:
            problems.append("bf16.bf16_master_weights_and_grads=True without bf16_optimizer_states keeps fp32 Adam"
                            " moments next to bf16 master weights, which DeepSpeed does only with the optimizer"
                            " offloaded to DeepSpeedCPUAdam. Add offload_optimizer=\"cpu\", or"
                            " bf16_optimizer_states=True to keep all optimizer state on the GPU in bf16")
        if master and device is not None and optimizer_type is not None and optimizer_type.lower() not in (
                "adam", "adamw"):
            problems.append(f"{keys} with the optimizer offloaded and optimizer.type={optimizer_type!r}: DeepSpeed"
                            " needs DeepSpeedCPUAdam for offloaded low-precision master weights. Use"
                            " \"AdamW\"/\"Adam\"")
        if flags is not None and not flags.precision.startswith("bf16-"):
            problems.append(f"{keys} needs Trainer(precision=\"bf16-mixed\") or \"bf16-true\" (precision is"
                            f" {flags.precision!r}): the master weights are kept in the model's bf16. Change the"
                            " precision or remove the bf16_* keys")
    zenflow = zero.get("zenflow")
    if isinstance(zenflow, Mapping):
        problems += _zenflow_problems(zenflow, zero, config.get("optimizer"), stage, device, flags)
    return problems


def _zenflow_problems(zenflow: Mapping[str, Any], zero: Mapping[str, Any], optimizer: Any, stage: int,
                      device: str | None, flags: TrainerFlags | None) -> list[str]:
    """ZenFlow (runtime/zenflow/, DeepSpeed 0.19.8) runs under DeepSpeed's managed accumulation (resolve_ds_config):
    each backward + ``step()`` is one ZenFlow iteration and its update interval is the accumulation, so the Trainer
    must not accumulate. Its "auto"/"epoch" selection reads the epoch length from DeepSpeed's own dataloader, which
    ZeroStrategy does not give it (``select_interval`` becomes 0: selected once, never again). The parameter shapes it
    fails on are checked at setup (offload.check_zenflow_parameters)."""
    problems: list[str] = []
    if stage not in (1, 2):
        problems.append(f"zero_optimization.zenflow needs ZeRO stage 1 or 2 (stage is {stage}): ZeroStrategy runs"
                        " ZenFlow's stage-1/2 optimizer; its stage-3 path (zenflow/engine_stage3.py) keeps its"
                        " buffers on \"cuda\" and has not run under ZeroStrategy. Use"
                        " ZeroStrategy(stage=2, offload_optimizer=\"cpu\", zenflow={...})")
    if device != "cpu":
        problems.append("zero_optimization.zenflow needs the optimizer offloaded to the CPU (ZenFlow steps the less"
                        f" important gradients with CPU Adam; offload_optimizer is {device or 'not set'}). Add"
                        " ZeroStrategy(offload_optimizer=\"cpu\")")
    if zero.get("compute_grad_norm") is False:
        problems.append("zero_optimization.zenflow does not work with compute_grad_norm=False. Remove"
                        " compute_grad_norm")
    if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("params"), Mapping):
        problems.append("zero_optimization.zenflow needs the optimizer in the DeepSpeed config (ZenFlow's selective"
                        " AdamW takes its hyperparameters from optimizer.params, and DeepSpeed builds its ZenFlow CPU"
                        " Adam from that block). Add config={\"optimizer\": {\"type\": \"AdamW\", \"params\":"
                        " {\"lr\": ..., \"weight_decay\": ...}}} and return None from configure_optimizers")
    if zenflow.get("offload") is True and zero.get("overlap_comm") is not True:
        problems.append("zero_optimization.zenflow.offload=True needs zero_optimization.overlap_comm=True (stage 2"
                        " or 3). Add ZeroStrategy(overlap_comm=True), or remove zenflow.offload")
    strategy, select, update = (zenflow.get("select_strategy", AUTO), zenflow.get("select_interval", AUTO),
                                zenflow.get("update_interval", AUTO))
    if strategy != "step" or not _positive_int(select):
        problems.append(f"zero_optimization.zenflow select_strategy={strategy!r}, select_interval={select!r}:"
                        " under ZeroStrategy ZenFlow re-selects its important columns every select_interval"
                        " optimizer steps (\"auto\"/\"epoch\" need DeepSpeed's own dataloader and would select once,"
                        " never again). Set \"select_strategy\": \"step\" and an integer \"select_interval\" >= 1")
    if not _positive_int(update):
        problems.append(f"zero_optimization.zenflow.update_interval={update!r}: under ZeroStrategy CPU Adam steps the"
                        " less important columns every update_interval optimizer steps, a fixed integer (\"auto\""
                        " adapts it from ZenFlow's own statistics, which has not been checked under Lightning's"
                        " loop). Set an integer, e.g. \"update_interval\": 4 (CPU Adam then steps the rest once every 4"
                        " optimizer steps; 1: every step)")
    elif _positive_int(select) and select < update:
        problems.append(f"zero_optimization.zenflow select_interval={select} < update_interval={update}: DeepSpeed"
                        " refuses to re-select the important columns more often than it updates the rest (\"Select"
                        " interval must be greater or equal to update interval\"). Set \"select_interval\" >="
                        f" {update}, e.g. {update * 2}")
    if zenflow.get("overlap_step") is True and flags is not None and flags.device_type == "cpu":
        problems.append("zero_optimization.zenflow.overlap_step=True on the CPU accelerator: DeepSpeed 0.19.8's"
                        " overlapped ZenFlow step waits forever there for its optimizer process (measured: two"
                        " processes, no step finished in 150 s). Set \"overlap_step\": false on CPU (it overlaps"
                        " the CPU step with the GPU's forward and backward, which a CPU run does not have)")
    if flags is not None and flags.accumulate_grad_batches != 1:
        problems.append("zero_optimization.zenflow with Trainer(accumulate_grad_batches="
                        f"{flags.accumulate_grad_batches}): ZenFlow runs under DeepSpeed's managed accumulation,"
                        " where every backward ends a ZenFlow iteration, so the Trainer's micro-batches would"
                        " overwrite each other's gradients instead of adding up. Use accumulate_grad_batches=1 (a"
                        " larger batch per step), or remove zenflow")
    return problems


def inference_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config for a model without optimizer (frozen models, validate/test/predict): no optimizer, no scheduler."""
    # no DeepCompile either: it compiles one trained engine (compiling.deepcompile_engine)
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("optimizer", "scheduler", "compile")}
    zero = out.get("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero.pop("zenflow", None)  # ZenFlow configures the optimizer step (its stage-3 hooks expect one)
    return out
