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
import pickle
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
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


def load_full_state_dict(root: nn.Module, source: Mapping[str, Any] | str | os.PathLike, strict: bool = True, *,
                         prefix: str = "") -> tuple[list[str], list[str]]:
    """Load full (unsharded) weights into ``root``, which may be ZeRO-3 partitioned, one module at a time.

    Args:
        root: the module to load into: the LightningModule, or a submodule (e.g. inside ``configure_model``, right
            after building it: the usual ``from_pretrained`` step).
        source: a state dict, or the path to a Lightning ``.ckpt`` (its ``"state_dict"`` is used), a file written by
            ``torch.save`` (read with ``weights_only=True``, memory-mapped), a ``.safetensors`` file or a folder of
            ``.safetensors`` shards (read lazily, one module's tensors at a time; needs ``pip install safetensors``).
        strict: with ``True``, any missing or unexpected key raises ``ValueError`` listing them, before anything is
            loaded; with ``False`` the keys present are loaded and the lists are returned.
        prefix: use only the source keys that start with it, without it (``prefix="net."`` loads the ``net.*``
            weights of a LightningModule checkpoint into ``self.net``).

    Returns ``(missing_keys, unexpected_keys)``. A shape mismatch always raises ``ValueError`` before loading. At
    stage 3 this is collective: every rank calls it with the same source (in ``configure_model`` they all do). At most
    one module's parameters are gathered at a time, and rank 0's values are the ones every rank keeps.
    """
    with _open_weights(source, prefix) as weights, _outside_zero_init():
        targets = root.state_dict(keep_vars=True)  # the parameter objects, not copies: cheap, partitioned or not
        available = set(weights.keys())
        missing = sorted(k for k in targets if k not in available)
        unexpected = sorted(available - set(targets))
        if strict and (missing or unexpected):
            raise ValueError(_key_report(missing, unexpected) + " Fix the keys (see `prefix=`) or pass strict=False.")
        _check_shapes(targets, weights, available)
        owned: dict[str, list[str]] = {}  # module prefix -> its own keys found in the source
        for key in targets:
            if key in available:
                head, _, _ = key.rpartition(".")
                owned.setdefault(f"{head}." if head else "", []).append(key)
        errors: list[str] = []
        for module_prefix, module in _walk(root):
            keys = owned.get(module_prefix)
            if not keys:
                continue
            local = {k: weights[k] for k in keys}
            with _gathered_for_write(_ds_params(module)):
                module._load_from_state_dict(local, module_prefix, {}, False, [], [], errors)
            del local
    if errors:
        raise ValueError("Loading the weights failed:\n  " + "\n  ".join(errors))
    return missing, unexpected


def _walk(module: nn.Module, prefix: str = "") -> Any:
    """(prefix, module) like ``state_dict`` visits them: a module reachable by two paths is visited under both."""
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _gathered_for_write(params: list[nn.Parameter]) -> Any:
    """Gather one module's partitioned parameters; on exit rank 0's values are broadcast and re-partitioned."""
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def _outside_zero_init() -> Iterator[None]:
    """Inside ``configure_model`` at stage 3, zero.Init converts every new floating tensor to the compute dtype and
    device; lift that while reading weights (DeepSpeed does the same around engine creation)."""
    zero_init = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero_init is not None and zero_init.zero_init_context > 0 and zero_init.top_level_context is not None
    if not active:
        yield
        return
    zero_init.shutdown_init_context()
    try:
        yield
    finally:
        zero_init.restore_init_context()


def _check_shapes(targets: Mapping[str, Any], weights: _Weights, available: set[str]) -> None:
    wrong = []
    for key, target in targets.items():
        if key in available and isinstance(target, torch.Tensor):
            want = tuple(getattr(target, "ds_shape", target.shape))
            got = weights.shape(key)
            if got is not None and got != want:
                wrong.append(f"{key}: the weights have {list(got)}, the model {list(want)}")
    if wrong:
        raise ValueError(f"{len(wrong)} shape mismatch(es) between the weights and the model:\n  " + "\n  ".join(wrong))


class _Weights:
    """Read access to a source of weights, by key, with ``prefix`` removed from the source's keys."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def keys(self) -> list[str]:
        return [k[len(self.prefix):] for k in self._raw_keys() if k.startswith(self.prefix)]

    def __getitem__(self, key: str) -> Any:
        return self._get(self.prefix + key)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self._shape(self.prefix + key)

    def _raw_keys(self) -> list[str]:
        raise NotImplementedError

    def _get(self, key: str) -> Any:
        raise NotImplementedError

    def _shape(self, key: str) -> tuple[int, ...] | None:
        raise NotImplementedError


class _DictWeights(_Weights):
    def __init__(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        super().__init__(prefix)
        self.state_dict = state_dict

    def _raw_keys(self) -> list[str]:
        return list(self.state_dict)

    def _get(self, key: str) -> Any:
        return self.state_dict[key]

    def _shape(self, key: str) -> tuple[int, ...] | None:
        value = self.state_dict[key]
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _SafetensorsWeights(_Weights):
    """One or several ``.safetensors`` files, opened lazily: a tensor is read when a module asks for it."""

    def __init__(self, handles: list[Any], files: list[Path], prefix: str) -> None:
        super().__init__(prefix)
        self.where: dict[str, Any] = {}
        for handle, file in zip(handles, files):
            for key in handle.keys():
                if key in self.where:
                    raise ValueError(f"Key {key!r} is in two of the safetensors files in {str(file.parent)!r}.")
                self.where[key] = handle

    def _raw_keys(self) -> list[str]:
        return list(self.where)

    def _get(self, key: str) -> Any:
        return self.where[key].get_tensor(key)

    def _shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self.where[key].get_slice(key).get_shape())


@contextmanager
def _open_weights(source: Mapping[str, Any] | str | os.PathLike, prefix: str) -> Iterator[_Weights]:
    if isinstance(source, Mapping):
        yield _DictWeights(_unwrap_lightning(source, "the state dict"), prefix)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_full_state_dict(source=...) takes a state dict or a path; got an object of type"
                        f" {type(source).__name__}.")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Weights file {str(source)!r} does not exist.")
    if path.is_dir():
        if (path / META).is_file():
            raise ValueError(f"{str(source)!r} is a sharded ZeroStrategy checkpoint folder. Resume from it with"
                             " `trainer.fit(model, ckpt_path=...)`, or consolidate it into one weights file first"
                             " (`lightning-zero consolidate`) and pass that file.")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{str(source)!r} is a folder without .safetensors files. Pass a weights file (.ckpt,"
                             " .pt/.bin, .safetensors) or a folder of .safetensors shards.")
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        yield _DictWeights(_unwrap_lightning(_torch_load(path), repr(str(source))), prefix)
        return
    safe_open = _require_safetensors()
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        yield _SafetensorsWeights(handles, files, prefix)


def _require_safetensors() -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("Reading .safetensors weights needs the safetensors package: `pip install safetensors`.") from None
    return safe_open


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the file format allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"torch.load({str(path)!r}, weights_only=True) refused the file: {str(err).splitlines()[0]} It holds"
            " objects other than tensors. If you trust it, load it yourself"
            f" (`torch.load(path, weights_only=False)['state_dict']`) and pass the dict."
        ) from None
    return torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) file: cannot be mapped


def _unwrap_lightning(obj: Any, what: str) -> Mapping[str, Any]:
    """A Lightning checkpoint's ``"state_dict"``, or the state dict itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors).")
    return obj


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
