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
