"""Lightning's own DeepSpeed strategy tests (tests/tests_pytorch/strategies/test_deepspeed.py, lightning 2.6.6) that
need no process group, ported to ZeroStrategy: construction, registered names, config sources, precision plugin,
device-index check. What changed and why: docs/lightning_tests_port.md."""

import json
import os
from re import escape
from unittest.mock import Mock

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CUDAAccelerator

from lightning_zero import ZeroConfigError, ZeroPrecision, ZeroStrategy


@pytest.fixture
def deepspeed_config():
    return {
        "optimizer": {"type": "SGD", "params": {"lr": 3e-5}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"last_batch_iteration": -1, "warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 100},
        },
    }


@pytest.mark.parametrize("strategy", ["zero", ZeroStrategy])
def test_deepspeed_strategy_string(tmp_path, strategy):
    trainer = Trainer(accelerator="cpu", fast_dev_run=True, default_root_dir=tmp_path,
                      strategy=strategy if isinstance(strategy, str) else strategy())
    assert isinstance(trainer.strategy, ZeroStrategy)
    assert trainer.strategy.parallel_devices == [torch.device("cpu")]


def _resolved_user_keys(strategy, trainer=None):
    """The part of the resolved config that came from the user (the rest is filled from the Trainer's flags)."""
    resolved = strategy.resolve_config(trainer)
    return {k: resolved[k] for k in ("optimizer", "scheduler")}


def test_deepspeed_strategy_env(tmp_path, monkeypatch, deepspeed_config):
    # PL_DEEPSPEED_CONFIG_PATH -> $LIGHTNING_ZERO_CONFIG; strategy.config (private there) -> resolve_config(trainer)
    config_path = os.path.join(tmp_path, "temp.json")
    with open(config_path, "w") as f:
        f.write(json.dumps(deepspeed_config))
    monkeypatch.setenv("LIGHTNING_ZERO_CONFIG", config_path)

    trainer = Trainer(accelerator="cpu", fast_dev_run=True, default_root_dir=tmp_path, strategy="zero")
    strategy = trainer.strategy
    assert isinstance(strategy, ZeroStrategy)
    assert strategy.parallel_devices == [torch.device("cpu")]
    assert _resolved_user_keys(strategy, trainer) == deepspeed_config


def test_deepspeed_precision_choice(tmp_path):
    # Lightning mocks one CUDA device (cuda_count_1, accelerator="gpu"); the plugin choice is the same on CPU
    trainer = Trainer(fast_dev_run=True, default_root_dir=tmp_path, accelerator="cpu", strategy="zero",
                      precision="16-mixed")
    assert isinstance(trainer.strategy, ZeroStrategy)
    assert isinstance(trainer.strategy.precision_plugin, ZeroPrecision)
    assert trainer.strategy.precision_plugin.precision == "16-mixed"


def test_deepspeed_with_invalid_config_path():
    # ZeroConfigError (a ValueError) instead of MisconfigurationException, with the path and the fix
    with pytest.raises(ZeroConfigError, match="'invalid_path.json', which is not a file. Pass a path to a DeepSpeed"):
        ZeroStrategy(config="invalid_path.json")


def test_deepspeed_with_env_path(tmp_path, monkeypatch, deepspeed_config):
    config_path = os.path.join(tmp_path, "temp.json")
    with open(config_path, "w") as f:
        f.write(json.dumps(deepspeed_config))
    monkeypatch.setenv("LIGHTNING_ZERO_CONFIG", config_path)
    strategy = ZeroStrategy()
    assert _resolved_user_keys(strategy) == deepspeed_config


def test_deepspeed_defaults():
    strategy = ZeroStrategy()
    config = strategy.resolve_config(None)
    assert config is not None
    assert isinstance(config["zero_optimization"], dict)


def test_deepspeed_custom_activation_checkpointing_params():
    keywords = dict(partition_activations=True, cpu_checkpointing=True, contiguous_memory_optimization=True,
                    synchronize_checkpoint_boundary=True)
    # Deliberate: DeepSpeed sizes the contiguous buffer with number_checkpoints; without it ZeroStrategy refuses at
    # construction instead of failing at the first checkpointed forward
    with pytest.raises(ZeroConfigError, match="contiguous_memory_optimization=True needs"
                                              " activation_checkpointing.number_checkpoints"):
        ZeroStrategy(**keywords)
    ds = ZeroStrategy(**keywords, config={"activation_checkpointing": {"number_checkpoints": 1}})
    checkpoint_config = ds.resolve_config(None)["activation_checkpointing"]
    assert checkpoint_config["partition_activations"]
    assert checkpoint_config["cpu_checkpointing"]
    assert checkpoint_config["contiguous_memory_optimization"]
    assert checkpoint_config["synchronize_checkpoint_boundary"]


def test_deepspeed_assert_config_zero_offload_disabled(deepspeed_config):
    # Lightning's version (on a GPU) checks its private dict in a callback's setup, before DeepSpeed reads it.
    # Deliberate: DeepSpeed 0.19's schema takes no `false` for the offload_optimizer section (it wants a dict or
    # nothing), so ZeroStrategy reports DeepSpeed's own error at construction; the keyword form means "no offload".
    config = {**deepspeed_config, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "offload_optimizer": False}}
    with pytest.raises(ZeroConfigError, match="'zero_optimization.offload_optimizer' = False: Input should be a valid"
                                              " dictionary"):
        ZeroStrategy(config=config)
    config["zero_optimization"].pop("offload_optimizer")
    resolved = ZeroStrategy(config=config, offload_optimizer=False).resolve_config(None)["zero_optimization"]
    assert "offload_optimizer" not in resolved or resolved["offload_optimizer"].get("device") in (None, "none")


@pytest.mark.parametrize("device_indices", [[1], [1, 0], [0, 2], [3, 2, 1]])
def test_validate_parallel_devices_indices(device_indices):
    accelerator = Mock(spec=CUDAAccelerator)
    strategy = ZeroStrategy(accelerator=accelerator,
                            parallel_devices=[torch.device("cuda", i) for i in device_indices])
    # ValueError (the project's type for a user mistake) instead of RuntimeError, with the fix in the message
    with pytest.raises(
        ValueError, match=escape(f"device indices {device_indices!r} don't match the local rank values of processes")
    ):
        strategy.setup_environment()
    accelerator.setup_device.assert_called_once_with(torch.device("cuda", device_indices[0]))
