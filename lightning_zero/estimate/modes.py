"""Offload modes (issue 18): partial optimizer offload, bf16 master weights / optimizer states; their model-state
memory, DeepSpeed's sub-group rounding of the offload ratio, and the modes :func:`fastest_fit` tries."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_zero.estimate.memory import (
    _BUFFER_FACTOR,
    _SUB_GROUP_SIZE,
    HOST_RUNTIME_GIB,
    GiB,
    MemoryPlan,
    MemoryRow,
    Offload,
    _check_runtime,
    _gib,
    _model_states,
)


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


_Mode = tuple[int, Offload, Offload, float]  # (stage, offload_optimizer, offload_parameters, offload ratio)
# Offload to CPU with the whole optimizer on the host, fastest first (as in CHOICES)
_OFFLOADED: tuple[_Mode, ...] = ((2, "cpu", "none", 1.0), (1, "cpu", "none", 1.0), (3, "cpu", "none", 1.0),
                                 (3, "cpu", "cpu", 1.0))


def _mode_candidates(state_bytes: int, groups: int) -> tuple[_Mode, ...]:
    """The modes :func:`fastest_fit` tries for one optimizer state size, fastest first. Partial offload (stage 3)
    keeps ``1 - k / groups`` of the optimizer on the GPU, the smallest k first: the fewer sub-groups CPU Adam steps,
    the faster. bf16 master weights with fp32 moments (12 bytes) exist only with the optimizer offloaded to
    DeepSpeedCPUAdam (the config refuses them otherwise); bf16 master weights and states (8) anywhere but stage 0."""
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
