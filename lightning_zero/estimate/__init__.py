"""Memory planning: model-state memory of every stage x offload choice, and the fastest choice that fits.

    lightning-zero estimate --params 7e9 --largest-layer 2e8 --nodes 1 --gpus-per-node 8 --gpu-memory 80 \
        --cpu-memory 512
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

Layout: :mod:`.memory` holds the memory model (stage x offload rows, activations, model and host-memory counts);
:mod:`.modes` the offload modes (partial offload, bf16 states); :mod:`.auto` the choice that fits and
``stage="auto"``'s refusals; :mod:`.cli` the command. Import from here (``lightning_zero.estimate``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# __all__, and the private names the wizard package, env.py and the tests import from here (_host_memory_available,
# _load_model, _mode_note, _ratio_for, GiB); Offload and _SUB_GROUP_SIZE are plan_auto's
from lightning_zero.estimate.auto import (
    _mode_note,
    auto_choice,
    detect_free_memory,
    fastest_fit,
    partial_offload_fit,
)
from lightning_zero.estimate.cli import _load_model, add_parser, run
from lightning_zero.estimate.memory import (
    _SUB_GROUP_SIZE,
    CHOICES,
    HOST_RUNTIME_GIB,
    GiB,
    MemoryPlan,
    MemoryRow,
    Offload,
    _host_memory_available,
    count_with_configure_model,
    estimate_memory,
    model_size,
    transformer_activation_bytes,
)
from lightning_zero.estimate.modes import ModeRow, _ratio_for, estimate_offload_mode, optimizer_state_bytes

__all__ = ["CHOICES", "HOST_RUNTIME_GIB", "MemoryPlan", "MemoryRow", "ModeRow", "add_parser", "auto_choice",
           "count_with_configure_model", "detect_free_memory", "estimate_memory", "estimate_offload_mode",
           "fastest_fit", "model_size", "optimizer_state_bytes", "partial_offload_fit", "plan_auto",
           "transformer_activation_bytes"]


# plan_auto lives here, not in .auto: it looks detect_free_memory up in this module, where tests replace it
# (monkeypatch.setattr(estimate, "detect_free_memory", ...) in tests/unit/test_auto_modes.py).
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
