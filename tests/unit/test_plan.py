"""The engine plan (lightning_zero/plan.py): every engine's model, optimizer and final DeepSpeed config, decided
without DeepSpeed (no engine, no process group); the last test builds a planned engine (build_engines) on one rank."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_zero.config import TrainerFlags, resolve_knobs
from lightning_zero.engines import EngineRegistry
from lightning_zero.plan import build_engines, plan_engines, resolve_model_config


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    """Three repeated blocks and an embedding: stage 3 fetches each block as one unit (granularity 276)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.table = nn.Embedding(1000, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


class Gan(nn.Module):
    def __init__(self, teacher: bool = False) -> None:
        super().__init__()
        self.generator, self.discriminator = Net(), Net()
        if teacher:
            self.teacher = Net().requires_grad_(False)


def model_config(stage: int = 2, user: dict | None = None, deepcompile: bool = False, precision: str = "bf16-mixed",
                 world_size: int = 2, **knobs) -> dict:
    flags = TrainerFlags(precision=precision, accumulate_grad_batches=2, gradient_clip_val=0.5,
                         gradient_clip_algorithm="norm", micro_batch_size=4, world_size=world_size)
    return resolve_model_config(user or {}, resolve_knobs(stage, **knobs), flags, deepcompile=deepcompile)


def adam(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=1e-3)


def test_one_model_one_optimizer_is_one_engine_with_the_model_config():
    config = model_config(stage=2)
    root = Net()
    opt = adam(root)
    (plan,) = plan_engines(config, root, [opt])
    assert (plan.name, plan.module, plan.face, plan.train, plan.config_optimizer) == ("model", root, opt, True, False)
    assert plan.config == config and plan.config is not config
    assert plan.config["managed_gradient_accumulation"] is False  # Lightning owns the accumulation boundary
    assert plan.config["bf16"]["check_grad_overflow"] is False  # the speed defaults are in (tuning.py)
    assert not plan.block_fetch and plan.notes == ()  # block fetch is a stage-3 setting


def test_stage3_single_model_fetches_its_blocks_as_units():
    config = model_config(stage=3)
    root = Net()
    (plan,) = plan_engines(config, root, [adam(root)])
    assert plan.block_fetch
    assert plan.config["zero_optimization"]["stage3_module_granularity_threshold"] == 276
    assert "stage3_module_granularity_threshold" not in config["zero_optimization"]  # the model config is unchanged
    (note,) = plan.notes
    assert note.startswith("ZeroStrategy: stage 3 gathers the parameters of each of these modules at once (Block x3)")


@pytest.mark.parametrize("stage", [2, 3])
def test_gan_is_two_engines_without_block_fetch(stage):
    config = model_config(stage=stage)
    root = Gan()
    g, d = adam(root.generator), adam(root.discriminator)
    plans = plan_engines(config, root, [g, d])
    assert [(p.name, p.module, p.face, p.train) for p in plans] == [
        ("generator", root.generator, g, True), ("discriminator", root.discriminator, d, True)]
    for plan in plans:
        # a GAN calls its discriminator twice per step, which a one-unit block does not support
        assert not plan.block_fetch and plan.notes == ()
        assert plan.config == config
    assert plans[0].config is not plans[1].config
    assert plans[0].config["zero_optimization"] is not plans[1].config["zero_optimization"]


def test_frozen_submodule_below_stage_3_gets_a_stage_0_inference_config():
    config = model_config(stage=2, offload_optimizer="cpu", user={"scheduler": {"type": "WarmupLR"}})
    root = Gan(teacher=True)
    plans = plan_engines(config, root, [adam(root.generator), adam(root.discriminator)])
    assert [p.name for p in plans] == ["generator", "discriminator", "frozen"]
    frozen = plans[-1]
    assert (frozen.module, frozen.face, frozen.train, frozen.config_optimizer) == (root.teacher, None, False, False)
    # DeepSpeed refuses ZeRO-1/2 without an optimizer: the frozen model is a plain stage-0 module
    assert frozen.config["zero_optimization"] == {"stage": 0}
    assert "scheduler" not in frozen.config and "scheduler" in plans[0].config
    assert config["zero_optimization"]["stage"] == 2 and "offload_optimizer" in config["zero_optimization"]


def test_frozen_submodule_at_stage_3_keeps_stage_3_without_the_optimizer_offload():
    config = model_config(stage=3, offload_optimizer="cpu", offload_parameters="cpu")
    root = Gan(teacher=True)
    frozen = plan_engines(config, root, [adam(root.generator), adam(root.discriminator)])[-1]
    zero = frozen.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in zero
    assert not frozen.block_fetch  # two trained models: per-layer fetching for every engine


def test_the_deepspeed_config_optimizer_trains_one_engine():
    config = model_config(stage=3, user={"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    root = Net()
    (plan,) = plan_engines(config, root, [])
    assert (plan.name, plan.module, plan.face, plan.train, plan.config_optimizer) == ("model", root, None, True, True)
    assert plan.config["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3}}
    assert plan.block_fetch and plan.config["zero_optimization"]["stage3_module_granularity_threshold"] == 276


def test_optimizer_from_both_places_or_none_is_refused():
    root = Net()
    with pytest.raises(ValueError, match=re.escape("Both `configure_optimizers` and the DeepSpeed config's"
                                                   " 'optimizer' block define an optimizer. Keep one")):
        plan_engines(model_config(user={"optimizer": {"type": "AdamW"}}), root, [adam(root)])
    with pytest.raises(ValueError, match=re.escape("No optimizer: `configure_optimizers` returned none and the"
                                                   " DeepSpeed config has no 'optimizer' block.")):
        plan_engines(model_config(), root, [])


def test_deepcompile_config_and_plan():
    config = model_config(stage=3, deepcompile=True, user={"compile": {"free_activation": True}})
    # DeepSpeed refuses its unmanaged accumulation with DeepCompile: the registry sets the boundary per backward
    assert config["managed_gradient_accumulation"] is True
    assert config["compile"] == {"free_activation": True, "deepcompile": True}
    assert model_config(stage=3)["managed_gradient_accumulation"] is False and "compile" not in model_config(stage=3)
    root = Net()
    (plan,) = plan_engines(config, root, [adam(root)], deepcompile=True)
    assert plan.train and plan.config["compile"]["deepcompile"] is True
    # DeepCompile schedules the gathers itself: no block fetch units
    assert not plan.block_fetch and "stage3_module_granularity_threshold" not in plan.config["zero_optimization"]


def test_deepcompile_refuses_several_engines():
    root = Gan()
    with pytest.raises(ValueError, match=re.escape("needs one optimizer that trains every parameter of the"
                                                   " LightningModule") + ".*This module needs 2 engines \\(generator:"
                                                   " generator \\(optimizer 0\\); discriminator: discriminator"
                                                   " \\(optimizer 1\\)\\)"):
        plan_engines(model_config(stage=2, deepcompile=True), root, [adam(root.generator), adam(root.discriminator)],
                     deepcompile=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_evaluation_is_one_engine_without_optimizer(stage):
    config = model_config(stage=stage, deepcompile=True, user={"optimizer": {"type": "AdamW"}})
    root = Net()
    (plan,) = plan_engines(config, root, [], deepcompile=True, fitting=False)
    assert (plan.name, plan.module, plan.face, plan.train, plan.config_optimizer) == ("model", root, None, False, False)
    assert "optimizer" not in plan.config and "compile" not in plan.config  # DeepCompile compiles a trained engine
    if stage < 3:
        assert plan.config["zero_optimization"] == {"stage": 0} and not plan.block_fetch
    else:  # evaluation fetches blocks as units, also after a DeepCompile fit
        assert plan.block_fetch and plan.config["zero_optimization"]["stage3_module_granularity_threshold"] == 276


def test_planning_mutates_neither_the_config_nor_the_model():
    config = model_config(stage=3, offload_optimizer="cpu")
    before = copy.deepcopy(config)
    root = Gan(teacher=True)
    state = {k: v.clone() for k, v in root.state_dict().items()}
    flags = [(n, p.requires_grad) for n, p in root.named_parameters()]
    plans = plan_engines(config, root, [adam(root.generator), adam(root.discriminator)])
    plans += plan_engines(config, root.generator, [adam(root.generator)])
    for plan in plans:
        plan.config["zero_optimization"]["stage"] = 0
        plan.config.setdefault("bf16", {})["enabled"] = False
    assert config == before
    assert all(torch.equal(state[k], v) for k, v in root.state_dict().items())
    assert [(n, p.requires_grad) for n, p in root.named_parameters()] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in root.modules())
    with pytest.raises(AttributeError):  # frozen dataclass
        plans[0].config = {}  # type: ignore[misc]


def test_planning_does_not_import_deepspeed():
    code = (
        "import sys, json\n"
        "import torch\n"
        "from lightning_zero import plan, tuning\n"
        "net = torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
        "config = {'zero_optimization': {'stage': 3}, 'gradient_clipping': 0.0, 'bf16': {'enabled': True}}\n"
        "plans = plan.plan_engines(tuning.resolve_speed_defaults(config, world_size=1), net, [torch.optim.SGD(net.parameters())])\n"
        "plans += plan.plan_engines(config, net, [], fitting=False)\n"
        "print(json.dumps([len(plans), sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, []]


def test_build_registers_the_config_optimizers_engine_once(one_rank):
    """build_engines on a real one-rank stage-3 engine: the optimizer DeepSpeed built from the config is the face,
    indexed once, and each block (fetch unit) has one call counter: a forward and a step run."""
    config = model_config(stage=3, precision="32-true", world_size=1,
                          user={"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    net, registry = Net(), EngineRegistry()
    (slot,) = build_engines(plan_engines(config, net, []), registry, torch.device("cpu"))
    try:
        assert slot.face is not None and slot.face is slot.basic_optimizer
        assert registry.trained == [slot] and registry.for_optimizer(slot.face) is slot
        assert len(registry._counter_hooks) == 3  # one per Block
        loss = slot.engine(torch.randn(4, 8))  # a second counter per unit would refuse this first call
        registry.backward(loss)
        registry.step(slot.face)
        assert slot.engine.global_steps == 1
    finally:
        registry.release()
