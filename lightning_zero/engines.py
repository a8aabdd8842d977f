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
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_zero._compat.deepspeed import (backward_reaches_only, leaf_module_hooks, remove_engine_module_hooks,
                                              set_gradient_clipping, start_micro_batch, untag_leaf_parameters,
                                              zero3_backward_counters)
from lightning_zero._compat.lightning import guard_zero_grad, unwrap_optimizer
from lightning_zero.compiling import check_gradients_reduced_by_deepcompile

__all__ = ["EngineRegistry", "EngineSlot", "ModelAssignment", "assign_models", "clone_optimizer", "leaf_flags"]

log = logging.getLogger(__name__)

# The registry whose engines wrap each LightningModule in this process: another Trainer's strategy may still hold
# engines on a module that a new Trainer sets up (see EngineRegistry.claim).
_OWNERS: weakref.WeakKeyDictionary[nn.Module, EngineRegistry] = weakref.WeakKeyDictionary()


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
    pending: bool = False  # a backward reached this engine since its last step
    leaf_flags: list[tuple[nn.Module, bool]] = field(default_factory=list)  # ZeRO-3 fetch units before the engine

    def check_discard(self) -> None:
        """``zero_grad()`` before ``step()``: plain PyTorch drops the gradients; DeepSpeed may already hold them."""
        if not self.pending or self.engine.optimizer is self.basic_optimizer:  # stage 0, fp32: gradients in p.grad
            return
        raise RuntimeError(
            f"`zero_grad()` was called on {type(self.face).__name__} (the optimizer of {self.name!r}) after a backward"
            f" reached {self.name!r} and before its `step()`. DeepSpeed has already reduced those gradients into its"
            " own buffers, so they cannot be discarded. If that loss should not train"
            f" {self.name!r}, call `self.toggle_optimizer(opt)` for the optimizer that steps before computing the loss"
            " (and `self.untoggle_optimizer(opt)` after its step), or `.detach()` the output that feeds"
            f" {self.name!r}."
        )

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
        set_gradient_clipping(self.engine, value)


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
    micro-batches in ``clear_backward_seen_flag()`` (called at the start of ``engine.forward``, see
    ``_compat.deepspeed.start_micro_batch``): without it, ZeRO-3 overwrites the gradient partitions accumulated by the
    previous backward instead of adding to them. Calling it again after a forward that already did is a no-op.
    """
    start_micro_batch(engine)
    engine.backward(loss, *args, scale_wrt_gas=False, **kwargs)


def _needs_grad(output: Any) -> bool:
    """Some tensor in ``output`` requires grad. It runs after every forward of every fetch unit: a block's output is
    usually one tensor, or a tuple whose first item is (the hidden states), so those are looked at before the pytree
    walk over all of it."""
    if isinstance(output, Tensor):
        return output.requires_grad
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor) and output[0].requires_grad:
        return True
    return any(isinstance(t, Tensor) and t.requires_grad for t in torch.utils._pytree.tree_leaves(output))


class _Zero3BackwardCounters:
    """ZeRO-3's per-module backward bookkeeping, so that several backward passes can run over one graph.

    ZeRO-3 gathers a module's parameters before its backward only while ``applied_pre_backward_ref_cnt`` (one per
    forward) is positive, and releases them when ``ds_grads_remaining`` (one per input needing a gradient) reaches 0;
    both count down during a backward. Each pass starts from the counts the forward left; at the end every module
    keeps the counts of a pass that went through it (the lowest), as after one ordinary backward.
    """

    def __init__(self, modules: Iterator[nn.Module]) -> None:
        self.saved = zero3_backward_counters(modules)
        self.lowest = [value for _, _, value in self.saved]

    def after_pass(self, last: bool) -> None:
        for i, (module, name, value) in enumerate(self.saved):
            self.lowest[i] = min(self.lowest[i], getattr(module, name))
            setattr(module, name, self.lowest[i] if last else value)


class EngineRegistry:
    """The engines of one LightningModule, by name and by the optimizer Lightning sees."""

    def __init__(self) -> None:
        self.slots: dict[str, EngineSlot] = {}
        self._by_face: dict[int, EngineSlot] = {}
        self._pass_owner: EngineSlot | None = None  # the engine whose pass runs, in a multi-engine backward
        self.deepcompile = False  # the one trained engine runs DeepCompile (compiling.deepcompile_engine)
        self._in_step = False  # inside optimizer_step: the closure's backward ends an accumulation
        self._unit_calls: dict[int, int] = {}  # forward calls of each fetch unit since its last backward
        self._counter_hooks: list[Any] = []  # handles of the fetch-unit call counters (_gate_leaf_hooks)

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
        self._gate_leaf_hooks(slot)

    def _gate_leaf_hooks(self, slot: EngineSlot) -> None:
        """Make the ZeRO-3 hooks that reduce a fetch unit's gradients (DeepSpeed's leaf modules, see
        ``tuning.resolve_block_fetch``) fire only in their own engine's backward.

        They are full backward hooks on the module, so they fire whenever a backward goes through it, including
        another engine's backward that only goes through on its way to that engine's parameters (a decoder's blocks
        in the encoder's pass of a shared loss, a toggled discriminator in the generator's step); DeepSpeed would
        then reduce the unit's gradients (as zeros where there are none) outside its own backward. Per-parameter hooks need no
        gate: ``backward_reaches_only`` keeps other engines' gradients from accumulating at all. Wrapped in place
        in the module's hook dict, before any forward captures the hooks."""
        for handle in leaf_module_hooks(slot.engine):
            hooks = handle.hooks_dict_ref()
            if hooks is None or handle.id not in hooks:
                continue
            name, unit = next(((n, m) for n, m in slot.module.named_modules() if m._backward_hooks is hooks),
                              (None, None))
            if unit is None:
                continue
            hooks[handle.id] = self._gated(hooks[handle.id], slot, id(unit))
            self._counter_hooks.append(
                unit.register_forward_hook(self._counter(f"{slot.name}.{name}" if name else slot.name)))

    def claim(self, root: nn.Module) -> None:
        """Before building engines on ``root``: release the engines another registry still holds on it (a new
        Trainer on a module an earlier Trainer of this process trained or evaluated, whose engines it kept)."""
        previous = _OWNERS.get(root)
        if previous is not None and previous is not self:
            previous.release()
        _OWNERS[root] = self

    def release(self) -> None:
        """Destroy every engine, leaving the models free for new ones (the registry is empty afterwards).

        ``DeepSpeedEngine.destroy()`` removes what the engine put on its model: the ZeRO gradient hooks (stages 1-3),
        the ZeRO-3 gather/release module hooks and leaf-module hooks, DeepCompile's state. Without it the next engine's
        backward would also fire the old engine's hooks. ZeRO-3 parameters stay partitioned: ``deepspeed.initialize``
        on a module whose parameters already carry ``ds_id`` adopts them as they are (as for a model created under
        ``zero.Init``). The ZeRO-3 fetch units the engine's config marked are unmarked (``EngineSlot.leaf_flags``:
        marks the user set before the engine stay).

        ``destroy()`` (DeepSpeed 0.19.8) leaves the engine's own forward pre/post hooks on the model (its
        ``_forward_prologue``/``_forward_epilogue``, registered in ``DeepSpeedEngine.__init__``); they are removed
        here, else every later forward would run the old engine's bookkeeping and keep it (and its optimizer state)
        alive."""
        from deepspeed.utils import set_z3_leaf_module

        for slot in reversed(self.slots.values()):
            slot.engine.destroy()
            remove_engine_module_hooks(slot.engine)
            # destroy() leaves the fetch units the engine's config marked (leaf_module, the granularity threshold)
            # marked, and their parameters tagged with their unit (``ds_z3_leaf_module``, which the ZeRO-3 optimizer
            # reads to delay their reduction to the unit's backward hook); the next engines decide their own units
            # (several trained models fetch layer by layer), and DeepSpeed tags the parameters of those again.
            for module, flag in slot.leaf_flags:
                set_z3_leaf_module(module, flag)
            untag_leaf_parameters(slot.module)
        for handle in self._counter_hooks:
            handle.remove()
        self._counter_hooks.clear()
        for root in [m for m, owner in _OWNERS.items() if owner is self]:
            del _OWNERS[root]
        self.slots.clear()
        self._by_face.clear()
        self._unit_calls.clear()
        self.deepcompile = False

    def _gated(self, hook: Callable[..., Any], slot: EngineSlot, unit: int) -> Callable[..., Any]:
        def gated(module: nn.Module, grad_input: Any, grad_output: Any) -> Any:
            if self._pass_owner is None or self._pass_owner is slot:
                self._unit_calls[unit] = 0
                return hook(module, grad_input, grad_output)
            return None

        return gated

    def _counter(self, name: str) -> Callable[..., None]:
        """A forward hook that refuses a fetch unit's second call before its backward: DeepSpeed reduces a leaf
        module's gradients in one hook per backward through it, so a second call would reduce them twice (and end in
        a DeepSpeed assertion). Only calls whose output needs a gradient count: not validation or no_grad, not a
        frozen (toggled) model, not recomputation during the backward (activation checkpointing)."""

        def count(module: nn.Module, args: Any, output: Any) -> None:
            if not _needs_grad(output) or torch._C._current_graph_task_id() != -1:
                return
            calls = self._unit_calls.get(id(module), 0) + 1
            self._unit_calls[id(module)] = calls
            if calls > 1:
                self._unit_calls[id(module)] = 0
                raise ValueError(
                    f"ZeroStrategy(stage=3): {name} ({type(module).__name__}) ran a second time before the backward of"
                    " its first call. Stage 3 gathers each such block as one unit (a DeepSpeed leaf module), which"
                    " supports one call per forward. Call it once (e.g. on the concatenated inputs), or fetch layer by"
                    " layer, which supports reuse: ZeroStrategy(..., config={'zero_optimization':"
                    " {'stage3_module_granularity_threshold': 0}}) (and no 'leaf_module' section)."
                )

        return count

    def reset_unit_calls(self) -> None:
        """Forget forward calls whose outputs never reached a backward (called at the start of each batch)."""
        self._unit_calls.clear()

    def for_optimizer(self, optimizer: Any) -> EngineSlot:
        optimizer = unwrap_optimizer(optimizer)  # the LightningOptimizer of self.optimizers() -> the user's optimizer
        slot = self._by_face.get(id(optimizer))
        if slot is None:
            raise ValueError(f"{type(optimizer).__name__} is not one of the optimizers ZeroStrategy set up. Use the"
                             " optimizers returned by `self.optimizers()`.")
        return slot

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Around the closure that ``optimizer_step`` runs: with automatic optimization its backward is the last of
        an accumulation (the other micro-batches run their closures before, outside any step)."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    def _deepcompile_boundary(self, slot: EngineSlot, automatic: bool) -> None:
        """Tell DeepCompile whether this backward ends the accumulation, before it runs.

        DeepCompile reduces inside the compiled backward: at stages 2-3 it adds each micro-batch's reduced gradients
        into the partitions until a backward marked as the boundary, at stage 1 it reduces only in that backward.
        DeepSpeed refuses its unmanaged accumulation mode with DeepCompile, so the boundary is set per backward
        (``set_gradient_accumulation_boundary``) from Lightning's loop instead."""
        if automatic:
            boundary = self._in_step
        else:
            if slot.pending:
                raise ValueError(
                    "ZeroStrategy(compile='deepcompile') with manual optimization needs `opt.step()` after each"
                    " `self.manual_backward(loss)`: DeepCompile reduces the gradients inside the compiled backward and"
                    " cannot add up several manual backward calls. Accumulate with automatic optimization and"
                    " Trainer(accumulate_grad_batches=N), or use compile=True (torch.compile).")
            boundary = True
        slot.engine.set_gradient_accumulation_boundary(boundary)

    def backward(self, loss: Tensor, *args: Any, automatic: bool = True, **kwargs: Any) -> None:
        """Backward through every engine whose parameters ``loss`` reaches (``manual_backward``, the closure);
        ``automatic``: the LightningModule uses automatic optimization."""
        trained = self.trained
        if len(trained) == 1:
            if self.deepcompile:
                self._deepcompile_boundary(trained[0], automatic)
            trained[0].pending = True
            _engine_backward(trained[0].engine, loss, *args, **kwargs)
            if self.deepcompile:
                check_gradients_reduced_by_deepcompile(trained[0].module)
            return
        reached = {id(p) for p in _accumulate_grad_params(loss)}
        hit = [s for s in trained if s.params & reached]
        if not hit:
            raise RuntimeError("The loss passed to backward does not depend on any trainable parameter.")
        for slot in hit:
            slot.pending = True
        if len(hit) == 1:  # e.g. a GAN's generator step: the backward also goes through the toggled discriminator
            self._pass_owner = hit[0]
            try:
                _engine_backward(hit[0].engine, loss, *args, **kwargs)
            finally:
                self._pass_owner = None
            return
        # One loss, several engines: one backward per engine over the same graph, each reaching only its own
        # parameters, so each engine's ZeRO hooks see exactly the gradients it reduces.
        retain_graph = kwargs.pop("retain_graph", False)
        counters = _Zero3BackwardCounters(m for s in self.slots.values() for m in s.module.modules())
        try:
            for i, slot in enumerate(hit):
                last = i == len(hit) - 1
                own = [p for p in slot.module.parameters() if id(p) in reached and p.requires_grad]
                self._pass_owner = slot
                with backward_reaches_only(own):
                    _engine_backward(slot.engine, loss, *args, retain_graph=retain_graph or not last, **kwargs)
                counters.after_pass(last)
        finally:
            self._pass_owner = None

    def guard_zero_grad(self, lightning_optimizer: Any) -> None:
        """Make ``opt.zero_grad()`` (the ``LightningOptimizer`` of ``self.optimizers()``) refuse to drop gradients
        that DeepSpeed already took in (see ``EngineSlot.check_discard``)."""
        guard_zero_grad(lightning_optimizer, self.for_optimizer(lightning_optimizer).check_discard)

    def step(self, optimizer: Any) -> None:
        slot = self.for_optimizer(optimizer)
        slot.sync_hyperparameters()
        try:
            slot.engine.step()
        finally:
            slot.set_clip(slot.config_clip)  # a clip set by clip_gradients() lasts for one step
        slot.pending = False
        # The face's own step() never runs; tell its schedulers it stepped (torch warns "lr_scheduler.step() before
        # optimizer.step()" otherwise).
        slot.face._opt_called = True  # type: ignore[union-attr]


def leaf_flags(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Which submodules are ZeRO-3 fetch units now (``deepspeed.utils.z3_leaf_module``): taken before an engine is
    built, restored when it is released."""
    from deepspeed.utils import z3_leaf_module

    return [(m, z3_leaf_module(m)) for m in module.modules()]


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
