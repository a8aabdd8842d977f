"""The memory model: model-state bytes of every ZeRO stage x offload choice (DeepSpeed's estimators with measured
host figures), transformer activations, and the model and host-memory counts ``stage="auto"`` starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

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
