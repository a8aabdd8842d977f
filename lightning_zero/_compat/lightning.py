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


def evaluate_under_no_grad(trainer: Any) -> None:
    """Run this trainer's validation, test and predict loops under ``torch.no_grad`` rather than
    ``torch.inference_mode`` (as Lightning does itself for FSDP and for gloo).

    Why: at stage 3 DeepSpeed gathers and releases ``param.data`` during each forward; under ``inference_mode`` the
    tensors it puts back are inference tensors, so a later ``requires_grad_(True)`` (unfreezing after ``predict``) or
    a backward through them fails ("Setting requires_grad=True on inference tensor outside InferenceMode"; seen on
    an H200, NCCL). Lightning's loops choose the context from their ``inference_mode`` attribute
    (``loops.utilities._no_grad_context``); if a loop no longer has it, this raises instead of silently keeping
    inference mode.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    loops = [getattr(trainer, name, None) for name in ("validate_loop", "test_loop", "predict_loop")]
    loops.append(getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None))
    for loop in loops:
        if not hasattr(loop, "inference_mode"):
            import lightning

            raise RuntimeError(
                f"Lightning {lightning.__version__}'s {type(loop).__name__} has no `inference_mode` attribute, which"
                " lightning_zero sets to False at ZeRO stage 3 (see lightning_zero/_compat/lightning.py). Install a"
                " Lightning version in the range lightning_zero supports (`pip install 'lightning>=2.5.0,<2.7'`), or"
                " pass Trainer(inference_mode=False)."
            )
        loop.inference_mode = False
