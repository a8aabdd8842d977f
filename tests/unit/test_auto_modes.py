"""ZeroStrategy(stage="auto"), `lightning-zero estimate` and `lightning-zero config` with issue 18's offload modes:
partial optimizer offload at the smallest share on the host that fits, rounded to DeepSpeed's sub-groups, and bf16
master weights / optimizer states (bf16 precision only) when fp32 states fit nowhere. The free memory is passed in
(or detect_free_memory is given fixed figures), so no GPU is needed; the choice reaches the resolved DeepSpeed config
through ZeroStrategy._plan_auto_stage."""

from __future__ import annotations

import os
import re

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lightning_zero import ZeroConfigError, ZeroStrategy
from lightning_zero import config as cfg
from lightning_zero import estimate
from lightning_zero.cli import main
from lightning_zero.estimate import HOST_RUNTIME_GIB, GiB, _ratio_for, auto_choice, estimate_memory, fastest_fit
from lightning_zero.offload import effective_offload_ratio
from lightning_zero.precision import ZeroPrecision
from lightning_zero.wizard import Context, Machine, ModelSize, build_outputs, run_session

# One H200 machine as issue 18 measured it: 139 GiB free on the GPU, 120 GiB of the 128 GiB host memory available
H200_GPU, H200_HOST = 139 * GiB, 120 * GiB
P10, P20, LAYER = 10**10, 2 * 10**10, 2 * 10**8
F = 1.15  # host buffer factor of the estimator


def _h200(num_params: int, precision: str = "bf16-mixed", **kwargs):
    return auto_choice(num_params, LAYER, num_nodes=1, devices_per_node=1, device_type="cuda", precision=precision,
                       gpu_free_bytes=H200_GPU, cpu_free_bytes=H200_HOST, **kwargs)


def test_10b_on_one_h200_takes_the_smallest_partial_offload_that_fits():
    plan = estimate_memory(P10, LAYER, gpu_memory_gb=139, cpu_memory_gb=120)
    fits = {(r.stage, r.offload_optimizer, r.offload_parameters): r.fits for r in plan.rows}
    # neither extreme fits: stage 3 keeps 18 bytes/param on the GPU, full offload 16 x 1.15 bytes/param on the host
    assert fits[(3, "none", "none")] is False and fits[(3, "cpu", "none")] is False and plan.recommended is None
    row, message = _h200(P10)
    # 10 sub-groups of 1e9 (DeepSpeed's default sub_group_size): 1 of 10 on the host needs 2P + 0.9 x 16P + 4 x layer
    # = 164.8e9 B (153.5 GiB) on the GPU; 2 of 10: 148.8e9 B (138.6 GiB) fits, with 0.2 x 16P x 1.15 on the host, the
    # 16-bit partition DeepSpeed copies through host memory at setup (2P) and the process runtime
    assert (row.stage, row.offload_optimizer, row.offload_parameters, row.offload_ratio) == (3, "cpu", "none", 0.2)
    assert row.keywords() == {"offload_optimizer_ratio": 0.2}
    assert row.gpu_bytes == 4 * LAYER + 2 * P10 + int(0.8 * 16 * P10)
    assert row.cpu_bytes == pytest.approx(2 * P10 + 0.2 * 16 * P10 * F + HOST_RUNTIME_GIB * GiB, rel=1e-9)
    assert ("ZeroStrategy(stage=3, offload_optimizer='cpu', offload_optimizer_ratio=0.2) is the fastest choice that"
            " fits") in message
    assert ("Partial offload: CPU Adam steps 20% of the optimizer states in host memory and the GPU the rest, faster"
            " than offloading them all (stage 3 without offload needs about 168.38 GiB per GPU).") in message
    assert "bf16" not in message  # fp32 states fit: the numerics stay as they are
    # the user's sub_group_size (from the config) sets the steps: 3e8 gives 34 sub-groups, and the GPU needs a share
    # >= 0.197 on the host: 7 of 34 (0.2059), passed as 0.205 (0.206 > 7/34 would make DeepSpeed offload 8)
    row, _ = _h200(P10, sub_group_size=3 * 10**8)
    assert row.offload_ratio == _ratio_for(7, 34) == 0.205 and "sub_group_size=300_000_000" in row.strategy()


def test_partial_offload_beats_full_offload_but_not_the_gpu():
    # 1B parameters on 4 GPUs with 4 GiB each: stage 3 without offload needs 4.56 GiB; at sub_group_size 1e7 the
    # 25 sub-groups per GPU allow a partial offload, which comes before stage 2 + full offload
    row, message = auto_choice(10**9, 10**8, num_nodes=1, devices_per_node=4, device_type="cuda",
                               precision="bf16-mixed", gpu_free_bytes=4 * GiB, cpu_free_bytes=100 * GiB,
                               sub_group_size=10**7)
    assert (row.stage, row.offload_optimizer) == (3, "cpu") and 0 < row.offload_ratio < 1
    assert "sub_group_size=10_000_000" in row.strategy() and "Partial offload" in message
    # with DeepSpeed's default sub_group_size one sub-group per GPU cannot be split: full offload at stage 2
    row, _ = auto_choice(10**9, 10**8, num_nodes=1, devices_per_node=4, device_type="cuda", precision="bf16-mixed",
                         gpu_free_bytes=4 * GiB, cpu_free_bytes=100 * GiB)
    assert (row.stage, row.offload_optimizer, row.keywords()) == (2, "cpu", {})
    # with room on the GPU, no offload at all (the partial rows are not even looked at)
    row, _ = auto_choice(10**9, 10**8, num_nodes=1, devices_per_node=4, device_type="cuda", precision="bf16-mixed",
                         gpu_free_bytes=80 * GiB, cpu_free_bytes=100 * GiB, sub_group_size=10**7)
    assert (row.stage, row.offload_optimizer, row.keywords()) == (2, "none", {})


def test_the_ratio_offloads_exactly_the_sub_groups_planned():
    # DeepSpeed offloads the last n - int((1 - ratio) x n) sub-groups: k / n itself can round one up (0.9 of 10)
    for groups in range(2, 120):
        for k in range(1, groups):
            assert effective_offload_ratio(_ratio_for(k, groups), [[1] * groups], 1) == pytest.approx(k / groups)
    assert _ratio_for(9, 10) == 0.899 and effective_offload_ratio(0.9, [[1] * 10], 1) == 1.0
    assert _ratio_for(3, 10) == 0.3


def test_bf16_states_only_when_fp32_fits_nowhere_and_only_with_bf16_precision():
    # 20B on one H200: no fp32 choice fits (a partial offload small enough for the GPU overflows the host), so the
    # optimizer keeps bf16 master weights and states: 8 bytes/param, 7 of 20 sub-groups on the host
    row, message = _h200(P20)
    assert row.keywords() == {"offload_optimizer_ratio": 0.35, "bf16_master_weights_and_grads": True,
                              "bf16_optimizer_states": True}
    assert ("Nothing fits with fp32 master weights and Adam states (16 bytes per parameter), so the optimizer keeps"
            " bf16 master weights, gradients and Adam moments (8 bytes per parameter). This changes the numerics"
            " (bf16 master weights and optimizer states: convergence measured in docs/benchmarks.md).") in message
    assert _h200(P20, precision="bf16-true")[0].keywords() == row.keywords()
    # fp32 and fp16 precision never get bf16 states: refused, naming bf16 precision as the way out
    for precision in ("32-true", "16-mixed"):
        with pytest.raises(ZeroConfigError, match=re.escape(
                f"Trainer(precision=\"bf16-mixed\") instead of {precision!r}, where \"auto\" would choose"
                " ZeroStrategy(stage=3, offload_optimizer='cpu', offload_optimizer_ratio=0.35,"
                " bf16_master_weights_and_grads=True, bf16_optimizer_states=True)")):
            _h200(P20, precision=precision)
    # bf16 master weights with fp32 moments (12 bytes) come first, offloaded: 8B parameters, 20 GiB free per GPU
    # and 120 GiB host: fp32 stage 2 offload needs 16P x 1.15 = 137 GiB; 12 bytes: 16P x 1.15 x 0.75 (+ the runtime)
    row, message = auto_choice(8 * 10**9, LAYER, num_nodes=1, devices_per_node=1, device_type="cuda",
                               precision="bf16-mixed", gpu_free_bytes=20 * GiB, cpu_free_bytes=H200_HOST)
    assert (row.stage, row.offload_optimizer, row.keywords()) == (2, "cpu", {"bf16_master_weights_and_grads": True})
    assert row.cpu_bytes == pytest.approx(16 * 8e9 * F * 12 / 16 + HOST_RUNTIME_GIB * GiB, rel=1e-9)
    assert "bf16 master weights and gradients with fp32 Adam moments (12 bytes per parameter)" in message
    # nothing fits at all: the refusal says the bf16 states were tried too
    with pytest.raises(ZeroConfigError, match="with bf16 master weights and optimizer states .* nothing fits either"):
        _h200(5 * 10**10)


class Billions(L.LightningModule):
    """``layers`` x 2e8 parameters, created in configure_model (counted on the meta device, never allocated)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = layers

    def configure_model(self) -> None:
        self.blocks = nn.ModuleList(nn.Linear(20_000, 10_000, bias=False) for _ in range(self.layers))


@pytest.mark.parametrize(("layers", "expected"), [
    (50, {"offload_optimizer": {"device": "cpu", "ratio": 0.2}}),
    (100, {"offload_optimizer": {"device": "cpu", "ratio": 0.35}, "bf16_master_weights_and_grads": True,
          "bf16_optimizer_states": True}),
])
def test_the_chosen_mode_reaches_the_resolved_deepspeed_config(tmp_path, monkeypatch, layers, expected):
    # the real planner and ZeroStrategy._plan_auto_stage, on this machine's "GPU" with the H200's free memory
    monkeypatch.setattr(estimate, "detect_free_memory", lambda device, nvme_path=None: (H200_GPU, H200_HOST, None))
    strategy = ZeroStrategy(stage="auto", parallel_devices=[torch.device("cuda", 0)],
                            precision_plugin=ZeroPrecision("bf16-mixed"))
    strategy._lightning_module = Billions(layers)
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        strategy._plan_auto_stage()
    finally:
        torch.distributed.destroy_process_group()
    assert strategy.stage == 3 and not strategy._auto
    ds = cfg.resolve_ds_config(strategy.user_config, strategy.knobs,
                               cfg.TrainerFlags(precision="bf16-mixed", world_size=1, device_type="cuda"))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["ratio"] == expected["offload_optimizer"]["ratio"]
    bf16 = {k: v for k, v in expected.items() if k.startswith("bf16_")}
    assert ds["bf16"] == {"enabled": True, **bf16}


def test_estimate_lists_the_modes_and_recommends_what_auto_chooses(capsys):
    assert main(["estimate", "--params", "1e10", "--largest-layer", "2e8", "--gpu-memory", "139",
                 "--cpu-memory", "120"]) == 0
    out = capsys.readouterr().out
    # every 10% DeepSpeed's 10 sub-groups allow, and the bf16 states for bf16 precision (the default)
    # host: the share x 16P x 1.15, the setup copy of the 16-bit partition (2P, 18.63 GiB) and the runtime (1.8 GiB)
    assert "    3            10%  fp32                153.48 GiB   37.56 GiB  no (GPU)" in out
    assert "    3            20%  fp32                138.58 GiB   54.70 GiB  yes" in out
    assert "    3            70%  fp32                 64.07 GiB  140.38 GiB  no (CPU)" in out
    assert "    3             0%  bf16 master+states   93.88 GiB   20.43 GiB  yes" in out
    assert "    2             0%  bf16 master+states  111.76 GiB    1.80 GiB  yes" in out  # the runtime alone
    assert ("Recommended (fastest that fits): ZeroStrategy(stage=3, offload_optimizer='cpu',"
            " offload_optimizer_ratio=0.2)\nPartial offload: CPU Adam steps 20%") in out
    assert main(["estimate", "--params", "1e10", "--largest-layer", "2e8", "--precision", "32-true"]) == 0
    out = capsys.readouterr().out
    assert "bf16 master" not in out and "    3            50%  fp32" in out and out.count(" ?\n") >= 9


def test_wizard_offers_the_modes_and_writes_them():
    h200 = Machine(gpus=1, gpu_name="H200", gpu_memory_bytes=H200_GPU, bf16=True, host_memory_bytes=H200_HOST)
    a = run_session(Context(h200, ModelSize(P10, LAYER, "GPT")), {}, None).answers
    assert (a["stage"], a["offload_optimizer"], a["offload_optimizer_ratio"], a["optimizer_states"]) == (
        3, "cpu", 0.2, "fp32")
    ds, block = build_outputs(a)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "ratio": 0.2}
    assert block["trainer"]["strategy"]["init_args"] == {"stage": 3, "offload_optimizer": "cpu",
                                                         "offload_optimizer_ratio": 0.2}
    a = run_session(Context(h200, ModelSize(P20, LAYER, "GPT")), {}, None).answers
    assert (a["offload_optimizer_ratio"], a["optimizer_states"]) == (0.35, "bf16-master-states")
    ds, block = build_outputs(a)
    assert ds["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    ZeroStrategy(**block["trainer"]["strategy"]["init_args"])  # what the YAML block builds
    # the answers are checked with ZeroStrategy's own messages
    small = Context(h200, ModelSize(10**9, 10**8, "GPT"))
    with pytest.raises(ValueError, match=re.escape(
            "--optimizer-states bf16-master: These ZeRO settings cannot work:\n  - bf16.bf16_master_weights_and_grads"
            "=True without bf16_optimizer_states keeps fp32 Adam moments")):
        run_session(small, {"--stage": "2", "--optimizer-states": "bf16-master"}, None)
    with pytest.raises(ValueError, match=re.escape(
            "--offload-optimizer-ratio 1.5: ZeroStrategy(offload_optimizer_ratio=1.5) must be a number in (0, 1]")):
        run_session(small, {"--stage": "3", "--offload-optimizer": "cpu", "--offload-optimizer-ratio": "1.5"}, None)
    # the states question is for bf16 precision only, the ratio for stage 3 with the optimizer on the CPU
    with pytest.raises(ValueError, match="--optimizer-states bf16-master-states: that question does not apply"):
        run_session(small, {"--precision": "16-mixed", "--optimizer-states": "bf16-master-states"}, None)
    with pytest.raises(ValueError, match="--offload-optimizer-ratio 0.5: that question does not apply"):
        run_session(small, {"--stage": "2", "--offload-optimizer": "cpu", "--offload-optimizer-ratio": "0.5"}, None)
