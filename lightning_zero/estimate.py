"""Memory planning: model-state memory of every stage x offload choice, and the fastest choice that fits.

    lightning-zero estimate --params 7e9 --largest-layer 2e8 --nodes 1 --gpus-per-node 8 --gpu-memory 80 --cpu-memory 512
    lightning-zero estimate --model my_package.models:MyLitModel --gpus-per-node 8 --gpu-memory 80

    lightning-zero estimate --params 6.25e9 --largest-layer 2.06e8 --gpu-memory 79 --cpu-memory 125 \
        --hidden 4096 --layers 30 --vocab 50304 --seq-len 1024 --micro-batch 32 --activation-checkpointing

The model-state figures are DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` for stages 0-2,
``estimate_zero3_model_states_mem_needs`` for stage 3) with a host buffer factor of 1.2 measured on an H100 machine
instead of DeepSpeed's 1.5; see :func:`estimate_memory` for what is derived from them. With a transformer's shape,
:func:`transformer_activation_bytes` adds the activations, and the per-GPU figure becomes the peak to expect
(docs/benchmarks.md compares it with measured peaks). ``ZeroStrategy(stage="auto")`` runs the same planner at setup
(:func:`auto_choice`).
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

__all__ = ["CHOICES", "MemoryPlan", "MemoryRow", "ModeRow", "add_parser", "auto_choice", "count_with_configure_model",
           "detect_free_memory", "estimate_memory", "estimate_offload_mode", "model_size", "optimizer_state_bytes",
           "plan_auto", "transformer_activation_bytes"]

GiB = 2**30
Offload = Literal["none", "cpu", "nvme"]
# Host memory per byte of DeepSpeed's host model-state figure. DeepSpeed's estimators default to 1.5; the resident set
# of ZeroStrategy processes on an H100 machine fit 1.19 x that figure + 3.8 GiB of process runtime (CUDA context,
# libraries) for a 0.9B GPT with the optimizer offloaded, the same with parameters offloaded too, and a 6.25B GPT
# (19.99, 22.17 and 114.9 GiB measured; docs/benchmarks.md). 1.5 called the 6.25B run infeasible on 125 GiB.
_BUFFER_FACTOR = 1.2
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

    def strategy(self, nvme_path: str | None = None) -> str:
        """The ``ZeroStrategy(...)`` call for this choice."""
        args = [f"stage={self.stage}"]
        if self.offload_optimizer != "none":
            args.append(f"offload_optimizer={self.offload_optimizer!r}")
        if self.offload_parameters != "none":
            args.append(f"offload_parameters={self.offload_parameters!r}")
        if "nvme" in (self.offload_optimizer, self.offload_parameters):
            args.append(f"nvme_path={nvme_path or '/local_nvme'!r}")
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
    step) of one choice; see estimate_memory."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    gpus = nodes * per_node
    extra = weight_bytes - 2  # fp32: 2 more bytes per resident 16-bit weight / gradient element
    if stage < 3:
        offload = opt != "none"
        cpu, gpu = zero2(p, per_node, nodes, cpu_offload=offload, additional_buffer_factor=buffer_factor)
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

    if opt == "none":
        cpu, gpu = z3(False, False)
        return gpu + extra * (layer + 2 * p / gpus), cpu, 0, 0
    # DeepSpeed's host memory with offload splits into the optimizer part (offload_optimizer only) and the 16-bit
    # parameter part (the difference once parameters are offloaded too); NVMe moves that part to the drive and keeps
    # pinned swap buffers in host memory instead.
    opt_cpu, opt_gpu = z3(True, False)
    all_cpu, all_gpu = z3(True, True)
    param_part = all_cpu - opt_cpu
    cpu = nvme = 0.0
    if opt == "cpu":
        cpu += opt_cpu
    else:
        cpu += per_node * _OPTIMIZER_BUFFER_COUNT * min(_SUB_GROUP_SIZE, p / gpus) * 4
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

    - host memory: DeepSpeed's figure x ``buffer_factor`` (1.2, measured; DeepSpeed's own default is 1.5).

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
    if p < 1 or not 0 <= layer <= p:
        raise ValueError(f"estimate_memory needs num_params >= 1 and 0 <= largest_layer_params <= num_params, got"
                         f" {p} and {layer}.")
    weight_bytes = 4 if precision == "32-true" else 2
    reserve = activation_memory_gb * GiB
    rows = []
    for stage, opt, param in choices:
        gpu, cpu, nvme, step_only = _model_states(stage, opt, param, p, layer, num_nodes, gpus_per_node,
                                                  weight_bytes, buffer_factor)
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
    return MemoryPlan(p, layer, num_nodes, gpus_per_node, tuple(rows), recommended, int(reserve))


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

    def line(self) -> str:
        states = {16: "fp32", 12: "bf16 master", 8: "bf16 master+states"}[self.state_bytes]
        return (f"{self.stage:>5}  {self.offload_ratio:>13.0%}  {states:<18}  {_gib(self.gpu_bytes):>10}"
                f"  {_gib(self.cpu_bytes):>10}")


def estimate_offload_mode(num_params: int | float, largest_layer_params: int | float, *, stage: int = 3,
                          offload_ratio: float = 1.0, bf16_master_weights_and_grads: bool = False,
                          bf16_optimizer_states: bool = False, num_nodes: int = 1, gpus_per_node: int = 1,
                          sub_group_size: int = _SUB_GROUP_SIZE, buffer_factor: float = _BUFFER_FACTOR) -> ModeRow:
    """Model states of an offload mode, from the same DeepSpeed estimators as :func:`estimate_memory` (bf16 weights):
    the optimizer's 16 bytes per parameter become :func:`optimizer_state_bytes`, and with ``offload_ratio`` r
    (stage 3; 0 = no offload, 1 = ZeRO-Offload) a share r of them sits in host RAM and the rest on the GPU. DeepSpeed
    offloads whole sub-groups of ``sub_group_size`` elements (stage3.py), so r is first rounded as it does, for
    equal sub-groups of a rank's partition (``ModeRow.offload_ratio`` is the share it really offloads).

    Derived from DeepSpeed's dtypes and sub-group split, not measured on a GPU (docs/benchmarks.md has no such row
    yet); ``stage="auto"`` does not consider these modes."""
    if not 0 <= offload_ratio <= 1:
        raise ValueError(f"offload_ratio={offload_ratio!r} must be between 0 and 1.")
    if stage not in (1, 2, 3) or (stage < 3 and offload_ratio not in (0, 1)):
        raise ValueError(f"stage={stage!r} with offload_ratio={offload_ratio!r}: partial offload is stage 3 only,"
                         " low-precision states need stage 1, 2 or 3.")
    p, layer = int(num_params), int(largest_layer_params)
    gpus = num_nodes * gpus_per_node
    state = optimizer_state_bytes(bf16_master_weights_and_grads, bf16_optimizer_states)
    ratio = float(offload_ratio)
    if 0 < ratio < 1:
        groups = max(1, -(-(-(-p // gpus)) // sub_group_size))
        ratio = (groups - int((1 - ratio) * groups)) / groups
    on_gpu = _model_states(stage, "none", "none", p, layer, num_nodes, gpus_per_node, 2, buffer_factor)
    offloaded = _model_states(stage, "cpu", "none", p, layer, num_nodes, gpus_per_node, 2, buffer_factor)
    # the 16 optimizer bytes per parameter move between the GPU figure and the host figure (at stages 1-2 the GPU
    # difference also holds the 16-bit gradient partition: 18 bytes, of which 16 change with the state dtype)
    moved = 16 if stage == 3 else 18
    gpu = offloaded[0] + (1 - ratio) * (on_gpu[0] - offloaded[0]) * (state + moved - 16) / moved
    cpu = on_gpu[1] + ratio * (offloaded[1] - on_gpu[1]) * state / 16
    return ModeRow(stage, ratio, state, int(gpu), int(cpu))


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


def auto_choice(num_params: int, largest_layer_params: int, *, num_nodes: int, devices_per_node: int,
                device_type: str, precision: str, gpu_free_bytes: int | None, cpu_free_bytes: int | None,
                nvme_free_bytes: int | None = None) -> tuple[MemoryRow, str]:
    """The choice ``ZeroStrategy(stage="auto")`` makes, and the log line that explains it.

    On GPUs: the fastest row of :func:`estimate_memory` that fits the free GPU memory, the available host memory
    and (when ``nvme_path`` was given) the free NVMe space. Without GPUs the model states live in host memory
    whatever the choice, so offload gains nothing: the fastest stage without offload whose states (per process x
    processes per node) fit the available host memory. When nothing fits, a :class:`ZeroConfigError` gives the
    estimate and the ways out (the fewest nodes that would fit; NVMe offload when no ``nvme_path`` was given).
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
                                nvme_option=None)
        row = plan.recommended
        return row, (f"ZeroStrategy(stage=\"auto\"): no GPU, so the model states live in host memory whatever the"
                     f" stage and offloading gains nothing; chose stage {row.stage} ({size}: about"
                     f" {_gib(row.gpu_bytes)} per process, {devices_per_node} process(es) per node,"
                     f" {_gib(cpu_free_bytes or 0)} host memory available).")
    gib = (lambda n: None if n is None else n / GiB)  # noqa: E731
    choices = CHOICES if nvme_free_bytes is not None else tuple(c for c in CHOICES if "nvme" not in c)
    plan = estimate_memory(num_params, largest_layer_params, num_nodes=num_nodes, gpus_per_node=devices_per_node,
                           gpu_memory_gb=gib(gpu_free_bytes), cpu_memory_gb=gib(cpu_free_bytes),
                           nvme_gb=gib(nvme_free_bytes), precision=precision, choices=choices)
    row = plan.recommended
    verdict = "the fastest choice that fits"
    if row is None:
        frugal = plan.rows[-1]
        nvme_option = None
        if nvme_free_bytes is None:  # would NVMe offload fit, with enough drive space?
            with_nvme = _fits_on(plan, num_nodes, gib(gpu_free_bytes), gib(cpu_free_bytes), float("inf"))
            if with_nvme is not None:
                nvme_option = (f"NVMe offload: ZeroStrategy(stage=\"auto\", nvme_path=...) with a local NVMe folder"
                               f" that has {_gib(with_nvme.nvme_bytes)} free per node ({with_nvme.strategy()})")
        raise _fits_nowhere(plan, f"the most frugal choice, {frugal.strategy()}, needs about"
                            f" {_gib(frugal.gpu_bytes)} per GPU ({_gib(gpu_free_bytes or 0)} free) and"
                            f" {_gib(frugal.cpu_bytes)} host memory per node ({_gib(cpu_free_bytes or 0)} available)"
                            + (f" and {_gib(frugal.nvme_bytes)} NVMe ({_gib(nvme_free_bytes)} free)"
                               if frugal.nvme_bytes else ""),
                            lambda nodes: _fits_on(plan, nodes, gib(gpu_free_bytes), gib(cpu_free_bytes),
                                                   gib(nvme_free_bytes), choices=choices),
                            nvme_option=nvme_option)
    return row, (f"ZeroStrategy(stage=\"auto\"): {size} (largest layer {_count(largest_layer_params)}) on"
                 f" {num_nodes} x {devices_per_node} GPU(s) with {_gib(gpu_free_bytes or 0)} free per GPU and"
                 f" {_gib(cpu_free_bytes or 0)} host memory available: {row.strategy()} is {verdict} (model states"
                 f" about {_gib(row.gpu_bytes)} per GPU, {_gib(row.cpu_bytes)} host memory per node).")


def _fits_on(plan: MemoryPlan, num_nodes: int, gpu_gb: float | None, cpu_gb: float | None, nvme_gb: float | None,
             choices: tuple[tuple[int, Offload, Offload], ...] = CHOICES) -> MemoryRow | None:
    """The fastest choice for ``plan``'s model on ``num_nodes`` nodes that fits the capacities (GiB), or None."""
    return estimate_memory(plan.num_params, plan.largest_layer_params, num_nodes=num_nodes,
                           gpus_per_node=plan.gpus_per_node, gpu_memory_gb=gpu_gb, cpu_memory_gb=cpu_gb,
                           nvme_gb=nvme_gb, choices=choices).recommended


def _fits_nowhere(plan: MemoryPlan, why: str,
                  fits_on: Callable[[int], MemoryRow | None], nvme_option: str | None) -> ValueError:
    """The refusal of ``stage="auto"`` when no choice fits: the estimate and the ways out (more nodes, NVMe)."""
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
    if nvme_option:
        options.append(nvme_option)
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
              nvme_path: str | None = None) -> tuple[int, Offload, Offload, str]:
    """``(stage, offload_optimizer, offload_parameters, log line)`` for ``ZeroStrategy(stage="auto")``: the model
    counted with :func:`count_with_configure_model`, this machine's free memory, then :func:`auto_choice`."""
    total, largest = count_with_configure_model(module)
    gpu, cpu, nvme = detect_free_memory(device, nvme_path)
    row, message = auto_choice(total, largest, num_nodes=num_nodes, devices_per_node=devices_per_node,
                               device_type=device.type, precision=precision, gpu_free_bytes=gpu, cpu_free_bytes=cpu,
                               nvme_free_bytes=nvme)
    return row.stage, row.offload_optimizer, row.offload_parameters, message


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
    shape = parser.add_argument_group("activations of a GPT-style transformer (instead of --activation-memory)")
    shape.add_argument("--hidden", type=int, help="hidden size (d_model)")
    shape.add_argument("--layers", type=int, help="number of transformer blocks")
    shape.add_argument("--seq-len", type=int, help="tokens per sequence")
    shape.add_argument("--micro-batch", type=int, help="sequences per GPU per forward")
    shape.add_argument("--vocab", type=int, default=0, help="vocabulary size (the loss's logits)")
    shape.add_argument("--activation-checkpointing", action="store_true", help="blocks recompute their activations")
    modes = parser.add_argument_group("offload modes (printed after the table; not planned by stage=\"auto\")")
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


def _print_modes(args: argparse.Namespace, plan: MemoryPlan) -> None:
    """The offload-mode rows asked for on the command line (--offload-ratio, --bf16-*)."""
    ratios = getattr(args, "offload_ratio", None) or []
    bf16 = dict(bf16_master_weights_and_grads=getattr(args, "bf16_master_weights", False),
                bf16_optimizer_states=getattr(args, "bf16_optimizer_states", False))
    if not ratios and not any(bf16.values()):
        return
    stages = [(3, r) for r in ratios] or [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    rows = [estimate_offload_mode(plan.num_params, plan.largest_layer_params, stage=stage, offload_ratio=ratio,
                                  num_nodes=plan.num_nodes, gpus_per_node=plan.gpus_per_node,
                                  sub_group_size=int(args.sub_group_size), **bf16) for stage, ratio in stages]
    print(f"\nOffload modes (model states, bf16 weights; derived from DeepSpeed's dtypes, not measured):\n"
          f"{'stage':>5}  {'on the host':>13}  {'optimizer state':<18}  {'per GPU':>10}  {'CPU/node':>10}")
    print("\n".join(r.line() for r in rows))


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
                           activation_memory_gb=activations)
    print(plan.table())
    _print_modes(args, plan)
    if plan.recommended is not None:
        print(f"\nRecommended (fastest that fits): {plan.recommended.strategy()}")
        return 0
    if any(r.fits is None for r in plan.rows):
        print("\nGive --gpu-memory / --cpu-memory (and --nvme) for a recommendation.")
        return 0
    print("\nNothing fits: add GPUs or nodes, host memory or NVMe space.")
    return 1
