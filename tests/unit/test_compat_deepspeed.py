"""Contract tests: the DeepSpeed internals ZeroStrategy reaches into, against the installed DeepSpeed.

Most of these are read with ``getattr(..., None)`` or ``name in module.__dict__`` guards in the package, which would
turn into silent no-ops if DeepSpeed renamed them; these tests fail instead, naming the symbol. They build real
engines in one process (a one-rank gloo group, DeepSpeed's CPU accelerator). `make test` runs them on the pinned
DeepSpeed and `make test-compat` on the lowest proven one.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from lightning_zero._compat import deepspeed as compat

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
    _stage3_step_skips_the_unused_norm_and_computes_it_to_clip(one_rank)
    _one_partition_keeps_whole_parameters_as_views_of_it(one_rank)
    _one_process_writes_gradients_into_the_partition(one_rank)
    _the_comm_backend_is_released(one_rank)


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
    for name in compat.BACKWARD_COUNTERS:
        assert name in model[0].a.__dict__, f"ZeRO-3 modules lost the backward counter `{name}`"
    counters = compat.zero3_backward_counters(model.modules())
    assert {(m, n) for m, n, _ in counters} >= {(model[0].a, n) for n in compat.BACKWARD_COUNTERS}
    assert callable(getattr(engine.optimizer, "clear_backward_seen_flag", None)), \
        "ZeRO-3's optimizer lost `clear_backward_seen_flag` (the micro-batch start engines._engine_backward calls)"
    compat.start_micro_batch(engine)
    assert compat.leaf_module_hooks(engine) == []  # no fetch units marked
    engine.backward(loss, scale_wrt_gas=False)
    compat.set_gradient_clipping(engine, 0.25)
    assert engine.optimizer.clip_grad == 0.25 and engine.gradient_clipping() == 0.25
    engine.step()
    for name in compat.ENGINE_MODULE_HOOKS:
        handle = getattr(engine, name, None)
        assert handle is not None and callable(getattr(handle, "remove", None)), f"DeepSpeedEngine lost `{name}`"
    assert hasattr(engine._config, "gradient_clipping") and hasattr(engine._config, "load_universal_checkpoint")
    with compat.loading_universal_checkpoint(engine):
        assert engine.load_universal_checkpoint() is True
    assert engine.load_universal_checkpoint() is False
    hooks = [getattr(engine, name).id for name in compat.ENGINE_MODULE_HOOKS]
    engine.destroy()
    compat.remove_engine_module_hooks(engine)
    assert not set(hooks) & (set(model._forward_pre_hooks) | set(model._forward_hooks)), \
        "the engine's forward hooks are still on the model after release"


def _stage12_optimizer_starts_a_micro_batch_with_clear_backward_seen_flag(one_rank):
    config = {**STAGE3, "gradient_clipping": 0.0, "zero_optimization": {"stage": 2, "compute_grad_norm": False}}
    engine, model = _engine(one_rank, config)
    assert callable(getattr(engine.optimizer, "clear_backward_seen_flag", None))
    assert "compute_grad_norm" in dir(engine.optimizer), \
        "DeepSpeed's stage-1/2 optimizer lost the `compute_grad_norm` switch EngineSlot.set_clip turns back on"
    assert engine.optimizer.compute_grad_norm is False and compat.leaf_module_hooks(engine) == []
    compat.start_micro_batch(engine)
    compat.set_gradient_clipping(engine, 0.5)
    assert engine.optimizer.compute_grad_norm is True and engine.optimizer.clip_grad == 0.5
    assert engine.gradient_clipping() == 0.5
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
    assert [h.id for h in compat.leaf_module_hooks(engine)] == [h.id for h in handles]
    engine.destroy()
    compat.untag_leaf_parameters(model)
    assert not any(hasattr(p, "ds_z3_leaf_module") for p in model.parameters())


def _stage3_step_skips_the_unused_norm_and_computes_it_to_clip(one_rank):
    """skip_unused_grad_norm: without clipping the ZeRO-3 step computes no norm (get_global_grad_norm() is None) and
    still steps exactly as torch.optim.AdamW does; a clipping step computes the norm and clips as torch does."""
    engine, model = _engine(one_rank, STAGE3)
    reference = nn.Sequential(Block(), Block())
    with one_rank.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            q.copy_(p)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    compat.skip_unused_grad_norm(engine.optimizer)
    for clip in (0.0, 1e-3):
        x = torch.randn(3, 4)
        compat.set_gradient_clipping(engine, clip)
        loss = engine(x).square().sum()
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        reference_opt.zero_grad()
        reference(x).square().sum().backward()
        if clip:
            total = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
            assert engine.get_global_grad_norm() == pytest.approx(float(total), rel=1e-5)
        else:
            assert engine.get_global_grad_norm() is None, "the ZeRO-3 step still computed the unused gradient norm"
        reference_opt.step()
        with one_rank.zero.GatheredParameters(list(model.parameters())):
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6, msg=f"{name}, clip={clip}")
    with pytest.raises(TypeError, match="ZeRO-3 optimizer"):
        compat.skip_unused_grad_norm(torch.optim.SGD(reference.parameters(), lr=1.0))
    engine.destroy()


def _one_partition_keeps_whole_parameters_as_views_of_it(one_rank):
    """tuning.resolve_speed_defaults keeps every parameter whole at world size 1 (persistence threshold): DeepSpeed's
    one-partition "gather" (_no_gather_coalesced) makes the parameter a view of its partition, so that costs no
    memory, the parameter stays available across forward, backward and step, and each step lands in it exactly as
    in an engine that gathers and releases (threshold 0)."""
    import sys

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from lightning_zero.tuning import resolve_speed_defaults

    config = resolve_speed_defaults({**STAGE3, "zero_optimization": {"stage": 3}}, world_size=1)
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == sys.maxsize
    torch.manual_seed(0)
    engine, model = _engine(one_rank, config, leaf=True)
    torch.manual_seed(0)
    gathering, gathered = _engine(one_rank, STAGE3, leaf=True)
    torch.manual_seed(0)
    kept, kept_model = _engine(one_rank, config, leaf=True)
    assert compat.keep_whole_parameters_through_step(kept.optimizer) is True
    assert compat.keep_whole_parameters_through_step(gathering.optimizer) is True  # patched, and falls back itself
    released = _count_partition_calls(kept_model)
    for step in range(3):
        x = torch.randn(3, 4, requires_grad=True)  # a leaf unit's input must require grad (tuning.track_unit_inputs)
        for e in (engine, gathering, kept):
            e.backward(e(x).square().sum(), scale_wrt_gas=False)
            e.step()
        # the first step comes after DeepSpeed's tracing backward, which released the parameters: DeepSpeed's release
        # and gather run then; from the second on nothing is released
        assert (released() > 0) == (step == 0), \
            f"step {step}: {released()} partition() calls (keep_whole_parameters_through_step)"
        released = _count_partition_calls(kept_model)
        with one_rank.zero.GatheredParameters(list(gathered.parameters())):
            for (name, p), q, k in zip(model.named_parameters(), gathered.parameters(), kept_model.parameters()):
                for each in (p, k):
                    assert each.ds_persist and each.ds_status == ZeroParamStatus.AVAILABLE, f"{name} was released"
                    assert each.data.data_ptr() == each.ds_tensor.data_ptr(), f"{name} is a gathered copy, not a" \
                        " view of its partition: keeping parameters whole at world size 1 would double their memory"
                    assert not each.ds_active_sub_modules, f"{name}: active modules left after step {step}"
                torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=name)
                torch.testing.assert_close(k.detach(), q.detach(), rtol=0, atol=0, msg=name)
    # a parameter the step moves off its partition would go stale: the step says so instead
    victim = kept_model[0].a.weight
    x = torch.randn(3, 4, requires_grad=True)
    kept.backward(kept(x).square().sum(), scale_wrt_gas=False)
    original = type(kept.optimizer)._reassign_or_swap_out_partitioned_parameters

    def moving(self, sub_group_id):  # a DeepSpeed whose step gives the partition new storage
        original(self, sub_group_id)
        victim.ds_tensor.data = victim.ds_tensor.data.clone()

    type(kept.optimizer)._reassign_or_swap_out_partitioned_parameters = moving
    try:
        with pytest.raises(RuntimeError, match=r"moved parameter `0\.a\.weight` off its partition"):
            kept.step()
    finally:
        type(kept.optimizer)._reassign_or_swap_out_partitioned_parameters = original
    with pytest.raises(TypeError, match="ZeRO-3 optimizer"):
        compat.keep_whole_parameters_through_step(torch.optim.SGD(model.parameters(), lr=1.0))
    for e in (engine, gathering, kept):
        e.destroy()


def _count_partition_calls(model):
    """A new counter, from zero, of ``partition()`` calls on ``model``'s ZeRO-3 parameters (DeepSpeed's
    per-parameter release); it replaces the counter an earlier call put on them."""
    calls = [0]
    for p in model.parameters():
        partition = getattr(p, "_uncounted_partition", p.partition)
        p._uncounted_partition = partition

        def counted(*args, _partition=partition, **kwargs):
            calls[0] += 1
            return _partition(*args, **kwargs)

        p.partition = counted
    return lambda: calls[0]


class WithUnused(nn.Module):
    """Two blocks and a layer no forward uses (its gradient is None: the partition must hold zeros for it); with
    ``reentrant``, the first block is recomputed in a reentrant checkpoint (its gradients come in a later phase)."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.blocks, self.unused, self.reentrant = nn.Sequential(Block(), Block()), nn.Linear(4, 2), reentrant

    def forward(self, x):
        if self.reentrant:
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(self.blocks[0], x.requires_grad_(), use_reentrant=True)
            return self.blocks[1](x)
        return self.blocks(x)


def _one_process_writes_gradients_into_the_partition(one_rank):
    """write_gradients_into_partition: at stages 1-2 on one process each step lands exactly where DeepSpeed's own
    bucketed path lands (ZeroStrategy's unmanaged accumulation with two backwards per step, in fp32 and bf16;
    DeepSpeed's managed accumulation over two micro-batches, with overlap_comm, with clipping; a reentrant
    checkpoint), safe_get_full_grad reads the same gradients at a managed boundary, and DeepSpeed's per-gradient
    bucket copy never runs."""
    from deepspeed.utils import safe_get_full_grad

    base = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0}
    unmanaged = [{**base, "gradient_accumulation_steps": 1, "managed_gradient_accumulation": False,
                  "zero_optimization": {"stage": stage, "compute_grad_norm": False}} for stage in (1, 2)]
    managed = [{**base, "gradient_accumulation_steps": 2, "gradient_clipping": 0.05,
                "zero_optimization": {"stage": stage, "overlap_comm": stage == 2}} for stage in (1, 2)]
    bf16 = {**unmanaged[1], "bf16": {"enabled": True, "check_grad_overflow": False}}
    cases = [(c, False) for c in unmanaged + managed + [bf16]] + [(managed[1], True), (unmanaged[0], True)]
    for config, reentrant in cases:
        dtype = torch.bfloat16 if "bf16" in config else torch.float32
        is_managed = config.get("managed_gradient_accumulation", True)
        engines, bucketed = [], [0, 0]  # DeepSpeed's per-gradient bucket copies, without and with the partition write
        for patch in (False, True):
            torch.manual_seed(0)
            model = WithUnused(reentrant).to(dtype)
            engine, *_ = one_rank.initialize(model=model, config=config,
                                             optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
            if patch:
                assert compat.write_gradients_into_partition(engine) is True

            def counted(*args, _k=patch, _original=engine.optimizer.reduce_independent_p_g_buckets_and_remove_grads):
                bucketed[_k] += 1
                return _original(*args)

            engine.optimizer.reduce_independent_p_g_buckets_and_remove_grads = counted
            engines.append((engine, model))
        (_, ref_model), (fast, fast_model) = engines
        label = (f"stage {config['zero_optimization']['stage']}, accumulation {config['gradient_accumulation_steps']}"
                 f", {'managed' if is_managed else 'unmanaged'}, {dtype}{', reentrant' if reentrant else ''}")
        micro_batches = config["gradient_accumulation_steps"] if is_managed else 2
        for step in range(3):
            for micro in range(micro_batches):
                x = torch.randn(3, 4, dtype=dtype)
                for engine, _ in engines:
                    engine.backward(engine(x).square().sum())
                if is_managed and micro == micro_batches - 1:  # the boundary: both offer this step's gradients
                    for (name, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
                        torch.testing.assert_close(safe_get_full_grad(q), safe_get_full_grad(p), rtol=0, atol=0,
                                                   msg=f"{label}, step {step}: the gradient of {name}")
                if is_managed:
                    for engine, _ in engines:
                        engine.step()  # DeepSpeed's own boundary: an update every second micro-batch
            if not is_managed:
                for engine, _ in engines:
                    engine.step()
            for (name, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
                torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=0, msg=f"{label}, step {step}: {name}")
        assert bucketed[0] > 0 and bucketed[1] == 0, \
            f"{label}: DeepSpeed's bucket path ran {bucketed[1]} times with the partition write ({bucketed[0]} without)"
        if is_managed and not reentrant:
            # an epilogue that runs again at the boundary (DeepSpeed's reentrant-checkpoint phases) adds the
            # gradients that came since to the partition
            for _ in range(micro_batches):
                fast.backward(fast(torch.randn(3, 4)).square().sum())
                if _ < micro_batches - 1:
                    fast.step()
            weight = fast_model.blocks[0].a.weight
            before = safe_get_full_grad(weight).clone()
            weight.grad = torch.ones_like(weight)
            fast.optimizer.independent_gradient_partition_epilogue()
            torch.testing.assert_close(safe_get_full_grad(weight), before + 1, msg=f"{label}: a later phase")
            assert weight.grad is None
        for engine, _ in engines:
            engine.destroy()
    # where the reduction is not the identity's layout, nothing is patched
    torch.manual_seed(0)
    model = WithUnused()
    engine, *_ = one_rank.initialize(model=model, config={**unmanaged[0], "gradient_predivide_factor": 2.0},
                                     optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert compat.write_gradients_into_partition(engine) is False
    assert "process_gradients" not in vars(engine.optimizer)
    engine.destroy()
    # nor where DeepCompile's passes own the gradients
    engine, *_ = one_rank.initialize(model=model, config=unmanaged[0],
                                     optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    engine.is_deepcompile_enabled = lambda: True
    assert compat.write_gradients_into_partition(engine) is False
    assert "process_gradients" not in vars(engine.optimizer)
    engine.destroy()
    with pytest.raises(TypeError, match="ZeRO-1/2 optimizer"):
        compat.write_gradients_into_partition(
            type("Engine", (), {"optimizer": torch.optim.SGD(model.parameters(), lr=1.0)})())


def _the_comm_backend_is_released(one_rank):
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None
    compat.release_comm_backend()
    assert ds_comm.cdb is None


def test_comm_backend_handle_and_deepcompile_schedule_exist():
    import deepspeed.comm.comm as ds_comm
    from deepspeed.compile import backend

    assert "cdb" in vars(ds_comm), "deepspeed.comm.comm.cdb (released at exit by strategy._destroy_process_group)"
    assert "remaining_schedule" in vars(backend), \
        "deepspeed.compile.backend.remaining_schedule (shifted on resume by compiling.resume_deepcompile_schedule)"


def test_ds_to_universal_reads_exactly_the_arguments_checkpoint_passes(monkeypatch):
    """_compat.deepspeed.convert_to_universal calls ds_to_universal.main(argparse.Namespace(...)) directly."""
    from deepspeed.checkpoint import ds_to_universal

    source = inspect.getsource(ds_to_universal)
    passed = set(vars(compat.universal_args("in", "out")))
    read = set(__import__("re").findall(r"\bargs\.([a-z_]+)", source))
    assert read <= passed, f"ds_to_universal now reads {sorted(read - passed)}, which lightning_zero does not pass"
    assert isinstance(ds_to_universal.main, type(lambda: 0))
    assert list(inspect.signature(ds_to_universal.main).parameters) == ["args"]
    # its command line parses into exactly these fields
    monkeypatch.setattr("sys.argv", ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"])
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        parsed = vars(ds_to_universal.parse_arguments())
    assert set(parsed) == passed, f"ds_to_universal's command line has {sorted(set(parsed) ^ passed)} now"


def test_the_counters_check_fails_loudly_when_zero3_modules_carry_none():
    module = nn.Linear(2, 2)
    assert compat.zero3_backward_counters(module.modules()) == []  # stages 0-2: nothing partitioned, nothing to keep
    module.weight.ds_id = 0  # a partitioned parameter whose module has no counter: DeepSpeed renamed them
    with pytest.raises(RuntimeError, match=r"module.applied_pre_backward_ref_cnt.*_compat/deepspeed.py.*"
                                           r"pip install 'deepspeed>=0.19.8,<0.20'"):
        compat.zero3_backward_counters(module.modules())


def test_deepcompile_schedule_shift_and_the_compile_redirect():
    from collections import deque

    from deepspeed.compile import backend
    from deepspeed.runtime.engine import DeepSpeedEngine

    saved = backend.remaining_schedule
    try:
        backend.remaining_schedule = deque([(0, "gather"), (5, "prefetch")])
        compat.shift_deepcompile_schedule(3)
        assert list(backend.remaining_schedule) == [(3, "gather"), (8, "prefetch")]
        compat.shift_deepcompile_schedule(0)
        assert list(backend.remaining_schedule) == [(3, "gather"), (8, "prefetch")]
    finally:
        backend.remaining_schedule = saved
    assert "self.module.compile(" in inspect.getsource(DeepSpeedEngine.compile), \
        "DeepSpeedEngine.compile no longer calls self.module.compile (compiling.deepcompile_engine redirects it)"
    module, seen = nn.Linear(2, 2), []
    with compat.redirect_module_compile(module, lambda **kw: seen.append(kw)):
        module.compile(backend="eager")
    assert seen == [{"backend": "eager"}] and "compile" not in vars(module)


def test_the_accelerator_deepspeed_chose():
    from deepspeed.accelerator import get_accelerator

    get_accelerator()  # resolves it (DS_ACCELERATOR=cpu in the tests)
    assert compat.accelerator_chosen() == "cpu"


def test_the_backward_swap_keeps_other_parameters_out_and_why_it_is_needed():
    """DeepSpeedEngine.backward calls loss.backward() without `inputs` (so the swap in _compat/deepspeed.py stays);
    inside the swap a backward reaches only the given parameters."""
    import re

    from deepspeed.runtime import engine

    # DeepSpeedEngine.backward is wrapped by DeepSpeed's nvtx decorator: read its body from the module's source
    source = re.search(r"\n    def backward\(self.*?(?=\n    (?:@|def ))", inspect.getsource(engine), re.S).group(0)
    assert "inputs" not in source.split(":\n")[0], "DeepSpeedEngine.backward takes `inputs` now"
    assert 'backward_kwargs = {"retain_graph": retain_graph}' in source, "DeepSpeedEngine.backward passes more now"
    assert "loss.backward(**backward_kwargs)" in source, \
        "DeepSpeedEngine.backward changed how it calls loss.backward: check whether backward_reaches_only can go"
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    loss = (a * 2 + b * 3).sum()
    original = torch.Tensor.backward
    with compat.backward_reaches_only([a]):
        loss.backward()
    assert torch.Tensor.backward is original
    assert torch.equal(a.grad, torch.full((2,), 2.0)) and b.grad is None


def test_cpu_info_is_asked_once_per_process(monkeypatch):
    """DeepSpeed's op builders look py-cpuinfo's get_cpu_info up at each call (cpu_arch, simd_width, CPU Adam's
    __init__): after memoize_cpu_info, loading the built CPU Adam op and building the optimizer runs py-cpuinfo's
    subprocess once instead of three times. Fails if DeepSpeed stops looking the function up there."""
    import cpuinfo
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    calls = []
    real = cpuinfo.get_cpu_info

    def counted() -> dict:
        calls.append(1)
        return real()

    monkeypatch.setattr(cpuinfo, "get_cpu_info", counted)
    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    builder.load()
    DeepSpeedCPUAdam([nn.Parameter(torch.zeros(4))])
    unmemoized = len(calls)
    assert unmemoized >= 3, f"DeepSpeed asked py-cpuinfo {unmemoized} times; the memo's reason may be gone"
    calls.clear()
    compat.memoize_cpu_info()
    compat.memoize_cpu_info()  # idempotent: one memo, not a memo of a memo
    builder.load()
    info = cpuinfo.get_cpu_info()
    DeepSpeedCPUAdam([nn.Parameter(torch.zeros(4))])
    assert len(calls) == 1
    info["arch"] = "changed"  # callers get copies
    assert cpuinfo.get_cpu_info()["arch"] != "changed"
