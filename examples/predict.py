"""Fit a model created in `configure_model` at ZeRO stage 3, then predict with it; then predict again with a fresh
model whose full weights are loaded inside `configure_model` (the `from_pretrained` pattern).

CPU (2 processes, under a minute):   python examples/predict.py
GPUs (all visible GPUs, bf16):       python examples/predict.py   (picks CUDA when available)

Prints the held-out mean absolute error (a torchmetrics metric synced over the ranks) of the untrained model, of the
fitted model, and of the reloaded one, then the largest difference between the fitted and reloaded predictions (0).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanAbsoluteError

from lightning_zero import ZeroStrategy, load_full_state_dict


def make_data(n: int, seed: int) -> TensorDataset:
    """A smooth function of 4 inputs: an MLP learns it to a small error within seconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2]) + 0.5 * x[:, 2:3] * x[:, 3:]
    return TensorDataset(x, y)


class Regressor(L.LightningModule):
    def __init__(self, width: int = 256, pretrained: str | None = None) -> None:
        super().__init__()
        self.width, self.pretrained = width, pretrained
        self.mae = MeanAbsoluteError()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        # Lightning calls this hook at every fit/validate/test/predict: build once, or the trained layers are replaced.
        if self.net is not None:
            return
        w = self.width  # at stage 3 each layer is partitioned across the ranks as it is created
        self.net = nn.Sequential(nn.Linear(4, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1))
        if self.pretrained:  # every rank calls it; one layer at a time is gathered, filled and re-partitioned
            load_full_state_dict(self.net, self.pretrained, prefix="net.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("loss", loss, sync_dist=True)
        return loss

    def on_predict_epoch_start(self) -> None:
        self.mae.reset()

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self(x).float()
        self.mae.update(pred, y)
        return pred

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def predict(args: argparse.Namespace, model: Regressor) -> tuple[L.Trainer, torch.Tensor, float]:
    """Predictions of this rank's share of the held-out set, and the MAE over all of it (synced by torchmetrics)."""
    trainer = make_trainer(args)
    loader = DataLoader(make_data(512, seed=1), batch_size=64)
    preds = torch.cat(trainer.predict(model, loader))  # type: ignore[arg-type]
    return trainer, preds, model.mae.compute().item()


def make_trainer(args: argparse.Namespace, epochs: int = 0) -> L.Trainer:
    gpu = torch.cuda.is_available()
    return L.Trainer(strategy=ZeroStrategy(stage=3), accelerator="gpu" if gpu else "cpu", devices=-1 if gpu else 2,
                     precision="bf16-mixed" if gpu else "32-true", max_epochs=epochs, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=epochs > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lightning_zero_predict"),
                        help="folder for the full weights file (shared by the processes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = Regressor()

    trainer, _, untrained = predict(args, model)
    fit = make_trainer(args, epochs=args.epochs)
    fit.fit(model, DataLoader(make_data(4096, seed=0), batch_size=64, shuffle=True))
    trainer, fitted, fitted_mae = predict(args, model)

    # Full weights (gathered one module at a time, kept on rank 0) -> a file -> a fresh model's configure_model.
    path = os.path.join(args.out, "weights.pt")
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        os.makedirs(args.out, exist_ok=True)
        torch.save(state, path)
    trainer.strategy.barrier()
    trainer, reloaded, reloaded_mae = predict(args, Regressor(pretrained=path))
    diff = trainer.strategy.reduce((fitted - reloaded).abs().max(), reduce_op="max")

    if trainer.is_global_zero:
        print(f"held-out MAE: untrained {untrained:.4f} | fitted {fitted_mae:.4f} | reloaded {reloaded_mae:.4f}")
        print(f"max |fitted - reloaded| prediction difference: {diff.item():.3g}")


if __name__ == "__main__":
    main()
