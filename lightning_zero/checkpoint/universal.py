"""Resuming on another number of processes or at another ZeRO stage: which load an engine needs (``resume_method``),
and DeepSpeed's universal checkpoint format, converted once into the checkpoint folder and completed there so that it
loads at any stage 1-3."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_zero.checkpoint.files import PARTIAL_SUFFIX, TAG, UNIVERSAL_TAG, _remove_path, _sibling

if TYPE_CHECKING:
    from lightning_zero.strategy import ZeroStrategy

log = logging.getLogger(__package__)  # "lightning_zero.checkpoint": the logger's name before the split into modules


def resume_method(saved_world_size: int, saved_stage: int, world_size: int, stage: int, with_optimizer: bool
                  ) -> Literal["native", "weights", "universal"]:
    """How an engine saved at (``saved_world_size``, ``saved_stage``) loads now: DeepSpeed's own load when the layout
    is the same, its full weights when no optimizer state is needed, else through the universal format (stages 1-3)."""
    # Not at stage 3 without the optimizer state: DeepSpeed's own load of an optimizer-less stage-3 engine (a new
    # Trainer's validate/test/predict) fails ('DeepSpeedZeRoOffload' has no '_restore_from_bit16_weights').
    if saved_stage == stage and (saved_world_size == world_size or stage == 0) and (with_optimizer or stage != 3):
        return "native"
    if not with_optimizer:
        return "weights"
    if 0 in (saved_stage, stage):
        change = (f"saved at stage {saved_stage} by {saved_world_size} processes, resumed at stage {stage} by"
                  f" {world_size}")
        raise ValueError(
            f"Cannot resume this checkpoint's optimizer state ({change}): stage 0 keeps a plain, unpartitioned"
            " optimizer state that DeepSpeed's universal checkpoint format cannot convert to or from stages 1-3."
            f" Resume with ZeroStrategy(stage={saved_stage})"
            f"{'' if saved_stage else ' (any number of processes works at stage 0)'}, or start a new run from its"
            " weights: export them with `lightning-zero consolidate` and pass that file as ckpt_path."
        )
    return "universal"


def _describe_change(meta: Mapping[str, Any], strategy: ZeroStrategy, saved: int, now: int) -> str:
    parts = []
    if meta["world_size"] != strategy.world_size:
        parts.append(f"saved by {meta['world_size']} processes, this run has {strategy.world_size}")
    if saved != now:
        parts.append(f"saved at ZeRO stage {saved}, this run uses stage {now}")
    return " and ".join(parts)


def _ensure_universal(strategy: ZeroStrategy, folder: Path) -> None:
    """Rank 0 converts ``folder/checkpoint`` into ``folder/checkpoint_universal`` unless that exists (the rename
    makes it visible only when complete); every rank waits, and raises if the conversion failed."""
    error = None
    target = folder / UNIVERSAL_TAG
    if strategy.is_global_zero and not target.is_dir():
        try:
            _convert_to_universal(folder)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(err).__name__}: {err}"
    error = strategy.broadcast(error)
    strategy.barrier()
    if error:
        raise RuntimeError(f"Converting {str(folder / TAG)!r} to DeepSpeed's universal checkpoint format failed:"
                           f" {error}."
                           " The folder must be writable (the conversion is cached there); copy the checkpoint to a"
                           " writable place, or resume with the original number of processes and ZeRO stage.")


def _convert_to_universal(folder: Path) -> None:
    from lightning_zero._compat.deepspeed import convert_to_universal

    target = folder / UNIVERSAL_TAG
    work = _sibling(target, PARTIAL_SUFFIX)
    _remove_path(work)
    started = time.monotonic()
    with redirect_stdout(io.StringIO()) as printed:
        convert_to_universal(str(folder / TAG), str(work))
    log.debug("ds_to_universal output:\n%s", printed.getvalue())
    _serve_every_stage(work)
    os.replace(work, target)
    (folder / "latest_universal").write_text(UNIVERSAL_TAG)
    rank_zero_info(f"Converted {str(folder / TAG)!r} to the universal format in {time.monotonic() - started:.1f} s.")


def _serve_every_stage(folder: Path) -> None:
    """Make one universal conversion loadable at any stage 1-3 (DeepSpeed 0.19 writes it for the saving stage only).

    The loaders differ in four places: the model-states file name (``mp_rank_00_...`` at stages 1-2,
    ``zero_pp_rank_0_mp_rank_00_...`` at stage 3), where the optimizer step lives (a ``step.pt`` per parameter at
    stages 1-2; ``optimizer_state_dict.state[0].step`` at stage 3), the tensor files (shaped, in a dict, at stages 1-2;
    the stage-3 converter writes flat tensors) and ``ds_version`` (required at stages 1-2).
    """
    import deepspeed
    from deepspeed.checkpoint.constants import CAT_DIM, DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS

    names = [folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    source = next(f for f in names if f.is_file())
    for name in names:
        if not name.exists():
            os.link(source, name)
    zero = folder / "zero"
    state_file = zero / "optimizer_state.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=False)  # DeepSpeed's file, just written
    params = [d for d in zero.iterdir() if d.is_dir()]
    if OPTIMIZER_STATE_DICT not in state:  # converted from stage 1-2
        steps = [torch.load(d / "step.pt", weights_only=True) for d in params if (d / "step.pt").is_file()]
        inner: dict[str, Any] = {"state": {0: {"step": steps[0]}} if steps else {}, "param_groups": state[PARAM_GROUPS]}
        state[OPTIMIZER_STATE_DICT] = inner
    else:  # converted from stage 3: flat tensors, which the stage 1-2 loader wants as {"param": shaped, "cat_dim": 0}
        shapes: dict[str, Any] = {}
        for group in torch.load(names[1], map_location="cpu", weights_only=False)["param_shapes"]:
            shapes.update(group)
        step = state[OPTIMIZER_STATE_DICT].get("state", {}).get(0, {}).get("step")
        for d in params:
            for file in d.glob("*.pt"):
                value = torch.load(file, map_location="cpu", weights_only=False)
                if isinstance(value, torch.Tensor) and file.stem != "step":
                    torch.save({PARAM: value.view(shapes[d.name]), CAT_DIM: 0}, file)
            if step is not None and not (d / "step.pt").exists():
                torch.save(step, d / "step.pt")
    state.setdefault(DS_VERSION, deepspeed.__version__)
    torch.save(state, state_file)
