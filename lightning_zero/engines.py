"""One DeepSpeed engine per model: assignment of optimizers to submodules, engine creation and routing.

Vocabulary: a *model* is the ``nn.Module`` an engine wraps (a submodule of the LightningModule, a container of
several, or the LightningModule itself); an *engine* is its ``deepspeed.DeepSpeedEngine``; the user's optimizer
object stays the *face* Lightning sees (``trainer.optimizers``, toggling, schedulers, ``LearningRateMonitor``),
while DeepSpeed steps a private clone of it. Before each step the face's hyperparameters (lr, betas, ...) are copied
to the clone, so schedulers written against the user's optimizer keep working unchanged.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["EngineRegistry", "EngineSlot", "ModelAssignment", "assign_models", "clone_optimizer"]

log = logging.getLogger(__name__)


class _ModelGroup(nn.Module):
    """Holds several submodules that one optimizer trains, so that one engine can wrap them.

    The submodules are shared with the LightningModule (not copied); user code keeps calling them directly.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name.replace(".", "__"), module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("A group of models has no forward; call the submodules directly.")


@dataclass
class ModelAssignment:
    """Which submodules an optimizer trains (``optimizer_index is None`` means frozen: no optimizer)."""

    name: str
    modules: dict[str, nn.Module]
    optimizer_index: int | None

    def as_module(self, root: nn.Module) -> nn.Module:
        if list(self.modules.values()) == [root]:
            return root
        if len(self.modules) == 1:
            return next(iter(self.modules.values()))
        return _ModelGroup(self.modules)


def _param_owner(optimizers: list[Optimizer], names: dict[int, str]) -> dict[int, int]:
    """id(param) -> optimizer index; a parameter in two optimizers is an error."""
    owner: dict[int, int] = {}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in owner and owner[id(p)] != i:
                    raise ValueError(
                        f"Parameter {names.get(id(p), '<not in the model>')!r} is in optimizer {owner[id(p)]}"
                        f" ({type(optimizers[owner[id(p)]]).__name__}) and optimizer {i} ({type(opt).__name__})."
                        " ZeroStrategy gives each optimizer its own DeepSpeed engine, so a parameter can belong to"
                        " one optimizer only. Give each optimizer the parameters of its own submodule(s), e.g."
                        " `Adam(self.generator.parameters())` and `Adam(self.discriminator.parameters())`."
                    )
                owner[id(p)] = i
    return owner


def assign_models(root: nn.Module, optimizers: list[Optimizer]) -> list[ModelAssignment]:
    """Split ``root`` into the submodules each optimizer trains, plus the frozen rest.

    A single optimizer trains the whole ``root`` (frozen parameters included), which is the familiar one-engine case.
    With several optimizers, each maximal submodule whose trainable parameters all belong to one optimizer goes to
    that optimizer; submodules without trainable parameters are frozen. Raises ``ValueError`` naming the parameters
    when no such split exists.
    """
    names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    owner = _param_owner(optimizers, names)
    foreign = sorted({i for pid, i in owner.items() if pid not in names})
    if foreign:
        raise ValueError(
            f"Optimizer(s) {foreign} hold parameters that are not in the LightningModule. Create optimizers in"
            " `configure_optimizers` from the module's own parameters, e.g. `Adam(self.generator.parameters())`."
        )
    if len(optimizers) <= 1:
        stray = [n for n, p in root.named_parameters() if p.requires_grad and optimizers and id(p) not in owner]
        if stray:
            log.info("%d trainable parameters are not in the optimizer and will not be updated: %s", len(stray),
                     ", ".join(stray[:3]))
        return [ModelAssignment("model", {"": root}, 0 if optimizers else None)]

    trained: dict[int | None, dict[str, nn.Module]] = {}

    def owners(module: nn.Module, recurse: bool = True) -> dict[str, int | None]:
        """Trainable (or optimized) parameter name -> optimizer index (None: trainable but in no optimizer)."""
        return {n: owner.get(id(p)) for n, p in module.named_parameters(recurse=recurse)
                if p.requires_grad or id(p) in owner}

    def visit(prefix: str, module: nn.Module) -> None:
        below = owners(module)
        found = set(below.values())
        if not found:
            if any(True for _ in module.parameters()):
                trained.setdefault(None, {})[prefix] = module
            return
        if found != {None} and len(found) == 1:
            trained.setdefault(next(iter(found)), {})[prefix] = module
            return
        direct = owners(module, recurse=False)
        where = f"submodule {prefix!r}" if prefix else "the LightningModule itself"
        dotted = (lambda n: f"{prefix}.{n}" if prefix else n)  # noqa: E731
        untrained = [dotted(n) for n, i in below.items() if i is None]
        trained_by = sorted(i for i in found if i is not None)
        if untrained and (direct or found == {None} or not list(module.children())):
            problem = f"has trainable parameters that no optimizer trains ({', '.join(untrained[:3])})"
        elif direct:
            problem = (f"directly holds parameters {', '.join(dotted(n) for n in list(direct)[:3])} while its"
                       f" submodules belong to optimizers {trained_by}")
        elif not list(module.children()):
            problem = f"has its parameters split between optimizers {trained_by}"
        else:
            problem = ""
        if problem:
            raise ValueError(
                f"Cannot give each optimizer its own model: {where} {problem}. ZeroStrategy needs every optimizer"
                " to train whole submodules, e.g. `self.generator` and `self.discriminator`, each passed to its own"
                " optimizer. Move such parameters into a submodule, give them to one optimizer, or set"
                " `requires_grad=False` on the ones that should stay frozen."
            )
        for child_name, child in module.named_children():
            visit(dotted(child_name), child)

    visit("", root)
    missing = [i for i in range(len(optimizers)) if i not in trained]
    if missing:
        raise ValueError(f"Optimizer(s) {missing} train no parameter of the LightningModule. Pass each optimizer the"
                         " parameters of a submodule of your LightningModule.")
    assignments = []
    for index in sorted(trained, key=lambda i: (i is None, i)):
        modules = trained[index]
        name = "frozen" if index is None else "+".join(modules) if len(modules) <= 2 else f"optimizer_{index}"
        assignments.append(ModelAssignment(name, modules, index))
    return assignments


def clone_optimizer(optimizer: Optimizer) -> Optimizer:
    """A fresh optimizer of the same class, hyperparameters and parameter groups (no state)."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optimizer.param_groups]
    # Param groups carry every hyperparameter; pass only the defaults the constructor accepts (AdamW's defaults hold
    # `decoupled_weight_decay`, which its __init__ does not take).
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: copy.deepcopy(v) for k, v in optimizer.defaults.items() if k in accepted}
    try:
        return type(optimizer)(groups, **defaults)
    except TypeError as err:
        raise TypeError(
            f"ZeroStrategy could not rebuild {type(optimizer).__name__} from its `defaults` ({err}). Optimizers must"
            " accept `(param_groups, **defaults)` like every torch.optim optimizer does."
        ) from None


@dataclass
class EngineSlot:
    """One model and what trains it."""

    name: str
    module: nn.Module
    engine: Any  # deepspeed.DeepSpeedEngine
    face: Optimizer | None = None  # what Lightning sees (the user's optimizer); None for frozen models
    config_clip: float = 0.0
    params: set[int] = field(default_factory=set)

    def sync_hyperparameters(self) -> None:
        """Copy lr/betas/... the user's schedulers set on the face to the optimizer DeepSpeed steps."""
        if self.face is None or self.face is self.basic_optimizer:
            return
        for face_group, real_group in zip(self.face.param_groups, self.basic_optimizer.param_groups):
            for key, value in face_group.items():
                if key != "params":
                    real_group[key] = value

    @property
    def basic_optimizer(self) -> Optimizer | None:
        return getattr(self.engine, "basic_optimizer", None)

    def set_clip(self, value: float) -> None:
        """Clip the next step at ``value`` (global norm); DeepSpeed reads it at step time."""
        opt = self.engine.optimizer
        if hasattr(opt, "clip_grad"):
            opt.clip_grad = value
        if value and getattr(opt, "compute_grad_norm", True) is False:
            opt.compute_grad_norm = True  # the speed default skipped the norm while nothing clipped (tuning.py)
        self.engine._config.gradient_clipping = value


def _accumulate_grad_params(loss: Tensor) -> Iterator[Tensor]:
    """Leaf tensors that ``loss.backward()`` would write gradients into (walks the autograd graph once)."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            yield variable
        stack.extend(next_fn for next_fn, _ in node.next_functions)


def _engine_backward(engine: Any, loss: Tensor, *args: Any, **kwargs: Any) -> None:
    """``engine.backward`` after the bookkeeping ``DeepSpeedEngine.forward`` does first.

    With several engines the user calls the submodules directly, so no engine's forward runs. ZeRO's optimizers count
    micro-batches in ``clear_backward_seen_flag()`` (called at the start of ``engine.forward``): without it, ZeRO-3
    overwrites the gradient partitions accumulated by the previous backward instead of adding to them. Calling it again
    after a forward that already did is a no-op.
    """
    start_micro_batch = getattr(engine.optimizer, "clear_backward_seen_flag", None)
    if start_micro_batch is not None:
        start_micro_batch()
    engine.backward(loss, *args, scale_wrt_gas=False, **kwargs)


class EngineRegistry:
    """The engines of one LightningModule, by name and by the optimizer Lightning sees."""

    def __init__(self) -> None:
        self.slots: dict[str, EngineSlot] = {}
        self._by_face: dict[int, EngineSlot] = {}

    def __iter__(self) -> Iterator[EngineSlot]:
        return iter(self.slots.values())

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def trained(self) -> list[EngineSlot]:
        return [s for s in self.slots.values() if s.face is not None]

    def add(self, slot: EngineSlot) -> None:
        self.slots[slot.name] = slot
        slot.params = {id(p) for p in slot.module.parameters()}
        if slot.face is not None:
            self._by_face[id(slot.face)] = slot

    def for_optimizer(self, optimizer: Any) -> EngineSlot:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap LightningOptimizer
        slot = self._by_face.get(id(optimizer))
        if slot is None:
            raise ValueError(f"{type(optimizer).__name__} is not one of the optimizers ZeroStrategy set up. Use the"
                             " optimizers returned by `self.optimizers()`.")
        return slot

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward through the engine whose parameters ``loss`` reaches."""
        trained = self.trained
        if len(trained) == 1:
            _engine_backward(trained[0].engine, loss, *args, **kwargs)
            return
        reached = {id(p) for p in _accumulate_grad_params(loss)}
        hit = [s for s in trained if s.params & reached]
        if len(hit) == 1:
            _engine_backward(hit[0].engine, loss, *args, **kwargs)
            return
        if not hit:
            raise RuntimeError("The loss passed to backward does not depend on any trainable parameter.")
        names = ", ".join(f"{s.name!r} ({type(s.face).__name__})" for s in hit)
        raise RuntimeError(
            f"This loss reaches the parameters of {len(hit)} optimizers: {names}. Each optimizer has its own DeepSpeed"
            " engine, so one backward must feed one optimizer. Call `self.toggle_optimizer(opt)` before computing the"
            " loss for `opt` (and `self.untoggle_optimizer(opt)` after its step), or `.detach()` the output of the"
            " model that should not receive gradients."
        )

    def step(self, optimizer: Any) -> None:
        slot = self.for_optimizer(optimizer)
        slot.sync_hyperparameters()
        try:
            slot.engine.step()
        finally:
            slot.set_clip(slot.config_clip)  # a clip set by clip_gradients() lasts for one step
        # The face's own step() never runs; tell its schedulers it stepped (torch warns "lr_scheduler.step() before
        # optimizer.step()" otherwise).
        slot.face._opt_called = True  # type: ignore[union-attr]


def build_engine(module: nn.Module, config: dict[str, Any], optimizer: Optimizer | None, device_index: int,
                 train: bool) -> Any:
    """``deepspeed.initialize`` with our defaults: no dist init, no client scheduler (Lightning steps schedulers)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=device_index),
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad] if train else [],
        optimizer=optimizer,
        config=config,
        dist_init_required=False,
    )
    return engine
