"""Memory planning: model-state memory of every stage x offload choice, and the fastest choice that fits.

    lightning-zero estimate --params 7e9 --largest-layer 2e8 --nodes 1 --gpus-per-node 8 --gpu-memory 80 --cpu-memory 512
    lightning-zero estimate --model my_package.models:MyLitModel --gpus-per-node 8 --gpu-memory 80

    lightning-zero estimate --params 6.25e9 --largest-layer 2.06e8 --gpu-memory 79 --cpu-memory 125 \
        --hidden 4096 --layers 30 --vocab 50304 --seq-len 1024 --micro-batch 32 --activation-checkpointing

The model-state figures are DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` for stages 0-2,
``estimate_zero3_model_states_mem_needs`` for stage 3) with a host buffer factor of 1.15 instead of DeepSpeed's 1.5
and the host memory each GPU process holds anyway (``HOST_RUNTIME_GIB``), both measured on H100 and H200 machines;
see :func:`estimate_memory` for what is derived from them. With a transformer's shape,
:func:`transformer_activation_bytes` adds the activations, and the per-GPU figure becomes the peak to expect
(docs/benchmarks.md compares it with measured peaks). ``ZeroStrategy(stage="auto")`` runs the same planner at setup
(:func:`auto_choice`), with issue 18's offload modes when no stage fits without offload (:func:`fastest_fit`: stage 3
partial optimizer offload, then with bf16 precision bf16 master weights / optimizer states); the command prints those
modes after the table (:func:`estimate_offload_mode`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["CHOICES", "HOST_RUNTIME_GIB", "MemoryPlan", "MemoryRow", "ModeRow", "add_parser", "auto_choice",
           "count_with_configure_model", "detect_free_memory", "estimate_memory", "estimate_offload_mode",
           "fastest_fit", "model_size", "optimizer_state_bytes", "partial_offload_fit", "plan_auto",
           "transformer_activation_bytes"]

GiB = 2**30
Offload = Literal["none", "cpu", "nvme"]
# Host memory of one GPU process outside the model states (CUDA context, torch, DeepSpeed and Lightning libraries):
# stage 2 without offload on one H200, torch 2.11, DeepSpeed 0.19.8: 1.83 GiB RSS for a 0.9B GPT and 1.82 GiB for a
# 10.3B one (bench/results/offload_modes_h200.json, largest_10b_h200.json): no model state lives in host memory there,
# whatever the model's size. Stage 3 without offload measured 3.32 GiB: this plus the 16-bit parameter partition's
# trip through host memory at setup (see _model_states).
HOST_RUNTIME_GIB = 1.8
# Host memory per byte of DeepSpeed's host model-state figure. DeepSpeed's estimators default to 1.5; with the runtime
# above and the stage-3 setup copy, 1.15 puts every measured host peak within 6%: on one H200 a 0.9B GPT at stage 3
# with the optimizer offloaded (fully, 25/50/75% of it, bf16 master weights, bf16 states; 8.0 to 20.0 GiB) and on NVMe
# (26.2 GiB), on an H100 the same with parameters offloaded too and a 6.25B GPT (22.17 and 114.9 GiB;
# docs/benchmarks.md, tests/unit/test_estimate.py). 1.2 overshot the 6.25B run by 9% (125.2 GiB: "does not fit" on
# the 125 GiB machine it trained on), 1.5 by far more.
_BUFFER_FACTOR = 1.15
# DeepSpeed defaults that size the pinned host buffers of NVMe offload (runtime/zero/offload_config.py, config.py).
_OPTIMIZER_BUFFER_COUNT, _SUB_GROUP_SIZE = 4, 10**9
_PARAM_BUFFER_COUNT, _PARAM_BUFFER_SIZE = 5, 10**8

# Every valid (stage, offload_optimizer, offload_parameters), fastest first. Stages 0-2 cost about the same (the same
# gradient traffic), stage 2 first as it needs the least memory of them; NVMe offload is stage 3 only (ZeRO-Infinity),
# and parameter offload comes with optimizer offload (as in DeepSpeed's estimator).
CHOICES: tuple[tuple[int, Offload, Offload], ...] = (
    (2, "none", "none"), (1, "none", "none"), (0, "none", "none"),
    (3, "none", "none"),
    (2, "cpu", "none"), (1, "cpu", "none"), (3, "cpu", "none"),
    (3, "cpu", "cpu"),
    (3, "nvme", "none"), (3, "nvme", "cpu"), (3, "cpu", "nvme"), (3, "nvme", "nvme"),
)


@dataclass(frozen=True)
class MemoryRow:
    """Model-state memory of one choice: bytes per GPU, per node of host RAM and per node of NVMe."""

    stage: int
    offload_optimizer: Offload
    offload_parameters: Offload
    gpu_bytes: int
    cpu_bytes: int
    nvme_bytes: int
    fits: bool | None = None  # None: no capacity given to check against
    why_not: str = ""
    # the offload modes (fastest_fit): the ratio passed as offload_optimizer_ratio (below 1: partial offload, stage 3),
    # the optimizer bytes per parameter (optimizer_state_bytes: 16 fp32, 12 bf16 master, 8 bf16 master + states) and
    # the sub_group_size the ratio was rounded for (None: DeepSpeed's default or the user's own)
    offload_ratio: float = 1.0
    state_bytes: int = 16
    sub_group_size: int | None = None

    def keywords(self) -> dict[str, Any]:
        """The offload-mode keywords of ``ZeroStrategy`` for this choice (empty for plain fp32-state rows)."""
        modes: dict[str, Any] = {}
        if self.offload_optimizer != "none" and self.offload_ratio < 1:
            modes["offload_optimizer_ratio"] = self.offload_ratio
        if self.state_bytes <= 12:
            modes["bf16_master_weights_and_grads"] = True
        if self.state_bytes <= 8:
            modes["bf16_optimizer_states"] = True
        return modes

    def strategy(self, nvme_path: str | None = None) -> str:
        """The ``ZeroStrategy(...)`` call for this choice."""
        args = [f"stage={self.stage}"]
        if self.offload_optimizer != "none":
            args.append(f"offload_optimizer={self.offload_optimizer!r}")
        if self.offload_parameters != "none":
            args.append(f"offload_parameters={self.offload_parameters!r}")
        if "nvme" in (self.offload_optimizer, self.offload_parameters):
            args.append(f"nvme_path={nvme_path or '/local_nvme'!r}")
        args += [f"{k}={v!r}" for k, v in self.keywords().items()]
        if self.sub_group_size is not None and "offload_optimizer_ratio" in self.keywords():
            args.append(f"sub_group_size={self.sub_group_size:_}")
        return f"ZeroStrategy({', '.join(args)})"


@dataclass(frozen=True)
class MemoryPlan:
    num_params: int
    largest_layer_params: int
    num_nodes: int
    gpus_per_node: int
    rows: tuple[MemoryRow, ...]
    recommended: MemoryRow | None
    activation_bytes: int = 0
    host_runtime_gb: float = HOST_RUNTIME_GIB  # per GPU process, in every host figure

    def table(self) -> str:
        what = (f"per GPU: expected peak with {_gib(self.activation_bytes)} of activations" if self.activation_bytes
                else "activations not included")
        head = (f"Model states of {_count(self.num_params)} parameters (largest layer"
                f" {_count(self.largest_layer_params)}) on {self.num_nodes} node(s) x {self.gpus_per_node} GPU(s);"
                f" {what}.")
        lines = [head, f"{'stage':>5}  {'offload_optimizer':<17}  {'offload_param':<13}  {'per GPU':>10}"
                       f"  {'CPU/node':>10}  {'NVMe/node':>10}  fits"]
        for r in self.rows:
            fits = {True: "yes", False: f"no ({r.why_not})", None: "?"}[r.fits]
            lines.append(f"{r.stage:>5}  {r.offload_optimizer:<17}  {r.offload_parameters:<13}"
                         f"  {_gib(r.gpu_bytes):>10}  {_gib(r.cpu_bytes):>10}  {_gib(r.nvme_bytes):>10}  {fits}")
        return "\n".join(lines)


def _count(n: float) -> str:
    """Parameter counts as people say them: 7.00B, 939.5M, 179."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n else "-"


def model_size(module: nn.Module) -> tuple[int, int]:
    """``(total parameters, largest layer)`` as DeepSpeed's ``model_to_params`` counts them (a layer is one module's
    own parameters), but deduplicated by tensor identity so that meta-device models count too."""
    total = sum({id(p): int(getattr(p, "ds_numel", p.numel())) for p in module.parameters()}.values())
    largest = max((sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters(recurse=False))
                   for m in module.modules()), default=0)
    return total, largest


def transformer_activation_bytes(*, hidden: int, layers: int, seq_len: int, micro_batch: int, vocab: int = 0,
                                 checkpointing: bool = False, bytes_per_element: int = 2) -> int:
    """Activation memory per GPU of one forward/backward of a GPT-style decoder: pre-LayerNorm blocks with a fused
    attention kernel (``scaled_dot_product_attention``: no seq_len^2 scores kept) and a 4x MLP, no dropout.

    Per token and layer a block keeps 17 x hidden elements for its backward (Korthikanti et al., 2022, "Reducing
    Activation Recomputation in Large Transformer Models", without the attention-score and dropout terms): block
    input 1, LayerNorm outputs 2, q/k/v 3, attention output and its contiguous copy 2, residual 1, MLP up-projection
    and activation 8. With activation checkpointing a layer keeps its input only, and one layer at a time is
    recomputed. The loss adds, per token, the logits, their float32 copy and the float32 log-softmax (``vocab``).
    """
    tokens = seq_len * micro_batch
    layer = 17 * tokens * hidden * bytes_per_element
    body = tokens * hidden * bytes_per_element * layers + layer if checkpointing else layer * layers
    loss = tokens * vocab * (bytes_per_element + 8 if bytes_per_element < 4 else 8)
    return int(body + loss)


def _model_states(stage: int, opt: Offload, param: Offload, p: int, layer: int, nodes: int, per_node: int,
                  weight_bytes: int, buffer_factor: float) -> tuple[float, float, float, float]:
    """(GPU bytes per GPU, CPU bytes per node, NVMe bytes per node, GPU bytes that exist only during the optimizer
    step) of one choice, the process runtime excluded; see estimate_memory."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    gpus = nodes * per_node
    extra = weight_bytes - 2  # fp32: 2 more bytes per resident 16-bit weight / gradient element
    if stage < 3:
        offload = opt != "none"
        cpu, gpu = zero2(p, per_node, nodes, cpu_offload=offload, additional_buffer_factor=buffer_factor)
        # without offload DeepSpeed's host figure is the fp32 model loaded on the CPU; built in configure_model the
        # model never is (measured: the process runtime alone, HOST_RUNTIME_GIB)
        cpu = cpu if offload else 0
        if stage == 0:  # nothing partitioned: the stage-2 formula on one GPU
            _, gpu = zero2(p, 1, 1, cpu_offload=False, additional_buffer_factor=buffer_factor)
        if stage == 1:  # full 16-bit gradients on every GPU instead of a 1/N partition (none when offloaded)
            gpu += 2 * p - (0 if offload else 2 * p / gpus)
        grads = p if stage < 2 else 0 if offload else p / gpus
        # the fp32 copy of the gradient partition (4 of DeepSpeed's 16 optimizer bytes) is built in the step and
        # freed after it: it never coexists with the activations (measured, docs/benchmarks.md)
        step_only = 4 * p / gpus if stage in (1, 2) and not offload else 0
        return gpu + extra * (p + grads), cpu, 0, step_only

    def z3(opt_cpu: bool, param_cpu: bool) -> tuple[int, int]:
        cpu, gpu, _ = zero3(p, layer, per_node, nodes, cpu_offload=opt_cpu, cpu_offload_params=param_cpu,
                            zero_init=True, additional_buffer_factor=buffer_factor)
        return cpu, gpu

    # parameters on the GPU: DeepSpeed defragments each rank's 16-bit partition through a host buffer at setup
    # (zero/utils.py defragment), which stays in the peak resident set (measured: 3.32 GiB without offload, 0.9B).
    # With the parameters in host memory the peak holds as much again over DeepSpeed's figure (measured: 22.17 GiB
    # for the 0.9B GPT). It replaces DeepSpeed's zero.Init host figure (4 x largest layer per GPU), which the
    # measurements do not show.
    setup_copy = per_node * weight_bytes * p / gpus if param != "nvme" else 0
    if opt == "none":
        _, gpu = z3(False, False)
        return gpu + extra * (layer + 2 * p / gpus), setup_copy, 0, 0
    # DeepSpeed's host memory with offload splits into the optimizer part (offload_optimizer only) and the 16-bit
    # parameter part (the difference once parameters are offloaded too); NVMe moves that part to the drive and keeps
    # pinned swap buffers in host memory instead.
    opt_cpu, opt_gpu = z3(True, False)
    all_cpu, all_gpu = z3(True, True)
    param_part = all_cpu - opt_cpu
    cpu, nvme = setup_copy, 0.0
    if opt == "cpu":
        cpu += opt_cpu
    else:
        # pinned swap buffers (allocated exactly) and the fp32 gradients that stay in host memory: the partition's
        # accumulation buffer and one sub-group's (stage3.py; measured 26.17 GiB for a 0.9B GPT on one H200)
        group = min(_SUB_GROUP_SIZE, p / gpus)
        cpu += per_node * (_OPTIMIZER_BUFFER_COUNT * group * 4 + buffer_factor * 4 * (p / gpus + group))
        nvme += 16 * p / nodes
    if param == "none":
        gpu = opt_gpu + extra * (layer + p / gpus)
    else:
        gpu = all_gpu + extra * layer
        if param == "cpu":
            cpu += param_part * weight_bytes / 2
        else:
            cpu += per_node * _PARAM_BUFFER_COUNT * min(_PARAM_BUFFER_SIZE, p) * weight_bytes
            nvme += weight_bytes * p / nodes
    return gpu, cpu, nvme, 0


def estimate_memory(
    num_params: int | float | None = None,
    largest_layer_params: int | float | None = None,
    *,
    model: nn.Module | None = None,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    gpu_memory_gb: float | None = None,
    cpu_memory_gb: float | None = None,
    nvme_gb: float | None = None,
    precision: str = "bf16-mixed",
    activation_memory_gb: float = 0.0,
    buffer_factor: float = _BUFFER_FACTOR,
    choices: tuple[tuple[int, Offload, Offload], ...] = CHOICES,
    host_runtime_gb: float = HOST_RUNTIME_GIB,
) -> MemoryPlan:
    """Model-state memory of every stage x offload choice and the fastest choice that fits (capacities in GiB).

    Give either ``num_params`` and ``largest_layer_params`` or a ``model`` (counted without allocating when it lives
    on the meta device). Per GPU, per node of host RAM, per node of NVMe, from DeepSpeed's estimators:

    - stage 2: ``estimate_zero2_model_states_mem_needs`` (2 bytes/param of 16-bit weights + 18/N of gradients, fp32
      weights and Adam state; or 2 bytes/param on the GPU and the rest on the host when the optimizer is offloaded).
    - stage 1: the same plus full 16-bit gradients (2 bytes/param instead of 2/N); stage 0: the stage-2 GPU figure
      for one GPU (nothing partitioned).
    - stage 3: ``estimate_zero3_model_states_mem_needs`` with ``zero_init=True`` (models built in
      ``configure_model``). NVMe rows move the optimizer's 16 bytes/param (and the parameters' 2) from host RAM to
      the drive, leaving DeepSpeed's pinned swap buffers in host RAM (4 x min(sub_group_size, partition) fp32
      elements per GPU for the optimizer; 5 x 1e8 elements per GPU for parameters).
    - ``precision="32-true"``: 2 more bytes per resident weight and gradient element (an upper bound).

    - host memory: DeepSpeed's figure x ``buffer_factor`` (1.15, measured; DeepSpeed's own default is 1.5) where it
      offloads, plus ``host_runtime_gb`` per GPU process (``HOST_RUNTIME_GIB``, 1.8: CUDA context and libraries,
      measured), plus at stage 3 (parameters not on NVMe) the 16-bit partition DeepSpeed copies through host
      memory at setup. Without offload DeepSpeed's host figure (the model loaded on the CPU first) is left out: a
      model built in ``configure_model`` is not (one built in ``__init__`` on the CPU passes through host memory
      once, 4 bytes per parameter). NVMe rows count the fp32 gradient buffers that stay in host memory too.

    Activations are not included unless given: ``activation_memory_gb`` per GPU (for a transformer,
    :func:`transformer_activation_bytes`). With them the per-GPU figure is the expected peak: model states plus
    activations, less what exists only during the optimizer step (the fp32 gradient partition at stages 1-2), or
    the model states alone if larger. The CUDA context and the allocator's fragmentation are not included. A row
    fits when each figure is within the given capacity (capacities left ``None`` are not checked; NVMe rows need
    ``nvme_gb``).
    """
    if model is not None:
        num_params, largest_layer_params = model_size(model)
    if num_params is None:
        raise ValueError("estimate_memory needs num_params (with largest_layer_params) or a model.")
    if largest_layer_params is None:
        raise ValueError("estimate_memory needs largest_layer_params (the most parameters one module holds itself,"
                         " e.g. the embedding) with num_params: stage 3 gathers one such layer at a time.")
    p, layer = int(num_params), int(largest_layer_params)
    for name, value in (("num_nodes", num_nodes), ("gpus_per_node", gpus_per_node)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"estimate_memory({name}={value!r}) must be a positive integer.")
    _check_runtime(host_runtime_gb, "estimate_memory")
    if p < 1 or not 0 <= layer <= p:
        raise ValueError(f"estimate_memory needs num_params >= 1 and 0 <= largest_layer_params <= num_params, got"
                         f" {p} and {layer}.")
    weight_bytes = 4 if precision == "32-true" else 2
    reserve = activation_memory_gb * GiB
    runtime = gpus_per_node * host_runtime_gb * GiB
    rows = []
    for stage, opt, param in choices:
        gpu, cpu, nvme, step_only = _model_states(stage, opt, param, p, layer, num_nodes, gpus_per_node,
                                                  weight_bytes, buffer_factor)
        cpu += runtime
        if reserve:
            gpu = max(gpu, gpu - step_only + reserve)
        why = []
        if gpu_memory_gb is not None and gpu > gpu_memory_gb * GiB:
            why.append("GPU")
        if cpu_memory_gb is not None and cpu > cpu_memory_gb * GiB:
            why.append("CPU")
        if nvme and (nvme_gb is None or nvme > nvme_gb * GiB):
            why.append("NVMe" if nvme_gb is not None else "no NVMe given")
        checked = gpu_memory_gb is not None or cpu_memory_gb is not None or nvme_gb is not None or bool(nvme)
        rows.append(MemoryRow(stage, opt, param, int(gpu), int(cpu), int(nvme), fits=not why if checked else None,
                              why_not=", ".join(why)))
    recommended = next((r for r in rows if r.fits), None)
    return MemoryPlan(p, layer, num_nodes, gpus_per_node, tuple(rows), recommended, int(reserve), host_runtime_gb)


def _check_runtime(host_runtime_gb: float, caller: str) -> None:
    if not host_runtime_gb >= 0:
        raise ValueError(f"{caller}(host_runtime_gb={host_runtime_gb!r}) must be at least 0: the GiB of host memory"
                         f" each GPU process holds outside the model states (measured: {HOST_RUNTIME_GIB}).")


# --------------------------------------------------------------------------------------------------------------------
# Offload modes (issue 18): partial optimizer offload, bf16 master weights / optimizer states
# --------------------------------------------------------------------------------------------------------------------


def optimizer_state_bytes(bf16_master_weights_and_grads: bool = False, bf16_optimizer_states: bool = False) -> int:
    """Bytes per parameter of the ZeRO optimizer's state (DeepSpeed's estimators count 16: fp32 master weights,
    fp32 gradient partition, Adam's two fp32 moments). ``bf16_master_weights_and_grads`` makes the master weights
    and the gradient partition bf16 (``master_weights_and_grads_dtype``, base_optimizer.py): 2 + 2 + 8 = 12;
    ``bf16_optimizer_states`` the moments too (``fp32_optimizer_states=False`` for CPU Adam): 8."""
    if bf16_optimizer_states and not bf16_master_weights_and_grads:
        raise ValueError("bf16_optimizer_states needs bf16_master_weights_and_grads (DeepSpeed asserts it).")
    return 8 if bf16_optimizer_states else 12 if bf16_master_weights_and_grads else 16


@dataclass(frozen=True)
class ModeRow:
    """Model-state memory of one offload mode: bytes per GPU and per node of host RAM."""

    stage: int
    offload_ratio: float  # the share of the optimizer state on the host, as DeepSpeed's sub-groups make it
    state_bytes: int  # optimizer bytes per parameter (16, 12 or 8)
    gpu_bytes: int
    cpu_bytes: int
    # of gpu_bytes, what exists only inside the optimizer step (stages 1-2, optimizer on the GPU: the flat gradient
    # partition in the master weights' dtype), so never together with the activations
    step_bytes: int = 0

    def line(self) -> str:
        states = {16: "fp32", 12: "bf16 master", 8: "bf16 master+states"}[self.state_bytes]
        return (f"{self.stage:>5}  {self.offload_ratio:>13.0%}  {states:<18}  {_gib(self.gpu_bytes):>10}"
                f"  {_gib(self.cpu_bytes):>10}")


def estimate_offload_mode(num_params: int | float, largest_layer_params: int | float, *, stage: int = 3,
                          offload_ratio: float = 1.0, bf16_master_weights_and_grads: bool = False,
                          bf16_optimizer_states: bool = False, num_nodes: int = 1, gpus_per_node: int = 1,
                          sub_group_size: int = _SUB_GROUP_SIZE, buffer_factor: float = _BUFFER_FACTOR,
                          offload_parameters: bool = False, precision: str = "bf16-mixed",
                          host_runtime_gb: float = HOST_RUNTIME_GIB) -> ModeRow:
    """Model states of an offload mode, from the same DeepSpeed estimators as :func:`estimate_memory`: the
    optimizer's 16 bytes per parameter become :func:`optimizer_state_bytes`, and with ``offload_ratio`` r (stage 3;
    0 = no offload, 1 = ZeRO-Offload) a share r of them sits in host RAM and the rest on the GPU. DeepSpeed offloads
    whole sub-groups of ``sub_group_size`` elements (stage3.py), so r is first rounded as it does, for equal
    sub-groups of a rank's partition (``ModeRow.offload_ratio`` is the share it really offloads).
    ``offload_parameters`` (stage 3, r = 1) adds the parameters' host part of :func:`estimate_memory`'s row. The
    host figure includes ``host_runtime_gb`` per GPU process, as in :func:`estimate_memory`.

    Derived from DeepSpeed's dtypes and sub-group split; with the activations (as :func:`fastest_fit` adds them,
    less ``ModeRow.step_bytes``) within 10% of the GPU and host peaks measured on one H200 (0.9B GPT: 25/50/75% and
    full offload, bf16 master weights and states; 10.3B at stage 2 with bf16 states; tests/unit/test_estimate.py).
    ``ZeroStrategy(stage="auto")`` plans with these figures (:func:`fastest_fit`)."""
    if not 0 <= offload_ratio <= 1:
        raise ValueError(f"offload_ratio={offload_ratio!r} must be between 0 and 1.")
    if stage not in (1, 2, 3) or (stage < 3 and offload_ratio not in (0, 1)):
        raise ValueError(f"stage={stage!r} with offload_ratio={offload_ratio!r}: partial offload is stage 3 only,"
                         " low-precision states need stage 1, 2 or 3.")
    if offload_parameters and (stage != 3 or offload_ratio != 1):
        raise ValueError(f"offload_parameters with stage={stage!r}, offload_ratio={offload_ratio!r}: parameter"
                         " offload is estimated at stage 3 with the whole optimizer offloaded (offload_ratio=1).")
    _check_runtime(host_runtime_gb, "estimate_offload_mode")
    p, layer = int(num_params), int(largest_layer_params)
    state = optimizer_state_bytes(bf16_master_weights_and_grads, bf16_optimizer_states)
    ratio = float(offload_ratio)
    if 0 < ratio < 1:
        groups = _sub_groups(p, num_nodes * gpus_per_node, sub_group_size)
        ratio = (groups - int((1 - ratio) * groups)) / groups
    weight_bytes = 4 if precision == "32-true" else 2
    param = "cpu" if offload_parameters else "none"
    on_gpu, offloaded, full = (_model_states(stage, opt, part, p, layer, num_nodes, gpus_per_node, weight_bytes,
                                             buffer_factor) for opt, part in (("none", "none"), ("cpu", "none"),
                                                                              ("cpu", param)))
    # the 16 optimizer bytes per parameter move between the GPU figure and the host figure (at stages 1-2 the GPU
    # difference also holds the 16-bit gradient partition: 18 bytes, of which 16 change with the state dtype)
    moved = 16 if stage == 3 else 18
    host_part = offloaded[1] - on_gpu[1]  # the optimizer's part of the host figure
    gpu = full[0] + (1 - ratio) * (on_gpu[0] - offloaded[0]) * (state + moved - 16) / moved
    cpu = full[1] - host_part + ratio * host_part * state / 16 + gpus_per_node * host_runtime_gb * GiB
    # stages 1-2 with the optimizer on the GPU flatten the gradient partition into the master weights' dtype in the
    # step (stage_1_and_2.py): fp32, 4 bytes per element, or with bf16 master weights a bf16 copy, 2 (measured: the
    # 10.3B row peaks in the step, docs/benchmarks.md)
    step = on_gpu[3] * (1 - ratio) * (1 if state == 16 else 0.5)
    return ModeRow(stage, ratio, state, int(gpu), int(cpu), int(step))


def _sub_groups(num_params: int, gpus: int, sub_group_size: int) -> int:
    """Sub-groups of one rank's partition, as equal groups of ``sub_group_size`` elements (estimate_offload_mode)."""
    return max(1, -(-(-(-num_params // gpus)) // sub_group_size))


def _ratio_for(offloaded: int, groups: int) -> float:
    """A short ``offload_optimizer_ratio`` that makes DeepSpeed offload exactly ``offloaded`` of ``groups``
    sub-groups: it offloads the last ``groups - int((1 - ratio) * groups)`` (stage3.py), and ``k / groups`` itself
    can round one sub-group up in floating point (``int((1 - 0.9) * 10) == 0``)."""
    digits = max(3, len(str(groups)) + 1)
    for ratio in (round(offloaded / groups, digits), round(offloaded / groups - 10.0 ** -digits, digits)):
        if groups - int((1 - ratio) * groups) == offloaded:
            return ratio
    raise AssertionError(f"no ratio offloads {offloaded} of {groups} sub-groups")  # our invariant, not user input


# --------------------------------------------------------------------------------------------------------------------
# ZeroStrategy(stage="auto")
# --------------------------------------------------------------------------------------------------------------------


def _host_memory_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def count_with_configure_model(module: nn.Module) -> tuple[int, int]:
    """``model_size`` of ``module`` after its ``configure_model``, run on a meta-device shell so nothing is allocated
    and ``module`` itself is unchanged (the shell has its own submodule/parameter dicts)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("configure_model", module):
        return model_size(module)
    shell = object.__new__(type(module))
    shell.__dict__.update(module.__dict__)
    for attr in ("_modules", "_parameters", "_buffers"):
        shell.__dict__[attr] = dict(module.__dict__[attr])
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            shell.configure_model()
    except Exception as err:  # the user's code: report it with the way out
        raise RuntimeError(
            f"ZeroStrategy(stage=\"auto\") counts the parameters by running {type(module).__name__}.configure_model()"
            f" on the meta device first, which failed: {type(err).__name__}: {err}. Name the stage instead (see"
            " `lightning-zero estimate` for the choices)."
        ) from err
    return model_size(shell)


_Mode = tuple[int, Offload, Offload, float]  # (stage, offload_optimizer, offload_parameters, offload ratio)
# Offload to CPU with the whole optimizer on the host, fastest first (as in CHOICES)
_OFFLOADED: tuple[_Mode, ...] = ((2, "cpu", "none", 1.0), (1, "cpu", "none", 1.0), (3, "cpu", "none", 1.0),
                                 (3, "cpu", "cpu", 1.0))


def _mode_candidates(state_bytes: int, groups: int) -> tuple[_Mode, ...]:
    """The modes :func:`fastest_fit` tries for one optimizer state size, fastest first. Partial offload (stage 3)
    keeps ``1 - k / groups`` of the optimizer on the GPU, the smallest k first: the fewer sub-groups CPU Adam steps,
    the faster. bf16 master weights with fp32 moments (12 bytes) exist only with the optimizer offloaded to
    DeepSpeedCPUAdam (config.py refuses them otherwise); bf16 master weights and states (8) anywhere but stage 0."""
    partial = tuple((3, "cpu", "none", _ratio_for(k, groups)) for k in range(1, groups))
    if state_bytes == 16:
        return partial
    if state_bytes == 12:
        return _OFFLOADED
    return ((2, "none", "none", 0.0), (1, "none", "none", 0.0), (3, "none", "none", 0.0), *partial, *_OFFLOADED)


def _mode_row(plan: MemoryPlan, mode: _Mode, state_bytes: int, gpu_free_bytes: int | None,
              cpu_free_bytes: int | None, precision: str, sub_group_size: int) -> MemoryRow:
    """``mode`` for ``plan``'s model as a :class:`MemoryRow`, checked against the free memory (bytes; None: not
    checked). The activations ``plan`` reserves come on top of the model states."""
    stage, opt, param, ratio = mode
    figures = estimate_offload_mode(
        plan.num_params, plan.largest_layer_params, stage=stage, offload_ratio=ratio,
        bf16_master_weights_and_grads=state_bytes <= 12, bf16_optimizer_states=state_bytes <= 8,
        num_nodes=plan.num_nodes, gpus_per_node=plan.gpus_per_node, sub_group_size=sub_group_size,
        offload_parameters=param == "cpu", precision=precision, host_runtime_gb=plan.host_runtime_gb)
    gpu = max(figures.gpu_bytes, figures.gpu_bytes - figures.step_bytes + plan.activation_bytes)
    why = [name for name, need, free in (("GPU", gpu, gpu_free_bytes), ("CPU", figures.cpu_bytes, cpu_free_bytes))
           if free is not None and need > free]
    checked = gpu_free_bytes is not None or cpu_free_bytes is not None
    return MemoryRow(stage, opt, param, gpu, figures.cpu_bytes, 0, fits=not why if checked else None,
                     why_not=", ".join(why), offload_ratio=ratio if opt != "none" else 1.0, state_bytes=state_bytes,
                     sub_group_size=None if sub_group_size == _SUB_GROUP_SIZE else sub_group_size)


def partial_offload_fit(plan: MemoryPlan, gpu_free_bytes: int | None, cpu_free_bytes: int | None, *, precision: str,
                        state_bytes: int = 16, sub_group_size: int = _SUB_GROUP_SIZE) -> MemoryRow | None:
    """Stage 3 partial optimizer offload with the smallest share on the host that fits (None: none does, or one
    sub-group per rank leaves no share between 0 and 1)."""
    groups = _sub_groups(plan.num_params, plan.num_nodes * plan.gpus_per_node, sub_group_size)
    return next((row for k in range(1, groups) if (row := _mode_row(
        plan, (3, "cpu", "none", _ratio_for(k, groups)), state_bytes, gpu_free_bytes, cpu_free_bytes, precision,
        sub_group_size)).fits), None)


def fastest_fit(plan: MemoryPlan, gpu_free_bytes: int | None, cpu_free_bytes: int | None, *, precision: str,
                sub_group_size: int = _SUB_GROUP_SIZE) -> MemoryRow | None:
    """The fastest choice that fits on GPUs, with the offload modes (what ``ZeroStrategy(stage="auto")`` chooses):

    1. ``plan.recommended`` when it keeps the optimizer on the GPU (stages 2, 1, 0, 3 without offload);
    2. else partial optimizer offload at stage 3, the smallest share on the host that fits (more of the Adam step on
       the GPU: faster than any full offload), rounded to DeepSpeed's sub-groups of ``sub_group_size``;
    3. else ``plan.recommended`` (full offload to CPU, then NVMe when ``plan`` has those rows);
    4. else, with bf16 precision only (DeepSpeed keeps these states in the model's bf16): bf16 master weights with
       fp32 Adam moments offloaded (12 bytes per parameter instead of 16), then bf16 master weights and states (8),
       each in the order above. They change the numerics, so they come only when nothing fits in fp32.

    ``plan`` comes from :func:`estimate_memory` with the same capacities (its activations and host runtime count
    here too); None when nothing fits."""
    row = plan.recommended
    if row is not None and row.offload_optimizer == "none":
        return row
    groups = _sub_groups(plan.num_params, plan.num_nodes * plan.gpus_per_node, sub_group_size)
    for state_bytes in (16, 12, 8) if precision.startswith("bf16-") else (16,):
        fit = next((r for mode in _mode_candidates(state_bytes, groups)
                    if (r := _mode_row(plan, mode, state_bytes, gpu_free_bytes, cpu_free_bytes, precision,
                                       sub_group_size)).fits), None)
        if fit is not None or row is not None:
            return fit or row
    return None


def _mode_note(row: MemoryRow, plan: MemoryPlan) -> str:
    """What a mode chosen by :func:`fastest_fit` trades, for the log line ("" for a plain row)."""
    note = ""
    if row.offload_optimizer != "none" and row.offload_ratio < 1:
        no_offload = next((r for r in plan.rows if (r.stage, r.offload_optimizer) == (3, "none")), None)
        note += (f" Partial offload: CPU Adam steps {row.offload_ratio:.0%} of the optimizer states in host memory and"
                 " the GPU the rest, faster than offloading them all"
                 + (f" (stage 3 without offload needs about {_gib(no_offload.gpu_bytes)} per GPU)." if no_offload
                    else "."))
    if row.state_bytes < 16:
        kept = ("bf16 master weights and gradients with fp32 Adam moments" if row.state_bytes == 12
                else "bf16 master weights, gradients and Adam moments")
        note += (f" Nothing fits with fp32 master weights and Adam states (16 bytes per parameter), so the optimizer"
                 f" keeps {kept} ({row.state_bytes} bytes per parameter). This changes the numerics (bf16 master"
                 " weights and optimizer states: convergence measured in docs/benchmarks.md).")
    return note


def auto_choice(num_params: int, largest_layer_params: int, *, num_nodes: int, devices_per_node: int,
                device_type: str, precision: str, gpu_free_bytes: int | None, cpu_free_bytes: int | None,
                nvme_free_bytes: int | None = None, sub_group_size: int = _SUB_GROUP_SIZE,
                host_runtime_gb: float = HOST_RUNTIME_GIB) -> tuple[MemoryRow, str]:
    """The choice ``ZeroStrategy(stage="auto")`` makes, and the log line that explains it.

    On GPUs: the fastest choice that fits the free GPU memory, the available host memory and (when ``nvme_path``
    was given) the free NVMe space (each host figure with ``host_runtime_gb`` per process), with the offload modes:
    :func:`fastest_fit` (partial optimizer offload rounded to ``sub_group_size``; with bf16 precision, bf16 master
    weights and optimizer states when fp32 states fit nowhere; ``MemoryRow.keywords()`` gives their ZeroStrategy
    keywords). Without GPUs the model states live in host memory whatever the choice, so offload gains nothing: the
    fastest stage without offload whose states (per process x processes per node) fit the available host memory.
    When nothing fits, a :class:`ZeroConfigError` gives the estimate and the ways out (the fewest nodes that would
    fit; NVMe offload when no ``nvme_path`` was given).
    """
    size = f"{_count(num_params)} parameters"
    if device_type != "cuda":
        budget = None if cpu_free_bytes is None else cpu_free_bytes / GiB / devices_per_node
        plan_choices = tuple(c for c in CHOICES if c[1:] == ("none", "none"))
        plan = estimate_memory(num_params, largest_layer_params, num_nodes=num_nodes, gpus_per_node=devices_per_node,
                               gpu_memory_gb=budget, precision=precision, choices=plan_choices)
        if plan.recommended is None:
            raise _fits_nowhere(plan, f"without a GPU the model states live in host memory: the"
                                f" most frugal choice (stage 3) needs about {_gib(plan.rows[-1].gpu_bytes)} per"
                                f" process x {devices_per_node} process(es) per node, and"
                                f" {_gib(cpu_free_bytes or 0)} of host memory is available",
                                lambda nodes: _fits_on(plan, nodes, budget, None, None, choices=plan_choices),
                                more_options=None)
        row = plan.recommended
        return row, (f"ZeroStrategy(stage=\"auto\"): no GPU, so the model states live in host memory whatever the"
                     f" stage and offloading gains nothing; chose stage {row.stage} ({size}: about"
                     f" {_gib(row.gpu_bytes)} per process, {devices_per_node} process(es) per node,"
                     f" {_gib(cpu_free_bytes or 0)} host memory available).")
    gib = (lambda n: None if n is None else n / GiB)  # noqa: E731
    choices = CHOICES if nvme_free_bytes is not None else tuple(c for c in CHOICES if "nvme" not in c)
    plan = estimate_memory(num_params, largest_layer_params, num_nodes=num_nodes, gpus_per_node=devices_per_node,
                           gpu_memory_gb=gib(gpu_free_bytes), cpu_memory_gb=gib(cpu_free_bytes),
                           nvme_gb=gib(nvme_free_bytes), precision=precision, choices=choices,
                           host_runtime_gb=host_runtime_gb)
    row = fastest_fit(plan, gpu_free_bytes, cpu_free_bytes, precision=precision, sub_group_size=sub_group_size)
    if row is None:
        raise _refusal_on_gpus(plan, precision, gpu_free_bytes, cpu_free_bytes, nvme_free_bytes, choices)
    return row, (f"ZeroStrategy(stage=\"auto\"): {size} (largest layer {_count(largest_layer_params)}) on"
                 f" {num_nodes} x {devices_per_node} GPU(s) with {_gib(gpu_free_bytes or 0)} free per GPU and"
                 f" {_gib(cpu_free_bytes or 0)} host memory available: {row.strategy()} is the fastest choice that"
                 f" fits (model states about {_gib(row.gpu_bytes)} per GPU, {_gib(row.cpu_bytes)} host memory per"
                 f" node).{_mode_note(row, plan)}")


def _refusal_on_gpus(plan: MemoryPlan, precision: str, gpu_free_bytes: int | None, cpu_free_bytes: int | None,
                     nvme_free_bytes: int | None, choices: tuple[tuple[int, Offload, Offload], ...]) -> ValueError:
    """:func:`_fits_nowhere` for GPUs: the most frugal row, and NVMe or bf16 states where they would fit."""
    gib = (lambda n: None if n is None else n / GiB)  # noqa: E731
    frugal, num_nodes = plan.rows[-1], plan.num_nodes
    options = []
    if nvme_free_bytes is None:  # would NVMe offload fit, with enough drive space?
        with_nvme = _fits_on(plan, num_nodes, gib(gpu_free_bytes), gib(cpu_free_bytes), float("inf"))
        if with_nvme is not None:
            options.append(f"NVMe offload: ZeroStrategy(stage=\"auto\", nvme_path=...) with a local NVMe folder"
                           f" that has {_gib(with_nvme.nvme_bytes)} free per node ({with_nvme.strategy()})")
    bf16 = precision.startswith("bf16-")
    alternative = None if bf16 else fastest_fit(plan, gpu_free_bytes, cpu_free_bytes, precision="bf16-mixed")
    if alternative is not None:
        options.append(f"Trainer(precision=\"bf16-mixed\") instead of {precision!r}, where \"auto\" would choose"
                       f" {alternative.strategy()}")
    tried = ("; with bf16 master weights and optimizer states (8 bytes per parameter instead of 16) nothing fits"
             " either" if bf16 else "")
    return _fits_nowhere(plan, f"the most frugal choice, {frugal.strategy()}, needs about"
                         f" {_gib(frugal.gpu_bytes)} per GPU ({_gib(gpu_free_bytes or 0)} free) and"
                         f" {_gib(frugal.cpu_bytes)} host memory per node ({_gib(cpu_free_bytes or 0)} available)"
                         + (f" and {_gib(frugal.nvme_bytes)} NVMe ({_gib(nvme_free_bytes)} free)"
                            if frugal.nvme_bytes else "") + tried,
                         lambda nodes: _fits_on(plan, nodes, gib(gpu_free_bytes), gib(cpu_free_bytes),
                                                gib(nvme_free_bytes), choices=choices),
                         more_options="; ".join(options) or None)


def _fits_on(plan: MemoryPlan, num_nodes: int, gpu_gb: float | None, cpu_gb: float | None, nvme_gb: float | None,
             choices: tuple[tuple[int, Offload, Offload], ...] = CHOICES) -> MemoryRow | None:
    """The fastest choice for ``plan``'s model on ``num_nodes`` nodes that fits the capacities (GiB), or None."""
    return estimate_memory(plan.num_params, plan.largest_layer_params, num_nodes=num_nodes,
                           gpus_per_node=plan.gpus_per_node, gpu_memory_gb=gpu_gb, cpu_memory_gb=cpu_gb,
                           nvme_gb=nvme_gb, choices=choices, host_runtime_gb=plan.host_runtime_gb).recommended


def _fits_nowhere(plan: MemoryPlan, why: str,
                  fits_on: Callable[[int], MemoryRow | None], more_options: str | None) -> ValueError:
    """The refusal of ``stage="auto"`` when no choice fits: the estimate and the ways out (more nodes, then
    ``more_options``: NVMe, bf16 precision)."""
    from lightning_zero.config import ZeroConfigError

    options = []
    nodes = next((n for n in (2 ** k * plan.num_nodes for k in range(1, 13)) if fits_on(n) is not None), None)
    if nodes is not None:  # the fewest nodes between the last power of two that did not fit and this one
        low = nodes // 2
        while nodes - low > 1:
            mid = (low + nodes) // 2
            low, nodes = (low, mid) if fits_on(mid) is not None else (mid, nodes)
        options.append(f"more processes: {nodes} nodes of {plan.gpus_per_node} (Trainer(num_nodes={nodes}, ...)),"
                       f" where {fits_on(nodes).strategy()} fits")  # type: ignore[union-attr]
    if more_options:
        options.append(more_options)
    if not options:  # no node count or NVMe helps: the per-GPU (or per-process) share alone is too large
        options.append("devices with more free memory (the figures above are the least each needs)")
    options.append("a smaller model")
    return ZeroConfigError(
        f"ZeroStrategy(stage=\"auto\"): {_count(plan.num_params)} parameters (largest layer"
        f" {_count(plan.largest_layer_params)}) on {plan.num_nodes} node(s) x {plan.gpus_per_node} process(es) fit no"
        f" ZeRO stage or offload by the estimate (model states only, activations excluded): {why}. Options: "
        + "; ".join(options) + f". `lightning-zero estimate --params {plan.num_params:.3g} --largest-layer"
        f" {plan.largest_layer_params:.3g} --nodes {plan.num_nodes} --gpus-per-node {plan.gpus_per_node}` prints every"
        " choice; or name the stage yourself to try anyway."
    )


def detect_free_memory(device: torch.device, nvme_path: str | None = None,
                       disk_usage: Callable[[str], Any] = shutil.disk_usage) -> tuple[int | None, int, int | None]:
    """(free GPU bytes or None on CPU, available host bytes, free bytes at ``nvme_path`` or None)."""
    gpu = int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None
    nvme = int(disk_usage(nvme_path).free) if nvme_path else None
    return gpu, _host_memory_available(), nvme


def plan_auto(module: nn.Module, *, num_nodes: int, devices_per_node: int, device: torch.device, precision: str,
              nvme_path: str | None = None, sub_group_size: int | None = None,
              ) -> tuple[int, Offload, Offload, dict[str, Any], str]:
    """``(stage, offload_optimizer, offload_parameters, mode keywords, log line)`` for ``ZeroStrategy(stage="auto")``:
    the model counted with :func:`count_with_configure_model`, this machine's free memory, then :func:`auto_choice`.
    The mode keywords (``offload_optimizer_ratio``, ``bf16_master_weights_and_grads``, ``bf16_optimizer_states``;
    often none) are ZeroStrategy keywords, as ``MemoryRow.keywords()``; ``sub_group_size``: the config's, if set."""
    total, largest = count_with_configure_model(module)
    gpu, cpu, nvme = detect_free_memory(device, nvme_path)
    row, message = auto_choice(total, largest, num_nodes=num_nodes, devices_per_node=devices_per_node,
                               device_type=device.type, precision=precision, gpu_free_bytes=gpu, cpu_free_bytes=cpu,
                               nvme_free_bytes=nvme, sub_group_size=int(sub_group_size or _SUB_GROUP_SIZE))
    return row.stage, row.offload_optimizer, row.offload_parameters, row.keywords(), message


# --------------------------------------------------------------------------------------------------------------------
# lightning-zero estimate
# --------------------------------------------------------------------------------------------------------------------


def _load_model(spec: str) -> nn.Module:
    """Instantiate ``pkg.module:Class`` on the meta device and run its ``configure_model`` there."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r}: use the form package.module:ClassName.")
    try:
        factory = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({err}). Check the spelling, and run from"
                         " the folder that holds the package (or install it / add it to PYTHONPATH).") from None
    owner = module_name
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {spec!r}: {owner!r} has no {part!r}. Check the class name.")
        factory, owner = getattr(factory, part), f"{owner}.{part}"
    if not callable(factory) or isinstance(factory, type) and not issubclass(factory, nn.Module):
        what = factory.__name__ if isinstance(factory, type) else type(factory).__name__
        raise TypeError(f"--model {spec!r} is a {what}, not a LightningModule or torch.nn.Module class. Name the"
                        " model class, or give --params and --largest-layer.")
    try:
        with torch.device("meta"):
            model = factory()
            configure = getattr(model, "configure_model", None)
            if callable(configure):
                configure()
    except Exception as err:  # noqa: BLE001 - the user's constructor: report it with the way out
        raise ValueError(f"--model {spec!r}: {getattr(factory, '__name__', attr)}() could not be built with no"
                         f" arguments on the meta device ({type(err).__name__}: {err}). Give the class defaults for"
                         " every argument, or use --params and --largest-layer.") from None
    if not isinstance(model, nn.Module):  # a factory function
        raise TypeError(f"--model {spec!r} made a {type(model).__name__}, not a torch.nn.Module.")
    if model_size(model)[0] == 0:
        raise ValueError(f"--model {spec!r}: {type(model).__name__} has no parameters, even after its"
                         " configure_model. Name the class that builds the layers, or give --params and"
                         " --largest-layer.")
    return model


def _check_args(args: argparse.Namespace) -> str | None:
    """The first bad number on the command line, as the message to print (None: all fine)."""
    if args.params is not None and not args.params >= 1:
        return f"--params {args.params:g}: give the total number of parameters (at least 1), e.g. --params 7e9."
    if args.largest_layer is not None and not 0 <= args.largest_layer <= (args.params or float("inf")):
        return (f"--largest-layer {args.largest_layer:g}: give the most parameters one module holds itself, between 0"
                " and --params.")
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            return f"{flag} {value}: must be at least 1."
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory), ("--nvme", args.nvme),
                        ("--activation-memory", args.activation_memory)):
        if value is not None and not value >= 0:
            return f"{flag} {value:g}: give GiB, at least 0."
    for flag, value in (("--hidden", args.hidden), ("--layers", args.layers), ("--seq-len", args.seq_len),
                        ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:
            return f"{flag} {value}: must be at least 1."
    if args.vocab < 0:
        return f"--vocab {args.vocab}: must be at least 0."
    for ratio in getattr(args, "offload_ratio", None) or []:
        if not 0 <= ratio <= 1:
            return f"--offload-ratio {ratio:g}: the share of the optimizer state on the host, between 0 and 1."
    if getattr(args, "bf16_optimizer_states", False) and not getattr(args, "bf16_master_weights", False):
        return "--bf16-optimizer-states needs --bf16-master-weights too (DeepSpeed keeps the moments in its dtype)."
    if not getattr(args, "host_runtime", 0) >= 0:
        return (f"--host-runtime {args.host_runtime:g}: give the GiB of host memory each GPU process holds outside the"
                f" model states, at least 0 (measured: {HOST_RUNTIME_GIB}).")
    if getattr(args, "sub_group_size", 1) < 1:
        return f"--sub-group-size {args.sub_group_size:g}: must be at least 1."
    return None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "estimate", help="model-state memory of every ZeRO stage x offload choice, and the fastest that fits",
        description="Per-GPU, per-node host RAM and NVMe memory of every ZeRO stage x offload choice, and the fastest"
                    " choice that fits. Sizes in GiB. Model states only, unless the activations are given"
                    " (--activation-memory, or a transformer's --hidden/--layers/--seq-len/--micro-batch): then the"
                    " per-GPU figure is the expected peak.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", type=float, help="total parameters, e.g. 7e9")
    what.add_argument("--model", help="a LightningModule or nn.Module class, package.module:ClassName; built"
                                      " with no arguments on the meta device (configure_model included)")
    parser.add_argument("--largest-layer", type=float, help="parameters of the largest layer (with --params)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU")
    parser.add_argument("--cpu-memory", type=float, help="GiB of host RAM per node")
    parser.add_argument("--nvme", type=float, help="GiB of NVMe space per node (enables the NVMe rows)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed", "bf16-true",
                                                                        "16-true", "32-true"])
    parser.add_argument("--activation-memory", type=float, default=0.0, help="GiB per GPU to reserve for activations")
    parser.add_argument("--host-runtime", type=float, default=HOST_RUNTIME_GIB,
                        help="GiB of host memory per GPU process outside the model states (CUDA context, libraries;"
                             f" default {HOST_RUNTIME_GIB}, measured)")
    shape = parser.add_argument_group("activations of a GPT-style transformer (instead of --activation-memory)")
    shape.add_argument("--hidden", type=int, help="hidden size (d_model)")
    shape.add_argument("--layers", type=int, help="number of transformer blocks")
    shape.add_argument("--seq-len", type=int, help="tokens per sequence")
    shape.add_argument("--micro-batch", type=int, help="sequences per GPU per forward")
    shape.add_argument("--vocab", type=int, default=0, help="vocabulary size (the loss's logits)")
    shape.add_argument("--activation-checkpointing", action="store_true", help="blocks recompute their activations")
    modes = parser.add_argument_group("offload modes (rows after the table; without these flags: the modes"
                                      " stage=\"auto\" considers)")
    modes.add_argument("--offload-ratio", type=float, action="append",
                       help="stage 3 partial optimizer offload: the share stepped by CPU Adam (repeat for several)")
    modes.add_argument("--sub-group-size", type=float, default=_SUB_GROUP_SIZE,
                       help="zero_optimization.sub_group_size (partial offload moves whole sub-groups)")
    modes.add_argument("--bf16-master-weights", action="store_true", help="bf16.bf16_master_weights_and_grads")
    modes.add_argument("--bf16-optimizer-states", action="store_true",
                       help="bf16.bf16_optimizer_states (with --bf16-master-weights)")
    parser.set_defaults(func=run)
    return parser


def _error(message: str) -> int:
    print(f"lightning-zero estimate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError) as err:  # bad input, named by the message: one line, no traceback
        return _error(str(err))


def _print_modes(args: argparse.Namespace, plan: MemoryPlan, gpu_free: int | None, cpu_free: int | None) -> None:
    """The offload-mode rows: those asked for on the command line (--offload-ratio, --bf16-*), else the ones
    ``stage="auto"`` considers (:func:`fastest_fit`): partial offload at every 10% that DeepSpeed's sub-groups allow,
    and with bf16 precision the low-precision states."""
    sub, p, gpus = int(args.sub_group_size), plan.num_params, plan.num_nodes * plan.gpus_per_node
    groups = _sub_groups(p, gpus, sub)
    master, states = bool(args.bf16_master_weights), bool(args.bf16_optimizer_states)
    modes: list[tuple[_Mode, int]]
    if args.offload_ratio or master or states:
        state = optimizer_state_bytes(master, states)
        pairs = [(3, r) for r in args.offload_ratio or []] or [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
        modes = [((stage, "cpu" if r else "none", "none", r), state) for stage, r in pairs]
    else:
        steps = range(1, groups) if groups <= 10 else sorted({round(i * groups / 10) for i in range(1, 10)})
        modes = [((3, "cpu", "none", _ratio_for(k, groups)), 16) for k in steps]
        if args.precision.startswith("bf16-"):
            modes += [((2, "cpu", "none", 1.0), 12), ((3, "cpu", "none", 1.0), 12), ((2, "none", "none", 0.0), 8),
                      ((3, "none", "none", 0.0), 8), ((3, "cpu", "none", 1.0), 8)]
    what = (f"per GPU: expected peak with {_gib(plan.activation_bytes)} of activations" if plan.activation_bytes
            else "model states")
    print(f"\nOffload modes ({what}; derived from DeepSpeed's dtypes and sub-groups):\n"
          f"{'stage':>5}  {'on the host':>13}  {'optimizer state':<18}  {'per GPU':>10}  {'CPU/node':>10}  fits")
    for mode, state in modes:
        row = _mode_row(plan, mode, state, gpu_free, cpu_free, args.precision, sub)
        ratio = mode[3]  # shown as the share DeepSpeed's sub-groups make it
        share = (groups - int((1 - ratio) * groups)) / groups if 0 < ratio < 1 else float(ratio > 0)
        shown = ModeRow(row.stage, share, state, row.gpu_bytes, row.cpu_bytes)
        print(f"{shown.line()}  {({True: 'yes', False: f'no ({row.why_not})', None: '?'})[row.fits]}")
    if groups == 1 and not args.offload_ratio:
        print(f"(partial offload: one sub-group of sub_group_size={sub:.3g} per GPU, so any ratio offloads all of it;"
              " a smaller --sub-group-size splits it)")


def _run(args: argparse.Namespace) -> int:
    if args.params is not None and args.largest_layer is None:
        return _error("--params needs --largest-layer (the most parameters one module holds itself, e.g. the"
                      " embedding).")
    problem = _check_args(args)
    if problem:
        return _error(problem)
    activations = args.activation_memory
    shape = {"--hidden": args.hidden, "--layers": args.layers, "--seq-len": args.seq_len,
             "--micro-batch": args.micro_batch}
    if any(v is not None for v in shape.values()):
        missing = [k for k, v in shape.items() if v is None]
        if missing or args.activation_memory:
            return _error("the transformer's activations need --hidden, --layers, --seq-len and --micro-batch"
                          f" together ({'missing ' + ', '.join(missing) if missing else 'all given'}), and replace"
                          " --activation-memory (give one or the other).")
        activations = transformer_activation_bytes(
            hidden=args.hidden, layers=args.layers, seq_len=args.seq_len, micro_batch=args.micro_batch,
            vocab=args.vocab, checkpointing=args.activation_checkpointing,
            bytes_per_element=4 if args.precision == "32-true" else 2) / GiB
    model = _load_model(args.model) if args.model else None
    plan = estimate_memory(args.params, args.largest_layer, model=model, num_nodes=args.nodes,
                           gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory,
                           cpu_memory_gb=args.cpu_memory, nvme_gb=args.nvme, precision=args.precision,
                           activation_memory_gb=activations, host_runtime_gb=args.host_runtime)
    gpu_free, cpu_free = (None if gb is None else int(gb * GiB) for gb in (args.gpu_memory, args.cpu_memory))
    print(plan.table())
    _print_modes(args, plan, gpu_free, cpu_free)
    best = fastest_fit(plan, gpu_free, cpu_free, precision=args.precision, sub_group_size=int(args.sub_group_size))
    if best is not None:
        print(f"\nRecommended (fastest that fits): {best.strategy()}")
        if best.keywords():  # an offload mode: what it trades
            print(_mode_note(best, plan).strip())
        return 0
    if any(r.fits is None for r in plan.rows):
        print("\nGive --gpu-memory / --cpu-memory (and --nvme) for a recommendation.")
        return 0
    print("\nNothing fits: add GPUs or nodes, host memory or NVMe space.")
    return 1
