"""Knowledge distillation with a frozen teacher and a trained student, ZeroStrategy(stage=3) by default.

Both models are created in `configure_model`, so at stage 3 the teacher is partitioned as it is created: each process
holds about 1/N of it, it gets no optimizer state, and ZeRO-3 gathers it layer by layer for its forward. The student
has the only optimizer (automatic optimization). The labels come from the teacher itself (with 10% of them flipped),
standing in for a labelled data set the teacher was trained on, so there is nothing to download or pre-train.

CPU (2 processes):          python examples/distill.py                  # stage 3, 4 epochs (about a minute)
                            python examples/distill.py --stage 2 --epochs 2
GPUs (all visible GPUs):    python examples/distill.py                  (picks CUDA when available)
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_zero import ZeroStrategy

FEATURES, CLASSES, TEMPERATURE, NOISE = 8, 10, 2.0, 0.1


class Teacher(nn.Module):
    """A wide network standing in for a pre-trained model (confident: its logits are scaled up)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(FEATURES, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                                 nn.Linear(512, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8.0 * self.net(x)


def make_student() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(FEATURES, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, CLASSES))


def labelled_data(n: int, seed: int) -> TensorDataset:
    """Inputs labelled by (an unpartitioned copy of) the teacher, 10% of the labels replaced at random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    with torch.no_grad():
        y = Teacher()(x).argmax(-1)
    flip = torch.rand(n, generator=g) < NOISE
    y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=g)
    return TensorDataset(x, y)


class Distill(L.LightningModule):
    def __init__(self, alpha: float = 0.9, lr: float = 3e-3, batch_size: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data = {"train": labelled_data(16384, seed=0), "val": labelled_data(1024, seed=1)}

    def configure_model(self) -> None:
        self.teacher = Teacher().requires_grad_(False).eval()  # frozen: in no optimizer
        self.student = make_student()

    def on_fit_start(self) -> None:
        params = list(self.teacher.parameters())
        # a partitioned parameter is empty outside its forward; this rank keeps its shard (ds_tensor)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        held = sum(p.numel() or p.ds_tensor.numel() for p in params)
        student = sum(getattr(p, "ds_numel", p.numel()) for p in self.student.parameters())
        if self.trainer.is_global_zero:
            print(f"teacher: {total:,} parameters, {held:,} of them held by rank 0 between forwards; student:"
                  f" {student:,} parameters", flush=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        # Hinton et al.: soft targets at temperature T (scaled by T^2) plus the usual cross-entropy on the labels
        soft = nn.functional.kl_div(nn.functional.log_softmax(student_logits / TEMPERATURE, -1),
                                    nn.functional.softmax(teacher_logits / TEMPERATURE, -1),
                                    reduction="batchmean") * TEMPERATURE**2
        hard = nn.functional.cross_entropy(student_logits, y)
        loss = self.hparams.alpha * soft + (1 - self.hparams.alpha) * hard
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.totals = torch.zeros(5, device=self.device)  # samples, then loss sum and correct count per model

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.totals[0] += len(y)
        for i, model in enumerate((self.student, self.teacher)):
            logits = model(x)
            self.totals[1 + 2 * i] += nn.functional.cross_entropy(logits, y, reduction="sum")
            self.totals[2 + 2 * i] += (logits.argmax(-1) == y).sum()

    def on_validation_epoch_end(self) -> None:
        n, student_loss, student_correct, teacher_loss, teacher_correct = self.trainer.strategy.reduce(
            self.totals, reduce_op="sum").tolist()
        if self.trainer.is_global_zero:
            when = "before training" if self.trainer.sanity_checking else f"after epoch {self.current_epoch}"
            print(f"{when:16s} validation: student loss {student_loss / n:.3f} acc {student_correct / n:6.1%} |"
                  f" teacher loss {teacher_loss / n:.3f} acc {teacher_correct / n:6.1%}", flush=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data["val"], batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    trainer = L.Trainer(
        strategy=ZeroStrategy(stage=args.stage),
        accelerator="gpu" if gpu else "cpu",
        devices=-1 if gpu else 2,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=-1,  # a full validation before training: the starting point
    )
    trainer.fit(Distill())


if __name__ == "__main__":
    main()
