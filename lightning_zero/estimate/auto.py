"""Choosing what fits: the fastest choice with the offload modes (:func:`fastest_fit`), the choice and log line of
``ZeroStrategy(stage="auto")`` (:func:`auto_choice`), its refusals with the ways out, and this machine's free memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch

from lightning_zero.estimate.memory import (
    _SUB_GROUP_SIZE,
    CHOICES,
    HOST_RUNTIME_GIB,
    GiB,
    MemoryPlan,
    MemoryRow,
    Offload,
    _count,
    _gib,
    _host_memory_available,
    estimate_memory,
)
from lightning_zero.estimate.modes import _mode_candidates, _mode_row, _ratio_for, _sub_groups


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
