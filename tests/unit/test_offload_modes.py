"""Issue 18's offload modes without processes: partial optimizer offload (``offload_optimizer_ratio``), bf16 master
weights / optimizer states and ZenFlow. The keywords reach DeepSpeed's keys (Python and LightningCLI), every
combination DeepSpeed 0.19 refuses mid-setup (or would silently not apply) is one ZeroConfigError up front, the
optimizer DeepSpeed steps is the one it needs, and the sub-group arithmetic of partial offload."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed


import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_zero import ZeroConfigError, ZeroStrategy
from lightning_zero.config import TrainerFlags, offload_ratio, resolve_ds_config
from lightning_zero.offload import build_stepped_optimizer, effective_offload_ratio, route_zero_grad

ZENFLOW = {"topk_ratio": 0.1, "select_strategy": "step", "select_interval": 4, "update_interval": 1,
           "overlap_step": True}
ADAMW = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}


def _resolve(precision: str = "32-true", device_type: str | None = None, **kwargs):
    strategy = ZeroStrategy(**kwargs)
    flags = TrainerFlags(precision=precision, world_size=2, device_type=device_type)
    return resolve_ds_config(strategy.user_config, strategy.knobs, flags)


# ----------------------------------------------------------------------------------------------------------------------
# The keywords reach DeepSpeed's keys
# ----------------------------------------------------------------------------------------------------------------------


def test_keywords_reach_deepspeed_keys():
    ds = _resolve("bf16-mixed", stage=3, offload_optimizer="cpu", offload_optimizer_ratio=0.3,
                  bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "ratio": 0.3}
    assert ds["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    assert offload_ratio(ds) == 0.3
    # ZenFlow runs under DeepSpeed's managed accumulation (unmanaged, its selective AdamW steps a None gradient), on
    # a GPU and on CPU alike; every other config keeps the Trainer's boundary
    # (overlap_step only on a GPU), with an update interval of 1 or longer
    for device_type, zenflow in (("cuda", ZENFLOW), ("cpu", {**ZENFLOW, "overlap_step": False}),
                                 ("cuda", {**ZENFLOW, "update_interval": 4, "select_interval": 8})):
        zf = _resolve("bf16-mixed", device_type=device_type, stage=2, offload_optimizer="cpu", zenflow=zenflow,
                      config=ADAMW)
        assert zf["zero_optimization"]["zenflow"] == zenflow and zf["managed_gradient_accumulation"] is True
    assert ds["managed_gradient_accumulation"] is False
    assert offload_ratio(_resolve(stage=2, offload_optimizer="cpu")) == 1.0 and offload_ratio(_resolve(stage=2)) == 0


def test_the_same_keys_in_the_config_are_validated_the_same_way():
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}}
    with pytest.raises(ZeroConfigError, match=r"offload_optimizer.ratio=0.5 \(partial offload\) needs stage 3 \(stage"
                                              r" is 2\).*Use ZeroStrategy\(stage=3, ...\) or remove the ratio") as err:
        ZeroStrategy(config=config)
    assert "Assertion failed" not in str(err.value)  # DeepSpeed's own schema assert is replaced, not added to
    with pytest.raises(ZeroConfigError, match="bf16_optimizer_states=True needs bf16_master_weights_and_grads"):
        ZeroStrategy(config={"bf16": {"bf16_optimizer_states": True}})


def _cli_knobs(*strategy_args: str) -> dict:
    cli = LightningCLI(BoringModel, run=False, save_config_callback=None, args=[
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
        "--trainer.strategy=lightning_zero.ZeroStrategy", "--trainer.strategy.offload_optimizer=cpu",
        *strategy_args])
    return cli.trainer.strategy.knobs


def test_cli_options_reach_the_deepspeed_config(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    knobs = _cli_knobs("--trainer.strategy.stage=3", "--trainer.strategy.offload_optimizer_ratio=0.25",
                       "--trainer.strategy.bf16_master_weights_and_grads=true",
                       "--trainer.strategy.bf16_optimizer_states=true")
    assert knobs["zero_optimization"]["offload_optimizer"]["ratio"] == 0.25
    assert knobs["bf16"] == {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    knobs = _cli_knobs("--trainer.strategy.stage=2",  # ZenFlow: stages 1-2
                       '--trainer.strategy.zenflow={"topk_ratio": 0.2, "select_strategy": "step", "select_interval":'
                       ' 2, "update_interval": 1}',
                       '--trainer.strategy.config={"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}')
    assert knobs["zero_optimization"]["zenflow"]["topk_ratio"] == 0.2


# ----------------------------------------------------------------------------------------------------------------------
# Refused up front, quoting the input and naming the fix
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, True, "0.5"])
def test_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ZeroConfigError, match=rf"ZeroStrategy\(offload_optimizer_ratio={ratio!r}\) must be a number in"
                                              r" \(0, 1\].*leave out offload_optimizer"):
        ZeroStrategy(stage=3, offload_optimizer="cpu", offload_optimizer_ratio=ratio)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=3, offload_optimizer_ratio=0.5), r"offload_optimizer_ratio \(needs offload_optimizer\)"),
    (dict(stage=1, offload_optimizer="cpu", offload_optimizer_ratio=0.5), r"needs stage 3 \(stage is 1\)"),
    (dict(stage=3, offload_optimizer="nvme", nvme_path="/tmp", offload_optimizer_ratio=0.5),
     r"offload_optimizer.device='nvme'.*Use offload_optimizer=\"cpu\""),
    (dict(stage=3, offload_optimizer="cpu", offload_optimizer_ratio=0.5, config={"optimizer": {"type": "SGD"}}),
     r"optimizer.type='SGD': DeepSpeed's hybrid step supports DeepSpeedCPUAdam only"),
    (dict(stage=0, bf16_master_weights_and_grads=True, bf16_optimizer_states=True),
     r"needs ZeRO stage 1, 2 or 3 \(stage is 0\)"),
    (dict(stage=2, bf16_optimizer_states=True), r"Add ZeroStrategy\(bf16_master_weights_and_grads=True\)"),
    (dict(stage=3, bf16_master_weights_and_grads=True),
     r"without bf16_optimizer_states keeps fp32 Adam moments.*Add offload_optimizer=\"cpu\", or"
     r" bf16_optimizer_states=True"),
    (dict(stage=2, bf16_master_weights_and_grads="yes"), r"bf16_master_weights_and_grads='yes'\) must be True or"),
    (dict(stage=0, zenflow=ZENFLOW), r"zenflow needs ZeRO stage 1 or 2 \(stage is 0\)"),
    (dict(stage=3, offload_optimizer="cpu", zenflow=ZENFLOW, config=ADAMW),
     r"zenflow needs ZeRO stage 1 or 2 \(stage is 3\).*engine_stage3.py.*Use ZeroStrategy\(stage=2"),
    (dict(stage=2, zenflow=ZENFLOW), r"zenflow needs the optimizer offloaded to the CPU.*offload_optimizer is not"
                                     r" set\). Add ZeroStrategy\(offload_optimizer=\"cpu\"\)"),
    (dict(stage=2, offload_optimizer="cpu", zenflow={**ZENFLOW, "select_strategy": "auto"}),
     r"select_strategy='auto', select_interval=4.*Set \"select_strategy\": \"step\""),
    (dict(stage=2, offload_optimizer="cpu", zenflow={"topk_ratio": 0.1}),
     r"(?s)select_interval='auto'.*update_interval='auto'.*Set an integer, e.g. \"update_interval\": 4"),
    (dict(stage=2, offload_optimizer="cpu", zenflow={**ZENFLOW, "update_interval": 8}),
     r"select_interval=4 < update_interval=8.*Set \"select_interval\" >= 8"),
    (dict(stage=2, offload_optimizer="cpu", zenflow={**ZENFLOW, "offload": True}),
     r"zenflow.offload=True needs zero_optimization.overlap_comm=True"),
    (dict(stage=2, offload_optimizer="cpu", compute_grad_norm=False, zenflow=ZENFLOW),
     r"zenflow does not work with compute_grad_norm=False"),
    (dict(stage=2, offload_optimizer="cpu", zenflow={**ZENFLOW, "topk_ratio": 1.0}),
     r"'zero_optimization.zenflow.topk_ratio' = 1.0: Input should be less than 1"),
])
def test_combinations_deepspeed_refuses_fail_at_construction(kwargs, match):
    with pytest.raises(ZeroConfigError, match=match):
        ZeroStrategy(**kwargs)


def test_all_problems_in_one_error():
    with pytest.raises(ZeroConfigError) as err:
        ZeroStrategy(stage=0, bf16_optimizer_states=True, zenflow={"topk_ratio": 0.1})
    assert str(err.value).count("\n  - ") == 7, str(err.value)


@pytest.mark.parametrize("precision, device_type, kwargs, match", [
    ("32-true", None, dict(stage=2, bf16_master_weights_and_grads=True, bf16_optimizer_states=True),
     r"needs Trainer\(precision=\"bf16-mixed\"\) or \"bf16-true\" \(precision is '32-true'\)"),
    ("16-mixed", None, dict(stage=2, offload_optimizer="cpu", bf16_master_weights_and_grads=True),
     r"\(precision is '16-mixed'\)"),
    ("32-true", "cpu", dict(stage=2, offload_optimizer="cpu", zenflow=ZENFLOW, config=ADAMW),
     r"zenflow.overlap_step=True on the CPU accelerator.*Set \"overlap_step\": false on CPU"),
])
def test_combinations_with_the_trainer_fail_at_resolution(precision, device_type, kwargs, match):
    with pytest.raises(ZeroConfigError, match=match):
        _resolve(precision, device_type, **kwargs)


def test_zenflow_refuses_the_trainers_accumulation():
    # under managed accumulation every backward ends a ZenFlow iteration: micro-batches would overwrite each other
    strategy = ZeroStrategy(stage=2, offload_optimizer="cpu", zenflow=ZENFLOW, config=ADAMW)
    flags = TrainerFlags(precision="bf16-mixed", world_size=2, accumulate_grad_batches=2, device_type="cpu")
    with pytest.raises(ZeroConfigError, match=r"zenflow with Trainer\(accumulate_grad_batches=2\).*overwrite each"
                                              r" other's gradients.*Use accumulate_grad_batches=1"):
        resolve_ds_config(strategy.user_config, strategy.knobs, flags)


def _zenflow_config(stage: int = 2) -> dict:
    return {**ADAMW, "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}, "zenflow": ZENFLOW}}


def test_zenflow_refuses_the_parameter_shapes_deepspeed_fails_on():
    from lightning_zero.offload import check_zenflow_parameters

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))  # 2-D with >= 2 rows and 1-D biases: stepped
    check_zenflow_parameters(net, _zenflow_config())
    head = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1), nn.Conv1d(2, 4, 3))
    with pytest.raises(ZeroConfigError, match=r"1-D or 2-D with at least two rows; it fails in the first backward on"
                                              r" 1.weight \(1, 16\), 2.weight \(4, 2, 3\)\. .*Freeze them"):
        check_zenflow_parameters(head, _zenflow_config())
    head[1].weight.requires_grad_(False)
    head[2].weight.requires_grad_(False)
    check_zenflow_parameters(head, _zenflow_config())  # frozen parameters are not ZenFlow's
    head[1].weight.requires_grad_(True)
    check_zenflow_parameters(head, {**ADAMW, "zero_optimization": {"stage": 2}})  # without ZenFlow: any shape


@pytest.mark.parametrize("kwargs", [dict(offload_optimizer_ratio=0.5), dict(bf16_optimizer_states=True),
                                    dict(zenflow=ZENFLOW)])
def test_stage_auto_refuses_the_modes_it_does_not_plan(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ZeroConfigError, match=rf"stage=\"auto\"\) chooses.*cannot be combined with {name}="):
        ZeroStrategy(stage="auto", **kwargs)


def test_zenflow_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"ZeroStrategy\(zenflow=True\) must be a dict of DeepSpeed's zenflow keys"):
        ZeroStrategy(stage=2, offload_optimizer="cpu", zenflow=True)


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer DeepSpeed steps
# ----------------------------------------------------------------------------------------------------------------------


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(64)) for _ in range(2)]


# two sub-groups of 64 elements: ratio 0.5 splits them exactly (no granularity warning)
PARTIAL = {"zero_optimization": {"stage": 3, "sub_group_size": 64,
                                 "offload_optimizer": {"device": "cpu", "ratio": 0.5}}}


def test_partial_offload_refuses_optimizers_deepspeed_cannot_split():
    with pytest.raises(ValueError, match=r"offload_optimizer_ratio=0.5\) \(partial offload\).*SGD cannot be split"):
        build_stepped_optimizer(torch.optim.SGD(_params(), lr=0.1), {**PARTIAL, "zero_force_ds_cpu_optimizer": False})
    with pytest.raises(ValueError, match=r"steps the share kept on the GPU with torch AdamW.*Adam's L2 weight_decay"):
        build_stepped_optimizer(torch.optim.Adam(_params(), lr=0.1, weight_decay=0.1), PARTIAL)
    stepped = build_stepped_optimizer(torch.optim.Adam(_params(), lr=0.1), PARTIAL)  # no decay: the same update
    assert type(stepped).__name__ == "DeepSpeedCPUAdam" and not stepped.adam_w_mode


def test_bf16_optimizer_states_make_cpu_adam_keep_bf16_moments():
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              "bf16": {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}}
    stepped = build_stepped_optimizer(torch.optim.AdamW(_params(), lr=0.1), config)
    assert type(stepped).__name__ == "DeepSpeedCPUAdam" and stepped.fp32_optimizer_states is False
    config["bf16"]["bf16_optimizer_states"] = False
    assert build_stepped_optimizer(torch.optim.AdamW(_params(), lr=0.1), config).fp32_optimizer_states is True


def test_models_without_optimizer_get_neither_zenflow_nor_offloaded_optimizer():
    from lightning_zero.config import inference_config

    ds = {**ADAMW, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "zenflow": ZENFLOW}}
    zero = inference_config(ds)["zero_optimization"]
    assert "zenflow" not in zero and "offload_optimizer" not in zero and zero["stage"] == 3


def test_zenflow_needs_the_optimizer_in_the_config():
    # ZenFlow's selective AdamW reads optimizer.params; DeepSpeed builds its ZenFlowCPUAdam from that block
    with pytest.raises(ZeroConfigError, match=r"zenflow needs the optimizer in the DeepSpeed config.*return None from"
                                              r" configure_optimizers"):
        ZeroStrategy(stage=2, offload_optimizer="cpu", zenflow=ZENFLOW)
    ZeroStrategy(stage=2, offload_optimizer="cpu", zenflow=ZENFLOW, config=ADAMW)


# ----------------------------------------------------------------------------------------------------------------------
# Partial offload counts sub-groups, not elements (stage3.py _create_fp32_partitions)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, numels, sub_group_size, expected", [
    (0.5, [[100, 100]], 10**9, 1.0),  # one sub-group: all of it offloaded, whatever the ratio below 1
    (0.5, [[100, 100]], 100, 0.5),
    (0.25, [[10] * 8], 10, 0.25),
    (0.4, [[64, 8, 128, 8, 8, 1]], 50, 153 / 217),  # the distributed test's split: (64), (8, 128), (8, 8, 1)
    (0.5, [[30, 30], [40]], 30, 70 / 100),  # sub-groups per param group: (30) (30) | (40) -> the last two
])
def test_effective_offload_ratio(ratio, numels, sub_group_size, expected):
    assert effective_offload_ratio(ratio, numels, sub_group_size) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------------
# The estimator's figures for the modes (hand-computed from DeepSpeed's estimators' terms)
# ----------------------------------------------------------------------------------------------------------------------


def test_estimate_of_partial_offload_and_low_precision_states():
    from lightning_zero.estimate import estimate_memory, estimate_offload_mode, optimizer_state_bytes

    p, layer = 8 * 10**8, 10**7
    rows = {(r.stage, r.offload_optimizer): r for r in estimate_memory(p, layer).rows if r.offload_parameters == "none"}
    # both with the process runtime and stage 3's setup copy; they differ by DeepSpeed's 16P x buffer 1.15
    host_none, host_all = rows[(3, "none")].cpu_bytes, rows[(3, "cpu")].cpu_bytes
    assert host_all - host_none == pytest.approx(p * 16 * 1.15, rel=1e-9)
    assert [optimizer_state_bytes(*f) for f in ((False, False), (True, False), (True, True))] == [16, 12, 8]
    # ratio 0.5 over 4 equal sub-groups: exactly half of the 16 optimizer bytes per parameter on each side
    half = estimate_offload_mode(p, layer, offload_ratio=0.5, sub_group_size=p // 4)
    assert half.offload_ratio == 0.5
    assert half.gpu_bytes == 4 * layer + 2 * p + 8 * p
    assert half.cpu_bytes == pytest.approx(host_none + 0.5 * (host_all - host_none), rel=1e-9)
    # the same ratio with DeepSpeed's default sub_group_size (1e9): one sub-group, all of it on the host
    assert estimate_offload_mode(p, layer, offload_ratio=0.5).offload_ratio == 1.0
    # bf16 master weights + states: 8 of 16 bytes on the host; no offload: 8 on the GPU
    full = estimate_offload_mode(p, layer, bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    assert full.gpu_bytes == 4 * layer + 2 * p
    assert full.cpu_bytes == pytest.approx(host_none + (host_all - host_none) * 8 / 16, rel=1e-9)
    assert estimate_offload_mode(p, layer, offload_ratio=0, bf16_master_weights_and_grads=True,
                                 bf16_optimizer_states=True).gpu_bytes == 4 * layer + 2 * p + 8 * p
    with pytest.raises(ValueError, match="partial offload is stage 3 only"):
        estimate_offload_mode(p, layer, stage=2, offload_ratio=0.5)


def test_estimate_command_prints_the_modes(capsys):
    from lightning_zero.cli import main

    assert main(["estimate", "--params", "8e8", "--largest-layer", "1e7", "--offload-ratio", "0.25",
                 "--sub-group-size", "8e7"]) == 0
    out = capsys.readouterr().out
    # 10 sub-groups: int(0.75 x 10) = 7 stay on the GPU, 3 of 10 go to the host
    assert "Offload modes" in out and "    3            30%  fp32" in out
    assert main(["estimate", "--params", "8e8", "--largest-layer", "1e7", "--bf16-optimizer-states"]) == 2
    assert "--bf16-optimizer-states needs --bf16-master-weights too" in capsys.readouterr().err


def test_zero_grad_on_the_config_optimizer_keeps_zero_offloads_gradient_buffer(one_rank):
    # The config's optimizer (the face Lightning sees) steps DeepSpeed's fp32 partitions, whose .grad is ZeRO-Offload's
    # CPU gradient buffer at stages 1-2: torch's zero_grad would drop it and the next backward fail. Routed, it clears
    # the model's gradients through DeepSpeed's optimizer and training goes on.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    config = {**ADAMW, "train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    engine, *_ = one_rank.initialize(model=net, model_parameters=net.parameters(), config=config)
    face = engine.basic_optimizer
    route_zero_grad(face, engine, config)
    buffers = [p.grad for g in face.param_groups for p in g["params"]]
    x, before = torch.randn(4, 8), [p.detach().clone() for p in net.parameters()]
    for _ in range(2):
        face.zero_grad()  # what Lightning calls before each backward
        kept = [p.grad for g in face.param_groups for p in g["params"]]
        assert all(a is b for a, b in zip(kept, buffers, strict=True)), kept  # the same tensors
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    engine.destroy()


def test_zenflow_parameter_views_keep_the_weights_and_step_like_adamw(one_rank):
    # Contract of _compat.deepspeed.fix_zenflow_parameter_views on a real one-rank ZenFlow engine: DeepSpeed 0.19.8
    # flattens ZenFlow's 2-D weights transposed but views them untransposed (stage_1_and_2.py
    # _update_model_bit16_weights), so deepspeed.initialize leaves W.t().contiguous().view(W.shape) in the model. If
    # a DeepSpeed release stops doing so, the first assertion fails: drop the fix then.
    from lightning_zero._compat.deepspeed import fix_zenflow_parameter_views

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    original = {k: v.clone() for k, v in net.state_dict().items()}
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
              "train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                    "zenflow": {**ZENFLOW, "topk_ratio": 0.5, "overlap_step": False}}}
    engine, *_ = one_rank.initialize(model=net, model_parameters=net.parameters(), config=config)
    w = original["0.weight"]
    assert torch.equal(net[0].weight.detach(), w.t().contiguous().view(w.shape))  # DeepSpeed's scrambled view
    fix_zenflow_parameter_views(engine.optimizer)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in original.items())
    # one step: the selected columns' fresh selective AdamW and CPU Adam elsewhere both take AdamW's first step
    reference = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    reference.load_state_dict(original)
    x = torch.randn(4, 8)
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    reference(x).pow(2).mean().backward()
    adamw.step()
    diff = max((a - b).abs().max().item() for a, b in zip(net.state_dict().values(), reference.state_dict().values()))
    assert 0 < (net[0].weight - w).abs().max() and diff <= 1e-6, diff
    engine.destroy()


def test_zenflow_selective_adamw_restarts_its_steps_with_its_moments(one_rank):
    # Contract of _compat.deepspeed.restart_zenflow_selective_steps on a real one-rank ZenFlow engine: DeepSpeed 0.19.8
    # zeroes the selective AdamW's moments at each re-selection (clear_selected_mv) and keeps its step count. If a
    # DeepSpeed release restarts the steps itself, the first assertion on `kept` fails: drop the wrapper then.
    from lightning_zero._compat.deepspeed import restart_zenflow_selective_steps

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
              "train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                    "zenflow": {**ZENFLOW, "topk_ratio": 0.5, "overlap_step": False}}}
    engine, *_ = one_rank.initialize(model=net, model_parameters=net.parameters(), config=config)
    for _ in range(3):
        engine.backward(engine(torch.randn(4, 8)).pow(2).mean())
        engine.step()
    selective = engine.optimizer.selective_optimizer
    steps = [s["step"] for s in selective.state.values() if "step" in s]
    assert steps and all(float(s) > 0 for s in steps), steps
    selective.clear_selected_mv()  # DeepSpeed's own: moments zeroed, steps kept
    kept = [float(s["step"]) for s in selective.state.values() if "step" in s]
    assert all(k > 0 for k in kept), "DeepSpeed's clear_selected_mv now restarts the step count itself"
    restart_zenflow_selective_steps(engine.optimizer)
    selective.clear_selected_mv()
    for state in selective.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    with pytest.raises(RuntimeError, match="selective_optimizer.clear_selected_mv"):
        restart_zenflow_selective_steps(torch.optim.SGD(net.parameters(), lr=1.0))
    engine.destroy()
