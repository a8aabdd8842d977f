"""Save and load of a ZeroStrategy checkpoint folder (its layout: the package docstring): each engine's shards or
full weights, Lightning's state, each rank's RNG state and the files DeepSpeed's and Lightning's converters read; on
load, the check that the folder holds this model, then each engine's load (native, weights only, or universal). A plain
weights file loads its weights only."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_zero.checkpoint.files import (FORMAT, LIGHTNING_STATE, META, PARTIAL_SUFFIX, RNG_DIR, TAG, UNIVERSAL_TAG,
                                             WEIGHTS, _commit, _first_line, _manifest, _raise_if_save_failed,
                                             _remove_path, _remove_stale_partials, _report_interrupted_saves,
                                             _sibling, validate_path)
from lightning_zero.checkpoint.universal import _describe_change, _ensure_universal, resume_method
from lightning_zero.checkpoint.weights import (_key_report, gather_full_state_dict, load_full_state_dict,
                                               read_weights_file)

if TYPE_CHECKING:
    from lightning_zero.strategy import ZeroStrategy

log = logging.getLogger(__package__)  # "lightning_zero.checkpoint": the logger's name before the split into modules

# Test hook: seconds each rank sleeps after writing its shards, before the commit (makes a kill mid-save reliable).
SAVE_DELAY_ENV = "LIGHTNING_ZERO_TEST_SAVE_DELAY"
# Lightning's own copies of weights/optimizer state are replaced by the engines' shards.
_EXCLUDED_KEYS = ("state_dict",)


# ----------------------------------------------------------------------------------------------------------------------
# Save: every rank writes into <path>.partial, rank 0 writes meta.json last and renames
# ----------------------------------------------------------------------------------------------------------------------


def save(strategy: ZeroStrategy, checkpoint: dict[str, Any], path: str) -> None:
    """Write a complete checkpoint folder at ``path`` (collective: every rank calls it)."""
    final = Path(path)
    partial = _sibling(final, PARTIAL_SUFFIX)
    if strategy.is_global_zero:
        _remove_path(partial)  # the leftover of an interrupted save
        partial.mkdir(parents=True)
    strategy.barrier()
    # Phase 1, every rank: its shards of every engine and its RNG state. A write that fails (a full drive) is
    # reported on every rank below, instead of leaving the other ranks waiting in a barrier.
    failure: BaseException | None = None
    try:
        client_state = _tools_client_state(strategy, checkpoint)
        engines = {slot.name: _save_engine(strategy, slot, partial / slot.name, client_state)
                   for slot in strategy.engines}
        _save_rng(partial, strategy.global_rank)
    except (OSError, RuntimeError) as err:
        failure = err
    delay = float(os.environ.get(SAVE_DELAY_ENV, 0) or 0)
    if delay:
        time.sleep(delay)
    _raise_if_save_failed(strategy, final, partial, failure)  # every rank's files are on disk (a barrier)
    # Phase 2, rank 0: Lightning's state, the manifest (meta.json, last), then the rename that makes it visible.
    if strategy.is_global_zero:
        try:
            torch.save({k: v for k, v in checkpoint.items() if k not in _EXCLUDED_KEYS}, partial / LIGHTNING_STATE)
            _write_tool_files(strategy, partial)
            from lightning_zero.export import record_models

            record_models(strategy.lightning_module, partial)  # for `consolidate --format hf/peft`, before the manifest
            meta = {"format": FORMAT, "world_size": strategy.world_size, "stage": strategy.stage,
                    "precision": str(strategy.precision_plugin.precision), "engines": engines,
                    "files": _manifest(partial)}
            (partial / META).write_text(json.dumps(meta, indent=1))
            _commit(partial, final)
        except (OSError, RuntimeError) as err:
            failure = err
    _raise_if_save_failed(strategy, final, partial, failure)  # a barrier too
    if strategy.is_global_zero:
        _remove_stale_partials(final)


def _save_engine(strategy: ZeroStrategy, slot: Any, folder: Path, client_state: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Write one engine's part and return its description for meta.json. ``client_state``: extra keys for DeepSpeed's
    model-states file (Lightning's state, for Lightning's converter; see _tools_client_state)."""
    assert strategy.lightning_module is not None
    modules = _module_prefixes(strategy.lightning_module, slot.module)
    info: dict[str, Any] = {"modules": modules, "keys": _state_keys(slot.module, modules),
                            "stage": int(slot.engine.zero_optimization_stage()), "optimizer": slot.face is not None}
    exclude = strategy.exclude_frozen_parameters
    if slot.face is not None:
        info["kind"] = "deepspeed"
        info["excluded"] = [model_key(n, modules) for n, p in slot.module.named_parameters()
                            if exclude and not p.requires_grad]
        slot.engine.save_checkpoint(str(folder), tag=TAG, client_state=client_state or {},
                                    exclude_frozen_parameters=exclude)
        return info
    # A model without optimizer (a frozen teacher, an EMA copy): its full weights, as plain tensors. They may have
    # been changed by hand (EMA), so they are saved unless the user excludes frozen parameters.
    info["kind"] = "weights"
    info["saved"] = not exclude
    info["excluded"] = list(info["keys"]) if exclude else []
    if info["saved"]:
        if strategy.stage == 3:  # collective: one module gathered at a time
            state = gather_full_state_dict(slot.module, rank_zero_only=True, is_rank_zero=strategy.is_global_zero)
        else:
            state = {k: v.detach().cpu() for k, v in slot.module.state_dict().items()}
        if strategy.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / WEIGHTS)
    return info


# DeepSpeed's and Lightning's own tools (deepspeed.utils.zero_to_fp32, the zero_to_fp32.py script DeepSpeed copies
# into checkpoint folders, lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict) read
# `<folder>/latest` and take its text as the tag folder, relative to <folder>. At the top of a ZeroStrategy checkpoint
# that file names the one engine's shards ("model/checkpoint"), so those tools work on the checkpoint folder
# unchanged; where they cannot rebuild the LightningModule from one engine, it holds a sentence instead, which their
# error ("Directory '<folder>/<tag>' doesn't exist") then shows: it names `lightning-zero consolidate`.
LATEST = "latest"
_TOOL_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # what DeepSpeed copies into its checkpoint folders
# What Lightning's DeepSpeedStrategy leaves out of the client state it stores with the shards (its converter puts
# everything else into the file it writes, which `load_from_checkpoint` reads).
_CLIENT_EXCLUDED_KEYS = ("state_dict", "optimizer_states")


def _tools_slot(strategy: ZeroStrategy) -> Any | None:
    """The engine whose shards are the whole LightningModule, if DeepSpeed's zero_to_fp32 can read them as such: the
    only engine, with an optimizer, at ZeRO stage 1-3 (stage 0 keeps no ZeRO partitions for it to read)."""
    slots = list(strategy.engines)
    if len(slots) != 1 or slots[0].face is None or slots[0].module is not strategy.lightning_module:
        return None
    return slots[0] if int(slots[0].engine.zero_optimization_stage()) > 0 else None


def _tools_client_state(strategy: ZeroStrategy, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """Lightning's state for the one engine's model-states file (rank 0's is the one Lightning's converter reads)."""
    if not strategy.is_global_zero or _tools_slot(strategy) is None:
        return None
    return {k: v for k, v in checkpoint.items() if k not in _CLIENT_EXCLUDED_KEYS}


def _tools_latest(strategy: ZeroStrategy) -> str:
    """The text of the top-level ``latest``: the one engine's tag folder, or why there is none and what to run."""
    slot = _tools_slot(strategy)
    if slot is not None:
        return f"{slot.name}/{TAG}"
    names = [s.name for s in strategy.engines]
    if len(names) > 1:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        why = f"it holds {len(names)} DeepSpeed engines ({shown}), not one"
    elif names and next(iter(strategy.engines)).face is None:
        why = "its model has no optimizer, so it holds no ZeRO shards"
    else:
        why = "it was written at ZeRO stage 0, which zero_to_fp32 does not read"
    # one line without "/": DeepSpeed joins it to the folder path and prints that path in its error
    return (f"(no DeepSpeed tag: this is a ZeroStrategy checkpoint that zero_to_fp32 cannot convert, because {why};"
            " export it with `lightning-zero consolidate <this folder> model.ckpt`)")


def _write_tool_files(strategy: ZeroStrategy, folder: Path) -> None:
    """Rank 0, before the manifest: the top-level ``latest`` and DeepSpeed's conversion scripts (see LATEST)."""
    import deepspeed.utils

    (folder / LATEST).write_text(_tools_latest(strategy))
    scripts = Path(deepspeed.utils.__file__).parent
    for name in _TOOL_SCRIPTS:
        if (scripts / name).is_file():
            shutil.copy(scripts / name, folder / name)  # with its executable bit, as DeepSpeed copies it


def _module_prefixes(root: nn.Module, module: nn.Module) -> dict[str, str]:
    """Engine-local key head -> the LightningModule's prefix: ``{"": ""}`` for the LightningModule itself,
    ``{"": "generator"}`` for a submodule, ``{"a__b": "a.b", "c": "c"}`` for a group of submodules (engines.py)."""
    names: dict[int, str] = {}
    for name, sub in root.named_modules():
        names.setdefault(id(sub), name)
    if id(module) in names:
        return {"": names[id(module)]}
    return {head: names[id(child)] for head, child in module.named_children()}


def model_key(key: str, modules: Mapping[str, str]) -> str:
    """An engine-local state-dict key as the LightningModule names it."""
    if "" in modules:
        prefix = modules[""]
    else:
        head, _, key = key.partition(".")
        prefix = modules[head]
    return f"{prefix}.{key}" if prefix else key


def _state_keys(module: nn.Module, modules: Mapping[str, str]) -> dict[str, list[Any]]:
    """LightningModule key -> [shape, dtype] of everything the module's state dict holds (full shapes at stage 3)."""
    out = {}
    for key, value in module.state_dict(keep_vars=True).items():
        shape = list(getattr(value, "ds_shape", value.shape))
        out[model_key(key, modules)] = [shape, str(value.dtype).replace("torch.", "")]
    return out


def _save_rng(folder: Path, rank: int) -> None:
    from lightning_zero._compat.lightning import collect_rng_states

    state = collect_rng_states(include_cuda=torch.cuda.is_available())
    if "numpy" in state:  # stored as tensors, so the file loads with weights_only=True
        name, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / RNG_DIR / f"rank_{rank:05d}.pt")


# ----------------------------------------------------------------------------------------------------------------------
# Load: same layout -> DeepSpeed's own load; other world size or stage -> DeepSpeed's universal format
# ----------------------------------------------------------------------------------------------------------------------


def load(strategy: ZeroStrategy, path: str, fitting: bool, weights_only: bool | None = None) -> dict[str, Any]:
    """Load a checkpoint folder (or a weights file) into the strategy's engines; return Lightning's state to restore.

    ``fitting``: restore optimizer states too (``trainer.fit``); otherwise weights only (validate/test/predict).
    """
    meta = validate_path(path)
    assert strategy.lightning_module is not None
    if not meta:
        return _load_weights_file(strategy, path, fitting, weights_only)
    root = Path(path)
    _report_interrupted_saves(root)
    state = _load_lightning_state(root / LIGHTNING_STATE, weights_only)
    _check_model(strategy, meta, path)
    # Decide for every engine before loading any (a refusal must come before any work).
    methods = {slot.name: resume_method(meta["world_size"], meta["engines"][slot.name]["stage"], strategy.world_size,
                                        int(slot.engine.zero_optimization_stage()), fitting and slot.face is not None)
               for slot in strategy.engines if meta["engines"][slot.name]["kind"] == "deepspeed"}
    for slot in strategy.engines:
        info = meta["engines"][slot.name]
        if info["kind"] == "weights":
            if info["saved"]:
                load_full_state_dict(slot.module, root / slot.name / WEIGHTS, strict=False)
            continue  # else: excluded (exclude_frozen_parameters): configure_model built them
        _load_engine(strategy, slot, root, meta, methods[slot.name], with_optimizer=fitting and slot.face is not None)
    if meta["world_size"] == strategy.world_size:
        _load_rng(root, strategy.global_rank)
    else:
        log.info("RNG states not restored: %r was saved by %d processes, this run has %d.", path, meta["world_size"],
                 strategy.world_size)
    return state


def _load_engine(strategy: ZeroStrategy, slot: Any, root: Path, meta: Mapping[str, Any], how: str,
                 with_optimizer: bool) -> None:
    info, folder = meta["engines"][slot.name], root / slot.name
    saved, now = info["stage"], int(slot.engine.zero_optimization_stage())
    if how == "native":
        # Keys were checked above (frozen parameters may be excluded from the shards): DeepSpeed need not be strict.
        loaded, _ = slot.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=with_optimizer,
                                                load_lr_scheduler_states=False, load_module_strict=False)
        if loaded is None:
            raise ValueError(f"DeepSpeed found no checkpoint for engine {slot.name!r} under {str(folder)!r}.")
        return
    if how == "weights":  # no optimizer state to restore: rebuild the full weights, whatever the layout
        weights = {k: v.contiguous() for k, v in engine_weights(folder, info).items()}
        load_full_state_dict(slot.module, weights, strict=False)
        return
    change = _describe_change(meta, strategy, saved, now)
    rank_zero_info(f"Checkpoint {str(root)!r}: {change}. Resuming engine {slot.name!r} through DeepSpeed's universal"
                   f" checkpoint format (converted once, cached in {str(folder / UNIVERSAL_TAG)!r}).")
    _ensure_universal(strategy, folder)
    from lightning_zero._compat.deepspeed import loading_universal_checkpoint

    with loading_universal_checkpoint(slot.engine):
        loaded, _ = slot.engine.load_checkpoint(str(folder), tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=False)
    if loaded is None:
        raise ValueError(f"DeepSpeed could not load the universal checkpoint of engine {slot.name!r} from"
                         f" {str(folder / UNIVERSAL_TAG)!r}.")


def engine_weights(folder: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """One engine's full fp32 weights with engine-local keys, rebuilt from its shards by DeepSpeed's zero_to_fp32.

    Values are tensors, or DeepSpeed's lazy tensors at stage 3: call ``.contiguous()`` on each to get the tensor
    (memory then grows one tensor at a time). Tied parameters share one value object.
    """
    if info["kind"] == "weights":
        return torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    shards = folder / TAG
    if any(shards.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with redirect_stdout(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG, lazy_mode=True)
    # Stage 0 in fp32: the module's weights are the master weights. Trusted pickle (DeepSpeed's own file).
    state = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return dict(state["module"])


def _check_model(strategy: ZeroStrategy, meta: Mapping[str, Any], path: str) -> None:
    """The checkpoint must hold this model: same keys and shapes (listed when not), then the same engines."""
    assert strategy.lightning_module is not None
    saved = {k: v for info in meta["engines"].values() for k, v in info["keys"].items()}
    current = {}
    for slot in strategy.engines:
        current.update(_state_keys(slot.module, _module_prefixes(strategy.lightning_module, slot.module)))
    if strategy.lightning_module.strict_loading:
        missing = sorted(set(current) - set(saved))
        unexpected = sorted(set(saved) - set(current))
        shapes = [f"{k} (checkpoint {saved[k][0]}, model {current[k][0]})" for k in current
                  if k in saved and list(saved[k][0]) != list(current[k][0])]
        if missing or unexpected or shapes:
            parts = [_key_report(missing, unexpected)] if missing or unexpected else []
            if shapes:
                more = " ..." if len(shapes) > 5 else ""
                parts.append(f"{len(shapes)} shape mismatch(es): {', '.join(shapes[:5])}{more}.")
            raise ValueError(f"{path!r} is a checkpoint of another model. " + " ".join(parts)
                             + " Pass a checkpoint written by this model.")
    names = {slot.name for slot in strategy.engines}
    if set(meta["engines"]) != names:
        raise ValueError(
            f"{path!r} holds engines {sorted(meta['engines'])} (one per optimizer) but this model has {sorted(names)}:"
            " `configure_optimizers` changed. Resume with the same optimizers, or start from the checkpoint's weights:"
            " export them with `lightning-zero consolidate` and pass that file as ckpt_path."
        )


def _load_rng(folder: Path, rank: int) -> None:
    from lightning_zero._compat.lightning import set_rng_states

    file = folder / RNG_DIR / f"rank_{rank:05d}.pt"
    if not file.is_file():
        return
    state = torch.load(file, map_location="cpu", weights_only=True)
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, keys.numpy(), pos, has_gauss, cached)
    if not torch.cuda.is_available():
        state.pop("torch.cuda", None)
    set_rng_states(state)


def _load_lightning_state(file: Path, weights_only: bool | None) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only is not False)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(file)!r} holds objects that `weights_only=True` loading refuses ({_first_line(err)}). It is"
            " Lightning's loop and callback state; if you trust this checkpoint, pass"
            " `trainer.fit(..., weights_only=False)`."
        ) from None


def _load_weights_file(strategy: ZeroStrategy, path: str, fitting: bool, weights_only: bool | None) -> dict[str, Any]:
    """A plain weights file (a DDP/single-device ``.ckpt``, a consolidated export, torch or safetensors weights):
    load the weights only. Training starts fresh: step 0, new optimizer state, schedulers and loops."""
    import lightning.pytorch as pl

    module = strategy.lightning_module
    assert module is not None
    source: Any = path  # a .safetensors file or folder: read lazily by load_full_state_dict
    if not Path(path).is_dir() and not path.endswith(".safetensors"):
        source = read_weights_file(path, trusted=weights_only is False)
    load_full_state_dict(module, source, strict=module.strict_loading)
    if fitting:
        rank_zero_warn(f"{path!r} is a plain weights file: ZeroStrategy loaded its weights only. Training starts at"
                       " step 0 with a new optimizer state (a DeepSpeed engine cannot adopt another strategy's"
                       " optimizer state).")
    # Lightning restores whatever the returned dict holds: nothing here but the version it requires.
    return {"pytorch-lightning_version": pl.__version__, "optimizer_states": [], "lr_schedulers": []}
