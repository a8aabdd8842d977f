"""lightning_zero.precision.ZeroPrecision: the parts that need no engine."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_zero.precision import ZeroPrecision

DTYPES = {"32-true": torch.float32, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16,
          "16-true": torch.float16, "bf16-true": torch.bfloat16}


@pytest.mark.parametrize("precision", ["64-true", "16", "bf16", "transformer-engine", "32"])
def test_invalid_precision(precision: str) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"Trainer(precision={precision!r}) is not supported with ZeroStrategy. Use one of ('32-true', '16-mixed',"
            " 'bf16-mixed', '16-true', 'bf16-true').")):
        ZeroPrecision(precision)


@pytest.mark.parametrize(("precision", "dtype"), DTYPES.items())
def test_dtype(precision: str, dtype: torch.dtype) -> None:
    plugin = ZeroPrecision(precision)
    assert plugin.precision == precision
    assert plugin.dtype is dtype


@pytest.mark.parametrize(("precision", "dtype"), DTYPES.items())
def test_convert_module_only_for_true(precision: str, dtype: torch.dtype) -> None:
    module = nn.Linear(2, 2)
    out = ZeroPrecision(precision).convert_module(module)
    assert out is module
    assert module.weight.dtype == (dtype if precision.endswith("-true") else torch.float32)


@pytest.mark.parametrize(("precision", "dtype"), DTYPES.items())
def test_convert_input_and_init_context(precision: str, dtype: torch.dtype) -> None:
    plugin = ZeroPrecision(precision)
    batch = plugin.convert_input({"x": torch.ones(2), "idx": torch.arange(2)})
    assert batch["x"].dtype is dtype and batch["idx"].dtype is torch.int64
    with plugin.module_init_context():
        created = nn.Linear(2, 2)
    assert created.weight.dtype == (dtype if precision.endswith("-true") else torch.float32)
    assert torch.get_default_dtype() is torch.float32  # restored


def test_clip_by_value_rejected_naming_norm() -> None:
    with pytest.raises(ValueError, match=re.escape("gradient_clip_algorithm='value' is not supported: DeepSpeed clips"
                                                   " by global norm only. Use gradient_clip_algorithm='norm'.")):
        ZeroPrecision("32-true").clip_gradients(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), 1.0, "value")


# Lightning's accelerator connector replaces "16-mixed" with "bf16-mixed" on CPU (no float16 autocast there) for
# strategies other than its own DeepSpeed/FSDP/XLA; ZeroStrategy reads the flag as written
# (precision.requested_precision)
@pytest.mark.parametrize(("written", "precision"), [("16-mixed", "16-mixed"), (16, "16-mixed"), ("bf16-mixed",
                                                    "bf16-mixed"), ("16-true", "16-true"), ("32-true", "32-true")])
def test_cpu_trainer_keeps_the_precision_as_written(written, precision) -> None:
    import lightning as L

    from lightning_zero import ZeroStrategy

    trainer = L.Trainer(accelerator="cpu", devices=2, precision=written, strategy=ZeroStrategy(start_method="spawn"),
                        logger=False)
    assert trainer.strategy.precision_plugin.precision == precision


def test_float16_on_a_cpu_without_it_is_refused_before_launch() -> None:
    import lightning as L
    from deepspeed.accelerator import get_accelerator

    from lightning_zero import ZeroStrategy
    from lightning_zero.precision import check_cpu_precision

    if get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has oneDNN float16: DeepSpeed trains fp16 on it (test_trainer_reuse.py)")
    message = (r"Trainer(precision='16-mixed') on CPU processes: DeepSpeed's CPU accelerator supports float16 only on"
               r" CPUs with oneDNN float16 (AVX512-FP16 or AMX-FP16), and this CPU has neither (DeepSpeed would stop"
               r" with 'Type fp16 is not supported on your device'). Use Trainer(precision='bf16-mixed') or"
               r" 'bf16-true', which DeepSpeed runs on every CPU, or run on GPUs.")
    with pytest.raises(ValueError, match=re.escape(message)):
        check_cpu_precision("16-mixed")
    check_cpu_precision("bf16-mixed")  # no error
    trainer = L.Trainer(accelerator="cpu", devices=2, precision="16-true", logger=False, max_steps=1,
                        strategy=ZeroStrategy(stage=3, start_method="spawn"))
    with pytest.raises(ValueError, match=re.escape("Trainer(precision='16-true') on CPU processes")):
        trainer.fit(L.LightningModule())  # refused in the main process, before any process starts
