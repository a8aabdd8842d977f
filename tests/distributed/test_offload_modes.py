"""Issue 18's offload modes on 2 CPU processes with real DeepSpeed.

- Partial optimizer offload (``offload_optimizer_ratio``, stage 3) vs plain PyTorch, fp32: exact parity (<= 1e-5).
  Under DeepSpeed's CPU accelerator the "GPU" share also lives on the CPU (``subgroup_to_device`` says "cpu" for
  both shares, stage3.py), so every share is stepped by DeepSpeedCPUAdam here; the test checks that DeepSpeed really
  built the hybrid optimizer (its ``backup_optimizer`` and ``partial_offload``) and the result. The GPU tier
  (tests/gpu/test_offload_modes_gpu.py) checks the split between the GPU and CPU Adam.
- bf16 master weights and bf16 optimizer states (stage 2; stage 3 with the optimizer offloaded; bf16 master weights
  with fp32 moments in CPU Adam): the master weights and moments have the dtypes DeepSpeed documents, their bytes per
  element are what the estimator counts, and the weights end within lr x steps of the fp32 reference (not exact by
  design).
- ZenFlow (stage 2, the config's AdamW, top-k 0.5 re-selected every 4 steps, the rest stepped every step or every
  4th): DeepSpeed's ZenFlow optimizer steps (its classes, the selected columns and the selective AdamW's moments), the
  loss falls, and the weights end within a documented bound of plain PyTorch AdamW, which the fp32 plain-offload run
  matches exactly (test_offload.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers import RandomDataset, Regressor, SaveFullWeights, cpu_trainer, max_diff, reference_weights, train_plain
from lightning_zero import ZeroStrategy
from lightning_zero.estimate import optimizer_state_bytes

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, CLIP, LR = 6, 2, 0.5, 1e-2  # LR: Regressor's


class RecordOptimizer(L.Callback):
    """Rank 0 writes what DeepSpeed's ZeRO optimizer was built with, after the first optimizer step, to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.path.exists() or not trainer.is_global_zero or trainer.global_step < 1:
            return
        zero = next(iter(trainer.strategy.engines)).engine.optimizer
        seen = {"partial_offload": getattr(zero, "partial_offload", None),
                     "backup_optimizer": type(getattr(zero, "backup_optimizer", None)).__name__,
                     "sub_groups": len(getattr(zero, "fp16_partitioned_groups_flat", [])),
                     "master_dtype": str(zero.master_weights_and_grads_dtype),
                     "inner": type(zero.optimizer).__name__}
        states = [s for s in zero.optimizer.state.values() if "exp_avg" in s]
        seen["state_dtype"] = str(states[0]["exp_avg"].dtype) if states else None
        # bytes per element of this rank's master weights + Adam moments: the estimator's optimizer_state_bytes
        # less the gradient partition (stage3.py fp32_partitioned_groups_flat, stage_1_and_2.py
        # single_partition_of_fp32_groups)
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        numel = sum(t.numel() for t in masters)
        nbytes = sum(t.numel() * t.element_size() for t in masters) + sum(
            s[k].numel() * s[k].element_size() for s in states for k in ("exp_avg", "exp_avg_sq"))
        seen["bytes_per_element"] = nbytes / numel
        self.path.write_text(json.dumps(seen))


def fit(tmp_path, strategy, precision="32-true"):
    out, record = tmp_path / "weights.pt", RecordOptimizer(tmp_path / "optimizer.json")
    trainer = cpu_trainer(strategy=strategy, callbacks=[SaveFullWeights(str(out)), record], max_steps=STEPS,
                          accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP, precision=precision)
    trainer.fit(Regressor())
    return torch.load(out), json.loads(record.path.read_text())


def test_partial_optimizer_offload_keeps_parity(tmp_path, capfd):
    # sub_group_size 50: 3 sub-groups per rank (64, 8 + 128 and 8 + 8 + 1 of the 217 elements), so ratio 0.4 keeps the
    # first on the "GPU" and offloads the other two: 153 / 217 = 71%, which ZeroStrategy's warning says
    strategy = ZeroStrategy(stage=3, offload_optimizer="cpu", offload_optimizer_ratio=0.4, sub_group_size=50,
                            start_method="spawn")
    got, seen = fit(tmp_path, strategy)
    out = capfd.readouterr()
    assert "so 71% of the optimizer states go to CPU Adam here (217 elements per rank), not 40%" in out.out + out.err
    print(seen)
    reference = reference_weights(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    diff = max_diff(got, reference)
    print(f"partial offload (ratio 0.4) vs plain PyTorch: max |diff| = {diff:.2e}")
    assert diff <= 1e-5
    assert seen["partial_offload"] == 0.4 and seen["backup_optimizer"] == "AdamW" and seen["sub_groups"] == 3
    assert seen["bytes_per_element"] == optimizer_state_bytes() - 4  # fp32 master + moments; the estimator's 16 - 4


@pytest.mark.parametrize("stage, offload, states", [(2, None, True), (3, "cpu", True), (2, "cpu", False)])
def test_bf16_master_weights_and_optimizer_states(tmp_path, stage, offload, states):
    strategy = ZeroStrategy(stage=stage, offload_optimizer=offload, bf16_master_weights_and_grads=True,
                            bf16_optimizer_states=states or None, start_method="spawn")
    got, seen = fit(tmp_path, strategy, precision="bf16-mixed")
    print(seen)
    reference = reference_weights(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    diff = max_diff(got, reference)
    print(f"bf16 master weights (states bf16: {states}), stage {stage}, offload {offload}: max |diff| vs fp32 ="
          f" {diff:.2e}")
    # without bf16_optimizer_states DeepSpeedCPUAdam keeps fp32 moments (12 bytes per parameter on the host)
    assert seen["master_dtype"] == "torch.bfloat16", seen
    # what the estimator counts: 12 or 8 bytes per parameter, of which the bf16 gradient partition is 2
    assert seen["bytes_per_element"] == optimizer_state_bytes(True, states) - 2, seen
    assert seen["state_dtype"] == ("torch.bfloat16" if states else "torch.float32"), seen
    assert seen["inner"] == ("DeepSpeedCPUAdam" if offload else "AdamW")
    # Not exact by design (bf16 compute, weights, gradients and moments; the dtypes and bytes above show the modes took
    # effect). Adam moves a weight by about lr per step, so two runs that differ by rounding drift apart by at most
    # ~2 x lr x steps; measured 1.98e-2 in all three cases (lr 1e-2, 6 steps): assert lr x steps.
    assert diff <= LR * STEPS


ZENFLOW = {"topk_ratio": 0.5, "select_strategy": "step", "select_interval": 4, "update_interval": 1}
ZENFLOW_STEPS = 12


class TwoOutputRegressor(Regressor):
    """Regressor with a two-row head (ZenFlow refuses one-row weights such as nn.Linear(16, 1).weight); the loss reads
    the first output. The optimizer comes from the DeepSpeed config, as ZenFlow needs."""

    def __init__(self) -> None:
        super().__init__(lr=LR, n=64, learnable=True)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                       torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x)[:, :1], y)

    def configure_optimizers(self) -> None:
        return None


class RecordZenFlow(L.Callback):
    """Rank 0 writes the losses and what DeepSpeed's ZenFlow optimizer holds at the end of fit to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        zero = next(iter(trainer.strategy.engines)).engine.optimizer
        selected = {n: [p.shape[0], p.selected_indices.numel(), p.shape[1]] for n, p in pl_module.named_parameters()
                    if p.dim() == 2}
        moments = [s["exp_avg"].shape for s in zero.selective_optimizer.state.values() if "exp_avg" in s]
        self.path.write_text(json.dumps({"zero": type(zero).__name__, "inner": type(zero.optimizer).__name__,
                                         "selected": selected, "moments": [list(m) for m in moments],
                                         "losses": self.losses}))


@pytest.mark.parametrize("update_interval", [1, 4])
def test_zenflow_trains_near_plain_adamw(tmp_path, update_interval):
    out, record = tmp_path / "weights.pt", RecordZenFlow(tmp_path / "zenflow.json")
    config = {"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}}
    strategy = ZeroStrategy(stage=2, offload_optimizer="cpu", zenflow={**ZENFLOW, "update_interval": update_interval},
                            config=config, start_method="spawn")
    trainer = cpu_trainer(strategy=strategy, callbacks=[SaveFullWeights(str(out)), record], max_steps=ZENFLOW_STEPS)
    trainer.fit(TwoOutputRegressor())
    got, seen = torch.load(out), json.loads(record.path.read_text())
    reference = TwoOutputRegressor()
    train_plain(lambda x, y: torch.nn.functional.mse_loss(reference(x)[:, :1], y),
                torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.01), ZENFLOW_STEPS,
                data=RandomDataset(64, learnable=True))
    diff = max_diff(got, {k: v.detach() for k, v in reference.state_dict().items()})
    losses = seen.pop("losses")
    print(seen, f"ZenFlow vs plain AdamW: max |diff| = {diff:.2e}; loss {losses[:4]} ... {losses[-4:]}")
    # DeepSpeed's ZenFlow stepped: its stage-1/2 optimizer and CPU Adam; at most half of each weight's columns
    # selected (topk_ratio 0.5 of the columns in each rank's partition; a column split between the two ranks is
    # never selected: 16 x 16 -> 7 of 16), and the selective AdamW's moments cover just those (rows x selected)
    assert seen["zero"] == "ZenFlowZeroOptimizerSequential" and seen["inner"] == "ZenFlowCPUAdam", seen
    assert {n: k for n, (_, k, _) in seen["selected"].items()} == {"net.0.weight": 4, "net.2.weight": 7,
                                                                     "net.4.weight": 8}, seen
    assert sorted(m for m in seen["moments"] if len(m) == 2) == sorted([r, k] for r, k, _ in seen["selected"].values())
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    # Not exact by design: the selected columns are stepped by the selective AdamW, whose moments restart at each
    # re-selection (every 4 steps), so they move by up to ~lr per step more or less than plain AdamW's; allow
    # lr x steps (measured 6.5e-2 of 0.12; 0.10 with update_interval 4, where CPU Adam steps the other columns once
    # every 4 steps with their summed gradients). It is not the plain path either (diff > 0). Without
    # _compat.deepspeed.fix_zenflow_parameter_views DeepSpeed 0.19.8 scrambles the 2-D weights at initialize and
    # this was 0.79.
    assert 0 < diff <= LR * ZENFLOW_STEPS
