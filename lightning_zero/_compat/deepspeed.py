"""DeepSpeed internals ZeroStrategy relies on, each in one function with the reason and the versions it was verified
on; ``tests/unit/test_compat_deepspeed.py`` exercises each against the installed DeepSpeed (a real one-rank engine).

Verified on DeepSpeed 0.19.8 (the whole proven range, ``versions.py``). Where DeepSpeed's attribute is optional by
design (the ZeRO-3 counters exist only on modules a ZeRO-3 forward went through, ``clip_grad`` only on DeepSpeed's
own optimizer wrappers), the function checks the case in which it must exist and raises a ``RuntimeError`` naming the
symbol, the installed version and the fix, instead of silently skipping.

The one process-wide patch that must stay, :func:`backward_reaches_only` (``torch.Tensor.backward`` swapped during a
multi-engine backward), is here too, with the reason it cannot go.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BACKWARD_COUNTERS", "ENGINE_MODULE_HOOKS", "accelerator_chosen", "backward_reaches_only",
           "convert_to_universal", "fix_zenflow_parameter_views", "leaf_module_hooks",
           "loading_universal_checkpoint", "memoize_cpu_info", "redirect_module_compile", "release_comm_backend",
           "restart_zenflow_selective_steps", "keep_whole_parameters_through_step",
           "remove_engine_module_hooks", "set_gradient_clipping", "shift_deepcompile_schedule",
           "skip_unused_grad_norm", "start_micro_batch", "universal_args", "untag_leaf_parameters",
           "write_gradients_into_partition", "zero3_backward_counters"]

# ZeRO-3's per-module backward counters (deepspeed/runtime/zero/parameter_offload.py, DeepSpeed 0.19.8).
BACKWARD_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")
# Hook handles DeepSpeedEngine.__init__ puts on the model and destroy() leaves there (0.19.8); the second group only
# exists with tensor parallelism (``_configure_tensor_parallel_states``).
ENGINE_MODULE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook")
_OPTIONAL_ENGINE_MODULE_HOOKS = ("first_dataloader_check",)


def _missing(symbol: str, used_for: str) -> RuntimeError:
    import deepspeed

    from lightning_zero._compat.versions import requirement

    return RuntimeError(f"DeepSpeed {deepspeed.__version__} has no `{symbol}`, which lightning_zero uses {used_for}"
                        " (see lightning_zero/_compat/deepspeed.py). Install a DeepSpeed version in the range"
                        f" lightning_zero supports (`pip install '{requirement('deepspeed')}'`).")


def _check_optimizer(optimizer: Any, cls: type, kind: str, symbol: str, attributes: Iterable[str], caller: str,
                     used_for: str) -> None:
    """``optimizer`` is DeepSpeed's ``cls`` (else a TypeError naming ``caller``) and has each of ``attributes``
    (else :func:`_missing` for ``symbol.<attribute>``)."""
    if not isinstance(optimizer, cls):
        raise TypeError(f"{caller} needs DeepSpeed's {kind} optimizer, got {type(optimizer).__name__}.")
    for name in attributes:
        if not hasattr(optimizer, name):
            raise _missing(f"{symbol}.{name}", used_for)


def memoize_cpu_info() -> None:
    """Answer py-cpuinfo's ``get_cpu_info()`` once per process.

    Why: DeepSpeed's op builders ask py-cpuinfo for the CPU twice each time they load an op, even a built one
    (``OpBuilder.cpu_arch`` and ``simd_width``, for the compiler flags torch compares against the cached build), and
    ``DeepSpeedCPUAdam.__init__`` once more; each call runs ``cpuinfo.py --json`` in a new Python process (about 1.2 s
    of CPU). Measured in a 2-process CPU-offload run: 3 calls per rank (cpu_arch, simd_width, CPU Adam), for an
    answer that cannot change within the process; the shared-memory collectives op made none. DeepSpeed imports the
    function inside each of those methods (``from cpuinfo import get_cpu_info``), so replacing the module attribute
    reaches all of them.
    Callers get a copy (none of DeepSpeed's writes to it, but a shared dict must not leak one).
    Verified: DeepSpeed 0.19.8 (op_builder/builder.py, ops/adam/cpu_adam.py), py-cpuinfo 9.0.0.
    """
    import functools

    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu (OpBuilder._backup_cpuinfo): nothing to memoize
        return
    if getattr(cpuinfo.get_cpu_info, "lightning_zero_memoized", False):
        return
    once = functools.cache(cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict[str, Any]:
        return dict(once())

    get_cpu_info.lightning_zero_memoized = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


def _is_deepspeed_wrapper(optimizer: Any) -> bool:
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    return isinstance(optimizer, DeepSpeedOptimizer)


def set_gradient_clipping(engine: Any, value: float) -> None:
    """Clip the engine's next step at ``value`` (global norm).

    Why: DeepSpeed reads the clip value at step time from its optimizer wrapper (``clip_grad``: ZeRO 1-3, the bf16 and
    fp16 wrappers) and from ``engine._config.gradient_clipping`` (stage 0 with a plain torch optimizer); Lightning's
    ``clip_gradients`` changes it per step. The stage-1/2 optimizer also has ``compute_grad_norm``, which the speed
    default turns off while nothing clips (``tuning.py``) and which must be on again when a step clips.
    Verified: DeepSpeed 0.19.8.
    """
    optimizer = engine.optimizer
    if _is_deepspeed_wrapper(optimizer) and not hasattr(optimizer, "clip_grad"):
        raise _missing(f"{type(optimizer).__name__}.clip_grad", "to clip gradients at the value Lightning asks for")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer) and not hasattr(optimizer, "compute_grad_norm"):
        raise _missing("DeepSpeedZeroOptimizer.compute_grad_norm",
                       "to turn the gradient norm back on when a step clips")
    config = getattr(engine, "_config", None)
    if not hasattr(config, "gradient_clipping"):
        raise _missing("DeepSpeedEngine._config.gradient_clipping", "to clip gradients at the value Lightning asks for")
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = value
    if value and getattr(optimizer, "compute_grad_norm", True) is False:
        optimizer.compute_grad_norm = True  # the speed default skipped the norm while nothing clipped (tuning.py)
    config.gradient_clipping = value


def start_micro_batch(engine: Any) -> None:
    """The micro-batch bookkeeping ``DeepSpeedEngine.forward`` does first: ``optimizer.clear_backward_seen_flag()``.

    Why: with several engines the user calls the submodules directly, so no engine's forward runs; without it ZeRO-3
    overwrites the gradient partitions accumulated by the previous backward instead of adding to them. Mirrors
    ``DeepSpeedEngine.forward`` (engine.py 0.19.8: ``if isinstance(self.optimizer, ZeROOptimizer)``).
    Verified: DeepSpeed 0.19.8.
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, ZeROOptimizer):
        return
    clear = getattr(optimizer, "clear_backward_seen_flag", None)
    if not callable(clear):
        raise _missing(f"{type(optimizer).__name__}.clear_backward_seen_flag",
                       "to start each micro-batch of a multi-engine backward")
    clear()


def zero3_backward_counters(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, str, int]]:
    """``(module, counter, value)`` for each of ZeRO-3's backward counters (:data:`BACKWARD_COUNTERS`) set on
    ``modules``.

    Why: ZeRO-3 gathers a module's parameters before its backward only while ``applied_pre_backward_ref_cnt`` is
    positive and releases them when ``ds_grads_remaining`` reaches 0; both count down during a backward, so a second
    backward over the same graph (one per engine) must start from the counts the forward left. DeepSpeed sets them on
    the modules its ZeRO-3 forward went through; if modules with partitioned parameters carry none, DeepSpeed renamed
    them, and this raises instead of letting the second pass run on spent counters.
    Verified: DeepSpeed 0.19.8.
    """
    modules = list(modules)
    saved = [(m, name, m.__dict__[name]) for m in modules for name in BACKWARD_COUNTERS if name in m.__dict__]
    partitioned = any(hasattr(p, "ds_id") for m in modules for p in m.parameters(recurse=False))
    if partitioned and not saved:
        raise _missing(" / ".join(f"module.{n}" for n in BACKWARD_COUNTERS),
                       "to run one backward per engine over a shared ZeRO-3 graph")
    return saved


def leaf_module_hooks(engine: Any) -> list[Any]:
    """The ZeRO-3 optimizer's backward-hook handles of its leaf modules (fetch units), ``[]`` below stage 3.

    Why: ``EngineRegistry`` wraps these hooks in place so that a unit's gradients are reduced only in its own
    engine's backward. Verified: DeepSpeed 0.19.8 (``DeepSpeedZeroOptimizer_Stage3._leaf_module_hooks``).
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    optimizer = getattr(engine, "optimizer", None)
    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return []
    if not hasattr(optimizer, "_leaf_module_hooks"):
        raise _missing("DeepSpeedZeroOptimizer_Stage3._leaf_module_hooks",
                       "to keep a fetch unit's gradient reduction inside its own engine's backward")
    return list(optimizer._leaf_module_hooks)


def remove_engine_module_hooks(engine: Any) -> None:
    """Remove the hooks the engine put on its model that ``engine.destroy()`` leaves (:data:`ENGINE_MODULE_HOOKS`).

    Why: ``destroy()`` leaves the engine's ``_forward_prologue``/``_forward_epilogue`` hooks (and its data-loader
    check) on the model; every later forward would run the old engine's bookkeeping and keep it alive.
    Verified: DeepSpeed 0.19.8 (``first_dataloader_check`` exists with tensor parallelism only).
    """
    for name in ENGINE_MODULE_HOOKS:
        if name not in vars(engine):
            raise _missing(f"DeepSpeedEngine.{name}", "to take a released engine's forward hooks off the model")
    for name in ENGINE_MODULE_HOOKS + _OPTIONAL_ENGINE_MODULE_HOOKS:
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()


def untag_leaf_parameters(module: nn.Module) -> None:
    """Delete ``param.ds_z3_leaf_module`` (the fetch unit DeepSpeed tagged each parameter with) under ``module``.

    Why: the ZeRO-3 optimizer reads the tag to delay a parameter's reduction to its unit's backward hook; a released
    engine's tags would make the next engine treat the parameters as in units it did not choose. The attribute is
    optional (only parameters of fetch units have it). Verified: DeepSpeed 0.19.8 (``parameter_offload.py``).
    """
    for param in module.parameters():
        if hasattr(param, "ds_z3_leaf_module"):
            del param.ds_z3_leaf_module


def release_comm_backend() -> None:
    """Drop DeepSpeed's communication backend (``deepspeed.comm.comm.cdb``), if DeepSpeed was imported.

    Why: it keeps the process groups (and the TCP store's server thread) alive until the interpreter's final
    teardown, where destroying them aborts the process. Verified: DeepSpeed 0.19.8.
    """
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is None:
        return
    if "cdb" not in vars(comm):
        raise _missing("deepspeed.comm.comm.cdb", "to release the process groups before the interpreter exits")
    comm.cdb = None


def shift_deepcompile_schedule(global_steps: int) -> None:
    """Count DeepCompile's pass schedule (``deepspeed.compile.backend.remaining_schedule``) from ``global_steps``.

    Why: DeepCompile keys its passes on absolute engine steps and launches an entry only when ``global_steps`` equals
    its step, so an engine resumed past step 0 never installed its passes (see
    ``compiling.resume_deepcompile_schedule``). Verified: DeepSpeed 0.19.8.
    """
    from collections import deque

    from deepspeed.compile import backend

    if "remaining_schedule" not in vars(backend):
        raise _missing("deepspeed.compile.backend.remaining_schedule", "to resume a DeepCompile run from a checkpoint")
    if global_steps > 0 and backend.remaining_schedule:
        backend.remaining_schedule = deque((step + global_steps, passes) for step, passes in backend.remaining_schedule)


def convert_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's ``ds_to_universal`` conversion of one checkpoint folder, in this process.

    Why: DeepSpeed offers it only as a script; its ``main(args)`` reads an ``argparse.Namespace``, whose fields are
    passed here (the contract test checks that ``main`` reads no others). Verified: DeepSpeed 0.19.8.
    """
    from deepspeed.checkpoint import ds_to_universal

    if not callable(getattr(ds_to_universal, "main", None)):
        raise _missing("deepspeed.checkpoint.ds_to_universal.main", "to resume on another number of processes")
    ds_to_universal.main(universal_args(input_folder, output_folder))


def universal_args(input_folder: str, output_folder: str) -> argparse.Namespace:
    """The arguments :func:`convert_to_universal` gives ``ds_to_universal.main`` (its command line's, as parsed)."""
    return argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)


@contextmanager
def loading_universal_checkpoint(engine: Any) -> Iterator[None]:
    """Inside, ``engine.load_checkpoint`` reads DeepSpeed's universal format.

    Why: the engine reads the switch from ``engine._config.load_universal_checkpoint`` at load time only; it is set
    for the one load rather than in the config (the same engine saves native checkpoints afterwards).
    Verified: DeepSpeed 0.19.8.
    """
    config = getattr(engine, "_config", None)
    if not hasattr(config, "load_universal_checkpoint"):
        raise _missing("DeepSpeedEngine._config.load_universal_checkpoint", "to resume on another number of processes")
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = False


@contextmanager
def redirect_module_compile(module: nn.Module, compile_fn: Any) -> Iterator[None]:
    """Inside, ``module.compile(**kwargs)`` calls ``compile_fn(**kwargs)`` (this instance only).

    Why: ``DeepSpeedEngine.compile`` builds DeepCompile's backend, then calls ``self.module.compile(backend=...)``;
    ZeroStrategy compiles the LightningModule's networks instead of the module itself (``compiling.deepcompile_engine``
    says why). Verified: DeepSpeed 0.19.8 (engine.py, ``DeepSpeedEngine.compile``); the contract test checks that
    ``compile`` still calls ``self.module.compile``.
    """
    module.__dict__["compile"] = compile_fn
    try:
        yield
    finally:
        del module.__dict__["compile"]


def accelerator_chosen() -> str | None:
    """The name of the accelerator DeepSpeed already chose in this process (``"cpu"``, ``"cuda"``, ...), or None.

    Why: DeepSpeed resolves its accelerator once (``real_accelerator.ds_accelerator``); a CPU run must find it unset
    or CPU. Verified: DeepSpeed 0.19.8 (``real_accelerator.ds_accelerator``, ``DeepSpeedAccelerator._name``).
    """
    from deepspeed.accelerator import get_accelerator, real_accelerator

    if "ds_accelerator" not in vars(real_accelerator):
        raise _missing("deepspeed.accelerator.real_accelerator.ds_accelerator", "to run DeepSpeed on CPU processes")
    if real_accelerator.ds_accelerator is None:
        return None
    accelerator = get_accelerator()
    if not hasattr(accelerator, "_name"):
        raise _missing(f"{type(accelerator).__name__}._name", "to run DeepSpeed on CPU processes")
    return accelerator._name


@contextmanager
def backward_reaches_only(params: list[Tensor]) -> Iterator[None]:
    """Inside, ``tensor.backward()`` accumulates into ``params`` only (as with ``inputs=params``).

    Why (a process-wide patch that cannot go): ``DeepSpeedEngine.backward`` scales the loss into a new tensor and
    calls ``loss.backward(retain_graph=...)`` on it without ``inputs`` (engine.py 0.19.8, l.3415-3428), and offers no
    argument to pass them. A backward that also reached another engine's parameters would fire that engine's ZeRO
    gradient hooks outside its own backward (its reduction and epilogue then run half-prepared). With ``inputs``
    autograd does not run the other parameters' accumulation nodes at all, so their hooks stay silent;
    ``requires_grad_(False)`` after the forward would not do: the gradient is dropped but the post-accumulate hook
    still fires. Calling ``torch.autograd.backward(inputs=...)`` ourselves would skip the engine's loss scaling and
    its backward prologue/epilogue. Verified: DeepSpeed 0.19.8, torch 2.11 and 2.13.
    """
    original = torch.Tensor.backward

    def backward(self: Tensor, gradient: Tensor | None = None, retain_graph: bool | None = None,
                 create_graph: bool = False, inputs: Any = None) -> None:
        original(self, gradient, retain_graph, create_graph, inputs=params if inputs is None else inputs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


_STAGE3_NORM_ATTRIBUTES = ("_get_norm_groups", "unscale_and_clip_grads", "clip_grad", "dtype", "offload_optimizer",
                           "loss_scale", "_global_grad_norm")


_ZENFLOW_VIEW_ATTRIBUTES = ("bit16_groups", "bit16_groups_flat", "round_robin_bit16_groups", "round_robin_bit16_meta",
                            "round_robin_bit16_offsets", "round_robin_bit16_indices", "_update_model_bit16_weights")


def fix_zenflow_parameter_views(optimizer: Any) -> None:
    """Point a ZenFlow stage-1/2 optimizer's model parameters at their own elements of the flat buffer, now and after
    every step.

    Why: ZenFlow flattens each 2-D parameter transposed (``zenflow_utils._flatten_dense_tensors``: column-major, so a
    column's gradient is contiguous for its top-k selection), but DeepSpeed 0.19.8's
    ``DeepSpeedZeroOptimizer._update_model_bit16_weights`` (stage_1_and_2.py, called in ``__init__`` and after each
    step) views each slice in the parameter's own shape (``narrow(...).view(meta.shape)``) instead of through
    ``self.unflatten`` as earlier versions did. Every 2-D weight then silently becomes ``W.t().contiguous().view(
    W.shape)`` at ``deepspeed.initialize``, and each gradient (copied transposed into the buckets) updates another
    element. The replacement views a 2-D slice as ``(cols, rows)`` and transposes it back, which is what
    ``zenflow_utils._unflatten_dense_tensors`` returns. Verified: DeepSpeed 0.19.8.
    """
    from deepspeed.runtime.zenflow.zenflow_stage_1_and_2 import ZenFlowZeroOptimizer

    _check_optimizer(optimizer, ZenFlowZeroOptimizer, "ZenFlow", "DeepSpeedZeroOptimizer", _ZENFLOW_VIEW_ATTRIBUTES,
                     "fix_zenflow_parameter_views", "to view ZenFlow's transposed parameters")

    def update_model_bit16_weights(group_index: int) -> None:
        flat = optimizer.bit16_groups_flat[group_index]
        for p, meta, offset in zip(optimizer.round_robin_bit16_groups[group_index],
                                   optimizer.round_robin_bit16_meta[group_index],
                                   optimizer.round_robin_bit16_offsets[group_index], strict=True):
            piece = flat.narrow(0, offset, meta.numel())
            p.data = piece.view(meta.shape[1], meta.shape[0]).t() if meta.dim() == 2 else piece.view(meta.shape)
        reordered = optimizer.round_robin_bit16_groups[group_index]
        for index, param in enumerate(optimizer.bit16_groups[group_index]):
            param.data = reordered[optimizer.round_robin_bit16_indices[group_index][index]].data

    optimizer._update_model_bit16_weights = update_model_bit16_weights
    for group_index in range(len(optimizer.bit16_groups)):
        update_model_bit16_weights(group_index)


def restart_zenflow_selective_steps(optimizer: Any) -> None:
    """Make ZenFlow's selective AdamW restart its step count when it restarts its moments.

    Why: at every ``select_interval`` boundary ZenFlow picks new top-k columns and zeroes the selective optimizer's
    ``exp_avg``/``exp_avg_sq`` (``ZenFlowSelectiveAdamW.clear_selected_mv``, zenflow_torch_adam.py), but keeps each
    state's ``step``. AdamW's bias correction then treats the zeroed moments as long-accumulated ones: the first
    update after each re-selection is ``(1 - beta1) / sqrt(1 - beta2)`` times AdamW's (3.2x with betas 0.9/0.999,
    0.45x with 0.9/0.95), every ``select_interval`` steps for the rest of the run. Measured on CPU (2 processes, 200
    steps, lr 1e-2): the mean loss of steps 175-200 went from 0.0095 to 0.0052 (update_interval 1) and from 0.0101 to
    0.0042 (update_interval 4) with the restart; plain AdamW 0.0010. Verified: DeepSpeed 0.19.8.
    """
    selective = getattr(optimizer, "selective_optimizer", None)
    if selective is None or not callable(getattr(selective, "clear_selected_mv", None)):
        raise _missing("ZenFlowZeroOptimizer.selective_optimizer.clear_selected_mv",
                       "to restart the selective AdamW's step count with its moments")
    clear = selective.clear_selected_mv

    def clear_selected_mv() -> None:
        clear()
        for state in selective.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0

    selective.clear_selected_mv = clear_selected_mv


def skip_unused_grad_norm(optimizer: Any) -> None:
    """ZeRO-3's optimizer step without the global gradient norm while nothing uses it.

    Why: ``DeepSpeedZeroOptimizer_Stage3.step`` computes the global gradient norm at every step (a float64 reduction
    over every gradient partition), reads it back on the host to test it for inf/NaN (a device synchronisation, so
    the host cannot queue the optimizer's kernels ahead of the GPU) and multiplies every fp32 gradient by
    1 / loss scale, also with bf16 or fp32 (loss scale 1) and no clipping. DeepSpeed's own switch for this,
    ``zero_optimization.compute_grad_norm = false``, refuses stage 3. On one H200 (0.93B Llama, bf16) the norm, the
    sync and the multiply were 12 ms of a 156 ms step. The originals run whenever a step clips (Lightning's
    ``clip_gradients`` sets ``clip_grad``), runs fp16, offloads the optimizer or has a loss scale other than 1: the
    test is made at every step. As with ``compute_grad_norm = false`` at stages 1-2, ``engine.get_global_grad_norm()``
    is then ``None`` and a non-finite gradient no longer skips the step (as with DDP and FSDP).
    Verified: DeepSpeed 0.19.8 (``stage3.py`` ``step``, ``_get_norm_groups``, ``unscale_and_clip_grads``).
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    _check_optimizer(optimizer, DeepSpeedZeroOptimizer_Stage3, "ZeRO-3", "DeepSpeedZeroOptimizer_Stage3",
                     _STAGE3_NORM_ATTRIBUTES, "skip_unused_grad_norm", "to skip the unused gradient norm at stage 3")
    norm_groups, unscale = optimizer._get_norm_groups, optimizer.unscale_and_clip_grads

    def unused() -> bool:
        return (not optimizer.clip_grad and optimizer.dtype != torch.float16 and not optimizer.offload_optimizer
                and optimizer.loss_scale == 1 and not getattr(optimizer, "use_muon", False))

    def get_norm_groups() -> list[Any]:
        # a host number: DeepSpeed's inf/NaN test of the combined norm then reads no device memory (no sync)
        return [0.0] if unused() else norm_groups()

    def unscale_and_clip_grads(sub_group_id: int, total_norm: Any) -> None:
        if unused():
            optimizer._global_grad_norm = None  # no norm was computed (DeepSpeed stored the placeholder's 0)
            return
        unscale(sub_group_id, total_norm)

    optimizer._get_norm_groups = get_norm_groups
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads


_STAGE3_STEP_ATTRIBUTES = ("step", "_partition_all_parameters", "module", "dp_process_group")


def keep_whole_parameters_through_step(optimizer: Any) -> bool:
    """ZeRO-3's optimizer step without releasing and re-gathering parameters that one partition keeps whole.

    Why: ``DeepSpeedZeroOptimizer_Stage3.step`` starts with ``_partition_all_parameters()``, which releases every
    parameter of the model, persistent ones included (``release_and_reset_all``: one ``partition()`` per parameter),
    and ``_post_step`` gathers the persistent ones again. With one process and every parameter whole
    (``tuning.resolve_speed_defaults``' default at world size 1), each parameter is a view of its own partition
    (``partition_parameters._no_gather_coalesced``), the optimizer writes the partition in place, and the release and
    the gather only swap ``param.data`` out and back: 147 ``partition`` calls per step on a 16-layer Llama, host work
    that keeps the GPU waiting before the optimizer's kernels. The replacement skips the release when, at the start
    of the step, every parameter of the model is persistent, available and a view of its partition (then
    ``_post_step``'s gather finds nothing to gather), and clears the parameters' active-module sets as DeepSpeed's
    release does; otherwise DeepSpeed's release runs. After the step each kept parameter must still be a view of its
    partition, or the step raises (the weights would otherwise go stale). Returns False (nothing patched) on more
    than one process, where the release and gather move real data.
    Verified: DeepSpeed 0.19.8 (``stage3.py`` ``step``, ``_partition_all_parameters``, ``_post_step``;
    ``partitioned_param_coordinator.py`` ``release_and_reset_all``).
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    _check_optimizer(optimizer, DeepSpeedZeroOptimizer_Stage3, "ZeRO-3", "DeepSpeedZeroOptimizer_Stage3",
                     _STAGE3_STEP_ATTRIBUTES, "keep_whole_parameters_through_step",
                     "to keep whole parameters through the step")
    if dist.get_world_size(group=optimizer.dp_process_group) != 1:
        return False
    step, release = optimizer.step, optimizer._partition_all_parameters
    params = list(optimizer.module.parameters())

    def whole(p: Any) -> bool:
        return (getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE
                and p.data.data_ptr() == p.ds_tensor.data_ptr())

    def clear_active_modules() -> None:  # what DeepSpeed's release does besides releasing
        for p in params:
            p.ds_active_sub_modules.clear()

    def step_keeping_whole_parameters(*args: Any, **kwargs: Any) -> Any:
        kept = all(whole(p) for p in params)
        if not kept:
            return step(*args, **kwargs)
        optimizer._partition_all_parameters = clear_active_modules
        try:
            out = step(*args, **kwargs)
        finally:
            optimizer._partition_all_parameters = release
        if not all(whole(p) for p in params):
            stale = next(n for n, p in optimizer.module.named_parameters() if not whole(p))
            raise RuntimeError(f"DeepSpeed's ZeRO-3 step moved parameter `{stale}` off its partition, which"
                               " lightning_zero's keep_whole_parameters_through_step (_compat/deepspeed.py) relies on;"
                               " set zero_optimization.stage3_param_persistence_threshold in the config to get"
                               " DeepSpeed's own release and gather back.")
        return out

    optimizer.step = step_keeping_whole_parameters
    return True


_STAGE12_GRADIENT_ATTRIBUTES = (
    "process_gradients", "reduce_ready_partitions_and_remove_grads", "independent_gradient_partition_epilogue",
    "finalize_gradient_accumulation_boundary", "set_gradient_accumulation_boundary",
    "is_gradient_accumulation_boundary", "_get_preflattened_grad_partition", "_release_ipg_buffers",
    "_epilogue_ran_this_backward", "_is_muon_group", "averaged_gradients", "all_grad_tensors", "params_in_partition",
    "partition_size", "grad_start_offset", "grad_partition_insertion_offset", "round_robin_bit16_padding",
    "bit16_groups", "single_partition_of_fp32_groups", "real_dp_process_group", "get_param_id",
    "contiguous_gradients", "cpu_offload", "zenflow", "has_moe_layers", "gradient_predivide_factor",
    "use_grad_accum_attribute", "dtype", "gradient_accumulation_dtype")


def write_gradients_into_partition(engine: Any) -> bool:
    """ZeRO-1/2 on one process: the gradients stay where autograd puts them until the accumulation boundary, then one
    multi-tensor copy writes them into an fp32 gradient partition that the step takes as it is.

    Why: with one process the reduction is the identity, yet ``DeepSpeedZeroOptimizer`` still sends every gradient
    through it: at stage 2 the gradient hook copies it into a reduce bucket
    (``reduce_independent_p_g_buckets_and_remove_grads``), a full bucket is "all-reduced" and copied again into
    ``grads_in_partition`` (``reduce_ipg_grads``, ``copy_grads_in_partition``), the epilogue synchronises the device
    when ``overlap_comm`` is on and lists the gradients again (``get_all_grad_tensors``); at both stages the step
    flattens them into one more copy (``flatten_dense_tensors_aligned``) and casts that to fp32. On a 16-layer Llama
    that is about 20 Python calls per parameter per step, host work that keeps the GPU waiting, and two full copies
    of the gradients in the step. The replacement lets autograd add each backward's gradients into ``param.grad`` (as
    DeepSpeed's stage 1 does), and at the boundary (the epilogue of the boundary's backward with DeepSpeed's managed
    accumulation, the step with ZeroStrategy's unmanaged one) copies them, cast to the fp32 master partition's dtype,
    into one flat buffer laid out as the partition (``torch._foreach_copy_``), zeros the slots of parameters that got
    no gradient, and frees the gradients. The buffer is a ``GradPartitionBufferGroup`` in ``averaged_gradients``
    (the form DeepSpeed's own fp32-accumulation path and DeepCompile hand the step): the step takes it as the fp32
    gradient without a flatten or a cast (``_get_preflattened_grad_partition``), and the gradient norm, the overflow
    check and ``safe_get_full_grad`` find it as a list of per-parameter views. Every step equals DeepSpeed's own bit
    for bit (the gradients add up in the weights' dtype, as in DeepSpeed's path); the gradients' memory is the same
    during the backward (one copy in the weights' dtype) and one copy less in the step.
    Returns False (nothing patched) where the reduction is not the identity, DeepSpeed's layout differs or something
    else owns the gradients: more than one process, DeepCompile, pipeline parallelism, CPU offload, ZenFlow, MoE,
    Muon, fp16, a gradient-accumulation dtype other than the weights', ``contiguous_gradients`` off,
    ``gradient_predivide_factor`` other than 1, or alignment padding between parameters.
    Verified: DeepSpeed 0.19.8 (``stage_1_and_2.py``; ``engine.py`` ``allreduce_gradients``, ``step``), torch 2.11
    and 2.13 (``_foreach_copy_`` across dtypes).
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer, GradPartitionBufferGroup

    optimizer = getattr(engine, "optimizer", None)
    if isinstance(optimizer, DeepSpeedZeroOptimizer) and type(optimizer) is not DeepSpeedZeroOptimizer:
        return False  # ZenFlow's subclass
    _check_optimizer(optimizer, DeepSpeedZeroOptimizer, "ZeRO-1/2", "DeepSpeedZeroOptimizer",
                     _STAGE12_GRADIENT_ATTRIBUTES, "write_gradients_into_partition",
                     "to write gradients straight into the partition on one process")
    if not callable(getattr(engine, "is_deepcompile_enabled", None)):
        raise _missing("DeepSpeedEngine.is_deepcompile_enabled", "to leave DeepCompile's gradient passes alone")
    groups = range(len(optimizer.bit16_groups))
    if (engine.is_deepcompile_enabled() or getattr(engine, "pipeline_parallelism", False)
            or any(dist.get_world_size(group=optimizer.real_dp_process_group[i]) != 1 for i in groups)
            or optimizer.cpu_offload or optimizer.zenflow or optimizer.has_moe_layers
            or optimizer.dtype == torch.float16 or optimizer.gradient_accumulation_dtype != optimizer.dtype
            or optimizer.use_grad_accum_attribute or not optimizer.contiguous_gradients
            or optimizer.gradient_predivide_factor != 1.0
            or getattr(optimizer, "autoep_folding_tp_group", None) is not None
            or any(any(optimizer.round_robin_bit16_padding[i]) for i in groups)
            or any(optimizer.params_in_partition[i] and optimizer._is_muon_group(optimizer.params_in_partition[i])
                   for i in groups)):
        return False
    layouts: list[tuple[list[tuple[int, torch.Size]], int]] = []  # per group: (offset, shape) per parameter, padding
    for i in groups:
        views, end = [], 0
        for p in optimizer.params_in_partition[i]:
            param_id = optimizer.get_param_id(p)
            offset = int(optimizer.grad_partition_insertion_offset[i][0][param_id])
            if int(optimizer.grad_start_offset[i][0][param_id]) != 0 or offset != end:
                return False  # a parameter split across partitions or a gap: not one process's layout
            views.append((offset, p.shape))
            end = offset + p.numel()
        if end > int(optimizer.partition_size[i]):
            return False
        layouts.append((views, int(optimizer.partition_size[i]) - end))

    def new_partition(i: int, have: list[bool]) -> Any:
        """This step's fp32 gradient partition: zeros in the slots of parameters without a gradient (DeepSpeed's
        path gives them zeros too) and in the padding, the rest uninitialised (the first write copies into it)."""
        views, padding = layouts[i]
        master = optimizer.single_partition_of_fp32_groups[i]
        flat = torch.empty(int(optimizer.partition_size[i]), dtype=master.dtype, device=master.device)
        buffers = [flat.narrow(0, offset, shape.numel()).view(shape) for offset, shape in views]
        for buffer, h in zip(buffers, have):
            if not h:
                buffer.zero_()
        if padding:
            pad = flat.narrow(0, flat.numel() - padding, padding).zero_()
            pad._zero_padding = True  # DeepSpeed's norm skips it
            buffers.append(pad)
        return GradPartitionBufferGroup(buffers, flat)

    def boundary() -> None:
        for i in groups:
            params = optimizer.params_in_partition[i]
            have = [p.grad is not None for p in params]
            group = optimizer.averaged_gradients.get(i)
            first = getattr(group, "flat_partition", None) is None  # else a later phase of a reentrant backward
            if first:
                group = optimizer.averaged_gradients[i] = new_partition(i, have)
            views = group[:len(params)]
            write = torch._foreach_copy_ if first else torch._foreach_add_  # a later phase adds to the first's
            if any(have):
                write([v for v, h in zip(views, have) if h], [p.grad for p, h in zip(params, have) if h])
            for p in optimizer.bit16_groups[i]:
                p.grad = None
            optimizer.all_grad_tensors[i] = None

    def leave_in_param_grad(param: Any, i: int) -> None:  # the hook's and stage 1's per-parameter reduction
        return None

    def epilogue() -> None:  # after each backward (stage 2), or at the boundary (stage 1)
        if optimizer.is_gradient_accumulation_boundary():
            boundary()
        optimizer._release_ipg_buffers()
        optimizer._epilogue_ran_this_backward = True

    def finalize_gradient_accumulation_boundary() -> None:  # the step of unmanaged accumulation
        optimizer.set_gradient_accumulation_boundary(True)
        boundary()

    optimizer.process_gradients = leave_in_param_grad
    optimizer.reduce_ready_partitions_and_remove_grads = leave_in_param_grad
    optimizer.independent_gradient_partition_epilogue = epilogue
    optimizer.finalize_gradient_accumulation_boundary = finalize_gradient_accumulation_boundary
    return True
