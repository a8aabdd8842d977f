"""Models, callbacks and runners shared by the checkpoint tests (resume, crash safety, consolidation).

Every run here is tiny: 16 samples, batch 4 on 2 processes (global batch 8), so an epoch is 2 optimizer steps and a
checkpoint at an even step sits on an epoch boundary (Lightning resumes a plain DataLoader exactly only there).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from helpers import GAN, IN, OUT, HIDDEN, Regressor, SaveFullWeights, cpu_trainer

N = 16  # samples: 2 steps per epoch at a global batch of 8


class ResumeRegressor(Regressor):
    """Regressor with a StepLR scheduler and, optionally, dropout (so an exact resume needs the RNG state too)."""

    def __init__(self, batch_size: int = 4, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, n=N, scheduler=True, **kwargs)
        if dropout:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Dropout(dropout), nn.Linear(HIDDEN, HIDDEN),
                                     nn.Tanh(), nn.Linear(HIDDEN, OUT))


class LoraRegressor(Regressor):
    """A frozen base layer plus trained layers: `exclude_frozen_parameters` leaves the base out of the shards."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(n=N, scheduler=True, **kwargs)
        self.base = nn.Linear(IN, IN).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.base(x))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FrozenGAN(GAN):
    """The two-engine GAN plus a frozen latent transform: three engines, one without an optimizer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(n=N, **kwargs)

    def configure_model(self) -> None:
        super().configure_model()
        torch.manual_seed(1)
        self.prior = nn.Linear(4, 4).requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, z = batch
        return super().training_step((real, self.prior(z)), batch_idx)


class TiedRegressor(L.LightningModule):
    """Input and output projections share one weight (tied parameters must survive consolidation)."""

    def __init__(self, lr: float = 1e-2, batch_size: int = 4) -> None:
        super().__init__()
        self.lr, self.batch_size = lr, batch_size
        torch.manual_seed(0)
        self.inp = nn.Linear(IN, IN)
        self.mid = nn.Linear(IN, IN)
        self.out = nn.Linear(IN, IN)
        self.out.weight = self.inp.weight
        self.head = nn.Linear(IN, OUT)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))) * self.scale)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> Any:
        from helpers import RandomDataset

        return torch.utils.data.DataLoader(RandomDataset(N), batch_size=self.batch_size)


class KillDuringSave(L.Callback):
    """On ``rank`` at ``step``: SIGKILL this process ``after`` seconds later, i.e. while the checkpoint of that step
    is being written (the test stretches the save with $LIGHTNING_ZERO_TEST_SAVE_DELAY)."""

    def __init__(self, step: int, rank: int = 1, after: float = 1.0) -> None:
        self.step, self.rank, self.after = step, rank, after

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            def kill() -> None:
                time.sleep(self.after)
                os.kill(os.getpid(), signal.SIGKILL)

            threading.Thread(target=kill, daemon=True).start()


def checkpointing(folder: Path | str, **kwargs: Any) -> ModelCheckpoint:
    """A ModelCheckpoint saving every 2 steps (epoch ends here), keeping all, plus `last.ckpt`."""
    options: dict[str, Any] = dict(dirpath=str(folder), every_n_train_steps=2, save_top_k=-1, save_last=True)
    options.update(kwargs)
    return ModelCheckpoint(**options)


def fit(tmp: Path, strategy: Any, model: L.LightningModule, steps: int, ckpt_path: str | None = None,
        callbacks: list | None = None, devices: int = 2, name: str = "weights") -> dict[str, torch.Tensor]:
    """Fit to ``steps`` and return the full weights at the end (written by rank 0)."""
    out = tmp / f"{name}.pt"
    checkpointed = any(isinstance(c, ModelCheckpoint) for c in callbacks or [])
    trainer = cpu_trainer(strategy=strategy, max_steps=steps, devices=devices, enable_checkpointing=checkpointed,
                          callbacks=[SaveFullWeights(str(out)), *(callbacks or [])])
    trainer.fit(model, ckpt_path=ckpt_path)
    return torch.load(out)


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return all(torch.equal(a[k], b[k]) for k in a)


class WeightsAt(L.Callback):
    """Writes the full weights (rank 0) to ``folder/weights_<step>.pt`` at the given global steps."""

    def __init__(self, folder: Path | str, steps: tuple[int, ...]) -> None:
        self.folder, self.steps = Path(folder), steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            state = trainer.strategy.lightning_module_state_dict()  # collective at stage 3
            if trainer.is_global_zero:
                torch.save(state, self.folder / f"weights_{trainer.global_step}.pt")


def read_events(log_file: Path) -> list[tuple[str, str, list[str]]]:
    rows = [line.rstrip("\n").split("\t") for line in log_file.read_text().splitlines()]
    return [(event, name, complete.split(",") if complete else []) for event, name, complete in rows]


class WeightsAtStart(L.Callback):
    """Writes the full weights (rank 0) to ``path`` when training starts, i.e. right after any checkpoint loaded."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()  # collective at stage 3
        if trainer.is_global_zero:
            torch.save(state, self.path)


class NoGatherOnSave(L.Callback):
    """Fails the run if a save at stage 3 gathered the full weights into Lightning's checkpoint dict."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        assert checkpoint["state_dict"] == {}, "the full state dict was gathered for a sharded save"


class PredictRegressor(ResumeRegressor):
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def predict_dataloader(self) -> Any:
        from helpers import RandomDataset

        return torch.utils.data.DataLoader(RandomDataset(8, seed=11), batch_size=4)


class SavePredictions(L.Callback):
    """Writes rank 0's predictions (concatenated) to ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path, self.outputs = str(path), []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.outputs.append(outputs.detach().cpu())

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save(torch.cat(self.outputs), self.path)
