"""lightning_zero: DeepSpeed ZeRO for PyTorch Lightning, one engine per model.

    from lightning_zero import ZeroStrategy
    trainer = L.Trainer(strategy=ZeroStrategy(stage=3), ...)

Importing the package registers the ``"zero"``, ``"zero_stage_1"`` ... ``"zero_stage_3_offload_nvme"`` strategy names.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_zero.checkpoint import gather_full_state_dict, load_full_state_dict
from lightning_zero.config import ZeroConfigError, resolve_ds_config
from lightning_zero.estimate import estimate_memory
from lightning_zero.consolidate import consolidate_checkpoint, consolidated_state_dict
from lightning_zero.precision import ZeroPrecision
from lightning_zero.strategy import ZeroStrategy
from lightning_zero.summary import ZeroSummary

__all__ = [
    "ZeroConfigError",
    "ZeroPrecision",
    "ZeroStrategy",
    "ZeroSummary",
    "consolidate_checkpoint",
    "consolidated_state_dict",
    "estimate_memory",
    "gather_full_state_dict",
    "load_full_state_dict",
    "resolve_ds_config",
]
__version__ = "0.1.0"

if "zero" not in StrategyRegistry:
    ZeroStrategy.register_strategies(StrategyRegistry)
