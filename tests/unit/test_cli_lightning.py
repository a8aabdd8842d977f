"""ZeroStrategy's DeepSpeed keywords through LightningCLI (jsonargparse): options, YAML, --help, errors; and the
contract that every typed keyword is a key DeepSpeed knows."""

from __future__ import annotations

import sys
import typing

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_zero import ZeroConfigError, ZeroStrategy
from lightning_zero.keywords import (ACTIVATION_CHECKPOINTING_KEYS, AIO_KEYS, BF16_KEYS, OFFLOAD_KEYS, AioKeywords,
                                     ZenFlowKeywords, ZeroKeywords)

KEYS = list(typing.get_type_hints(ZeroKeywords))


def _cli(monkeypatch, *args: str) -> LightningCLI:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when given args and a command line
    return LightningCLI(BoringModel, run=False, save_config_callback=None,
                        args=["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false", *args])


def test_every_typed_keyword_is_a_key_deepspeed_knows():
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT
    from deepspeed.runtime.zenflow.zenflow_config import ZenFlowConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero_keys = {f.alias or name for name, f in DeepSpeedZeroConfig.model_fields.items()}
    rest = [k for k in KEYS if k not in OFFLOAD_KEYS + AIO_KEYS + ACTIVATION_CHECKPOINTING_KEYS + BF16_KEYS]
    assert [k for k in rest if k not in zero_keys] == []
    assert set(BF16_KEYS) <= set(DeepSpeedBF16Config.model_fields)
    assert set(typing.get_type_hints(ZenFlowKeywords)) <= set(ZenFlowConfig.model_fields)
    assert set(ACTIVATION_CHECKPOINTING_KEYS) <= set(DeepSpeedActivationCheckpointingConfig({}).__dict__)
    assert set(typing.get_type_hints(AioKeywords)) <= set(AIO_DEFAULT_DICT)


def test_every_keyword_resolve_knobs_maps_is_typed():
    import inspect

    from lightning_zero.config import resolve_knobs

    named = [p for p in inspect.signature(resolve_knobs).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    strategy_own = {"stage", "offload_optimizer", "offload_parameters", "nvme_path", "pin_memory"}
    assert sorted(p.name for p in named if p.name not in strategy_own) == sorted(
        OFFLOAD_KEYS + AIO_KEYS + ACTIVATION_CHECKPOINTING_KEYS + BF16_KEYS)
    assert strategy_own <= set(inspect.signature(ZeroStrategy).parameters)


def test_cli_options_and_yaml_reach_the_deepspeed_config(monkeypatch, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"strategy": {"class_path": "lightning_zero.ZeroStrategy",
        "init_args": {"stage": 3, "reduce_bucket_size": 3e5, "stage3_param_persistence_threshold": 1000,
                      "offload_parameters": "cpu", "params_buffer_count": 6, "partition_activations": True}}}}))
    cli = _cli(monkeypatch, "--config", str(config), "--trainer.strategy.overlap_comm=true",
               "--trainer.strategy.contiguous_gradients=false", "--trainer.strategy.sub_group_size=5e8")
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ZeroStrategy) and strategy.stage == 3
    ds = strategy.resolve_config(None)
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is False
    assert zero["reduce_bucket_size"] == 3e5 and zero["sub_group_size"] == 5e8
    assert zero["stage3_param_persistence_threshold"] == 1000
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_param"]["buffer_count"] == 6
    assert ds["activation_checkpointing"]["partition_activations"] is True
    # the same call in Python gives the same config
    python = ZeroStrategy(stage=3, reduce_bucket_size=3e5, stage3_param_persistence_threshold=1000,
                          offload_parameters="cpu", params_buffer_count=6, partition_activations=True,
                          overlap_comm=True, contiguous_gradients=False, sub_group_size=5e8)
    assert python.resolve_config(None) == ds


def test_cli_nested_aio_section(monkeypatch, tmp_path):
    cli = _cli(monkeypatch, "--trainer.strategy=lightning_zero.ZeroStrategy", "--trainer.strategy.stage=3",
               "--trainer.strategy.offload_optimizer=nvme", f"--trainer.strategy.nvme_path={tmp_path}",
               '--trainer.strategy.aio={"block_size": 262144, "queue_depth": 4}')
    assert cli.trainer.strategy.knobs["aio"] == {"block_size": 262144, "queue_depth": 4}


def test_help_lists_every_keyword(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli(monkeypatch, "--trainer.strategy.help", "lightning_zero.ZeroStrategy")
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    missing = [k for k in KEYS if f"--trainer.strategy.{k} " not in shown]
    assert missing == []
    assert "``zero_optimization.overlap_comm``: overlap gradient" in shown  # each option's own description
    assert "(type: bool)" in shown and "(type: int | float)" in shown


def test_wrong_values_are_refused(monkeypatch, capsys):
    # a wrong type: jsonargparse refuses it before ZeroStrategy is built, naming the option and the type
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "--trainer.strategy=lightning_zero.ZeroStrategy", "--trainer.strategy.overlap_comm=maybe")
    refused = capsys.readouterr().err
    assert "Parser key \"overlap_comm\":\n          Expected a <class 'bool'>. Got value: maybe" in refused
    # a well-typed value ZeroStrategy refuses: jsonargparse's ValueError quotes ZeroStrategy's own message, the same
    # as from Python (DeepSpeed's schema reworded; an offload setting without its offload)
    for key, value, expected in (
            ("reduce_bucket_size", -1, "'zero_optimization.reduce_bucket_size' = -1: Input should be greater than 0"),
            ("params_buffer_count", 4, "params_buffer_count (needs offload_parameters)")):
        with pytest.raises(ZeroConfigError) as from_python:
            ZeroStrategy(**{key: value})
        assert expected in str(from_python.value)
        with pytest.raises(ValueError) as from_cli:
            _cli(monkeypatch, "--trainer.strategy=lightning_zero.ZeroStrategy", f"--trainer.strategy.{key}={value}")
        assert all(line.strip() in str(from_cli.value) for line in str(from_python.value).splitlines())


def test_long_tail_keys_work_from_python_and_config_only(monkeypatch):
    # any other zero_optimization key is still a keyword in Python (backward compatible) ...
    strategy = ZeroStrategy(stage=2, use_multi_rank_bucket_allreduce=False)
    assert strategy.resolve_config(None)["zero_optimization"]["use_multi_rank_bucket_allreduce"] is False
    with pytest.raises(ZeroConfigError, match="overlap_comm"):
        ZeroStrategy(overlap_com=True)  # and misspelt keys still get the did-you-mean
    # ... while LightningCLI sees typed keywords only: such a key goes in `config=`
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "--trainer.strategy=lightning_zero.ZeroStrategy",
             "--trainer.strategy.use_multi_rank_bucket_allreduce=false")
    cli = _cli(monkeypatch, "--trainer.strategy=lightning_zero.ZeroStrategy",
               '--trainer.strategy.config={"zero_optimization": {"use_multi_rank_bucket_allreduce": false}}')
    assert cli.trainer.strategy.resolve_config(None)["zero_optimization"]["use_multi_rank_bucket_allreduce"] is False


def test_logging_level_by_name_from_the_command_line(monkeypatch):
    """`--trainer.strategy.logging_level=INFO` reaches ZeroStrategy's own check (the signature takes int | str)."""
    import logging

    import deepspeed

    logger = deepspeed.utils.logging.logger
    before = logger.level
    try:
        cli = _cli(monkeypatch, "--trainer.strategy=lightning_zero.ZeroStrategy", "--trainer.strategy.stage=2",
                   "--trainer.strategy.logging_level=INFO")
        assert isinstance(cli.trainer.strategy, ZeroStrategy)
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(before)
