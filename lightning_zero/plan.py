"""One planning step: what each DeepSpeed engine wraps, trains and is configured with, decided before any is built.

Phase 1, pure (no ``deepspeed`` import, no process group, nothing mutated; unit-tested in tests/unit/test_plan.py):

* :func:`resolve_model_config`: the model-wide DeepSpeed config: ``config.resolve_ds_config`` (user config, keywords,
  Trainer flags, ``managed_gradient_accumulation``), the speed defaults (``tuning.resolve_speed_defaults``) and the
  DeepCompile keys.
* :func:`plan_engines`: one :class:`EnginePlan` per engine from that config, the LightningModule and its optimizers:
  the name, the model (``engines.assign_models``), the optimizer Lightning sees, and the engine's final config
  (inference config for models without optimizer, stage 0 for those below stage 3, stage 3's block fetch units).

Phase 2, side effects: :func:`build_engines` builds and registers the planned engines in order; it is the only caller
of ``engines.build_engine`` (``deepspeed.initialize``).

Vocabulary as in engines.py: a *model* is the ``nn.Module`` an engine wraps; the user's optimizer is its *face*.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from lightning_zero import offload
from lightning_zero._compat.deepspeed import (fix_zenflow_parameter_views, keep_whole_parameters_through_step,
                                              restart_zenflow_selective_steps, skip_unused_grad_norm,
                                              write_gradients_into_partition)
from lightning_zero.config import TrainerFlags, inference_config, resolve_ds_config, zenflow_enabled, zero_stage
from lightning_zero.engines import EngineRegistry, EngineSlot, ModelAssignment, assign_models, build_engine, leaf_flags
from lightning_zero.tuning import resolve_block_fetch, resolve_speed_defaults, track_unit_inputs

__all__ = ["EnginePlan", "build_engines", "plan_engines", "resolve_model_config", "speed_up_engine"]


@dataclass(frozen=True)
class EnginePlan:
    """One engine to build: ``module`` wrapped with ``config``.

    ``face`` is the user's optimizer (``None``: a frozen model, or, with ``train``, the optimizer DeepSpeed builds
    from the config's ``optimizer`` block). ``block_fetch``: stage 3 may fetch repeated blocks as one unit (the
    config says which, when it found any) and the trained units' inputs are tracked (``tuning.track_unit_inputs``).
    ``notes``: log lines for the user (rank 0)."""

    name: str
    module: nn.Module
    face: Optimizer | None
    train: bool
    config: dict[str, Any]
    block_fetch: bool
    notes: tuple[str, ...] = ()
    skip_grad_norm: bool = False  # stage 3: skip the norm no step uses (``_compat.deepspeed.skip_unused_grad_norm``)

    @property
    def config_optimizer(self) -> bool:
        """DeepSpeed builds the optimizer from the config's ``optimizer`` block (``configure_optimizers`` has none)."""
        return self.train and self.face is None


def resolve_model_config(user: Mapping[str, Any], knobs: Mapping[str, Any], flags: TrainerFlags, *,
                         deepcompile: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of the whole model (a new dict; the inputs are unchanged), before it is split into the
    engines' configs by :func:`plan_engines`."""
    config = resolve_speed_defaults(resolve_ds_config(user, knobs, flags, deepcompile=deepcompile),
                                    world_size=flags.world_size, deepcompile=deepcompile)
    if deepcompile:
        config["compile"] = {**(config.get("compile") or {}), "deepcompile": True}
    return config


def plan_engines(config: Mapping[str, Any], root: nn.Module, optimizers: Sequence[Optimizer], *,
                 deepcompile: bool = False, fitting: bool = True) -> list[EnginePlan]:
    """The engines for ``root`` (the LightningModule) under the model-wide ``config``, in build order.

    ``optimizers``: what ``configure_optimizers`` returned (Lightning's mock optimizer left out); ``fitting=False``
    (validate/test/predict): one engine without optimizer. Raises ``ValueError`` when there is no optimizer or two
    sources of one, and for a module layout that cannot be split into engines (``engines.assign_models``)."""
    stage = zero_stage(config)
    if not fitting:
        return [_plan("model", root, None, config, stage, train=False, block_fetch=True)]
    if optimizers and "optimizer" in config:
        raise ValueError("Both `configure_optimizers` and the DeepSpeed config's 'optimizer' block define an"
                         " optimizer. Keep one: return None from configure_optimizers, or remove 'optimizer' (and"
                         " 'scheduler') from the config.")
    if not optimizers:
        if "optimizer" not in config:
            raise ValueError("No optimizer: `configure_optimizers` returned none and the DeepSpeed config has no"
                             " 'optimizer' block. Define one of them.")
        return [_plan("model", root, None, config, stage, train=True, block_fetch=not deepcompile)]
    assignments = assign_models(root, list(optimizers))
    # Several models with their own optimizers (GANs, distillation of several students) keep DeepSpeed's per-layer
    # fetching at stage 3: they often call a network twice per step (a discriminator on real and on generated data),
    # which one-unit blocks do not support (see EngineRegistry._counter).
    block_fetch = sum(a.optimizer_index is not None for a in assignments) <= 1
    if deepcompile:
        _check_deepcompile_layout(assignments, root)
        block_fetch = False  # DeepCompile removes ZeRO's module hooks and schedules the gathers itself
    plans = []
    for assignment in assignments:
        face = None if assignment.optimizer_index is None else optimizers[assignment.optimizer_index]
        plans.append(_plan(assignment.name, assignment.as_module(root), face, config, stage, train=face is not None,
                           block_fetch=block_fetch))
    return plans


def _plan(name: str, module: nn.Module, face: Optimizer | None, config: Mapping[str, Any], stage: int, *,
          train: bool, block_fetch: bool) -> EnginePlan:
    """One engine's plan: its own copy of the config, cut down for a model without optimizer."""
    engine_config = copy.deepcopy(dict(config)) if train else inference_config(config)
    if not train and stage < 3:
        # DeepSpeed refuses ZeRO-1/2 without an optimizer; below stage 3 such a model stays a plain module anyway.
        engine_config["zero_optimization"] = {"stage": 0}
    block_fetch = block_fetch and stage == 3
    notes: tuple[str, ...] = ()
    if block_fetch:
        engine_config, note = resolve_block_fetch(engine_config, module)
        notes = (note,) if note else ()
    # the stage-3 counterpart of the stages 1-2 speed default compute_grad_norm=false (tuning.py), which DeepSpeed's
    # config refuses at stage 3; an explicit compute_grad_norm=True keeps DeepSpeed's norm at every step
    skip_grad_norm = train and stage == 3 and "compute_grad_norm" not in engine_config.get("zero_optimization", {})
    return EnginePlan(name, module, face, train, engine_config, block_fetch, notes, skip_grad_norm)


def _check_deepcompile_layout(assignments: list[ModelAssignment], root: nn.Module) -> None:
    """DeepCompile drives one engine per process (its runtime and pass schedule are process-global), and that engine
    must wrap the whole LightningModule: its forward, which Lightning's training_step goes through, advances the
    schedule."""
    if len(assignments) == 1 and list(assignments[0].modules.values()) == [root]:
        return
    layout = "; ".join(f"{a.name}: {', '.join(a.modules)} "
                       + ("(frozen)" if a.optimizer_index is None else f"(optimizer {a.optimizer_index})")
                       for a in assignments)
    raise ValueError("ZeroStrategy(compile='deepcompile') needs one optimizer that trains every parameter of the"
                     " LightningModule, so that one DeepSpeed engine wraps it; DeepCompile's runtime serves one engine"
                     f" per process. This module needs {len(assignments)} engines ({layout}). Use compile=True"
                     " (torch.compile), which compiles each engine's networks.")


def build_engines(plans: Sequence[EnginePlan], registry: EngineRegistry, device: torch.device) -> list[EngineSlot]:
    """Build each planned engine on ``device`` and add it to ``registry``, in order; returns the new slots."""
    return [_build(plan, registry, device) for plan in plans]


def speed_up_engine(plan: EnginePlan, engine: Any) -> None:
    """The speed patches of DeepSpeed's optimizer that ``plan`` calls for (``tuning.py`` says why; each function in
    ``_compat.deepspeed`` checks its own conditions and leaves the optimizer alone where they do not hold)."""
    stage = zero_stage(plan.config)
    if plan.skip_grad_norm:
        skip_unused_grad_norm(engine.optimizer)
    if plan.train and stage == 3:
        keep_whole_parameters_through_step(engine.optimizer)  # one process: no release and re-gather in each step
    if plan.train and stage in (1, 2):
        write_gradients_into_partition(engine)  # one process: gradients go straight into the partition


def _build(plan: EnginePlan, registry: EngineRegistry, device: torch.device) -> EngineSlot:
    module, config, stage = plan.module, plan.config, zero_stage(plan.config)
    if stage < 3:
        module.to(device)
    else:
        offload.partition_for_nvme(module, config, device.type)  # a model created outside zero.Init, NVMe on CPU
    if plan.train:
        offload.check_zenflow_parameters(module, config)  # shapes ZenFlow fails on in its first backward
    for note in plan.notes:
        rank_zero_info(note)
    # the optimizer DeepSpeed steps: a clone of the face, or DeepSpeedCPUAdam when the optimizer is offloaded
    optimizer = offload.build_stepped_optimizer(plan.face, config) if plan.face is not None else None
    units_before = leaf_flags(module)  # restored when the engine is released
    engine = build_engine(module, config, optimizer, device.index if device.type == "cuda" else -1, train=plan.train)
    speed_up_engine(plan, engine)
    if plan.train and zenflow_enabled(config):
        fix_zenflow_parameter_views(engine.optimizer)  # DeepSpeed 0.19.8 scrambles ZenFlow's 2-D weights otherwise
        restart_zenflow_selective_steps(engine.optimizer)  # its moments restart at each re-selection, its steps not
    if plan.block_fetch and plan.train:
        track_unit_inputs(module)  # a frozen base's blocks (LoRA): see tuning.track_unit_inputs
    slot = EngineSlot(plan.name, module, engine, plan.face, config_clip=float(config.get("gradient_clipping", 0.0)),
                      leaf_flags=units_before)
    if plan.config_optimizer:
        # the config's optimizer: the one DeepSpeed built is the face Lightning sees (set before the registry
        # indexes the slot by its face, once: a second add would gate its fetch units' hooks twice)
        slot.face = slot.basic_optimizer
        offload.route_zero_grad(slot.face, engine, config)  # Lightning's zero_grad keeps ZeRO-Offload's buffers
    registry.add(slot)
    return slot
