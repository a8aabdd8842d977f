"""The defaults from the memory estimator: :func:`recommend` (stage and offload) and the offload, partial-offload
ratio and optimizer-state defaults of the questions that follow it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_zero.wizard.machine import Context, GiB, _gib


def _plan(ctx: Context, answers: Mapping[str, Any]) -> Any:
    from lightning_zero.estimate import estimate_memory

    m, model = ctx.machine, ctx.model
    gpu = m.gpu_memory_bytes / GiB if m.gpu_memory_bytes else None
    return estimate_memory(model.params, model.largest_layer, num_nodes=answers["nodes"],  # type: ignore[union-attr]
                           gpus_per_node=answers["devices"], gpu_memory_gb=gpu,
                           cpu_memory_gb=m.host_memory_bytes / GiB, precision=answers["precision"])


def recommend(ctx: Context, answers: Mapping[str, Any]) -> tuple[int, str, str, str]:
    """``(stage, offload_optimizer, offload_parameters, why)`` from the estimator, for the answers so far."""
    if ctx.model is None:
        return 2, "none", "none", ("no model given (--model pkg.module:Class, or --params/--largest-layer), so no"
                                   " size to plan for: stage 2 partitions gradients and optimizer state at DDP's"
                                   " speed; stage 3 also partitions the parameters, for models too big for stage 2")
    size = f"{ctx.model.name} ({ctx.model.params / 1e9:.2f}B parameters)"
    if ctx.machine.gpu_memory_bytes is None:
        from lightning_zero.estimate import auto_choice

        try:
            row, _ = auto_choice(ctx.model.params, ctx.model.largest_layer, num_nodes=answers["nodes"],
                                 devices_per_node=answers["devices"], device_type="cpu",
                                 precision=answers["precision"], gpu_free_bytes=None,
                                 cpu_free_bytes=ctx.machine.host_memory_bytes)
        except ValueError:
            return 3, "none", "none", (f"{size} does not fit this machine's host memory at any stage (CPU processes"
                                       " keep the model states in host memory); stage 3 needs the least")
        return row.stage, "none", "none", (f"{size} on CPU processes: the model states live in host memory whatever"
                                           f" the stage, so offload gains nothing; stage {row.stage} is the fastest"
                                           f" that fits ({_gib(row.gpu_bytes)} per process of"
                                           f" {_gib(ctx.machine.host_memory_bytes)} available)")
    plan, row = _fastest(ctx, answers)
    of = f"of your {_gib(ctx.machine.gpu_memory_bytes)}"
    if row is None:
        frugal = [r for r in plan.rows if "nvme" not in (r.offload_optimizer, r.offload_parameters)][-1]
        return 3, "cpu", "cpu", (f"{size} fits no choice by the estimate: the most frugal without NVMe needs"
                                 f" {_gib(frugal.gpu_bytes)} per GPU {of} and {_gib(frugal.cpu_bytes)} host memory;"
                                 " offload to NVMe below, or use more nodes")
    why = (f"{size}: {row.strategy()} is the fastest choice that fits, model states about {_gib(row.gpu_bytes)} per"
           f" GPU {of} and {_gib(row.cpu_bytes)} host memory per node (activations come on top)")
    roomier = min((r for r in plan.rows if r.fits and r.gpu_bytes < row.gpu_bytes), key=lambda r: r.gpu_bytes,
                  default=None)
    if roomier is not None:
        why += f"; {roomier.strategy()} leaves the most room for activations ({_gib(roomier.gpu_bytes)} per GPU)"
    return row.stage, row.offload_optimizer, row.offload_parameters, why + _mode_note(row, plan)


def _fastest(ctx: Context, answers: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(plan, the fastest row that fits with the offload modes, or None)``, as ``stage="auto"`` would choose on
    this machine's GPUs (:func:`lightning_zero.estimate.fastest_fit`)."""
    from lightning_zero.estimate import fastest_fit

    plan = _plan(ctx, answers)
    return plan, fastest_fit(plan, ctx.machine.gpu_memory_bytes, ctx.machine.host_memory_bytes,
                             precision=answers["precision"])


def _mode_note(row: Any, plan: Any) -> str:
    from lightning_zero.estimate import _mode_note as note

    return (". " + note(row, plan).strip().rstrip(".")) if row.keywords() else ""


def _offload_default(ctx: Context, answers: Mapping[str, Any], which: str) -> tuple[str, str]:
    """The estimator's ``which`` offload for the chosen stage (and optimizer offload): the fastest that fits."""
    stage, opt_rec, param_rec, why = recommend(ctx, answers)
    if ctx.model is None:
        return "none", "no model size to plan for, and offload costs speed"
    if ctx.machine.gpu_memory_bytes is None:
        return "none", "CPU processes: the model states are in host memory already, offload gains nothing"
    if answers["stage"] == stage and (which == "offload_optimizer" or answers["offload_optimizer"] == opt_rec):
        return (opt_rec if which == "offload_optimizer" else param_rec), why
    rows = [r for r in _plan(ctx, answers).rows if r.stage == answers["stage"]
            and (which == "offload_optimizer" or r.offload_optimizer == answers["offload_optimizer"])]
    row = next((r for r in rows if r.fits), None)
    verdict = "the fastest choice that fits at this stage"
    if row is None:
        row = ([r for r in rows if "nvme" not in (r.offload_optimizer, r.offload_parameters)] or rows)[-1]
        verdict = "nothing fits at this stage by the estimate; the most frugal without NVMe"
    return getattr(row, which), f"{verdict}: {row.strategy()}, model states about {_gib(row.gpu_bytes)} per GPU"


def _matching_recommendation(ctx: Context, a: Mapping[str, Any]) -> Any:
    """The estimator's row with its offload modes when the answers so far chose the same stage and offload."""
    if ctx.model is None or ctx.machine.gpu_memory_bytes is None:
        return None
    row = _fastest(ctx, a)[1]
    same = row is not None and (row.stage, row.offload_optimizer, row.offload_parameters) == (
        a["stage"], a.get("offload_optimizer", "none"), a.get("offload_parameters", "none"))
    return row if same else None


def _ratio_default(ctx: Context, a: Mapping[str, Any]) -> tuple[str, str]:
    from lightning_zero.estimate import partial_offload_fit

    full = ("1.0 offloads the whole optimizer; a share below 1 keeps the rest on the GPU (stepped there, faster) for"
            " 16 bytes per parameter of GPU memory")
    row = _matching_recommendation(ctx, a)
    if row is not None:
        return str(row.offload_ratio), f"the estimator's choice: {row.strategy()}"
    if ctx.model is None or ctx.machine.gpu_memory_bytes is None or a.get("offload_parameters", "none") != "none":
        return "1.0", full
    fit = partial_offload_fit(_plan(ctx, a), ctx.machine.gpu_memory_bytes, ctx.machine.host_memory_bytes,
                              precision=a["precision"])
    if fit is None:
        return "1.0", f"{full}; by the estimate no share below 1 fits (or one sub-group per GPU cannot be split)"
    return str(fit.offload_ratio), (f"the smallest share on the host that fits by the estimate: {fit.strategy()},"
                                    f" model states about {_gib(fit.gpu_bytes)} per GPU")
