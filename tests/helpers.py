"""Models, data and the plain-PyTorch reference loop shared by the distributed tests."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

IN, HIDDEN, OUT = 8, 16, 1


class RandomDataset(Dataset):
    """Fixed regression data: the same tensors in every process."""

    def __init__(self, n: int = 64, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.randn(n, OUT, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2, batch_size: int = 4, n: int = 64, scheduler: bool = False) -> None:
        super().__init__()
        self.lr, self.batch_size, self.n, self.scheduler = lr, batch_size, n, scheduler
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        # Lightning adds a DistributedSampler(shuffle=False here) that splits each global batch across ranks.
        return DataLoader(RandomDataset(self.n), batch_size=self.batch_size, shuffle=False)


def _global_batches(data: RandomDataset, world_size: int, batch_size: int) -> Any:
    """The global micro-batches the ranks see together under Lightning's DistributedSampler (shuffled, seed 0)."""
    from torch.utils.data import DistributedSampler

    epoch = 0
    while True:
        per_rank = []
        for rank in range(world_size):
            sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        for k in range(len(per_rank[0]) // batch_size):
            idx = [i for r in range(world_size) for i in per_rank[r][k * batch_size:(k + 1) * batch_size]]
            yield data.x[idx], data.y[idx]
        epoch += 1


def reference_weights(world_size: int, steps: int, accumulate: int, clip: float | None, batch_size: int = 4,
                      n: int = 64, lr: float = 1e-2, scheduler: bool = False) -> dict[str, torch.Tensor]:
    """Plain single-process PyTorch over the same global batches the ranks see together."""
    module = Regressor(lr=lr, batch_size=batch_size, n=n)
    net = module.net
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    data = RandomDataset(n)
    batches = _global_batches(data, world_size, batch_size)
    for _ in range(steps):
        for _ in range(accumulate):
            x, y = next(batches)
            loss = nn.functional.mse_loss(net(x), y) / accumulate
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


class SaveFullWeights(L.Callback):
    """Writes `strategy.lightning_module_state_dict()` (rank 0) to `path` at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            torch.save(state, self.path)


def cpu_trainer(**kwargs: Any) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return L.Trainer(**defaults)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
