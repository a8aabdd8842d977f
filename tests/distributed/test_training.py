"""Trainer features through ZeroStrategy on 2 CPU processes: precision, schedulers, DeepSpeed-config optimizers,
errors raised before any process starts."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from helpers import GAN, Regressor, cpu_trainer
from lightning_zero import ZeroConfigError, ZeroStrategy

pytestmark = pytest.mark.distributed


class RecordLoss(Callback):
    def __init__(self, path):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(self.losses, self.path)


@pytest.mark.parametrize(("precision", "stage"), [("bf16-mixed", 2), ("bf16-mixed", 3), ("bf16-true", 2)])
def test_half_precision_trains(tmp_path, precision, stage):
    rec = RecordLoss(str(tmp_path / "losses.pt"))
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=stage, start_method="spawn"), precision=precision,
                          max_epochs=6, callbacks=[rec])
    trainer.fit(Regressor(lr=1e-2, n=32, learnable=True))
    losses = torch.load(tmp_path / "losses.pt")
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, losses


class DeepSpeedOptimizerModule(Regressor):
    def configure_optimizers(self):
        return None


def test_optimizer_and_scheduler_from_the_deepspeed_config(tmp_path):
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                           "warmup_num_steps": 4}}}
    logger = CSVLogger(tmp_path, version=0)
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, config=config, start_method="spawn"), max_steps=6,
                          logger=logger, log_every_n_steps=1, callbacks=[LearningRateMonitor("step")])
    trainer.fit(DeepSpeedOptimizerModule())
    lrs = [float(line.split(",")[0]) for line in _csv_column(logger, "lr-")]
    assert len(lrs) == 6 and lrs[0] < lrs[3] <= 1e-2 + 1e-12  # warm-up, stepped once per optimizer step


def test_gan_schedulers_and_learning_rate_monitor(tmp_path):
    logger = CSVLogger(tmp_path, version=0)
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), max_steps=8, logger=logger,
                          log_every_n_steps=1, callbacks=[LearningRateMonitor("step")])
    trainer.fit(GAN())
    header = _csv_header(logger)
    assert "lr-Adam" in header and "lr-Adam-1" in header  # both optimizers, named like any Lightning run


def test_conflicting_precision_fails_before_any_process_starts():
    strategy = ZeroStrategy(stage=2, config={"fp16": {"enabled": True}, "gradient_accumulation_steps": 4},
                            start_method="spawn")
    trainer = cpu_trainer(strategy=strategy, precision="bf16-mixed", max_steps=1)
    with pytest.raises(ZeroConfigError, match=r"(?s)2 place.*fp16.enabled.*'bf16-mixed'.*gradient_accumulation_steps"):
        trainer.fit(Regressor())


def _csv_header(logger):
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return f.readline().strip().split(",")


def _csv_column(logger, prefix):
    header = _csv_header(logger)
    col = next(i for i, name in enumerate(header) if name.startswith(prefix))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [line.strip().split(",") for line in f.readlines()[1:]]
    return [r[col] for r in rows if r[col]]


class BothOptimizers(Regressor):
    pass


def test_optimizer_in_both_places_is_an_error():
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, config=config, start_method="spawn"), max_steps=1)
    with pytest.raises(Exception, match="Both `configure_optimizers` and the DeepSpeed config's 'optimizer' block"):
        trainer.fit(BothOptimizers())
