"""Speed defaults: DeepSpeed settings ZeroStrategy chooses when the user's config leaves them out.

Each default removes work DeepSpeed does every optimizer step that the run cannot use; the user's config always
wins (set the key explicitly to get DeepSpeed's own default back). Measured in docs/benchmarks.md ("Where the time
goes"): on one H100 with a 0.9B GPT in bf16 these two settings took ZeRO-2 from 41k to 53k tokens/s and cut the
GPU's idle time per step from 28 ms to 8 ms.

* ``bf16.check_grad_overflow = false``: with bf16 there is no loss scale to adjust, yet DeepSpeed's ZeRO-1/2
  optimizer still reduces every gradient tensor for inf/NaN and reads the result back on the host (a device sync
  per step). bf16 has fp32's exponent range, so overflow is not the failure mode it is in fp16; DDP and FSDP do not
  check either. fp16 keeps the check (its loss scaler needs it).
* ``zero_optimization.compute_grad_norm = false`` at stages 1-2 when nothing clips (``gradient_clipping`` is 0) and
  the optimizer is not offloaded: the global norm is only used for clipping. Manual optimization that calls
  ``self.clip_gradients`` turns the norm back on for that engine (see ``EngineSlot.set_clip``).
* Stage 3, the same without a config key (DeepSpeed's ``compute_grad_norm=false`` refuses stage 3): while a step
  does not clip, runs bf16/fp32 and keeps the optimizer on the GPU, the ZeRO-3 step skips the global norm, its
  host read-back and the multiply by 1/loss scale (``_compat.deepspeed.skip_unused_grad_norm``, applied by
  ``plan.build_engines``; 12 ms of a 156 ms step of a 0.93B Llama on one H200). ``compute_grad_norm=True`` keeps
  DeepSpeed's norm at every step.
* Stages 1-2 on one process, the same without a config key: the gradients skip DeepSpeed's reduce buckets (with one
  process only copies) and are written into the fp32 gradient partition at the accumulation boundary by one
  multi-tensor copy (``_compat.deepspeed.write_gradients_into_partition``, applied by ``plan.speed_up_engine``; every
  step equals DeepSpeed's own, bit for bit). On one H200, 0.93B Llama, bf16: stage 2 58.2k -> 60.9k tokens/s (FSDP
  57.2k), same peak. Not with CPU offload, ZenFlow, MoE, Muon or fp16 (DeepSpeed's path runs).
* ``zero_optimization.reduce_bucket_size = 2e8`` at stage 3 (Lightning's value): ZeRO-3 allocates one 16-bit
  gradient bucket of that many elements up front, and DeepSpeed's default (5e8) costs 0.56 GiB more GPU memory than
  Lightning's built-in strategy for no measured speed gain.
* Stage 3 on one process (world size 1) with the parameters on the accelerator keeps every parameter whole
  (``zero_optimization.stage3_param_persistence_threshold`` above the largest parameter). With one partition
  DeepSpeed's "gather" makes each parameter a view of its own partition (``partition_parameters._no_gather_coalesced``),
  so keeping it costs no memory, while gathering and releasing it around every block costs Python hooks and a stream
  sync per block. With every weight whole, torch's own linear replaces DeepSpeed's ``memory_efficient_linear`` (which
  exists to let a gathered weight go before its backward) at no memory cost. On one H200, 0.93B Llama, bf16: 47.5k
  tokens/s gathering, 51.2k whole, 53.8k whole with torch's linear, peak 28.58 GiB in all three (FSDP 57.4k).
  torch's FSDP does the same at world size 1 (it switches FULL_SHARD to NO_SHARD). The optimizer step then keeps
  them whole too (``_compat.deepspeed.keep_whole_parameters_through_step``, applied by ``plan``). Not with parameter
  offload (the partition is on the host, a gathered copy would keep the whole model on the GPU), ZeRO++ quantized
  weights, trainable or frozen (a gathered parameter is a dequantized copy), or DeepCompile (it schedules the
  gathers itself). Everything else stays stage 3: partitions, ``zero.Init``, checkpoints in stage-3 layout that
  resume on any number of devices.
* Stage 3 fetches each repeated block (a transformer layer) as one unit (:func:`resolve_block_fetch`): DeepSpeed's
  ``stage3_module_granularity_threshold`` at the blocks' granularity, or the blocks named in ``leaf_module``.
  DeepSpeed otherwise gathers and releases every ``nn.Linear`` / ``nn.LayerNorm`` separately, each with its own hooks
  and stream syncs: on one H100 with a 0.9B GPT this took ZeRO-3 from 37k to 54-56k tokens/s. Applied when one
  model is trained (``plan.plan_engines`` decides; a unit supports one call per forward, see
  ``EngineRegistry._counter``).

Both are pure (``resolve_*``): they return new dicts and only read the module; ``lightning_zero.plan`` applies them.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_zero.config import offload_device

__all__ = ["block_fetch_threshold", "resolve_block_fetch", "resolve_speed_defaults", "track_unit_inputs"]

STAGE3_REDUCE_BUCKET = 200_000_000
WHOLE_PARAMETERS = sys.maxsize  # a persistence threshold no parameter exceeds: every parameter stays whole


def _enabled(section: Any) -> bool:
    return isinstance(section, Mapping) and section.get("enabled") is True


def resolve_speed_defaults(config: Mapping[str, Any], *, world_size: int,
                           deepcompile: bool = False) -> dict[str, Any]:
    """A resolved DeepSpeed config with the speed defaults filled in where it is silent (a copy; the input is
    unchanged). ``world_size``: the processes the engines span; ``deepcompile``: DeepCompile drives stage 3."""
    config = copy.deepcopy(dict(config))
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    bf16_key = next((k for k in ("bf16", "bfloat16") if _enabled(config.get(k))), None)
    if bf16_key is not None:
        config[bf16_key] = {**config[bf16_key]}
        config[bf16_key].setdefault("check_grad_overflow", False)

    offloaded = offload_device(config, "offload_optimizer") is not None
    # DeepSpeed runs stage 1 with bf16 weights and fp32 gradient accumulation through its BF16_Optimizer, which
    # always needs the norm.
    grad_accum = (config.get("data_types") or {}).get("grad_accum_dtype")
    bf16_fp32_stage1 = stage == 1 and bf16_key is not None and grad_accum in ("fp32", "float32", "torch.float32")
    if stage in (1, 2) and not float(config.get("gradient_clipping") or 0.0) and not offloaded \
            and not bf16_fp32_stage1:
        zero.setdefault("compute_grad_norm", False)
    if stage == 3:
        zero.setdefault("reduce_bucket_size", STAGE3_REDUCE_BUCKET)
        quantized = zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights")
        if world_size == 1 and not deepcompile and offload_device(config, "offload_param") is None and not quantized \
                and "stage3_param_persistence_threshold" not in zero:
            zero["stage3_param_persistence_threshold"] = WHOLE_PARAMETERS
            # torch's own linear: it keeps its weight for the backward, which costs nothing when every weight stays
            # whole anyway (DeepSpeed's replacement exists to let a gathered weight go before its backward)
            zero.setdefault("memory_efficient_linear", False)
    return config


# DeepSpeed's rules (runtime/zero/parameter_offload.py, _get_granularity_recursively): a module's granularity is its
# parameter count over its number of layers (itself and every descendant with parameters, containers not counted);
# torch leaves, containers and modules over 1e9 parameters are never leaf units; the walk is pre-order, so a parent
# whose granularity is under the threshold becomes the unit before its children are looked at.
_CONTAINERS = frozenset(nn.modules.container.__all__)
_MAX_LEAF = 1e9
_NEVER = sys.maxsize


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # partitioned parameters have numel() == 0


def _granularities(module: nn.Module) -> dict[int, int]:
    """``id(module) -> granularity`` for every module, as DeepSpeed computes it."""
    out: dict[int, int] = {}

    def visit(m: nn.Module) -> tuple[int, int]:
        if not any(True for _ in m.parameters()):
            out[id(m)] = _NEVER
            return 0, 0
        params = sum(_numel(p) for p in m.parameters(recurse=False))
        children = list(m.children())
        if not children:
            out[id(m)] = _NEVER
            return 1, params
        layers = 0
        for child in children:
            child_layers, child_params = visit(child)
            layers, params = layers + child_layers, params + child_params
        if type(m).__name__ in _CONTAINERS:
            out[id(m)] = _NEVER
            return layers, params
        layers += 1
        out[id(m)] = params // layers if params <= _MAX_LEAF else _NEVER
        return layers, params

    visit(module)
    return out


def _repeated_blocks(module: nn.Module, granularity: dict[int, int]) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for each child of an ``nn.ModuleList`` / ``nn.Sequential`` / ``nn.ModuleDict`` whose class
    occurs there at least twice and which has parameters and submodules of its own (transformer layers, residual
    stages); none when a block is over DeepSpeed's 1e9-parameter cap for a fetch unit."""
    blocks: list[tuple[str, nn.Module]] = []
    for prefix, container in module.named_modules():
        if type(container).__name__ not in _CONTAINERS:
            continue
        children = list(container.named_children())
        counts = Counter(type(c) for _, c in children)
        blocks += [(f"{prefix}.{n}" if prefix else n, c) for n, c in children
                   if counts[type(c)] > 1 and any(True for _ in c.children()) and any(True for _ in c.parameters())]
    if any(granularity[id(b)] == _NEVER for _, b in blocks):
        return []
    return blocks


def block_fetch_threshold(module: nn.Module) -> tuple[int, list[nn.Module]] | None:
    """The smallest ``stage3_module_granularity_threshold`` that makes every repeated block of ``module`` one fetch
    unit, and the units it makes; None when ``module`` has no repeated blocks or the threshold cannot single them
    out (a module above a block would fall under it too, and the unit would grow to the whole model)."""
    granularity = _granularities(module)
    return _threshold(module, granularity, [b for _, b in _repeated_blocks(module, granularity)])


def _threshold(module: nn.Module, granularity: dict[int, int], blocks: list[nn.Module]
               ) -> tuple[int, list[nn.Module]] | None:
    if not blocks:
        return None
    threshold = max(granularity[id(b)] for b in blocks)
    units: list[nn.Module] = []

    def preorder(m: nn.Module) -> None:
        if not any(True for _ in m.parameters()):
            return
        if granularity[id(m)] <= threshold:
            units.append(m)
            return
        for child in m.children():
            preorder(child)

    preorder(module)
    unit_ids = {id(u) for u in units}
    if any(id(b) not in unit_ids for b in blocks):
        return None
    return threshold, units


def resolve_block_fetch(config: Mapping[str, Any], module: nn.Module) -> tuple[dict[str, Any], str | None]:
    """``config`` with ZeRO-3's fetch unit set to ``module``'s repeated blocks (a copy; the input is unchanged), and
    the log line that says so. Unchanged below stage 3, when the config names ``stage3_module_granularity_threshold``
    or ``leaf_module`` itself, or when no block structure is found.

    DeepSpeed's granularity threshold is preferred: its units also take DeepSpeed's fast path (one coalesced gather,
    no per-parameter events). Where no threshold singles out the blocks (a parent module with about as many
    parameters per layer as its blocks), the blocks are named in ``zero_optimization.leaf_module.names`` instead."""
    zero = config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) != 3 or "stage3_module_granularity_threshold" in zero or "leaf_module" in zero:
        return dict(config), None
    granularity = _granularities(module)
    named = _repeated_blocks(module, granularity)
    if not named:
        return dict(config), None
    found = _threshold(module, granularity, [b for _, b in named])
    if found is not None:
        threshold, units = found
        setting = {"stage3_module_granularity_threshold": threshold}
        how = f"zero_optimization.stage3_module_granularity_threshold={threshold}; set it to 0"
    else:
        units = [b for _, b in named]
        setting = {"leaf_module": {"names": [n for n, _ in named]}}
        how = "zero_optimization.leaf_module; set zero_optimization.leaf_module to {}"
    names = Counter(type(u).__name__ for u in units)
    what = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.most_common())
    config = {**config, "zero_optimization": {**zero, **setting}}
    return config, (f"ZeroStrategy: stage 3 gathers the parameters of each of these modules at once ({what}) rather"
                    f" than layer by layer ({how} for DeepSpeed's per-layer fetching).")


def _has_input_to_alias(args: tuple) -> bool:
    """Grad mode is on and a floating-point input does not require grad (cheap: no walk over parameters)."""
    return torch.is_grad_enabled() and \
        any(isinstance(a, torch.Tensor) and a.is_floating_point() and not a.requires_grad for a in args)


def _inputs_requiring_grad(module: nn.Module, args: tuple) -> tuple | None:
    if not _has_input_to_alias(args) or not any(p.requires_grad for p in module.parameters()):
        return None
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and not a.requires_grad else a for a in args)


def track_unit_inputs(module: nn.Module) -> int:
    """Make the floating-point inputs of each trained ZeRO-3 fetch unit require grad; returns how many units.

    Call after DeepSpeed built the engine (it marks the units, ``deepspeed.utils.z3_leaf_module``). DeepSpeed 0.19.8
    releases a unit's parameters after its backward from a hook on the unit's inputs (``PostBackwardFunctionModule``
    in ``parameter_offload.py``), counted over the inputs that require grad. With none (a frozen embedding before
    the first block: LoRA and other adapters on a frozen base) its leaf-module bookkeeping loses track of the unit,
    and a backward through the block then meets a released (empty) weight: ``The size of tensor a (0) must match
    ...`` or ``output with shape [1] doesn't match the broadcast shape [32, 4]``. A detached alias that requires grad
    gives the hook its input back; the values and every parameter's gradient are unchanged (autograd also computes
    the gradient of that input, one block's worth of extra backward)."""
    from deepspeed.utils import z3_leaf_module

    units = [m for m in module.modules() if z3_leaf_module(m) and any(p.requires_grad for p in m.parameters())]
    for unit in units:
        if not getattr(unit, "_lightning_zero_input_hook", False):
            unit.register_forward_pre_hook(_input_hook, prepend=True)
            unit._lightning_zero_input_hook = True
    return len(units)


def _input_hook(module: nn.Module, args: tuple) -> tuple | None:
    # Runs at every call of every unit. The cheap test first: with a trainable embedding the inputs already require
    # grad and the hook returns here, before the unit's parameters are walked (a callback may freeze or unfreeze
    # them, so that is decided per call, not at setup).
    if not _has_input_to_alias(args):
        return None
    from deepspeed.utils import z3_leaf_module

    # a no-op once the module is no longer a unit (its engine released, a later run without block fetch)
    return _inputs_requiring_grad(module, args) if z3_leaf_module(module) else None
