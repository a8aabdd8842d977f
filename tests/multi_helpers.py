"""Several models in one LightningModule: distillation, manual-optimization GANs and their plain-PyTorch references."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import GanDataset, _global_batches, gan_losses, make_gan

# ----------------------------------------------------------------------------------------------------------------------
# Distillation: a frozen teacher, one or two trained students
# ----------------------------------------------------------------------------------------------------------------------

FEATURES, CLASSES, TEMPERATURE = 8, 4, 2.0


class ClassifyDataset(Dataset):
    """Random inputs with integer labels (x, y), the same in every process."""

    def __init__(self, n: int = 64, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_teacher(seed: int = 11) -> nn.Module:
    # several times larger than the students, so optimizer state for it would not go unnoticed
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, CLASSES))


def make_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at temperature T, times T^2."""
    log_p = nn.functional.log_softmax(student_logits / TEMPERATURE, -1)
    q = nn.functional.softmax(teacher_logits / TEMPERATURE, -1)
    return nn.functional.kl_div(log_p, q, reduction="batchmean") * TEMPERATURE**2


def student_optimizers(students: list[nn.Module]) -> list[torch.optim.Optimizer]:
    return [torch.optim.Adam(s.parameters(), lr=1e-2 * (i + 1)) for i, s in enumerate(students)]


class Distill(L.LightningModule):
    """Frozen teacher, created in configure_model (partitioned at stage 3). ``students=2`` trains two students with
    their own optimizers (manual optimization), which puts the teacher in an engine of its own."""

    def __init__(self, manual: bool = False, students: int = 1, batch_size: int = 4, n: int = 64) -> None:
        super().__init__()
        self.automatic_optimization = not manual and students == 1
        self.num_students, self.batch_size, self.n = students, batch_size, n

    def configure_model(self) -> None:
        self.teacher = make_teacher().requires_grad_(False)
        self.students = nn.ModuleList([make_student(seed=i) for i in range(self.num_students)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, _ = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        losses = [distill_loss(s(x), teacher_logits) for s in self.students]
        if self.automatic_optimization:
            return losses[0]
        opts = self.optimizers()
        for opt, loss in zip(opts if isinstance(opts, list) else [opts], losses):
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return None

    def configure_optimizers(self) -> Any:
        return student_optimizers(list(self.students))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ClassifyDataset(self.n), batch_size=self.batch_size)


def reference_distill(world_size: int, steps: int, students: int = 1, batch_size: int = 4, n: int = 64
                      ) -> dict[str, torch.Tensor]:
    teacher = make_teacher().requires_grad_(False)
    nets = [make_student(seed=i) for i in range(students)]
    opts = student_optimizers(nets)
    batches = _global_batches(ClassifyDataset(n), world_size, batch_size)
    for _ in range(steps):
        x, _ = next(batches)
        teacher_logits = teacher(x)
        for net, opt in zip(nets, opts):
            distill_loss(net(x), teacher_logits).backward()
            opt.step()
            opt.zero_grad()
    state = {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    for i, net in enumerate(nets):
        state.update({f"students.{i}.{k}": v for k, v in net.state_dict().items()})
    return state


class ReportLayout(L.Callback):
    """Saves, per rank, how the teacher is held and how much optimizer state each engine keeps."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = list(pl_module.teacher.parameters())
        optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        state_numel = 0
        for slot in trainer.strategy.engines:
            basic = slot.basic_optimizer
            if basic is not None:
                state_numel += sum(t.numel() for s in basic.state.values() for t in s.values()
                                   if torch.is_tensor(t) and t.dim() > 0)
        report = {
            "partitioned": [hasattr(p, "ds_tensor") for p in teacher],
            "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher),
            "held": sum(p.numel() for p in teacher),  # 0 for a partitioned parameter outside its forward
            "devices": sorted({str(p.device) for p in teacher}),
            "requires_grad": any(p.requires_grad for p in teacher),
            "teacher_in_an_optimizer": any(id(p) in optimized for p in teacher),
            "optimizer_state_numel": state_numel,
            "engines": [(slot.name, slot.face is not None) for slot in trainer.strategy.engines],
            "root_device": str(trainer.strategy.root_device),
        }
        torch.save(report, f"{self.folder}/layout_{trainer.global_rank}.pt")


# ----------------------------------------------------------------------------------------------------------------------
# GAN in manual optimization: accumulation, per-optimizer clipping, a closure, schedulers stepped at different rates
# ----------------------------------------------------------------------------------------------------------------------

CLIP_G, CLIP_D = 0.05, 0.3
D_SCHED_EVERY = 2  # the discriminator's scheduler steps every second optimizer step, the generator's every one


def manual_gan_optimizers(g: nn.Module, d: nn.Module) -> tuple[list, list]:
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-2, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(d.parameters(), lr=3e-2, betas=(0.5, 0.9), weight_decay=0.01)
    scheds = [torch.optim.lr_scheduler.StepLR(opt_g, 1, 0.8), torch.optim.lr_scheduler.StepLR(opt_d, 1, 0.5)]
    return [opt_g, opt_d], scheds


class ManualGAN(L.LightningModule):
    """Backward every batch (loss / accumulate), step every ``accumulate`` batches as Lightning documents for manual
    optimization; the discriminator steps through ``opt.step(closure=...)``; each optimizer clips at its own value."""

    def __init__(self, folder: str, accumulate: int = 2, clip: bool = True, batch_size: int = 4, n: int = 64
                 ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.folder, self.accumulate, self.clip, self.batch_size, self.n = folder, accumulate, clip, batch_size, n
        self.steps_taken = 0
        self.record: list[dict[str, Any]] = []

    def configure_model(self) -> None:
        self.generator, self.discriminator = make_gan()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, z = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        boundary = (batch_idx + 1) % self.accumulate == 0

        self.toggle_optimizer(opt_d)
        d_loss = gan_losses(self.generator, self.discriminator, real, z, "d") / self.accumulate
        if boundary:
            def closure() -> torch.Tensor:
                self.manual_backward(d_loss)
                if self.clip:
                    self.clip_gradients(opt_d, gradient_clip_val=CLIP_D, gradient_clip_algorithm="norm")
                return d_loss

            returned = opt_d.step(closure=closure)
            opt_d.zero_grad()
        else:
            self.manual_backward(d_loss)
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        g_loss = gan_losses(self.generator, self.discriminator, real, z, "g") / self.accumulate
        self.manual_backward(g_loss)
        if boundary:
            if self.clip:
                self.clip_gradients(opt_g, gradient_clip_val=CLIP_G, gradient_clip_algorithm="norm")
            opt_g.step()
            opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        if boundary:
            self.steps_taken += 1
            sched_g.step()
            if self.steps_taken % D_SCHED_EVERY == 0:
                sched_d.step()
            self.record.append({
                "closure_returned_its_loss": returned is d_loss,
                "lr": (opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]),
                "scheduler_steps": (sched_g.last_epoch, sched_d.last_epoch),
                "schedulers": len(self.lr_schedulers()),
            })

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            torch.save(self.record, f"{self.folder}/record.pt")

    def configure_optimizers(self) -> Any:
        return manual_gan_optimizers(self.generator, self.discriminator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GanDataset(self.n), batch_size=self.batch_size)


def reference_manual_gan(world_size: int, steps: int, accumulate: int = 2, clip: bool = True, batch_size: int = 4,
                         n: int = 64) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain PyTorch: the same accumulation, ``clip_grad_norm_`` per model, the same scheduler rates."""
    g, d = make_gan()
    (opt_g, opt_d), (sched_g, sched_d) = manual_gan_optimizers(g, d)
    batches = _global_batches(GanDataset(n), world_size, batch_size)
    clipped = {"g": 0, "d": 0}
    lrs = []
    for step in range(1, steps + 1):
        for micro in range(accumulate):
            real, z = next(batches)
            for which, frozen in (("d", g), ("g", d)):
                frozen.requires_grad_(False)
                (gan_losses(g, d, real, z, which) / accumulate).backward()
                frozen.requires_grad_(True)
                if which == "d" and micro == accumulate - 1:
                    _clip_and_step(d, opt_d, CLIP_D if clip else None, clipped, "d")
        _clip_and_step(g, opt_g, CLIP_G if clip else None, clipped, "g")
        sched_g.step()
        if step % D_SCHED_EVERY == 0:
            sched_d.step()
        lrs.append((opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]))
    state = {f"generator.{k}": v for k, v in g.state_dict().items()}
    state.update({f"discriminator.{k}": v for k, v in d.state_dict().items()})
    return state, {"clipped": clipped, "lr": lrs}


def _clip_and_step(net: nn.Module, opt: torch.optim.Optimizer, clip: float | None, clipped: dict[str, int],
                   name: str) -> None:
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        clipped[name] += int(norm > clip)
    opt.step()
    opt.zero_grad()


# ----------------------------------------------------------------------------------------------------------------------
# One loss, two engines that both step: an autoencoder whose encoder and decoder have their own optimizers
# ----------------------------------------------------------------------------------------------------------------------


def make_autoencoder(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 3))
    decoder = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, FEATURES))
    return encoder, decoder


def autoencoder_optimizers(encoder: nn.Module, decoder: nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.Adam(encoder.parameters(), lr=1e-2), torch.optim.AdamW(decoder.parameters(), lr=3e-2)]


class SharedLoss(L.LightningModule):
    """One reconstruction loss reaches both engines; ``manual_backward`` once, then both optimizers step."""

    def __init__(self, batch_size: int = 4, n: int = 64, accumulate: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.batch_size, self.n, self.accumulate = batch_size, n, accumulate

    def configure_model(self) -> None:
        self.encoder, self.decoder = make_autoencoder()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        loss = nn.functional.mse_loss(self.decoder(self.encoder(x)), x) / self.accumulate
        self.manual_backward(loss)
        if (batch_idx + 1) % self.accumulate == 0:
            for opt in self.optimizers():
                opt.step()
                opt.zero_grad()

    def configure_optimizers(self) -> Any:
        return autoencoder_optimizers(self.encoder, self.decoder)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ClassifyDataset(self.n), batch_size=self.batch_size)


def reference_shared_loss(world_size: int, steps: int, accumulate: int = 1, batch_size: int = 4, n: int = 64
                          ) -> dict[str, torch.Tensor]:
    encoder, decoder = make_autoencoder()
    opts = autoencoder_optimizers(encoder, decoder)
    batches = _global_batches(ClassifyDataset(n), world_size, batch_size)
    for _ in range(steps):
        for _ in range(accumulate):
            x, _ = next(batches)
            (nn.functional.mse_loss(decoder(encoder(x)), x) / accumulate).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    return state


# ----------------------------------------------------------------------------------------------------------------------
# GANs that do not toggle: the generator's loss also reaches the discriminator's engine
# ----------------------------------------------------------------------------------------------------------------------


def reference_untoggled_gan(world_size: int, steps: int, batch_size: int = 4, n: int = 64) -> dict[str, torch.Tensor]:
    """helpers.GAN(toggle=False) in plain PyTorch: the generator's loss leaves gradients in the discriminator, which
    its next step includes (its zero_grad() comes after its step)."""
    from helpers import gan_optimizers

    g, d = make_gan()
    (opt_g, opt_d), (sched_g, sched_d) = gan_optimizers(g, d)
    batches = _global_batches(GanDataset(n), world_size, batch_size)
    for _ in range(steps):
        real, z = next(batches)
        for opt, sched, which in ((opt_d, sched_d, "d"), (opt_g, sched_g, "g")):
            gan_losses(g, d, real, z, which).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    state = {f"generator.{k}": v for k, v in g.state_dict().items()}
    state.update({f"discriminator.{k}": v for k, v in d.state_dict().items()})
    return state


class ZeroGradFirstGAN(L.LightningModule):
    """The PyTorch DCGAN tutorial's order without toggling: ``opt.zero_grad()`` before each backward, meant to drop the
    discriminator gradients the generator's loss left behind."""

    def __init__(self, batch_size: int = 4, n: int = 64) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.batch_size, self.n = batch_size, n

    def configure_model(self) -> None:
        self.generator, self.discriminator = make_gan()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, z = batch
        opt_g, opt_d = self.optimizers()
        for opt, which in ((opt_d, "d"), (opt_g, "g")):
            opt.zero_grad()
            self.manual_backward(gan_losses(self.generator, self.discriminator, real, z, which))
            opt.step()

    def configure_optimizers(self) -> Any:
        from helpers import gan_optimizers

        return gan_optimizers(self.generator, self.discriminator)[0]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GanDataset(self.n), batch_size=self.batch_size)
