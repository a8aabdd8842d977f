"""One Trainer across calls, run by tests/distributed/test_trainer_reuse.py under the "popen" launcher or torchrun:

    python tests/distributed/reuse_script.py OUT_DIR STAGES [gan] [blocks]   # popen (re-run once per extra rank)
    torchrun --nproc-per-node 2 tests/distributed/reuse_script.py OUT_DIR STAGES

For each stage in STAGES (e.g. ``0,1,2,3``), on one Trainer: validate -> fit with a frozen base (phase 1) -> test ->
predict -> unfreeze -> fit again (phase 2) -> validate -> save a checkpoint -> fit from it (phase 3); then a new
Trainer fits the same module (phase 4). With ``gan``,
also a GAN (two engines, manual optimization) on one Trainer: validate -> fit -> fit. With ``blocks``, once, at stage
3: a model of blocks with CPU offload, fit -> fit; a GAN with a block discriminator, validate -> fit. Rank 0 writes
OUT_DIR/results.pt: the full weights after each fit, the logged losses, the predictions, how often
configure_optimizers ran, what the fits trained, the hooks left behind.
"""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import GAN, GanDataset, RandomDataset, Regressor, gan_losses, gan_optimizers  # noqa: E402
from lightning_zero import ZeroStrategy  # noqa: E402
from test_block_fetch import BlockGAN, gan_loss  # noqa: E402

N = 16  # 2 optimizer steps per epoch on 2 ranks with batch size 4


class Phased(Regressor):
    """Regressor whose base (the first two linear layers) can be frozen; evaluates on RandomDataset(N, seed=9)."""

    def __init__(self) -> None:
        super().__init__(n=N)
        self.configured = 0  # configure_optimizers calls in this process
        self.engine_trains: list[int] = []  # elements the fit's optimizer trains, at each fit start
        self.hooks: list[int] = []  # module hooks at each fit start: the previous engines' must have left
        self.engine_refs: list[Any] = []  # weak references to each fit's engine
        self.freed: list[bool] = []  # at each fit start: whether every earlier engine was garbage-collected

    def set_base_trainable(self, trainable: bool) -> None:
        for layer in (self.net[0], self.net[2]):
            layer.requires_grad_(trainable)

    def configure_optimizers(self) -> Any:
        self.configured += 1
        self.created = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                         weight_decay=0.01)
        return self.created

    def on_train_start(self) -> None:
        (optimizer,) = self.trainer.optimizers
        assert optimizer is self.created, "the fit does not step the optimizer configure_optimizers just returned"
        self.engine_trains.append(sum(getattr(p, "ds_numel", p.numel()) for g in optimizer.param_groups
                                      for p in g["params"]))
        self.hooks.append(leftover_hooks(self))
        gc.collect()
        self.freed.append(all(ref() is None for ref in self.engine_refs))
        self.engine_refs.append(weakref.ref(self.trainer.strategy.engines.trained[0].engine))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", nn.functional.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.cat([batch[0], self(batch[0])], 1)  # the inputs with their outputs: checked row by row

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(N, seed=9), batch_size=4)

    test_dataloader = predict_dataloader = val_dataloader


class ReusedGAN(GAN):
    """The test GAN, created once (configure_model runs at every Trainer call), with a validation loss."""

    def __init__(self) -> None:
        super().__init__(n=N)
        self.configured = 0

    def configure_model(self) -> None:
        if getattr(self, "generator", None) is None:
            super().configure_model()

    def configure_optimizers(self) -> Any:
        self.configured += 1
        return gan_optimizers(self.generator, self.discriminator)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_d", gan_losses(self.generator, self.discriminator, *batch, "d"), sync_dist=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(GanDataset(N, seed=4), batch_size=4)


class ValidatedBlockGAN(BlockGAN):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_d", gan_loss(self.g, self.d, batch[0], True, 0), sync_dist=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(N), batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(N), batch_size=4)


def trainer_for(stage: int, strategy: dict[str, Any] | None = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=ZeroStrategy(stage=stage, **(strategy or {})), max_epochs=1,
                     logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kwargs)


def leftover_hooks(module: nn.Module) -> int:
    """Forward/backward hooks on every submodule."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               for m in module.modules())


def full_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """A copy (below stage 3 the state dict holds the live parameters, which the next fit changes)."""
    return {k: v.detach().clone() for k, v in trainer.strategy.lightning_module_state_dict().items()}


def phased(stage: int, out_dir: Path) -> dict[str, Any]:
    model, out = Phased(), {}
    trainer = trainer_for(stage)
    model.set_base_trainable(False)
    out["val_before"] = trainer.validate(model, verbose=False)[0]["val_loss"]
    trainer.fit(model)  # phase 1: the head only
    out["phase1"] = full_weights(trainer)
    out["test_after_phase1"] = trainer.test(model, verbose=False)[0]["test_loss"]
    out["predictions"] = torch.cat(trainer.predict(model))
    model.set_base_trainable(True)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)  # phase 2: everything, with a new optimizer
    out["phase2"] = full_weights(trainer)
    out["val_after"] = trainer.validate(model, verbose=False)[0]["val_loss"]
    checkpoint = out_dir / f"phase2-stage{stage}.ckpt"
    trainer.save_checkpoint(checkpoint)  # with the engines of phase 2, kept by the validation
    trainer.fit_loop.max_epochs = 3
    trainer.fit(model, ckpt_path=checkpoint)  # phase 3: resumes phase 2's optimizer state
    out["phase3"] = full_weights(trainer)
    out["global_step"] = trainer.global_step
    trainer = trainer_for(stage)  # a new Trainer on the same module: the old one's engines must leave it
    trainer.fit(model)  # phase 4: epoch 0 again, a new optimizer
    out["phase4"] = full_weights(trainer)
    out.update(configured=model.configured, engine_trains=model.engine_trains, hooks=model.hooks, freed=model.freed)
    return out


def gan(stage: int) -> dict[str, Any]:
    model, out = ReusedGAN(), {}
    trainer = trainer_for(stage)
    out["val_before"] = trainer.validate(model, verbose=False)[0]["val_d"]
    trainer.fit(model)
    out["fit1"] = full_weights(trainer)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)
    out["fit2"] = full_weights(trainer)
    out.update(configured=model.configured, engines=sorted(s.name for s in trainer.strategy.engines))
    return out


def blocks() -> dict[str, Any]:
    """Stage 3 with each Block gathered as one unit (tuning.resolve_block_fetch) and parameters and optimizer offloaded
    to CPU (DeepSpeedCPUAdam): fit -> fit."""
    from test_block_fetch import BlockRegressor

    model, out = BlockRegressor(), {}
    model.n = N
    trainer = trainer_for(3, dict(offload_optimizer="cpu", offload_parameters="cpu"))
    trainer.fit(model)
    out["fit1"] = full_weights(trainer)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)  # the first fit's unit-call counters (engines.EngineRegistry._counter) must be gone
    out["fit2"] = full_weights(trainer)
    out["units"] = units(model)
    # A validation (one engine: Blocks gathered as units) before a GAN whose discriminator runs twice per step: the
    # fit's two engines fetch layer by layer, as without the validation.
    gan = ValidatedBlockGAN(once=False)
    trainer = trainer_for(3)
    out["gan_val"] = trainer.validate(gan, verbose=False)[0]["val_d"]
    out["gan_val_units"] = units(gan)
    trainer.fit(gan)
    out["gan_fit"], out["gan_fit_units"] = full_weights(trainer), units(gan)
    return out


def units(model: nn.Module) -> list[str]:
    """The classes ZeRO-3 gathers as one fetch unit (DeepSpeed's z3 leaf modules)."""
    return sorted({type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)})


def main() -> None:
    out_dir, stages = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    results: dict[str, Any] = {}
    for stage in stages:
        results[f"phased{stage}"] = phased(stage, out_dir)
        if "gan" in sys.argv[3:]:
            results[f"gan{stage}"] = gan(stage)
    if "blocks" in sys.argv[3:]:
        results["blocks"] = blocks()
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_dir / "results.pt")


if __name__ == "__main__":
    main()
