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

    def __init__(self, n: int = 64, seed: int = 7, learnable: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.randn(n, OUT, generator=g)
        if learnable:  # a smooth function of x: the loss can fall far
            self.y = torch.tanh(self.x[:, :OUT] + 0.5 * self.x[:, OUT:2 * OUT])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2, batch_size: int = 4, n: int = 64, scheduler: bool = False,
                 learnable: bool = False) -> None:
        super().__init__()
        self.lr, self.batch_size, self.n, self.scheduler, self.learnable = lr, batch_size, n, scheduler, learnable
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
        return DataLoader(RandomDataset(self.n, learnable=self.learnable), batch_size=self.batch_size, shuffle=False)


def _global_batches(data: Dataset, world_size: int, batch_size: int) -> Any:
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
    train_plain(lambda x, y: nn.functional.mse_loss(net(x), y), opt, steps, accumulate=accumulate, clip=clip,
                scheduler=sched, data=RandomDataset(n), world_size=world_size, batch_size=batch_size)
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


def train_plain(loss_fn: Any, optimizer: torch.optim.Optimizer, steps: int, *, accumulate: int = 1,
                clip: float | None = None, scheduler: Any = None, data: Dataset | None = None, world_size: int = 2,
                batch_size: int = 4) -> None:
    """The single-process PyTorch loop the parity tests compare with: ``loss_fn(x, y)`` over the global
    micro-batches the ranks see together (``RandomDataset(64)`` unless ``data``), divided by ``accumulate``;
    clipping over the optimizer's parameters, then step, zero_grad and the scheduler, once per optimizer step."""
    batches = _global_batches(data if data is not None else RandomDataset(64), world_size, batch_size)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(steps):
        for _ in range(accumulate):
            x, y = next(batches)
            (loss_fn(x, y) / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


class LossNet(nn.Module):
    """A network that returns its own loss: the compiled graph ends at the scalar loss (the DeepCompile parity setup)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.body(x), y)


class LossInside(Regressor):
    """``Regressor`` whose network computes the loss: same initial weights (``net.*`` is ``loss_net.body.*``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_net = LossNet(self.net)
        del self.net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_net(x, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_net(*batch)


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


# ----------------------------------------------------------------------------------------------------------------------
# Two models, two optimizers (manual optimization)
# ----------------------------------------------------------------------------------------------------------------------


class GanDataset(Dataset):
    """(real point, latent) pairs, so every rank and the reference draw the same latents."""

    def __init__(self, n: int = 64, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        angle = torch.randint(0, 8, (n,), generator=g).float() * (torch.pi / 4)
        self.x = torch.stack([angle.cos(), angle.sin()], 1) * 2 + 0.05 * torch.randn(n, 2, generator=g)
        self.y = torch.randn(n, 4, generator=g)  # latents (named y so _global_batches can serve this dataset too)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_gan(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    d = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    return g, d


def gan_losses(g: nn.Module, d: nn.Module, real: torch.Tensor, z: torch.Tensor, which: str) -> torch.Tensor:
    bce = nn.functional.binary_cross_entropy_with_logits
    if which == "d":
        fake = g(z).detach()
        real_logits, fake_logits = d(real), d(fake)
        return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
    logits = d(g(z))
    return bce(logits, torch.ones_like(logits))


def gan_optimizers(g: nn.Module, d: nn.Module) -> tuple[list, list]:
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=5e-3, betas=(0.5, 0.9))
    scheds = [torch.optim.lr_scheduler.StepLR(opt_g, 2, 0.5), torch.optim.lr_scheduler.StepLR(opt_d, 3, 0.5)]
    return [opt_g, opt_d], scheds


class GAN(L.LightningModule):
    def __init__(self, toggle: bool = True, batch_size: int = 4, n: int = 64) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle, self.batch_size, self.n = toggle, batch_size, n

    def configure_model(self) -> None:
        self.generator, self.discriminator = make_gan()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, z = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        for opt, sched, which in ((opt_d, sched_d, "d"), (opt_g, sched_g, "g")):
            if self.toggle:
                self.toggle_optimizer(opt)
            loss = gan_losses(self.generator, self.discriminator, real, z, which)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            sched.step()
            if self.toggle:
                self.untoggle_optimizer(opt)
            self.log(f"loss_{which}", loss)

    def configure_optimizers(self) -> Any:
        return gan_optimizers(self.generator, self.discriminator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GanDataset(self.n), batch_size=self.batch_size)


def reference_gan(world_size: int, steps: int, batch_size: int = 4, n: int = 64) -> dict[str, torch.Tensor]:
    g, d = make_gan()
    (opt_g, opt_d), (sched_g, sched_d) = gan_optimizers(g, d)
    batches = _global_batches(GanDataset(n), world_size, batch_size)
    for _ in range(steps):
        real, z = next(batches)
        for opt, sched, which in ((opt_d, sched_d, "d"), (opt_g, sched_g, "g")):
            for p in (g if which == "d" else d).parameters():
                p.requires_grad_(False)
            gan_losses(g, d, real, z, which).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            for p in (g if which == "d" else d).parameters():
                p.requires_grad_(True)
    state = {f"generator.{k}": v for k, v in g.state_dict().items()}
    state.update({f"discriminator.{k}": v for k, v in d.state_dict().items()})
    return state


# DeepSpeed swaps only tensors of at least 1 MiB (swap_tensor.utils.MIN_AIO_BYTES): the NVMe test needs a layer whose
# per-rank fp32 partition is that large, 1024 x 512 weights (262,144 elements per rank).
WIDE_LR = 1e-3  # Adam's normalised step turns reduction-order rounding into lr-sized differences; at 1e-2 this net
# ends 6e-5 from the reference at plain stage 3 too (no offload), at 1e-3 within 6e-6 with or without NVMe.


def make_wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, OUT))


class WideRegressor(Regressor):
    """Created in configure_model, i.e. inside zero.Init: the parameters are partitioned (and swapped) at birth."""

    def __init__(self) -> None:
        super().__init__(lr=WIDE_LR)
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = make_wide_net()


def wide_net_reference(steps: int, *, world_size: int = 2, accumulate: int = 1, clip: float | None = None,
                       init_device: str = "cpu") -> dict[str, torch.Tensor]:
    """:func:`make_wide_net` trained by plain PyTorch AdamW (``WIDE_LR``) over the same global batches, with the
    LightningModule's keys. ``init_device``: where the initial weights are drawn, i.e. whose random generator
    (``zero.Init`` on a GPU builds the model there, so its seeded init comes from the CUDA generator); the training
    itself runs on the CPU."""
    with torch.device(init_device):
        net = make_wide_net()
    net = net.cpu()
    opt = torch.optim.AdamW(net.parameters(), lr=WIDE_LR, weight_decay=0.01)
    train_plain(lambda x, y: nn.functional.mse_loss(net(x), y), opt, steps, accumulate=accumulate, clip=clip,
                world_size=world_size)
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
