"""Offload keeps parity with plain PyTorch: the optimizer on the CPU (stages 1-3, DeepSpeedCPUAdam in place of the
user's AdamW), the parameters on the CPU (stage 3), both on "NVMe" (a temporary folder, through DeepSpeed's async I/O
op), and DeepSpeed activation checkpointing. 2 CPU processes, fp32, same global batches as the reference loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from helpers import WIDE_LR, Regressor, SaveFullWeights, WideRegressor, cpu_trainer, make_net, make_wide_net, \
    max_diff, reference_weights, train_plain, wide_net_reference
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, CLIP = 6, 2, 0.5


def _aio_buildable() -> bool:
    from deepspeed.ops.op_builder.cpu.async_io import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible()


def fit_weights(tmp_path, strategy, model=None):
    out = tmp_path / "weights.pt"
    trainer = cpu_trainer(strategy=strategy, callbacks=[SaveFullWeights(str(out))], max_steps=STEPS,
                          accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP)
    trainer.fit(model or Regressor())
    return torch.load(out)


def reference():
    return reference_weights(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_offload_to_cpu_keeps_parity(tmp_path, capfd, stage):
    got = fit_weights(tmp_path, ZeroStrategy(stage=stage, offload_optimizer="cpu", start_method="spawn"))
    assert max_diff(got, reference()) <= 1e-5
    # one line (rank 0 only) says which optimizer steps
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "DeepSpeedCPUAdam(adamw_mode=True) steps" in line]
    assert len(lines) == 1, lines
    assert "in place of your AdamW, with the same hyperparameters (lr=0.01, betas=(0.9, 0.999), eps=1e-08," \
           " weight_decay=0.01)" in lines[0]


def test_parameter_and_optimizer_offload_to_cpu_keeps_parity(tmp_path):
    # threshold 0: DeepSpeed would otherwise keep these small parameters resident instead of offloading them
    strategy = ZeroStrategy(stage=3, offload_optimizer="cpu", offload_parameters="cpu", start_method="spawn",
                            stage3_param_persistence_threshold=0)
    assert max_diff(fit_weights(tmp_path, strategy), reference()) <= 1e-5


class EagerWideRegressor(Regressor):
    """Created in __init__: DeepSpeed partitions it when the engine is built (see offload.partition_for_nvme)."""

    def __init__(self) -> None:
        super().__init__(lr=WIDE_LR)
        self.net = make_wide_net()


def wide_reference() -> dict[str, torch.Tensor]:
    return wide_net_reference(STEPS, accumulate=ACCUMULATE, clip=CLIP)


class RecordSwapFiles(L.Callback):
    """Rank 0 lists the swap files under the NVMe folder after the first optimizer step (DeepSpeed removes them at
    the end of the run)."""

    def __init__(self, nvme: Path, out: Path) -> None:
        self.nvme, self.out = nvme, out

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 1 and trainer.is_global_zero and not self.out.exists():
            files = sorted(str(p.relative_to(self.nvme).parent) for p in self.nvme.rglob("*.swp"))
            self.out.write_text(json.dumps(files))


@pytest.mark.skipif(not _aio_buildable(), reason="NVMe offload needs DeepSpeed's async_io op, which needs the libaio"
                    " headers: install libaio-dev (`apt install libaio-dev`, as `make test` does when run as root)")
@pytest.mark.parametrize("model", [WideRegressor, EagerWideRegressor], ids=["configure_model", "__init__"])
def test_nvme_offload_of_parameters_and_optimizer_keeps_parity(tmp_path, model):
    nvme, listing, out = tmp_path / "nvme", tmp_path / "swapped.json", tmp_path / "weights.pt"
    nvme.mkdir()
    strategy = ZeroStrategy(stage=3, offload_optimizer="nvme", offload_parameters="nvme", nvme_path=str(nvme),
                            max_in_cpu=0, stage3_param_persistence_threshold=0, start_method="spawn")
    trainer = cpu_trainer(strategy=strategy, callbacks=[SaveFullWeights(str(out)), RecordSwapFiles(nvme, listing)],
                          max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP)
    trainer.fit(model())
    assert max_diff(torch.load(out), wide_reference()) <= 1e-5
    # DeepSpeed really went through the folder: parameter and optimizer swap files of both ranks
    folders = set(json.loads(listing.read_text()))
    assert {f"zero_stage_3/float32params/rank{r}" for r in (0, 1)} <= folders, folders
    assert {f"zero_stage_3/optimizer/rank{r}" for r in (0, 1)} <= folders, folders


class CheckpointedRegressor(Regressor):
    """The same net, with its hidden block under deepspeed.checkpointing.checkpoint (recomputed in backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import deepspeed
        from deepspeed.runtime.activation_checkpointing import checkpointing

        # the strategy configured deepspeed.checkpointing from ZeroStrategy(partition_activations=True, ...)
        assert checkpointing.PARTITION_ACTIVATIONS and checkpointing.CPU_CHECKPOINT
        net = self.net
        h = net[1](net[0](x))
        h = deepspeed.checkpointing.checkpoint(lambda t: net[3](net[2](t)), h)
        return net[4](h)


def test_activation_checkpointing_keeps_parity(tmp_path):
    strategy = ZeroStrategy(stage=2, partition_activations=True, cpu_checkpointing=True, start_method="spawn")
    assert max_diff(fit_weights(tmp_path, strategy, CheckpointedRegressor()), reference()) <= 1e-5


def test_auto_stage_on_cpu_plans_from_configure_model_logs_and_trains(tmp_path, capfd):
    out = tmp_path / "weights.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage="auto", start_method="spawn"),
                          callbacks=[SaveFullWeights(str(out))], max_steps=STEPS, accumulate_grad_batches=ACCUMULATE,
                          gradient_clip_val=CLIP)
    trainer.fit(WideRegressor())  # its layers exist only after configure_model: counted on the meta device
    assert max_diff(torch.load(out), wide_reference()) <= 1e-5
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if 'ZeroStrategy(stage="auto")' in line]
    # 8x1024+1024 + 1024x512+512 + 512+1 = 534,529 parameters; no GPU: stage 2, said once (rank 0)
    assert len(lines) == 1, lines
    assert "no GPU, so the model states live in host memory whatever the stage and offloading gains nothing; chose" \
           " stage 2 (534,529 parameters" in lines[0]


class SGDRegressor(Regressor):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_other_optimizer_offloaded_as_is_when_the_config_allows_it(tmp_path, capfd):
    config = {"zero_force_ds_cpu_optimizer": False}
    got = fit_weights(tmp_path, ZeroStrategy(stage=2, offload_optimizer="cpu", config=config, start_method="spawn"),
                      SGDRegressor())
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train_plain(lambda x, y: nn.functional.mse_loss(net(x), y), opt, STEPS, accumulate=ACCUMULATE, clip=CLIP)
    assert max_diff(got, {f"net.{k}": v for k, v in net.state_dict().items()}) <= 1e-5
    captured = capfd.readouterr()
    assert "your SGD steps there as it is (\"zero_force_ds_cpu_optimizer\": false)" in captured.out + captured.err
