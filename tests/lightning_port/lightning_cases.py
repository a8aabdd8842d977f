"""Lightning's own DeepSpeed tests (lightning 2.6.6), ported to ZeroStrategy, as cases of one script run on 2 CPU
processes under the default "popen" launcher, as Lightning runs its standalone tests:

    DS_ACCELERATOR=cpu python tests/lightning_port/lightning_cases.py OUT_DIR CASE [CASE ...]

The launcher re-runs this command once for rank 1, so both ranks run the same cases in the same order, each with its
own Trainer(s). Every rank records each case's outcome in OUT_DIR/<case>.rank<r>.json (``ok`` or the traceback) and
goes on with the next case; tests/lightning_port/test_deepspeed_port.py reads them. The case names are Lightning's test
names (with their parameters); docs/lightning_tests_port.md lists what changed from Lightning's version and why.

Changes common to every case: ``DeepSpeedStrategy(...)`` -> ``ZeroStrategy(...)``, ``"deepspeed*"`` -> ``"zero*"``,
``accelerator="gpu", devices=1|2`` -> ``accelerator="cpu", devices=2``; ``strategy.config`` (the built-in's private
mutable dict) -> ``strategy.ds_config`` (the config ZeroStrategy resolved at setup). The CUDA versions are in
tests/gpu/test_lightning_port_gpu.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset, RandomIterableDataset
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Accuracy

from lightning_zero import ZeroConfigError, ZeroPrecision, ZeroStrategy, ZeroSummary

ACCELERATOR = os.environ.get("PORT_ACCELERATOR", "cpu")  # the GPU tier runs some cases on "gpu"
DEVICES = int(os.environ.get("PORT_DEVICES", "2"))
DEVICE_TYPE = "cuda" if ACCELERATOR == "gpu" else "cpu"
# Lightning's "16-mixed": on CPU processes ZeroStrategy refuses float16 where the CPU has no oneDNN float16 (DeepSpeed
# would stop, README "Configuration"), so the CPU port runs bfloat16 and checks bfloat16 where Lightning checks float16.
HALF = "16-mixed" if ACCELERATOR == "gpu" else "bf16-mixed"
HALF_DTYPE = torch.float16 if ACCELERATOR == "gpu" else torch.bfloat16

CASES: dict[str, Callable[[Path], None]] = {}


def case(name: str) -> Callable:
    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES[name] = fn
        return fn

    return register


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) + DEVICES * int(os.environ.get("NODE_RANK", "0"))


# ----------------------------------------------------------------------------------------------------------------------
# Lightning's models (tests/tests_pytorch/strategies/test_deepspeed.py), unchanged
# ----------------------------------------------------------------------------------------------------------------------


class ModelParallelBoringModel(BoringModel):
    def __init__(self):
        super().__init__()
        self.layer = None

    def configure_model(self) -> None:
        if self.layer is None:
            self.layer = torch.nn.Linear(32, 2)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()


class ModelParallelBoringModelNoSchedulers(ModelParallelBoringModel):
    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


class ModelParallelBoringModelManualOptim(BoringModel):
    def __init__(self):
        super().__init__()
        self.layer = None

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.step(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def configure_model(self) -> None:
        if self.layer is None:
            self.layer = torch.nn.Linear(32, 2)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()

    @property
    def automatic_optimization(self) -> bool:
        return False


class ModelParallelClassificationModel(LightningModule):
    def __init__(self, lr: float = 0.01, num_blocks: int = 5):
        super().__init__()
        self.lr = lr
        self.num_blocks = num_blocks
        self.prepare_data_per_node = True
        self.train_acc = self.valid_acc = self.test_acc = None
        self.model = None

    def make_block(self):
        return nn.Sequential(nn.Linear(32, 32, bias=False), nn.ReLU())

    def configure_model(self) -> None:
        if self.model is None:
            metric = Accuracy(task="multiclass", num_classes=3)
            self.train_acc = metric.clone()
            self.valid_acc = metric.clone()
            self.test_acc = metric.clone()
            self.model = nn.Sequential(*(self.make_block() for x in range(self.num_blocks)), nn.Linear(32, 3))

    def forward(self, x):
        x = self.model(x)
        x = x.float()
        return F.softmax(x, dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.forward(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc(logits, y), prog_bar=True, sync_dist=True)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.forward(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=False, sync_dist=True)
        self.log("val_acc", self.valid_acc(logits, y), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.forward(x)
        self.log("test_loss", F.cross_entropy(logits, y), prog_bar=False, sync_dist=True)
        self.log("test_acc", self.test_acc(logits, y), prog_bar=True, sync_dist=True)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self.forward(x)
        self.test_acc(logits, y)
        return self.test_acc.compute()

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)
        return [optimizer], [{"scheduler": lr_scheduler, "interval": "step"}]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not hasattr(self, "model"):
            self.configure_model()
        # Lightning saves the lr schedulers, but DeepSpeed saves the optimizer states separately. ZeroStrategy also
        # keeps the hyperparameters of the optimizer Lightning sees (README, Checkpoints: lightning.pt), no state.
        assert len(checkpoint["lr_schedulers"]) == 1
        assert not any(opt.get("state") for opt in checkpoint.get("optimizer_states", [])), checkpoint["optimizer_states"]


class ManualModelParallelClassificationModel(ModelParallelClassificationModel):
    @property
    def automatic_optimization(self) -> bool:
        return False

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.forward(x)
        loss = F.cross_entropy(logits, y)
        opt = self.optimizers()
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc(logits, y), prog_bar=True, sync_dist=True)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class _ClassifDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class ClassifDataModule(LightningDataModule):
    """Lightning's tests_pytorch.helpers.datamodules.ClassifDataModule without scikit-learn (not a dependency here):
    3 separable classes of 32 features (one Gaussian cluster per class, seed 42), split 48/32/20 % into train, val
    and test as Lightning's does; 200 samples instead of 800 to keep the suite fast."""

    def __init__(self, num_features: int = 32, length: int = 200, num_classes: int = 3, batch_size: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(42)
        y = torch.randint(0, num_classes, (length,), generator=g)
        centers = 2.0 * torch.randn(num_classes, num_features, generator=g)
        x = centers[y] + torch.randn(length, num_features, generator=g)
        n_train, n_val = int(length * 0.48), int(length * 0.32)
        self.batch_size = batch_size
        self.splits = {"train": (x[:n_train], y[:n_train]),
                       "val": (x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
                       "test": (x[n_train + n_val:], y[n_train + n_val:])}

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(_ClassifDataset(*self.splits[split]), batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")


def deepspeed_config() -> dict[str, Any]:
    return {
        "optimizer": {"type": "SGD", "params": {"lr": 3e-5}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"last_batch_iteration": -1, "warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 100},
        },
    }


def deepspeed_zero_config() -> dict[str, Any]:
    return {**deepspeed_config(), "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 2}}


def _assert_save_model_is_equal(model, tmp_path, trainer):
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    checkpoint_path = os.path.join(tmp_path, "model.pt")
    checkpoint_path = trainer.strategy.broadcast(checkpoint_path)
    trainer.save_checkpoint(checkpoint_path)

    # carry out the check only on rank 0
    if trainer.is_global_zero:
        single_ckpt_path = os.path.join(tmp_path, "single_model.pt")
        convert_zero_checkpoint_to_fp32_state_dict(checkpoint_path, single_ckpt_path)

        if not os.path.isfile(single_ckpt_path):
            single_ckpt_path = os.path.join(single_ckpt_path, "pytorch_model.bin")
        state_dict = torch.load(single_ckpt_path, weights_only=False)

        model = model.cpu()
        # Assert model parameters are identical after loading
        for orig_param, saved_model_param in zip(model.parameters(), state_dict.values()):
            # HALF is bfloat16 on CPU: DeepSpeed's module.bfloat16() leaves Lightning's `model.dtype` at float32
            # (only .half() updates it), so the parameter's own dtype decides, as model.dtype does for float16
            if orig_param.dtype in (torch.half, torch.bfloat16):
                # moved model to float32 for comparison with single fp32 saved weights
                saved_model_param = saved_model_param.to(orig_param.dtype)
            assert torch.equal(orig_param, saved_model_param)


def _assert_checkpoint_equal(model, output_path):
    # test_deepspeed_collate_checkpoint.py
    assert os.path.exists(output_path)
    single_output = torch.load(output_path, weights_only=False)
    state_dict = model.state_dict()
    for orig_param, saved_model_param in zip(state_dict.values(), single_output["state_dict"].values()):
        if orig_param.dtype in (torch.half, torch.bfloat16):  # see _assert_save_model_is_equal
            saved_model_param = saved_model_param.to(orig_param.dtype)
        assert torch.equal(orig_param.cpu(), saved_model_param)


def _quiet() -> dict[str, Any]:
    return dict(enable_progress_bar=False, enable_model_summary=False)


# ----------------------------------------------------------------------------------------------------------------------
# test_deepspeed.py
# ----------------------------------------------------------------------------------------------------------------------


@case("test_warn_deepspeed_ignored")
def _(tmp_path):
    class TestModel(BoringModel):
        def backward(self, loss: Tensor, *args, **kwargs) -> None:
            return loss.backward()

    model = TestModel()
    trainer = Trainer(fast_dev_run=True, default_root_dir=tmp_path, strategy=ZeroStrategy(), accelerator=ACCELERATOR,
                      devices=DEVICES, precision=HALF, **_quiet())
    context_manager = (pytest.warns(UserWarning, match="will be ignored since DeepSpeed handles the backward")
                       if rank() == 0 else contextlib.suppress())  # a rank-zero warning; Lightning ran 1 device
    with context_manager:
        trainer.fit(model)


def _auto_batch_size(tmp_path, dataset_cls, value):
    # Lightning: DeepSpeedStrategy(logging_batch_size_per_gpu=value, zero_optimization=False); ZeroStrategy has no
    # logging_batch_size_per_gpu: train_micro_batch_size_per_gpu comes from the train DataLoader's batch_size ("auto")
    # or from the config; stage 0 is zero_optimization=False.
    class TestModel(BoringModel):
        def train_dataloader(self):
            return DataLoader(dataset_cls(32, 64))

        def configure_model(self) -> None:
            assert isinstance(self.trainer.strategy, ZeroStrategy)
            # resolved with the Trainer's flags: ds_config is set after configure_model at stages 0-2
            config = self.trainer.strategy.resolve_config(self.trainer)
            expected_value = value if isinstance(value, int) else 1
            if dataset_cls == RandomDataset:
                expected_value = self.train_dataloader().batch_size if value == "auto" else value
            assert config["train_micro_batch_size_per_gpu"] == expected_value
            raise SystemExit

    config = None if value == "auto" else {"train_micro_batch_size_per_gpu": value}
    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=True, accelerator=ACCELERATOR, devices=DEVICES,
                      strategy=ZeroStrategy(stage=0, config=config), **_quiet())
    if value == "auto":
        with pytest.raises(SystemExit):
            trainer.fit(TestModel())
    else:  # deliberate: a micro-batch size that disagrees with the DataLoader's is an error, not a logging value
        with pytest.raises(ZeroConfigError, match="train_micro_batch_size_per_gpu"):
            trainer.fit(TestModel())


for _cls in (RandomDataset, RandomIterableDataset):
    for _value in ("auto", 10):
        case(f"test_deepspeed_auto_batch_size_config_select[{_cls.__name__}-{_value}]")(
            lambda tmp_path, c=_cls, v=_value: _auto_batch_size(tmp_path, c, v))


@case("test_deepspeed_run_configure_optimizers")
def _(tmp_path):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    class TestCB(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            # ZeroStrategy: the optimizer Lightning sees is the one configure_optimizers returned (README, "One engine
            # per model"); the engine's optimizer is DeepSpeed's ZeRO optimizer around a private clone of it.
            assert isinstance(trainer.optimizers[0], torch.optim.SGD)
            (slot,) = trainer.strategy.engines
            assert isinstance(slot.engine.optimizer, DeepSpeedZeroOptimizer)
            assert isinstance(slot.engine.optimizer.optimizer, torch.optim.SGD)
            assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)
            assert trainer.lr_scheduler_configs[0].name == "Sean"

    class TestModel(BoringModel):
        def configure_optimizers(self):
            [optimizer], [scheduler] = super().configure_optimizers()
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "name": "Sean"}}

    model = TestModel()
    lr_monitor = LearningRateMonitor()
    trainer = Trainer(strategy=ZeroStrategy(), default_root_dir=tmp_path, accelerator=ACCELERATOR, devices=DEVICES,
                      fast_dev_run=True, precision=HALF, callbacks=[TestCB(), lr_monitor],
                      logger=CSVLogger(tmp_path), **_quiet())
    trainer.fit(model)
    assert lr_monitor.lrs == {"Sean": [0.1]}
    _assert_save_model_is_equal(model, tmp_path, trainer)


def _deepspeed_config_trainer(tmp_path, callbacks):
    return Trainer(strategy=ZeroStrategy(config=deepspeed_zero_config()), default_root_dir=tmp_path,
                   accelerator=ACCELERATOR, devices=DEVICES, log_every_n_steps=1, limit_train_batches=4,
                   limit_val_batches=4, limit_test_batches=4, max_epochs=2, precision=HALF, callbacks=callbacks,
                   logger=CSVLogger(tmp_path), **_quiet())


@case("test_deepspeed_config")
def _(tmp_path):
    from deepspeed.runtime.lr_schedules import WarmupLR
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    class TestCB(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            # as in test_deepspeed_run_configure_optimizers: Lightning sees a torch SGD built from the config's
            # optimizer block; the engine's optimizer is DeepSpeed's ZeRO optimizer around its own SGD
            assert isinstance(trainer.optimizers[0], torch.optim.SGD), type(trainer.optimizers[0])
            (slot,) = trainer.strategy.engines
            assert isinstance(slot.engine.optimizer, DeepSpeedZeroOptimizer), type(slot.engine.optimizer)
            assert isinstance(slot.engine.optimizer.optimizer, torch.optim.SGD), type(slot.engine.optimizer.optimizer)
            assert isinstance(trainer.lr_scheduler_configs[0].scheduler, WarmupLR)
            assert trainer.lr_scheduler_configs[0].interval == "step"

    class ConfigOptimizerModel(BoringModel):
        # Deliberate (README, Configuration): the config's optimizer/scheduler are used when configure_optimizers
        # returns none; BoringModel's own configure_optimizers with them is the error checked below.
        def configure_optimizers(self):
            return None

    model = ConfigOptimizerModel()
    lr_monitor = LearningRateMonitor()
    trainer = _deepspeed_config_trainer(tmp_path, [TestCB(), lr_monitor])
    trainer.fit(model)
    trainer.test(model)
    assert list(lr_monitor.lrs) == ["lr-SGD"]
    assert len(lr_monitor.lrs["lr-SGD"]) == 8

    trainer = _deepspeed_config_trainer(tmp_path, [])
    with pytest.raises(Exception, match="optimizer"):  # both the config's optimizer and configure_optimizers'
        trainer.fit(BoringModel())


@case("test_deepspeed_custom_precision_params")
def _(tmp_path):
    # Lightning's keywords loss_scale=10, initial_scale_power=11, ... are the config's fp16 section here.
    class TestCB(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            assert trainer.strategy.ds_config["fp16"]["loss_scale"] == 10
            assert trainer.strategy.ds_config["fp16"]["initial_scale_power"] == 11
            assert trainer.strategy.ds_config["fp16"]["loss_scale_window"] == 12
            assert trainer.strategy.ds_config["fp16"]["hysteresis"] == 13
            assert trainer.strategy.ds_config["fp16"]["min_loss_scale"] == 14
            raise SystemExit()

    model = BoringModel()
    ds = ZeroStrategy(config={"fp16": {"loss_scale": 10, "initial_scale_power": 11, "loss_scale_window": 12,
                                       "hysteresis": 13, "min_loss_scale": 14}})
    trainer = Trainer(default_root_dir=tmp_path, strategy=ds, precision="16-mixed", accelerator=ACCELERATOR,
                      devices=DEVICES, callbacks=[TestCB()], **_quiet())
    with pytest.raises(SystemExit):
        trainer.fit(model)


def _inference_precision(tmp_path, precision):
    class TestCB(Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            assert trainer.strategy.ds_config[precision]
            raise SystemExit()

    # Deliberate (README, Configuration): a config precision section is not silently preferred to the Trainer's
    # precision; the agreeing Trainer flag is needed, and the disagreement is an error.
    flag = {"fp16": "16-mixed", "bf16": "bf16-mixed"}[precision]
    strategy = ZeroStrategy(config={precision: {"enabled": True}})
    trainer = Trainer(default_root_dir=tmp_path, strategy=strategy, accelerator=ACCELERATOR, devices=DEVICES,
                      callbacks=[TestCB()], barebones=True, precision=flag)
    with pytest.raises(SystemExit):
        trainer.validate(BoringModel())
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(config={precision: {"enabled": True}}),
                      accelerator=ACCELERATOR, devices=DEVICES, barebones=True)
    with pytest.raises(ZeroConfigError, match=f"{precision}.enabled"):
        trainer.validate(BoringModel())


for _p in ("fp16", "bf16"):
    case(f"test_deepspeed_inference_precision_during_inference[{_p}]")(
        lambda tmp_path, p=_p: _inference_precision(tmp_path, p))


@case("test_deepspeed_custom_activation_checkpointing_params_forwarded")
def _(tmp_path):
    import deepspeed

    # ZeroStrategy refuses contiguous_memory_optimization without number_checkpoints (DeepSpeed sizes its buffer
    # with it), see test_strategy_port.py; given in the config here
    ds = ZeroStrategy(partition_activations=True, cpu_checkpointing=True, contiguous_memory_optimization=True,
                      synchronize_checkpoint_boundary=True, config={"activation_checkpointing": {"number_checkpoints": 1}})
    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=1, strategy=ds, precision=HALF,
                      accelerator=ACCELERATOR, devices=DEVICES, **_quiet())
    with mock.patch("deepspeed.checkpointing.configure",
                    wraps=deepspeed.checkpointing.configure) as deepspeed_checkpointing_configure:
        trainer.fit(model)
    # ZeroStrategy passes the mpu positionally and forwards synchronize/num_checkpoints too (same values as Lightning)
    deepspeed_checkpointing_configure.assert_called_with(
        None, partition_activations=True, contiguous_checkpointing=True, num_checkpoints=1, checkpoint_in_cpu=True,
        synchronize=True, profile=None)


@case("test_deepspeed_multigpu")
def _(tmp_path):
    import deepspeed

    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    with mock.patch.object(model, "configure_optimizers", wraps=model.configure_optimizers) as mock_configure_optimizers:
        trainer.test(model)
    assert mock_configure_optimizers.call_count == 0

    with mock.patch("deepspeed.init_distributed", wraps=deepspeed.init_distributed) as mock_deepspeed_distributed:
        trainer.fit(model)
    mock_deepspeed_distributed.assert_called_once()

    _assert_save_model_is_equal(model, tmp_path, trainer)


@case("test_deepspeed_fp32_works")
def _(tmp_path):
    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, accelerator=ACCELERATOR, devices=DEVICES, strategy="zero_stage_3",
                      fast_dev_run=True, **_quiet())
    trainer.fit(model)


@case("test_deepspeed_stage_3_save_warning")
def _(tmp_path):
    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.fit(model)
    checkpoint_path = os.path.join(tmp_path, "model.pt")
    context_manager = (
        pytest.warns(UserWarning, match="each worker will save a shard of the checkpoint within a directory.")
        if trainer.is_global_zero
        else contextlib.suppress()
    )
    with context_manager:
        trainer.save_checkpoint(checkpoint_path)


def _single_file_checkpoint(tmp_path) -> str:
    """A plain single-device fit's checkpoint file. Each rank writes its own file (the two processes would otherwise
    write one file at once); ZeroStrategy reads rank 0's path on every rank."""
    model = BoringModel()
    checkpoint_path = os.path.join(tmp_path, f"model_rank{rank()}.pt")
    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=True, accelerator="cpu", devices=1, **_quiet())
    trainer.fit(model)
    trainer.save_checkpoint(checkpoint_path)
    return checkpoint_path


@case("test_deepspeed_multigpu_single_file")
def _(tmp_path):
    # Deliberate (README, "Fine-tuning from a plain weights file"): ZeroStrategy has no load_full_weights; a single
    # file is recognised and loaded at any stage. Lightning's first half (the error without load_full_weights=True)
    # does not apply; its second half (test() from the file at stage 3) is this.
    model = BoringModel()
    checkpoint_path = _single_file_checkpoint(tmp_path)
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    assert isinstance(trainer.strategy, ZeroStrategy)
    trainer.test(model, ckpt_path=checkpoint_path)


@case("test_deepspeed_strategy_exclude_frozen_parameters_integration")
def _(tmp_path):
    class TestModelWithFrozenParams(BoringModel):
        def __init__(self):
            super().__init__()
            self.frozen_layer = torch.nn.Linear(32, 32)

        def configure_model(self) -> None:
            super().configure_model()
            for param in self.frozen_layer.parameters():
                param.requires_grad = False

        def forward(self, x):
            x = self.frozen_layer(x)
            return super().forward(x)

    model = TestModelWithFrozenParams()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(exclude_frozen_parameters=True),
                      accelerator=ACCELERATOR, devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.fit(model)
    checkpoint_path = os.path.join(tmp_path, "checkpoint_exclude_frozen.ckpt")
    trainer.save_checkpoint(checkpoint_path)
    assert os.path.exists(checkpoint_path)


@case("test_deepspeed_multigpu_stage_3")
def _(tmp_path):
    model = ModelParallelBoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.test(model)
    trainer.fit(model)
    _assert_save_model_is_equal(model, tmp_path, trainer)


@case("test_deepspeed_multigpu_stage_3_manual_optimization")
def _(tmp_path):
    model = ModelParallelBoringModelManualOptim()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.test(model)
    trainer.fit(model)
    _assert_save_model_is_equal(model, tmp_path, trainer)


def _stage_3_checkpointing(tmp_path, automatic_optimization, accumulate_grad_batches):
    # Lightning: max_epochs=10 on 800 samples; here 2 epochs on 200 (same assertions)
    model = ModelParallelClassificationModel() if automatic_optimization else ManualModelParallelClassificationModel()
    dm = ClassifDataModule()
    ck = ModelCheckpoint(monitor="val_acc", mode="max", save_last=True, save_top_k=-1)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=2, strategy=ZeroStrategy(stage=3),
                      accelerator=ACCELERATOR, devices=DEVICES, precision=HALF,
                      accumulate_grad_batches=accumulate_grad_batches, callbacks=[ck], **_quiet())
    trainer.fit(model, datamodule=dm)

    results = trainer.test(datamodule=dm)
    saved_results = trainer.test(ckpt_path=ck.best_model_path, datamodule=dm)
    assert saved_results == results

    model = ModelParallelClassificationModel() if automatic_optimization else ManualModelParallelClassificationModel()
    trainer = Trainer(default_root_dir=tmp_path, accelerator=ACCELERATOR, devices=DEVICES,
                      strategy=ZeroStrategy(stage=3), precision=HALF, **_quiet())
    trainer.test(model, datamodule=dm, ckpt_path=ck.best_model_path)


for _acc, _auto in ((1, False), (2, True)):
    case(f"test_deepspeed_multigpu_stage_3_checkpointing[{_acc}-{_auto}]")(
        lambda tmp_path, a=_acc, o=_auto: _stage_3_checkpointing(tmp_path, o, a))


@case("test_deepspeed_multigpu_stage_3_warns_resume_training")
def _(tmp_path):
    dm = ClassifDataModule()
    model = BoringModel()
    checkpoint_path = _single_file_checkpoint(tmp_path)
    # ZeroStrategy's warning for a single file (README): its weights only, step 0, a new optimizer state
    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=True, strategy=ZeroStrategy(stage=3),
                      accelerator=ACCELERATOR, devices=DEVICES, precision=HALF, **_quiet())
    context_manager = (pytest.warns(UserWarning, match="plain weights file: ZeroStrategy loaded its weights only")
                       if rank() == 0 else contextlib.suppress())
    # Lightning passes datamodule=ClassifDataModule() to this BoringModel, whose forward cannot take (x, y) batches;
    # BoringModel's own data here
    with context_manager:
        trainer.fit(model, ckpt_path=checkpoint_path)


@case("test_deepspeed_multigpu_stage_3_resume_training")
def _(tmp_path):
    initial_model = ModelParallelClassificationModel()
    dm = ClassifDataModule()

    ck = ModelCheckpoint(monitor="val_acc", mode="max", save_last=True, save_top_k=-1)
    initial_trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                              limit_test_batches=2, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                              devices=DEVICES, precision=HALF, callbacks=[ck], **_quiet())
    initial_trainer.fit(initial_model, datamodule=dm)
    # ZeroStrategy releases the engines at teardown (built-in: strategy.deepspeed_engine stays): keep what the
    # callback compares now, while the first fit's engine still exists.
    (slot,) = initial_trainer.strategy.engines if len(initial_trainer.strategy.engines) else (None,)
    original = {
        "optimizer": None if slot is None else slot.engine.optimizer.state_dict(),
        "lr_scheduler": initial_trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    }

    class TestCallback(Callback):
        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            original_deepspeed_strategy = initial_trainer.strategy
            current_deepspeed_strategy = trainer.strategy
            assert isinstance(original_deepspeed_strategy, ZeroStrategy)
            assert isinstance(current_deepspeed_strategy, ZeroStrategy)
            (current_slot,) = current_deepspeed_strategy.engines
            original_optimizer_dict = original["optimizer"]
            assert original_optimizer_dict is not None, "the first fit's engine was gone after fit"
            current_optimizer_dict = current_slot.engine.optimizer.state_dict()
            for orig_tensor, current_tensor in zip(
                original_optimizer_dict["fp32_flat_groups"], current_optimizer_dict["fp32_flat_groups"]
            ):
                assert torch.all(orig_tensor.eq(current_tensor))
            for current_param, initial_param in zip(pl_module.parameters(), initial_model.parameters()):
                assert torch.equal(current_param.cpu(), initial_param.cpu())
            assert trainer.current_epoch == 1
            current_lr_scheduler = trainer.lr_scheduler_configs[0].scheduler
            assert original["lr_scheduler"] == current_lr_scheduler.state_dict()

    model = ModelParallelClassificationModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, max_epochs=2, limit_train_batches=1, limit_val_batches=0, precision=HALF,
                      callbacks=TestCallback(), **_quiet())
    trainer.fit(model, datamodule=dm, ckpt_path=ck.best_model_path)


def _stage_2_accumulated(tmp_path, offload_optimizer):
    class VerificationCallback(Callback):
        def __init__(self):
            self.on_train_batch_start_called = False

        def on_train_batch_start(self, trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
            deepspeed_engine = trainer.strategy.model
            assert trainer.global_step == deepspeed_engine.global_steps
            self.on_train_batch_start_called = True

    model = ModelParallelClassificationModel()
    dm = ClassifDataModule()
    verification_callback = VerificationCallback()
    # Lightning sets strategy.config["zero_force_ds_cpu_optimizer"] = False on its private dict; the config here
    strategy = ZeroStrategy(stage=2, offload_optimizer="cpu" if offload_optimizer else False,
                            config={"zero_force_ds_cpu_optimizer": False})
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, strategy=strategy, accelerator=ACCELERATOR,
                      devices=DEVICES, limit_train_batches=5, limit_val_batches=2, precision=HALF,
                      accumulate_grad_batches=2, callbacks=[verification_callback], **_quiet())
    assert trainer.limit_train_batches % trainer.accumulate_grad_batches != 0, "leftover batches should be tested"
    trainer.fit(model, datamodule=dm)
    assert verification_callback.on_train_batch_start_called


for _off in (False, True):
    case(f"test_deepspeed_multigpu_stage_2_accumulated_grad_batches[{_off}]")(
        lambda tmp_path, o=_off: _stage_2_accumulated(tmp_path, o))


@case("test_deepspeed_multigpu_test")
def _(tmp_path):
    model = ModelParallelBoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.test(model)


@case("test_deepspeed_multigpu_partial_partition_parameters")
def _(tmp_path):
    class TestModel(ModelParallelBoringModel):
        def __init__(self):
            super().__init__()
            self.layer_2 = torch.nn.Linear(32, 32)

        def configure_model(self) -> None:
            if self.layer is None:
                self.layer = torch.nn.Linear(32, 2)

        def forward(self, x):
            x = self.layer_2(x)
            return self.layer(x)

        def on_train_epoch_start(self) -> None:
            assert all(x.dtype == HALF_DTYPE for x in self.parameters())

    model = TestModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.fit(model)


@case("test_deepspeed_multigpu_test_rnn")
def _(tmp_path):
    class TestModel(BoringModel):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(32, 32)

        def on_train_epoch_start(self) -> None:
            assert all(x.dtype == HALF_DTYPE for x in self.parameters())

    model = TestModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.fit(model)


@case("test_deepspeed_multigpu_no_schedulers")
def _(tmp_path):
    model = ModelParallelBoringModelNoSchedulers()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.fit(model)
    _assert_save_model_is_equal(model, tmp_path, trainer)


@case("test_deepspeed_skip_backward_raises")
def _(tmp_path):
    class TestModel(BoringModel):
        def training_step(self, batch, batch_idx):
            return None

    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(), accelerator=ACCELERATOR, devices=DEVICES,
                      fast_dev_run=True, precision=HALF, **_quiet())
    # On 2 processes Lightning's own loop refuses it first (Lightning's test runs 1 device, where its DeepSpeed
    # precision plugin raises; ZeroPrecision raises a ValueError there)
    # (on 1 device, as on a 1-GPU machine, ZeroStrategy's own ValueError comes first)
    with pytest.raises((RuntimeError, ValueError), match="returning None in distributed training is not supported"
                       "|Returning None from training_step"):
        trainer.fit(TestModel())


def _scheduler_step_count(tmp_path, interval, max_epoch=2, limit_train_batches=2):
    class TestModel(BoringModel):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.layer.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    with mock.patch("torch.optim.lr_scheduler.StepLR.step", autospec=True) as mock_step:
        trainer = Trainer(default_root_dir=tmp_path, limit_train_batches=limit_train_batches, limit_val_batches=0,
                          max_epochs=max_epoch, accelerator=ACCELERATOR, devices=DEVICES, strategy="zero", **_quiet())
        trainer.fit(TestModel())
    if interval == "epoch":
        assert mock_step.call_count == 1 + max_epoch
    else:
        assert mock_step.call_count == 1 + (max_epoch * limit_train_batches)


for _i in ("step", "epoch"):
    case(f"test_scheduler_step_count[{_i}-2-2]")(lambda tmp_path, i=_i: _scheduler_step_count(tmp_path, i))


@case("test_deepspeed_configure_gradient_clipping")
def _(tmp_path):
    # Deliberate: Lightning warns that the hook "will not actually clip gradients"; ZeroPrecision.clip_gradients sets
    # the norm DeepSpeed clips the next step at (README, "Clipping"), so the hook works and no warning is given. Same
    # model and Trainer call; the assertions check that the hook ran and the clip norm reached the engine.
    seen = []

    class TestModel(BoringModel):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            seen.append(gradient_clip_val)

    trainer = Trainer(default_root_dir=tmp_path, accelerator=ACCELERATOR, devices=DEVICES, strategy="zero",
                      fast_dev_run=True, gradient_clip_val=0.5, **_quiet())
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TestModel())
    assert seen == [0.5]
    assert not [w for w in caught if "clip" in str(w.message)], [str(w.message) for w in caught]


@case("test_deepspeed_gradient_clip_by_value")
def _(tmp_path):
    # ZeroStrategy refuses it before any process starts, with a ZeroConfigError (a ValueError) naming the fix
    trainer = Trainer(default_root_dir=tmp_path, accelerator=ACCELERATOR, devices=DEVICES, strategy="zero",
                      gradient_clip_algorithm="value", **_quiet())
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        trainer.fit(BoringModel())


@case("test_deepspeed_multi_save_same_filepath")
def _(tmp_path):
    class CustomModel(BoringModel):
        def training_step(self, *args, **kwargs):
            self.log("grank", self.global_rank)
            return super().training_step(*args, **kwargs)

    model = CustomModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy="zero", accelerator=ACCELERATOR, devices=DEVICES,
                      callbacks=[ModelCheckpoint(filename="{epoch}_{step}_{grank}", save_top_k=1)],
                      limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0, max_epochs=2, **_quiet())
    trainer.fit(model)

    filepath = "epoch=1_step=2_grank=0.0.ckpt"
    expected = {filepath}
    assert expected == set(os.listdir(trainer.checkpoint_callback.dirpath)), os.listdir(trainer.checkpoint_callback.dirpath)

    ckpt_path = os.path.join(trainer.checkpoint_callback.dirpath, filepath)
    # ZeroStrategy's documented folder layout (README, Checkpoints) instead of DeepSpeed's bare one
    expected = {"meta.json", "lightning.pt", "rng", "model"}
    assert expected <= set(os.listdir(ckpt_path)), os.listdir(ckpt_path)


@case("test_deepspeed_with_bfloat16_precision")
def _(tmp_path):
    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy="zero_stage_3", accelerator=ACCELERATOR, devices=DEVICES,
                      fast_dev_run=True, precision="bf16-mixed", num_sanity_val_steps=0, **_quiet())
    trainer.fit(model)
    assert isinstance(trainer.strategy.precision_plugin, ZeroPrecision)
    assert trainer.strategy.precision_plugin.precision == "bf16-mixed"
    assert trainer.strategy.resolve_config(trainer)["zero_optimization"]["stage"] == 3
    assert trainer.strategy.resolve_config(trainer)["bf16"]["enabled"]
    assert model.layer.weight.dtype == torch.bfloat16


@case("test_deepspeed_configure_optimizer_device_set")
def _(tmp_path):
    class TestModel(BoringModel):
        def configure_optimizers(self):
            assert self.trainer.estimated_stepping_batches == 1
            assert self.device.type == DEVICE_TYPE
            raise SystemExit

    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=True, accelerator=ACCELERATOR, devices=DEVICES,
                      strategy=ZeroStrategy())
    with pytest.raises(SystemExit):
        trainer.fit(TestModel())


@case("test_deepspeed_init_module_with_stage_3")
def _(tmp_path):
    import deepspeed

    trainer = Trainer(accelerator=ACCELERATOR, devices=DEVICES, strategy="zero_stage_3", precision="bf16-mixed",
                      fast_dev_run=1, default_root_dir=tmp_path, **_quiet())
    model = ModelParallelBoringModel()
    # wraps (Lightning replaces it by a mock): configure_model really runs partitioned; ZeroStrategy passes the
    # resolved config as a dict and remote_device None (no parameter offload), and enables it by entering it
    with mock.patch("deepspeed.zero.Init", wraps=deepspeed.zero.Init) as zero_init_mock:
        trainer.fit(model)
    zero_init_mock.assert_called_once_with(remote_device=None, config_dict_or_path=mock.ANY)
    assert hasattr(model.layer.weight, "ds_id")  # created partitioned


def _init_module_stages_1_2(tmp_path, stage):
    import deepspeed

    strategy = ZeroStrategy(stage=stage)
    trainer = Trainer(accelerator=ACCELERATOR, devices=DEVICES, strategy=strategy, precision="bf16-mixed",
                      fast_dev_run=1, default_root_dir=tmp_path, **_quiet())
    model = ModelParallelBoringModel()
    with mock.patch("deepspeed.zero.Init", wraps=deepspeed.zero.Init) as zero_init_mock:
        trainer.fit(model)
    # Lightning enters zero.Init(enabled=False); ZeroStrategy does not enter it below stage 3 (README)
    zero_init_mock.assert_not_called()
    assert model.layer.weight.dtype == torch.bfloat16


for _s in (1, 2):
    case(f"test_deepspeed_init_module_with_stages_1_2[{_s}]")(lambda tmp_path, s=_s: _init_module_stages_1_2(tmp_path, s))


@case("test_deepspeed_load_checkpoint_validate_path")
def _(tmp_path):
    # Lightning calls strategy.load_checkpoint on a bare strategy; ZeroStrategy loads inside a Trainer call (all
    # ranks), so the paths go through trainer.validate(ckpt_path=...). Its errors are ValueErrors (FileNotFoundError
    # only for a path that does not exist), and the subfolder hint names the checkpoint folder, found by its manifest.
    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(), accelerator=ACCELERATOR, devices=DEVICES,
                      fast_dev_run=True, **_quiet())
    trainer.fit(model)
    checkpoint = tmp_path / "checkpoint.ckpt"
    trainer.save_checkpoint(checkpoint)

    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(), accelerator=ACCELERATOR, devices=DEVICES,
                      fast_dev_run=True, **_quiet())
    with pytest.raises(ValueError, match="is a folder but not a ZeroStrategy checkpoint"):
        trainer.validate(model, ckpt_path=empty)

    # User tries to pass the subfolder as the path
    checkpoint_path = checkpoint / "model" / "checkpoint"
    with pytest.raises(ValueError, match=f"Pass the checkpoint folder itself: '{checkpoint}'"):
        trainer.validate(model, ckpt_path=checkpoint_path)

    # User tries to pass an individual file inside the checkpoint folder
    checkpoint_path = next(checkpoint_path.glob("*model_states.pt"))
    with pytest.raises(ValueError, match=f"Pass the checkpoint folder itself: '{checkpoint}'"):
        trainer.validate(model, ckpt_path=checkpoint_path)


# ----------------------------------------------------------------------------------------------------------------------
# test_deepspeed_collate_checkpoint.py
# ----------------------------------------------------------------------------------------------------------------------


@case("test_deepspeed_collate_checkpoint")
def _(tmp_path):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    model = BoringModel()
    trainer = Trainer(default_root_dir=tmp_path, strategy=ZeroStrategy(stage=3), accelerator=ACCELERATOR,
                      devices=DEVICES, fast_dev_run=True, precision=HALF, **_quiet())
    trainer.fit(model)
    checkpoint_path = os.path.join(tmp_path, "model.pt")
    checkpoint_path = trainer.strategy.broadcast(checkpoint_path)
    trainer.save_checkpoint(checkpoint_path)
    if trainer.is_global_zero:
        output_path = os.path.join(tmp_path, "single_model.pt")
        convert_zero_checkpoint_to_fp32_state_dict(checkpoint_path, output_path)
        _assert_checkpoint_equal(model, output_path)


# ----------------------------------------------------------------------------------------------------------------------
# test_deepspeed_model_summary.py
# ----------------------------------------------------------------------------------------------------------------------


@case("test_deepspeed_summary")
def _(tmp_path):
    model = BoringModel()
    total_parameters = sum(x.numel() for x in model.parameters())

    class TestCallback(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            model_summary = ZeroSummary(pl_module, max_depth=1)
            assert model_summary.total_parameters == total_parameters
            assert model_summary.trainable_parameters == total_parameters
            # Lightning's DeepSpeedSummary has a "Params per Device" column (summary_data[4]); ZeroSummary reports the
            # rank's share in one line and `params_per_rank` (README, "Summary")
            assert model_summary.params_per_rank == (model_summary.total_parameters // 2)

    trainer = Trainer(strategy=ZeroStrategy(stage=3), default_root_dir=tmp_path, accelerator=ACCELERATOR,
                      fast_dev_run=True, devices=DEVICES, precision=HALF, enable_model_summary=True,
                      callbacks=[TestCallback()], enable_progress_bar=False)
    trainer.fit(model)


@case("test_deepspeed_summary_with_rich_model_summary")
def _(tmp_path):
    from lightning.pytorch.callbacks import RichModelSummary

    model = BoringModel()
    model.example_input_array = torch.randn(4, 32)
    trainer = Trainer(strategy=ZeroStrategy(stage=3), default_root_dir=tmp_path, accelerator=ACCELERATOR,
                      fast_dev_run=True, devices=DEVICES, enable_model_summary=True, callbacks=[RichModelSummary()],
                      enable_progress_bar=False)
    with mock.patch("rich.table.Table.add_row", autospec=True) as mock_table_add_row:
        trainer.fit(model)
    if rank() == 0:  # the summary is printed on rank 0
        args, _ = mock_table_add_row.call_args_list[0]
        # Lightning's DeepSpeedSummary adds a "Params per Device" column (the second "66  "); ZeroSummary gives the
        # rank's share in one line below the table instead (README, "Summary")
        assert args[1:] == ("0", "layer", "Linear", "66  ", "train", "512  ", "[4, 32]", "[4, 2]"), args[1:]


# ----------------------------------------------------------------------------------------------------------------------


def launch(out: Path, names: list[str], env: dict[str, str], timeout_s: float) -> str:
    """Run ``names`` in one launch of this script (the popen launcher starts the other ranks); its output."""
    proc = subprocess.Popen([sys.executable, __file__, str(out), *names], env=env, cwd=out,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's other ranks are in the same session
        log, _ = proc.communicate()
        log += f"\n[killed after {timeout_s} s]"
    return log


def failures(out: Path, name: str, ranks: int, log: str) -> list[str]:
    """What went wrong in case ``name`` on each rank of a launch (empty: it passed everywhere)."""
    found = []
    for r in range(ranks):
        path = out / f"{name}.rank{r}.json"
        if not path.exists():
            found.append(f"rank {r}: the case did not run to its end. Launch output (tail):\n{log[-4000:]}")
            continue
        result = json.loads(path.read_text())
        if not result["ok"]:
            found.append(f"rank {r}:\n{result['error']}")
    return found


def main(out_dir: str, names: list[str]) -> None:
    out = Path(out_dir)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    for name in names:
        tmp_path = out / "cases" / name.replace("[", "_").replace("]", "")
        tmp_path.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"ok": True}
        try:
            CASES[name](tmp_path)
        except BaseException:  # SystemExit included: a case that leaks one must not end the others
            result = {"ok": False, "error": traceback.format_exc()}
        (out / f"{name}.rank{rank()}.json").write_text(json.dumps(result))
        print(f"[rank {rank()}] {name}: {'ok' if result['ok'] else 'FAILED'}", flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo/DeepSpeed threads can abort a finalising interpreter (see strategy._Launcher)
