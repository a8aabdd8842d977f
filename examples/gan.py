"""A GAN on a 2-D mixture of 8 Gaussians: two models, two optimizers, one DeepSpeed engine each (ZeRO stage 2 or 3).

Plain Lightning manual optimization (`toggle_optimizer`, `manual_backward`, `opt.step()`); ZeroStrategy matches each
optimizer to its submodule and gives the generator and the discriminator their own engine. No downloads: the data is
generated in memory. At the end, rank 0 saves a PNG of real vs generated samples (needs matplotlib: the `examples` extra).

CPU (2 processes):          python examples/gan.py                 # stage 2, 1200 steps, gan.png (about 2 minutes)
                            python examples/gan.py --stage 3 --steps 600 --out gan_stage3.png
GPUs (all visible GPUs):    python examples/gan.py                 (picks CUDA when available)
"""

from __future__ import annotations

import argparse
import math
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_zero import ZeroStrategy

LATENT, HIDDEN, MODES, RADIUS, STD = 8, 128, 8, 2.0, 0.05
CENTERS = torch.tensor([[RADIUS * math.cos(2 * math.pi * k / MODES), RADIUS * math.sin(2 * math.pi * k / MODES)]
                        for k in range(MODES)])


class EightGaussians(Dataset):
    """Points from 8 Gaussians on a circle (fresh samples every epoch, seeded per index)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        k = int(torch.randint(0, MODES, (1,), generator=g))
        return CENTERS[k] + STD * torch.randn(2, generator=g)


def mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, outputs))


def mode_coverage(samples: torch.Tensor) -> tuple[int, float]:
    """(modes holding at least 1% of the samples, share of samples within 3 std of a mode)."""
    distance, nearest = torch.cdist(samples.float(), CENTERS.to(samples.device)).min(1)
    close = distance < 3 * STD
    counts = torch.bincount(nearest[close], minlength=MODES)
    return int((counts >= 0.01 * len(samples)).sum()), float(close.float().mean())


class GAN(L.LightningModule):
    def __init__(self, lr: float = 1e-3, global_batch: int = 256, steps: int = 1200, report_every: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False

    def on_fit_start(self) -> None:
        torch.manual_seed(1000 + self.global_rank)  # different latents on every rank

    def configure_model(self) -> None:
        # at stage 3 both models are partitioned as they are created
        self.generator, self.discriminator = mlp(LATENT, 2), mlp(2, 1)

    def training_step(self, real: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        z = torch.randn(len(real), LATENT, device=real.device)

        # discriminator: real -> 1, fake -> 0 (the generator is frozen while toggled)
        self.toggle_optimizer(opt_d)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(self.generator(z).detach())
        d_loss = bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

        # generator: make the discriminator say 1 (the discriminator is frozen while toggled)
        self.toggle_optimizer(opt_g)
        logits = self.discriminator(self.generator(z))
        g_loss = bce(logits, torch.ones_like(logits))
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True)
        step = batch_idx + 1
        if step % self.hparams.report_every == 0 or step == self.hparams.steps:
            modes, close = mode_coverage(self.sample(2000))  # every rank samples: at stage 3 that is collective
            if self.trainer.is_global_zero:
                print(f"step {step:4d}  d_loss {d_loss.item():.3f}  g_loss {g_loss.item():.3f}  modes covered"
                      f" {modes}/{MODES}  samples near a mode {close:.0%}", flush=True)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, LATENT, device=self.device, generator=torch.Generator(self.device).manual_seed(0))
        return self.generator(z).float()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)]

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        batch_size = max(1, self.hparams.global_batch // world)  # the same global batch on any number of devices
        return DataLoader(EightGaussians(self.hparams.steps * batch_size * world), batch_size=batch_size, shuffle=True)


class SavePlot(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: GAN) -> None:
        fake = pl_module.sample(2000).cpu()  # on every rank (collective at stage 3)
        if trainer.is_global_zero:
            save_plot(fake, self.path)


def save_plot(fake: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = torch.stack([EightGaussians(2000)[i] for i in range(2000)])
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, points, title in ((axes[0], real, "real"), (axes[1], fake, "generated")):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        ax.scatter(CENTERS[:, 0], CENTERS[:, 1], s=30, marker="x", color="red")
        ax.set_title(title)
        ax.set_aspect("equal")
    axes[0].set_xlim(-3, 3)
    axes[0].set_ylim(-3, 3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(2, 3), default=2)
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps of each model")
    parser.add_argument("--out", default="gan.png")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    L.seed_everything(0)
    trainer = L.Trainer(
        strategy=ZeroStrategy(stage=args.stage),
        accelerator="gpu" if gpu else "cpu",
        devices=-1 if gpu else 2,
        max_steps=2 * args.steps,  # Lightning counts the steps of both optimizers
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SavePlot(args.out)],
    )
    trainer.fit(GAN(steps=args.steps))


if __name__ == "__main__":
    main()
