"""lightning_zero.offload: the optimizer DeepSpeed steps when offloading, NVMe checks, and the offload / ZeRO++ errors
ZeroStrategy raises before any process starts."""

from __future__ import annotations

import logging
import os
import re
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import lightning as L
import pytest
import torch
from torch import nn

from lightning_zero import ZeroConfigError, ZeroStrategy
from lightning_zero import offload
from lightning_zero.config import resolve_knobs, merge_knobs
from lightning_zero.engines import EngineSlot
from lightning_zero.offload import build_stepped_optimizer, check_nvme, count_parameters, nvme_swap_bytes

CPU_OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def _params(n: int = 2) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(64)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer DeepSpeed steps
# ----------------------------------------------------------------------------------------------------------------------


def test_without_optimizer_offload_the_face_is_cloned() -> None:
    face = torch.optim.AdamW(_params(), lr=0.1)
    stepped = build_stepped_optimizer(face, {"zero_optimization": {"stage": 2}})
    assert type(stepped) is torch.optim.AdamW and stepped is not face
    assert stepped.param_groups[0]["params"] == face.param_groups[0]["params"]


@pytest.mark.parametrize(("make", "adamw_mode"), [
    (lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), True),
    (lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), False),
    (lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                decoupled_weight_decay=True), True),
])
def test_offloaded_adam_becomes_deepspeed_cpu_adam(make, adamw_mode: bool, caplog) -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    a, b = _params()
    face = make([{"params": [a]}, {"params": [b], "lr": 1e-3, "weight_decay": 0.0}])
    with caplog.at_level(logging.INFO):
        stepped = build_stepped_optimizer(face, CPU_OFFLOAD)
    assert type(stepped) is DeepSpeedCPUAdam and stepped.adam_w_mode is adamw_mode
    for face_group, group in zip(face.param_groups, stepped.param_groups):
        assert group["params"] == face_group["params"]
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert group[key] == face_group[key], key
    name = type(face).__name__
    assert [r.getMessage() for r in caplog.records if "DeepSpeedCPUAdam" in r.getMessage()] == [
        f"ZeroStrategy: the optimizer is offloaded to cpu, so DeepSpeedCPUAdam(adamw_mode={adamw_mode}) steps in place"
        f" of your {name}, with the same hyperparameters (lr=0.003, betas=(0.8, 0.95), eps=1e-06, weight_decay=0.1);"
        f" your {name} stays the optimizer Lightning and your schedulers see."]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the face never steps
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_cpu_adam_follows_the_face_and_matches_torch(cls) -> None:
    """The slot's hyperparameter sync (a scheduler halving lr on the face) reaches DeepSpeedCPUAdam, and its steps
    match torch's own (Adam)W on the same gradients."""
    reference = _params(1)
    ours = [nn.Parameter(p.detach().clone()) for p in reference]
    torch_opt = cls(reference, lr=1e-2, weight_decay=0.05)
    face = cls(ours, lr=1e-2, weight_decay=0.05)
    stepped = build_stepped_optimizer(face, CPU_OFFLOAD)
    slot = EngineSlot("model", nn.Module(), SimpleNamespace(basic_optimizer=stepped), face)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (torch_opt, face)]
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        grad = torch.randn(64, generator=g)
        reference[0].grad, ours[0].grad = grad.clone(), grad.clone()
        slot.sync_hyperparameters()  # what EngineRegistry.step does before engine.step()
        torch_opt.step()
        stepped.step()
        for s in schedulers:
            s.step()
    assert stepped.param_groups[0]["lr"] == 1e-2 / 8  # synced before the last step
    slot.sync_hyperparameters()
    assert stepped.param_groups[0]["lr"] == face.param_groups[0]["lr"] == 1e-2 / 16
    assert (reference[0] - ours[0]).abs().max().item() <= 1e-6


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"amsgrad": True}, "amsgrad=True (DeepSpeedCPUAdam has no AMSGrad)"),
    ({"maximize": True}, "maximize=True (minimise the negated loss instead)"),
    ({"lr": torch.tensor(0.01)}, "a Tensor lr/eps/weight_decay (pass floats)"),
])
def test_unsupported_adam_options_are_refused(kwargs, problem: str) -> None:
    face = torch.optim.AdamW(_params(), **kwargs)
    with pytest.raises(ValueError, match=re.escape(
            f"ZeroStrategy(offload_optimizer='cpu') steps your AdamW with DeepSpeedCPUAdam, which does not support"
            f" {problem}. Change the optimizer's arguments, or do not offload the optimizer.")):
        build_stepped_optimizer(face, CPU_OFFLOAD)


def test_mixed_weight_decay_kinds_are_refused() -> None:
    a, b = _params()
    face = torch.optim.Adam([{"params": [a]}, {"params": [b], "decoupled_weight_decay": True}])
    with pytest.raises(ValueError, match="param groups that mix decoupled and L2 weight decay"):
        build_stepped_optimizer(face, CPU_OFFLOAD)


def test_other_optimizers_are_refused_with_both_ways_out() -> None:
    face = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=re.escape(
            "ZeroStrategy(offload_optimizer='cpu') steps the optimizer on the CPU, where DeepSpeed uses its own"
            " DeepSpeedCPUAdam; SGD cannot be translated to it. Use torch.optim.Adam or AdamW (ZeroStrategy then steps"
            " DeepSpeedCPUAdam with the same hyperparameters), or keep SGD with a slower CPU step by adding"
            " \"zero_force_ds_cpu_optimizer\": false to the DeepSpeed config (ZeroStrategy(config={...})).")):
        build_stepped_optimizer(face, CPU_OFFLOAD)


def test_other_optimizers_are_kept_when_deepspeed_allows_it(caplog) -> None:
    face = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    with caplog.at_level(logging.INFO):
        stepped = build_stepped_optimizer(face, {**CPU_OFFLOAD, "zero_force_ds_cpu_optimizer": False})
    assert type(stepped) is torch.optim.SGD and stepped.param_groups[0]["momentum"] == 0.9
    assert "your SGD steps there as it is (\"zero_force_ds_cpu_optimizer\": false)" in caplog.text


def test_deepspeed_cpu_adam_face_keeps_its_mode() -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    face = DeepSpeedCPUAdam(_params(), lr=0.02, adamw_mode=False, weight_decay=0.1)
    stepped = build_stepped_optimizer(face, CPU_OFFLOAD)
    assert type(stepped) is DeepSpeedCPUAdam and stepped is not face
    assert stepped.adam_w_mode is False and stepped.param_groups[0]["lr"] == 0.02


# ----------------------------------------------------------------------------------------------------------------------
# NVMe
# ----------------------------------------------------------------------------------------------------------------------


def _nvme_config(path, precision_section=None, optimizer=True, parameters=True) -> dict:
    config = merge_knobs({}, resolve_knobs(stage=3, offload_optimizer="nvme" if optimizer else "cpu",
                                           offload_parameters="nvme" if parameters else None, nvme_path=str(path)))
    if precision_section:
        config[precision_section] = {"enabled": True}
    return config


def test_nvme_swap_bytes_by_hand(tmp_path) -> None:
    # 1,000,003 parameters over 8 ranks: ceil(1,000,003 / 8) = 125,001 per rank; 4 ranks on this node -> 500,004.
    # optimizer: 16 bytes each = 8,000,064; bf16 parameters: 2 bytes each = 1,000,008; fp32 parameters: 2,000,016.
    per_node = 500_004
    bf16 = nvme_swap_bytes(_nvme_config(tmp_path, "bf16"), 1_000_003, ranks_on_node=4, world_size=8)
    assert bf16 == {str(tmp_path): 16 * per_node + 2 * per_node} == {str(tmp_path): 9_000_072}
    fp32 = nvme_swap_bytes(_nvme_config(tmp_path), 1_000_003, ranks_on_node=4, world_size=8)
    assert fp32 == {str(tmp_path): 8_000_064 + 2_000_016}
    only_params = nvme_swap_bytes(_nvme_config(tmp_path, optimizer=False), 1_000_003, ranks_on_node=4, world_size=8)
    assert only_params == {str(tmp_path): 2_000_016}
    assert nvme_swap_bytes(CPU_OFFLOAD, 10**9, 8, 8) == {}


def test_check_nvme_passes_for_a_writable_folder_with_room(tmp_path) -> None:
    check_nvme(_nvme_config(tmp_path), num_params=1000, ranks_on_node=2, world_size=2)
    check_nvme(CPU_OFFLOAD)  # nothing to check without NVMe


def test_nvme_path_must_exist(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"zero_optimization.offload_optimizer.nvme_path={str(missing)!r} does not exist. Create the folder on a local"
            f" NVMe drive (`mkdir -p {missing}`) or pass another ZeroStrategy(nvme_path=...).")):
        check_nvme(_nvme_config(missing))


def test_nvme_path_must_be_a_folder(tmp_path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ZeroConfigError, match=re.escape(f"nvme_path={str(file)!r} is a file, not a folder.")):
        check_nvme(_nvme_config(file))


def test_nvme_path_must_be_writable(tmp_path, monkeypatch) -> None:
    # (the tests run as root, which writes anywhere: fake the refusal the way the OS reports it)
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(offload.tempfile, "TemporaryFile", refuse)
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"zero_optimization.offload_optimizer.nvme_path={str(tmp_path)!r} is not writable (Permission denied)."
            " Choose a folder this user can write to, or fix its permissions.")):
        check_nvme(_nvme_config(tmp_path))


def test_nvme_needs_room_for_the_swap(tmp_path) -> None:
    # 3e9 bf16 parameters, 8 ranks, all on this node: 3e9 x (16 + 2) bytes = 54e9 bytes = 50.3 GiB; 10 GiB free
    config = _nvme_config(tmp_path, "bf16")
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"NVMe offload swaps about 50.3 GiB to nvme_path={str(tmp_path)!r} on this node (3,000,000,000 parameters,"
            " 8 of 8 ranks here), but only 10.0 GiB is free there. Free up space, use a larger drive, or offload less"
            " (offload_parameters=\"cpu\").")):
        check_nvme(config, 3 * 10**9, ranks_on_node=8, world_size=8,
                   disk_usage=lambda path: SimpleNamespace(free=10 * 2**30))
    # the node's share only: 2 of 16 ranks here -> 6.75e9 bytes = 6.3 GiB fits in 10 GiB
    check_nvme(config, 3 * 10**9, ranks_on_node=2, world_size=16,
               disk_usage=lambda path: SimpleNamespace(free=10 * 2**30))


def test_nvme_needs_the_async_io_op(tmp_path, monkeypatch) -> None:
    from deepspeed.ops.op_builder.cpu.async_io import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    monkeypatch.setattr(offload.shutil, "which", lambda name: "/usr/bin/dpkg" if name == "dpkg" else None)
    with pytest.raises(ZeroConfigError, match=re.escape(
            "NVMe offload needs DeepSpeed's async I/O op (async_io), which cannot be built here: the libaio headers and"
            " library are missing. Install them with `apt install libaio-dev` (as root), or set CFLAGS/LDFLAGS to where"
            " libaio is installed; or offload to \"cpu\" instead.")):
        check_nvme(_nvme_config(tmp_path))
    monkeypatch.setattr(offload.shutil, "which", lambda name: "/usr/bin/rpm" if name == "rpm" else None)
    with pytest.raises(ZeroConfigError, match=re.escape("`yum install libaio-devel`")):
        check_nvme(_nvme_config(tmp_path))


def test_count_parameters_counts_shared_tensors_once() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    assert count_parameters(model) == 20 + 10
    # stage-3 partitioned parameters report their full size in ds_numel
    partitioned = nn.Module()
    partitioned.w = nn.Parameter(torch.empty(0))
    partitioned.w.ds_numel = 1000
    assert count_parameters(partitioned) == 1000


# ----------------------------------------------------------------------------------------------------------------------
# ZeroStrategy: the errors come before any process starts
# ----------------------------------------------------------------------------------------------------------------------


def test_constructor_refuses_offload_at_the_wrong_stage() -> None:
    with pytest.raises(ValueError, match=re.escape("ZeroStrategy(offload_optimizer='cpu') needs stage 1, 2 or 3: stage"
                                                   " 0 has no optimizer partition to offload. Use ZeroStrategy(stage=2,"
                                                   " offload_optimizer=...).")):
        ZeroStrategy(stage=0, offload_optimizer="cpu")
    with pytest.raises(ZeroConfigError, match=re.escape("zero_optimization.offload_param.device='cpu' needs stage 3"
                                                        " (stage is 2)")):
        ZeroStrategy(stage=2, config={"zero_optimization": {"offload_param": {"device": "cpu"}}})
    with pytest.raises(ZeroConfigError, match=re.escape("offload_optimizer.device='nvme' at stage 1")):
        ZeroStrategy(stage=1, offload_optimizer="nvme", nvme_path="/tmp")
    with pytest.raises(ZeroConfigError, match="ZeRO\\+\\+ works at stage 3 only"):
        ZeroStrategy(stage=2, zero_hpz_partition_size=2)


def test_constructor_accepts_every_offload_keyword(tmp_path) -> None:
    strategy = ZeroStrategy(stage=3, offload_optimizer="nvme", offload_parameters="nvme", nvme_path=str(tmp_path),
                            pin_memory=False, optimizer_buffer_count=5, params_buffer_count=6, params_buffer_size=10**7,
                            max_in_cpu=0, aio={"block_size": 262144, "queue_depth": 4, "intra_op_parallelism": 2},
                            zero_hpz_partition_size=2, zero_quantized_weights=True, zero_quantized_gradients=True,
                            partition_activations=True, cpu_checkpointing=True)
    assert strategy.knobs["aio"] == {"block_size": 262144, "queue_depth": 4, "intra_op_parallelism": 2}
    assert strategy.knobs["zero_optimization"]["offload_param"] == {
        "device": "nvme", "nvme_path": str(tmp_path), "pin_memory": False, "buffer_count": 6, "buffer_size": 10**7,
        "max_in_cpu": 0}
    assert strategy.knobs["activation_checkpointing"] == {"partition_activations": True, "cpu_checkpointing": True}


@pytest.mark.parametrize("name", ["zero_stage_2_offload", "zero_stage_3_offload", "zero_stage_3_offload_nvme"])
def test_registered_offload_names_resolve(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_ZERO_NVME_PATH", str(tmp_path))  # read when the strategy is built
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    zero = trainer.strategy.knobs["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == ("nvme" if name.endswith("nvme") else "cpu")
    assert ("offload_param" in zero) == name.startswith("zero_stage_3")
    if name.endswith("nvme"):
        assert zero["offload_param"]["nvme_path"] == zero["offload_optimizer"]["nvme_path"] == str(tmp_path)


def _precheck(strategy: ZeroStrategy, devices: int = 2) -> None:
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False)
    strategy.precheck(trainer)


def test_precheck_refuses_what_the_topology_or_device_cannot_run(tmp_path) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("zero_optimization.zero_hpz_partition_size=4 must divide the"
                                                        " devices per node (2) and the world size (2)")):
        _precheck(ZeroStrategy(stage=3, zero_hpz_partition_size=4))
    _precheck(ZeroStrategy(stage=3, zero_hpz_partition_size=2))
    with pytest.raises(ZeroConfigError, match=re.escape("zero_quantized_gradients=True needs a CUDA GPU")):
        _precheck(ZeroStrategy(stage=3, zero_quantized_gradients=True))
    with pytest.raises(ZeroConfigError, match=re.escape(f"nvme_path={str(tmp_path / 'x')!r} does not exist")):
        _precheck(ZeroStrategy(stage=3, offload_parameters="nvme", nvme_path=str(tmp_path / "x")))
    _precheck(ZeroStrategy(stage=3, offload_optimizer="nvme", nvme_path=str(tmp_path)))


def test_auto_stage_keywords() -> None:
    strategy = ZeroStrategy(stage="auto", nvme_path="/local_nvme", overlap_comm=True)
    assert strategy._auto and strategy._auto_nvme_path == "/local_nvme"
    assert strategy.knobs == {"zero_optimization": {"overlap_comm": True}}  # no stage yet: decided at setup
    with pytest.raises(ZeroConfigError, match=re.escape("cannot be combined with offload_parameters='cpu'")):
        ZeroStrategy(stage="auto", offload_parameters="cpu")
    with pytest.raises(ZeroConfigError, match=re.escape("ZeroStrategy(stage='three') is not supported. Use 0, 1, 2 or"
                                                        " 3. Or \"auto\"")):
        ZeroStrategy(stage="three")
