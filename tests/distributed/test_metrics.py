"""torchmetrics under ZeroStrategy(stage=3) on 2 processes: synced values equal one process over all the data, and
metric states stay float32 in bf16-true runs (for metrics created in __init__ and under zero.Init alike)."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from helpers import RandomDataset, cpu_trainer, make_net
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

N, BATCH = 20, 4  # 10 samples per rank, in batches of 4, 4 and 2


class WithMetrics(L.LightningModule):
    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self.mse = MeanSquaredError()  # created outside any creation context

    def configure_model(self):
        self.net = make_net()
        self.mae = MeanAbsoluteError()  # created under zero.Init (and the bf16 default dtype for bf16-true)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self.net(x)
        self.mse.update(pred, y)
        self.log("val_mse", self.mse)  # a Metric object: Lightning calls compute(), which syncs the states
        self.mae(pred, y)
        self.log("val_mae", self.mae)
        self.log("val_loss", nn.functional.mse_loss(pred.float(), y), sync_dist=True)

    def on_validation_epoch_end(self):
        dtypes = {f"{name}.{state}": getattr(metric, state).dtype
                  for name, metric in (("mse", self.mse), ("mae", self.mae)) for state in metric._defaults}
        torch.save(dtypes, f"{self.folder}/dtypes_{self.global_rank}.pt")

    def val_dataloader(self):
        return DataLoader(RandomDataset(N), batch_size=BATCH)


def test_metrics_over_two_ranks_equal_one_process_over_all_data(tmp_path):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"))
    (got,) = trainer.validate(WithMetrics(str(tmp_path)))
    data = RandomDataset(N)
    with torch.no_grad():
        pred = make_net()(data.x)
    want = {"val_mse": MeanSquaredError()(pred, data.y), "val_mae": MeanAbsoluteError()(pred, data.y)}
    for name, value in want.items():
        assert abs(got[name] - value.item()) <= 1e-6, (name, got[name], value.item())
    # sync_dist=True: the mean over ranks of each rank's batch-size-weighted mean (equal counts: the global mean)
    assert abs(got["val_loss"] - want["val_mse"].item()) <= 1e-6


def test_bf16_true_keeps_metric_states_fp32(tmp_path):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), precision="bf16-true")
    (got,) = trainer.validate(WithMetrics(str(tmp_path)))
    for rank in (0, 1):
        dtypes = torch.load(tmp_path / f"dtypes_{rank}.pt")
        assert dtypes == {"mse.sum_squared_error": torch.float32, "mse.total": torch.int64,
                          "mae.sum_abs_error": torch.float32, "mae.total": torch.int64}
    data = RandomDataset(N)
    with torch.no_grad():
        reference = MeanSquaredError()(make_net()(data.x), data.y).item()
    assert abs(got["val_mse"] - reference) <= 0.02 * reference  # bf16 weights and activations
