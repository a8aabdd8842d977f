"""On-disk layout, crash-safe sharded save/load, and full (unsharded) state dicts.

A ZeroStrategy checkpoint is a folder::

    epoch=3-step=400.ckpt/                 <- the path you pass to `ckpt_path=` / `save_checkpoint`
        meta.json                           written last: its presence means the folder is complete
        lightning.pt                        Lightning's state: loops, callbacks, schedulers, optimizer hyperparameters
        <engine name>/                      one folder per DeepSpeed engine ("model", or e.g. "generator")
            latest                          DeepSpeed's tag file
            checkpoint/                     DeepSpeed's shards: mp_rank_00_model_states.pt, *_optim_states.pt

Every rank writes into ``<path>.partial`` first; rank 0 renames it to ``<path>`` only after every rank finished, so a
crash mid-save leaves the previous checkpoint untouched and never a folder that looks complete.
``lightning.pt`` is a trusted pickle (it holds Lightning's loop and callback state); only load checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_zero.strategy import ZeroStrategy

__all__ = ["FORMAT", "gather_full_state_dict", "load", "load_full_state_dict", "remove", "save", "validate_path"]

FORMAT = "lightning_zero/1"
META = "meta.json"
LIGHTNING_STATE = "lightning.pt"
PARTIAL_SUFFIX = ".partial"
TAG = "checkpoint"
# Lightning's own copies of weights/optimizer state are replaced by the engines' shards.
_EXCLUDED_KEYS = ("state_dict",)


def _ds_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]


def gather_full_state_dict(root: nn.Module, rank_zero_only: bool, is_rank_zero: bool) -> dict[str, Any]:
    """The state dict of a ZeRO-3 partitioned module, gathered one module at a time into CPU memory.

    Collective: every rank must call it. Never more than one module's parameters are gathered at once.
    """
    import deepspeed

    keep = is_rank_zero or not rank_zero_only
    out: dict[str, Any] = {}
    for prefix, module in root.named_modules():
        prefix = f"{prefix}." if prefix else ""
        with deepspeed.zero.GatheredParameters(_ds_params(module), modifier_rank=None):
            if keep:
                part: dict[str, Any] = {}
                module._save_to_state_dict(part, prefix, keep_vars=False)
                out.update({k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                            for k, v in part.items()})
    return out


def load_full_state_dict(root: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> tuple[list[str],
                                                                                                         list[str]]:
    """Load a full (unsharded) state dict into a module that may be ZeRO-3 partitioned, one module at a time.

    Returns ``(missing_keys, unexpected_keys)``; with ``strict=True`` any mismatch raises ``ValueError`` with the
    report. Every rank must call it (at stage 3 the gathered parameters are re-partitioned from rank 0's values).
    """
    import deepspeed

    expected = set()
    for prefix, module in root.named_modules():
        prefix = f"{prefix}." if prefix else ""
        expected.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        expected.update(prefix + n for n, b in module.named_buffers(recurse=False)
                        if n not in module._non_persistent_buffers_set)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if strict and (missing or unexpected):
        raise ValueError(_key_report(missing, unexpected) + " Fix the keys or pass strict=False.")
    errors: list[str] = []
    for prefix, module in root.named_modules():
        prefix = f"{prefix}." if prefix else ""
        params = _ds_params(module)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if params else None):
            module._load_from_state_dict(dict(state_dict), prefix, {}, False, [], [], errors)
    if errors:
        raise ValueError("Loading the state dict failed:\n  " + "\n  ".join(errors))
    return missing, unexpected


def _key_report(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10
                                                                                     else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}"
                     + (" ..." if len(unexpected) > 10 else ""))
    return "The checkpoint does not match the model: " + "; ".join(parts) + "."


def save(strategy: ZeroStrategy, checkpoint: dict[str, Any], path: str) -> None:
    """Write a complete checkpoint folder at ``path`` (collective: every rank calls it)."""
    final = Path(path)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if strategy.is_global_zero:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a crashed save
        partial.mkdir(parents=True)
    strategy.barrier()
    for slot in strategy.engines:
        if slot.face is None and strategy.stage == 3:
            continue  # frozen models are rebuilt by configure_model; their weights are not training state
        slot.engine.save_checkpoint(str(partial / slot.name), tag=TAG,
                                    exclude_frozen_parameters=strategy.exclude_frozen_parameters)
    if strategy.is_global_zero:
        state = {k: v for k, v in checkpoint.items() if k not in _EXCLUDED_KEYS}
        torch.save(state, partial / LIGHTNING_STATE)
        meta = {"format": FORMAT, "world_size": strategy.world_size, "stage": strategy.stage,
                "engines": [s.name for s in strategy.engines if not (s.face is None and strategy.stage == 3)]}
        (partial / META).write_text(json.dumps(meta, indent=1))
    strategy.barrier()
    if strategy.is_global_zero:
        _commit(partial, final)
    strategy.barrier()


def _commit(partial: Path, final: Path) -> None:
    """Replace ``final`` by ``partial``; the old folder is removed only after the new one is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def validate_path(path: str) -> dict[str, Any]:
    """Check that ``path`` is a complete ZeroStrategy checkpoint folder and return its metadata."""
    p = Path(path)
    if p.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{path!r} is a half-written checkpoint (a save was interrupted); it cannot be loaded."
                         f" Resume from a complete checkpoint, e.g. {str(p.with_name(p.name[:-len(PARTIAL_SUFFIX)]))!r}"
                         " if it exists.")
    if not p.exists():
        partial = p.with_name(p.name + PARTIAL_SUFFIX)
        extra = (f" A half-written {partial.name!r} exists beside it: that save was interrupted and is not loadable."
                 if partial.exists() else "")
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.{extra}")
    if p.is_dir() and (p / META).is_file():
        meta = json.loads((p / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} was written by another version ({meta.get('format')!r}); expected {FORMAT!r}.")
        return meta
    for parent in list(p.parents)[:3]:
        if (parent / META).is_file():
            raise ValueError(f"{path!r} is inside a ZeroStrategy checkpoint. Pass the checkpoint folder itself:"
                             f" {str(parent)!r}.")
    if p.is_dir():
        raise ValueError(f"{path!r} is a folder but not a ZeroStrategy checkpoint (no {META}). Pass a folder written"
                         " by `trainer.save_checkpoint` with ZeroStrategy, or a single-file checkpoint.")
    return {}  # a single file: a plain Lightning/torch checkpoint


def load(strategy: ZeroStrategy, path: str, load_optimizer_states: bool) -> dict[str, Any]:
    """Load a checkpoint folder (or a single-file weights checkpoint) into the strategy's engines."""
    meta = validate_path(path)
    assert strategy.lightning_module is not None
    if not meta:
        return _load_single_file(strategy, path)
    if meta["world_size"] != strategy.world_size and load_optimizer_states:
        raise ValueError(
            f"{path!r} was saved by {meta['world_size']} processes and this run has {strategy.world_size}. Resuming"
            " the optimizer state on another number of processes is not supported yet; resume with"
            f" {meta['world_size']} processes, or load weights only with `trainer.validate/test/predict`."
        )
    names = {s.name for s in strategy.engines if not (s.face is None and strategy.stage == 3)}
    if set(meta["engines"]) != names:
        raise ValueError(f"{path!r} holds engines {sorted(meta['engines'])} but this model has {sorted(names)}."
                         " The checkpoint belongs to another model or another optimizer layout.")
    root = Path(path)
    for slot in strategy.engines:
        if slot.name not in meta["engines"]:
            continue
        load_path, _ = slot.engine.load_checkpoint(
            str(root / slot.name), tag=TAG, load_optimizer_states=load_optimizer_states and slot.face is not None,
            load_lr_scheduler_states=False, load_module_strict=strategy.lightning_module.strict_loading)
        if load_path is None:
            raise ValueError(f"DeepSpeed found no checkpoint for engine {slot.name!r} under {str(root / slot.name)!r}.")
    # Trusted pickle: Lightning's loop/callback state (see the module docstring).
    return torch.load(root / LIGHTNING_STATE, map_location="cpu", weights_only=False)


def _load_single_file(strategy: ZeroStrategy, path: str) -> dict[str, Any]:
    """A plain Lightning ``.ckpt`` or torch weights file: load weights only (fine-tuning start)."""
    assert strategy.lightning_module is not None
    state = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = state.get("state_dict", state)
    load_full_state_dict(strategy.lightning_module, state_dict, strict=strategy.lightning_module.strict_loading)
    return {k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")} if "state_dict" in state \
        else {}


def remove(path: Any) -> None:
    """Remove a checkpoint folder (used by ModelCheckpoint for top-k rotation)."""
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
