"""Stage 3: models created partitioned in configure_model; validate/test/predict without an optimizer."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import RandomDataset, Regressor, cpu_trainer
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

WIDTH, DEPTH = 2048, 9  # 8 x (2048*2048 + 2048) + small ends = 33.6M parameters


def make_wide(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, WIDTH)] + [nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH - 1)] + [nn.Linear(WIDTH, 1)]
    return nn.Sequential(*layers)


class Wide(L.LightningModule):
    def configure_model(self):
        self.net = make_wide()

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.net(x)

    def predict_dataloader(self):
        return DataLoader(RandomDataset(16), batch_size=4)


class CheckPartitionAndSave(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_predict_start(self, trainer, pl_module):
        params = list(pl_module.parameters())
        total = sum(p.ds_numel for p in params)
        local = sum(p.ds_tensor.numel() for p in params)
        assert all(p.numel() == 0 for p in params), "a parameter still holds its full storage"
        torch.save({"total": total, "local": local}, f"{self.folder}/partition_{trainer.global_rank}.pt")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        torch.save((batch[0], outputs), f"{self.folder}/pred_{trainer.global_rank}_{batch_idx}.pt")


def test_configure_model_partitions_and_predict_matches_unsharded(tmp_path):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"),
                          callbacks=[CheckPartitionAndSave(str(tmp_path))])
    trainer.predict(Wide(), return_predictions=False)
    reference = make_wide()
    expected_total = sum(p.numel() for p in reference.parameters())
    assert expected_total >= 30_000_000
    for rank in (0, 1):
        part = torch.load(tmp_path / f"partition_{rank}.pt")
        assert part["total"] == expected_total
        assert abs(part["local"] - expected_total / 2) <= 0.01 * expected_total  # each rank holds about half
    files = sorted(tmp_path.glob("pred_*.pt"))
    assert len(files) == 4  # 16 samples, 2 ranks, batch 4
    with torch.no_grad():
        for f in files:
            x, y = torch.load(f)
            assert (y - reference(x)).abs().max().item() <= 1e-5


class TwoValLoaders(Regressor):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x).float(), y), sync_dist=True)

    def val_dataloader(self):
        return [DataLoader(RandomDataset(16, seed=1), batch_size=4), DataLoader(RandomDataset(8, seed=2), batch_size=4)]

    def test_dataloader(self):
        return DataLoader(RandomDataset(16, seed=3), batch_size=4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_validate_and_test_alone_and_after_fit(precision):
    strategy = ZeroStrategy(stage=3, start_method="spawn")
    model = TwoValLoaders()
    trainer = cpu_trainer(strategy=strategy, precision=precision)
    alone = trainer.validate(model)
    assert [sorted(m) for m in alone] == [["val_loss/dataloader_idx_0"], ["val_loss/dataloader_idx_1"]]
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), precision=precision, max_steps=3)
    trainer.fit(model)
    after = trainer.test(model)
    assert after[0]["test_loss"] > 0
