"""The public surface: registered names, constructor validation (before any process starts)."""

import warnings

import lightning as L
import pytest
import torch

import lightning_zero
from lightning.pytorch.strategies import StrategyRegistry
from lightning_zero import ZeroConfigError, ZeroStrategy
from lightning_zero.precision import ZeroPrecision

NAMES = ["zero", "zero_stage_1", "zero_stage_2", "zero_stage_2_offload", "zero_stage_3", "zero_stage_3_offload",
         "zero_stage_3_offload_nvme"]


def test_registered_strategy_names_are_frozen():
    assert sorted(k for k in StrategyRegistry if k.startswith("zero")) == sorted(NAMES)
    assert lightning_zero.__all__ == sorted(lightning_zero.__all__)


def test_trainer_accepts_registered_name():
    trainer = L.Trainer(strategy="zero_stage_3", accelerator="cpu", devices=2, logger=False, precision="bf16-mixed")
    assert isinstance(trainer.strategy, ZeroStrategy) and trainer.strategy.stage == 3
    assert isinstance(trainer.strategy.precision_plugin, ZeroPrecision)
    assert trainer.strategy.precision_plugin.precision == "bf16-mixed"


def test_constructor_reports_config_problems_before_launch():
    with pytest.raises(ZeroConfigError, match="unknown key 'zero_optimisation'. Did you mean 'zero_optimization'"):
        ZeroStrategy(config={"zero_optimisation": {"stage": 3}})
    with pytest.raises(ZeroConfigError, match=r"ZeroStrategy\(stage=5\) is not supported"):
        ZeroStrategy(stage=5)
    with pytest.raises(ValueError, match=r"offload_parameters='cpu'\) needs stage=3"):
        ZeroStrategy(stage=2, offload_parameters="cpu")
    with pytest.raises(ValueError, match=r"start_method='thread'"):
        ZeroStrategy(start_method="thread")


def test_unsupported_precision_plugin_is_refused():
    strategy = ZeroStrategy()
    with pytest.raises(ValueError, match="does not support the DoubleWeird plugin"):
        strategy.precision_plugin = type("DoubleWeird", (L.pytorch.plugins.precision.Precision,), {})()


def test_lbfgs_is_refused_with_the_alternative():
    plugin = ZeroPrecision("32-true")
    opt = torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="LBFGS re-evaluates the closure.*Adam, AdamW, SGD"):
        plugin.optimizer_step(opt, model=None, closure=lambda: None)


def test_compile_argument_is_validated():
    assert ZeroStrategy(compile=True).compile_kwargs == {}
    assert ZeroStrategy(compile={"mode": "max-autotune"}).compile_kwargs == {"mode": "max-autotune"}
    assert ZeroStrategy().compile_kwargs is None
    with pytest.raises(ValueError, match=r"unknown torch.compile argument\(s\) 'mdoe' \(did you mean 'mode'\?\)"):
        ZeroStrategy(compile={"mdoe": "max-autotune"})
    with pytest.raises(ValueError, match=r"compile='max'\) is not supported.*compile='deepcompile'"):
        ZeroStrategy(compile="max")
    with pytest.raises(TypeError, match="must be True/False, 'deepcompile' or a dict"):
        ZeroStrategy(compile=3)


def test_deepcompile_is_chosen_by_keyword_or_config_and_reaches_the_deepspeed_config():
    strategy = ZeroStrategy(stage=3, compile="deepcompile")
    assert (strategy.compile_kwargs, strategy.deepcompile) == ({}, True)
    assert strategy.resolve_config(None)["compile"] == {"deepcompile": True}
    # DeepCompile's own options stay in the config's compile section
    strategy = ZeroStrategy(stage=2, config={"compile": {"deepcompile": True, "free_activation": True}})
    assert (strategy.compile_kwargs, strategy.deepcompile) == ({}, True)
    assert strategy.resolve_config(None)["compile"] == {"deepcompile": True, "free_activation": True}
    strategy = ZeroStrategy(stage=1, compile={"backend": "eager"}, config={"compile": {"deepcompile": True}})
    assert (strategy.compile_kwargs, strategy.deepcompile) == ({"backend": "eager"}, True)
    assert ZeroStrategy(stage=2, compile=True).deepcompile is False
    assert "compile" not in ZeroStrategy(stage=2, compile=True).resolve_config(None)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(stage=0, compile="deepcompile"), r"needs ZeRO stage 1, 2 or 3 \(stage is 0\).*compile=True"),
    (dict(stage=3, compile={"backend": "aot_eager"}, config={"compile": {"deepcompile": True}}),
     r"backend 'aot_eager' is not supported; DeepCompile runs its passes on 'inductor' or 'eager'"),
    (dict(stage=3, compile="deepcompile", offload_optimizer="nvme", offload_parameters="nvme", nvme_path="/tmp"),
     r"with ZeRO offload \(zero_optimization.offload_optimizer.device is 'nvme'\) is not supported"),
    (dict(stage=3, compile="deepcompile", offload_parameters="cpu"),
     r"with ZeRO offload \(zero_optimization.offload_param.device is 'cpu'\).*offload_opt_states.*compile=True"),
])
def test_what_deepcompile_cannot_run_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZeroStrategy(**kwargs)


def test_deepcompile_needs_one_engine_over_the_whole_module():
    from torch import nn

    from lightning_zero.engines import assign_models
    from lightning_zero.plan import _check_deepcompile_layout

    class GAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.generator, self.discriminator = nn.Linear(2, 2), nn.Linear(2, 1)

    gan = GAN()
    whole = [torch.optim.Adam(gan.parameters())]
    _check_deepcompile_layout(assign_models(gan, whole), gan)  # one engine wraps the module: accepted
    two = [torch.optim.Adam(gan.generator.parameters()), torch.optim.Adam(gan.discriminator.parameters())]
    with pytest.raises(ValueError, match=r"needs 2 engines \(.*generator.*\(optimizer 0\).*discriminator.*"
                                         r"\(optimizer 1\)\). Use compile=True"):
        _check_deepcompile_layout(assign_models(gan, two), gan)


def test_deepcompile_on_cpu_names_the_alternative():
    from lightning_zero.compiling import check_deepcompile_runtime

    with pytest.raises(ValueError, match=r"needs CUDA GPUs.*device is 'cpu'.*Use compile=True"):
        check_deepcompile_runtime(torch.device("cpu"))


def test_compile_targets_the_networks_not_containers_or_metrics():
    import torchmetrics
    from torch import nn

    from lightning_zero.compiling import _targets

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.heads = nn.ModuleDict({"a": nn.Linear(2, 1)})
            self.act = nn.ReLU()  # no parameters
            self.metric = torchmetrics.MeanSquaredError()

    m = Module()
    assert _targets(m, whole=True) == [m.encoder, m.blocks[0], m.blocks[1], m.heads["a"]]
    assert _targets(m.encoder, whole=False) == [m.encoder]


@pytest.mark.parametrize("kind", ["Sequential", "Linear", "Sequential subclass", "custom module"])
def test_compiled_networks_really_run_a_compiled_graph(kind):
    """`nn.Module.compile()` leaves a module whose forward is torch.nn's own running eagerly (no graph captured; found
    after DeepCompile trained an `nn.Sequential` on eager gradients). compile_models compiles such a module's forward,
    so every kind of network runs a compiled graph; parameters and state_dict keys stay as they were."""
    from torch import nn

    from helpers import LossNet
    from lightning_zero.compiling import compile_models, is_compiled

    class Stack(nn.Sequential):
        pass

    net = {"Sequential": lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
           "Linear": lambda: nn.Linear(4, 1),
           "Sequential subclass": lambda: Stack(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
           "custom module": lambda: LossNet(nn.Linear(4, 1))}[kind]()
    keys = list(net.state_dict())
    assert compile_models([(net, False)], {"backend": "aot_eager"}) == [net]
    out = net(torch.randn(3, 4), torch.randn(3, 1)) if kind == "custom module" else net(torch.randn(3, 4))
    assert type(out.grad_fn).__name__ == "CompiledFunctionBackward"
    assert is_compiled(net) and list(net.state_dict()) == keys
    assert compile_models([(net, False)], {"backend": "aot_eager"}) == []  # compiled once


def test_deepcompile_refuses_gradients_it_did_not_reduce():
    """DeepCompile leaves .grad None for every gradient it reduces; a .grad after its backward belongs to a layer that
    ran eagerly, which DeepCompile never reduces: stop before the step uses zeros for it."""
    from torch import nn

    from lightning_zero.compiling import check_gradients_reduced_by_deepcompile

    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    check_gradients_reduced_by_deepcompile(net)
    net[1].weight.grad = torch.zeros_like(net[1].weight)
    with pytest.raises(ValueError, match=r"gradients outside DeepCompile's compiled graphs \(1.weight\).*ran eagerly"
                                         r".*compile=True"):
        check_gradients_reduced_by_deepcompile(net)
    net[1].weight.requires_grad_(False)  # frozen parameters are not DeepCompile's to reduce
    check_gradients_reduced_by_deepcompile(net)


def test_deepcompile_accumulation_boundary_follows_lightnings_loop():
    """DeepCompile needs the boundary before the backward: automatic optimization's last micro-batch runs its closure
    inside optimizer_step; manual optimization must step after each backward (it cannot accumulate)."""
    from torch import nn

    from lightning_zero.engines import EngineRegistry, EngineSlot

    class Boundaries:  # the one DeepSpeedEngine call the decision makes
        def __init__(self):
            self.calls = []

        def set_gradient_accumulation_boundary(self, value):
            self.calls.append(value)

    registry, engine = EngineRegistry(), Boundaries()
    slot = EngineSlot("model", nn.Linear(1, 1), engine)
    registry._deepcompile_boundary(slot, automatic=True)  # a micro-batch that accumulates
    with registry.stepping():
        registry._deepcompile_boundary(slot, automatic=True)  # the closure optimizer_step runs
    registry._deepcompile_boundary(slot, automatic=False)  # manual: each backward is followed by a step
    assert engine.calls == [False, True, True]
    slot.pending = True  # a manual backward already reached the engine and no step followed
    with pytest.raises(ValueError, match=r"needs `opt.step\(\)` after each `self.manual_backward\(loss\)`"):
        registry._deepcompile_boundary(slot, automatic=False)


def test_deepcompile_stage3_shape_error_names_the_eager_layer(monkeypatch):
    """With DeepCompile at stage 3, a layer that runs eagerly fails on its partitioned weight (measured on an H100:
    "mat2 must be a matrix, got 1-D tensor"). That error gets the cause and the fix; other errors (out of memory, ...)
    pass unchanged."""
    from lightning.pytorch.strategies import ParallelStrategy

    strategy = ZeroStrategy(stage=3, compile="deepcompile")
    strategy.engines.deepcompile = True

    def failing(error):
        def training_step(self, *args, **kwargs):
            raise error
        return training_step

    partitioned = RuntimeError("mat2 must be a matrix, got 1-D tensor")
    monkeypatch.setattr(ParallelStrategy, "training_step", failing(partitioned), raising=False)
    with pytest.raises(ValueError, match=r"the forward failed \(mat2 must be a matrix.*a layer that runs eagerly"
                                         r".*compile=True") as caught:
        strategy.training_step()
    assert isinstance(caught.value.__cause__, RuntimeError)
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("NCCL timeout")):
        monkeypatch.setattr(ParallelStrategy, "training_step", failing(error), raising=False)
        with pytest.raises(type(error), match=str(error)):
            strategy.training_step()


@pytest.mark.parametrize("deepcompile", [True, False])
def test_evaluation_with_deepcompile_engines_runs_the_networks_eagerly(monkeypatch, deepcompile):
    """A no-grad forward through DeepCompile's backend during training left its reduce buckets inconsistent and the
    next backward aborted the process (H100, stages 2-3). Validation during a DeepCompile fit, and validate/test/predict
    on its engines afterwards, run the compiled networks eagerly; other runs keep their compiled graphs."""
    from lightning.pytorch.strategies import ParallelStrategy

    from lightning_zero.compiling import compile_models

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # earlier tests' graphs
    net = torch.nn.Linear(4, 1)
    compile_models([(net, False)], {"backend": "aot_eager"})
    strategy = ZeroStrategy(stage=2)
    strategy.engines.deepcompile = deepcompile
    for hook in ("validation_step", "test_step", "predict_step"):
        monkeypatch.setattr(ParallelStrategy, hook, lambda self, x: net(x), raising=False)
        with torch.no_grad():
            out = getattr(strategy, hook)(torch.randn(2, 4))
        compiled_graph = out.grad_fn is not None or torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
        assert compiled_graph != deepcompile, hook
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    with torch.no_grad():  # outside the evaluation hooks, the network is compiled as before
        net(torch.randn(2, 4))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_resumed_deepcompile_counts_its_pass_schedule_from_the_restored_step(monkeypatch):
    """DeepCompile launches a pass set when the engine's global_steps equals its step (0, then 5 at stage 3); an engine
    restored at step 4 never saw step 0 and its first compile failed inside DeepSpeed (H100). The schedule is shifted
    to the restored step; a fresh run (step 0) keeps it."""
    from collections import deque

    from deepspeed.compile import backend

    from lightning_zero.compiling import resume_deepcompile_schedule

    schedule = [(0, ["gather_release"]), (5, ["gather_release", "prefetch"])]
    monkeypatch.setattr(backend, "remaining_schedule", deque(schedule))
    resume_deepcompile_schedule(0)
    assert list(backend.remaining_schedule) == schedule
    resume_deepcompile_schedule(4)
    assert list(backend.remaining_schedule) == [(4, ["gather_release"]), (9, ["gather_release", "prefetch"])]


def test_stage3_deepcompile_evaluation_warns_once_that_it_gathers_the_whole_model(monkeypatch):
    """DeepSpeed's ZeRO-3 eager fallback keeps what an eager forward touched gathered until the next forward: an
    evaluation pass with a DeepCompile stage-3 engine holds the whole model on each GPU. Say so once, with the size
    and the ways out."""
    from lightning.pytorch.strategies import ParallelStrategy

    from helpers import Regressor

    monkeypatch.setattr(ParallelStrategy, "validation_step", lambda self: None, raising=False)
    strategy = ZeroStrategy(stage=3, compile="deepcompile")
    strategy._lightning_module = Regressor()  # 433 fp32 parameters
    strategy.engines.deepcompile = True
    with pytest.warns(UserWarning, match=r"each GPU holds the whole model during this pass \(433 parameters, 0.00 GiB\)"
                                         r".*limit_val_batches=0.*new Trainer"):
        strategy.validation_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.validation_step()  # once per strategy
        strategy.engines.deepcompile = False
        ZeroStrategy(stage=3).validation_step()  # no DeepCompile: nothing to say
