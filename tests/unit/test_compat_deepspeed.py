"""Contract tests: the DeepSpeed internals ZeroStrategy reaches into, against the installed DeepSpeed.

Most of these are read with ``getattr(..., None)`` or ``name in module.__dict__`` guards in the package, which would
turn into silent no-ops if DeepSpeed renamed them; these tests fail instead, naming the symbol. They build real
engines in one process (a one-rank gloo group, DeepSpeed's CPU accelerator). `make test` runs them on the pinned
DeepSpeed and `make test-compat` on the lowest proven one.
"""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch
from torch import nn

STAGE3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "managed_gradient_accumulation": False,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _engine(deepspeed, config, leaf: bool = False):
    model = nn.Sequential(Block(), Block())
    if leaf:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [Block])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, model


def test_deepspeed_engine_internals(one_rank):
    """One process group per process (DeepSpeed caches its groups), so every engine check runs here, in order."""
    _zero3_parameter_and_module_attributes(one_rank)
    _stage12_optimizer_starts_a_micro_batch_with_clear_backward_seen_flag(one_rank)
    _leaf_module_hooks_are_the_handles_the_registry_gates(one_rank)


def _zero3_parameter_and_module_attributes(one_rank):
    """ds_id/ds_numel/ds_tensor/ds_status/ds_shape (checkpoint, summary, estimate, hf.py); the ZeRO-3 backward
    counters engines._Zero3BackwardCounters reads; the engine's own forward hook handles EngineRegistry.release
    removes; clear_backward_seen_flag (engines._engine_backward); engine._config.gradient_clipping (set_clip)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    engine, model = _engine(one_rank, STAGE3)
    p = model[0].a.weight
    for name in ("ds_id", "ds_numel", "ds_tensor", "ds_status", "ds_shape"):
        assert hasattr(p, name), f"ZeRO-3 parameters lost `{name}`"
    assert p.ds_numel == 16 and tuple(p.ds_shape) == (4, 4) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
    assert {"AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"} <= set(ZeroParamStatus.__members__)

    loss = engine(torch.randn(2, 4)).sum()
    for name in ("applied_pre_backward_ref_cnt", "ds_grads_remaining"):
        assert name in model[0].a.__dict__, f"ZeRO-3 modules lost the backward counter `{name}`"
    assert callable(getattr(engine.optimizer, "clear_backward_seen_flag", None)), \
        "ZeRO-3's optimizer lost `clear_backward_seen_flag` (the micro-batch start engines._engine_backward calls)"
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        assert handle is not None and callable(getattr(handle, "remove", None)), f"DeepSpeedEngine lost `{name}`"
    assert hasattr(engine._config, "gradient_clipping") and hasattr(engine._config, "load_universal_checkpoint")
    engine.destroy()


def _stage12_optimizer_starts_a_micro_batch_with_clear_backward_seen_flag(one_rank):
    config = {**STAGE3, "zero_optimization": {"stage": 2}}
    engine, _ = _engine(one_rank, config)
    assert callable(getattr(engine.optimizer, "clear_backward_seen_flag", None))
    assert "compute_grad_norm" in dir(engine.optimizer), \
        "DeepSpeed's stage-1/2 optimizer lost the `compute_grad_norm` switch EngineSlot.set_clip turns back on"
    engine.destroy()


def _leaf_module_hooks_are_the_handles_the_registry_gates(one_rank):
    """EngineRegistry._gate_leaf_hooks wraps the ZeRO-3 optimizer's `_leaf_module_hooks` in place."""
    engine, model = _engine(one_rank, STAGE3, leaf=True)
    handles = list(getattr(engine.optimizer, "_leaf_module_hooks", None) or ())
    assert handles, "ZeRO-3's optimizer no longer lists `_leaf_module_hooks` for leaf modules"
    blocks = [m for m in model if isinstance(m, Block)]
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        assert hooks is not None and handle.id in hooks
        assert any(m._backward_hooks is hooks for m in blocks), "a leaf hook is not a backward hook on its block"
    assert all(hasattr(p, "ds_z3_leaf_module") for p in blocks[0].parameters())
    assert all(getattr(m, "_z3_leaf", False) for m in blocks)
    engine.destroy()


def test_comm_backend_handle_and_deepcompile_schedule_exist():
    import deepspeed.comm.comm as ds_comm
    from deepspeed.compile import backend

    assert "cdb" in vars(ds_comm), "deepspeed.comm.comm.cdb (released at exit by strategy._destroy_process_group)"
    assert "remaining_schedule" in vars(backend), \
        "deepspeed.compile.backend.remaining_schedule (shifted on resume by compiling.resume_deepcompile_schedule)"


def test_ds_to_universal_reads_exactly_the_arguments_checkpoint_passes():
    """checkpoint._convert_to_universal calls ds_to_universal.main(argparse.Namespace(...)) directly."""
    from deepspeed.checkpoint import ds_to_universal

    source = inspect.getsource(ds_to_universal)
    passed = {"input_folder", "output_folder", "num_extract_workers", "num_merge_workers", "keep_temp_folder",
              "strict", "inject_missing_state"}
    read = set(__import__("re").findall(r"\bargs\.([a-z_]+)", source))
    assert read <= passed, f"ds_to_universal now reads {sorted(read - passed)}, which lightning_zero does not pass"
    assert isinstance(ds_to_universal.main, type(lambda: 0))
    assert "args" in inspect.signature(ds_to_universal.main).parameters
    assert isinstance(argparse.Namespace(**dict.fromkeys(passed)), argparse.Namespace)
