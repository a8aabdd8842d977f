"""Lightning internals ZeroStrategy relies on, each in one function with the reason and a contract test
(``tests/unit/test_compat.py``). Verified on Lightning 2.5.0 and 2.6.6."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["route_checkpoint_state_dict"]


def route_checkpoint_state_dict(trainer: Any, state_dict: Callable[[], dict[str, Any]]) -> None:
    """Make the state dict Lightning puts into a checkpoint come from ``state_dict`` (this trainer only).

    Why: at stage 3 the weights are saved by the engines as shards, so the checkpoint's ``state_dict`` entry must not
    gather the whole model onto rank 0 at every save (a memory blow-up on large models), while
    ``strategy.lightning_module_state_dict()`` called by the user still returns the full weights. Lightning's
    ``_CheckpointConnector.dump_checkpoint`` asks ``self._get_lightning_module_state_dict()`` for that entry; it is
    the only caller. If Lightning renames it, this raises at setup instead of silently gathering at every save.
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    if not callable(getattr(type(connector), "_get_lightning_module_state_dict", None)):
        import lightning

        raise RuntimeError(
            f"Lightning {lightning.__version__} has no `Trainer._checkpoint_connector._get_lightning_module_state_dict`,"
            " which lightning_zero uses so that stage-3 checkpoints do not gather the whole model onto rank 0 (see"
            " lightning_zero/_compat/lightning.py). Install a Lightning version in the range lightning_zero supports"
            " (`pip install 'lightning>=2.5.0,<2.7'`)."
        )
    connector._get_lightning_module_state_dict = state_dict
