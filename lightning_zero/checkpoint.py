"""On-disk layout, crash-safe sharded save/load, resume on another number of processes, and full state dicts.

A ZeroStrategy checkpoint is a folder::

    epoch=3-step=400.ckpt/                 <- the path you pass to `ckpt_path=` / `save_checkpoint`
        meta.json                           written last: format, world size, stage, engines, and the size of every
                                            file below (a folder whose files do not match is refused)
        lightning.pt                        Lightning's state: loops, callbacks, schedulers, optimizer hyperparameters
        rng/rank_00000.pt ...               each rank's RNG states (torch, CUDA, numpy, Python)
        <engine name>/                      one folder per DeepSpeed engine ("model", or e.g. "generator")
            latest                          DeepSpeed's tag file
            checkpoint/                     DeepSpeed's shards: *_model_states.pt, *_optim_states.pt
            checkpoint_universal/           added on the first resume with another number of processes or another
                                            ZeRO stage: DeepSpeed's universal format, cached for the next resume
        <frozen engine name>/weights.pt     a model without optimizer: its full weights (plain tensors)
        latest, zero_to_fp32.py, ...        for DeepSpeed's and Lightning's converters: the one engine's tag folder
                                            ("model/checkpoint"), or why they cannot convert this folder (see LATEST)
        hf/                                 only with transformers/peft models inside: their configs, tied keys and
                                            adapter weight names, for `consolidate --format hf/peft` (export.py)

Every rank writes into ``<path>.partial`` first; after all ranks finished, rank 0 writes ``meta.json`` and renames the
folder to ``<path>``. Overwriting an existing ``<path>`` (``last.ckpt``) swaps the two folders atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux), so ``<path>`` is never missing or half-written. A crash at any point leaves
the previous checkpoint loadable; a ``.partial`` folder is never loaded.

Trusted files: ``lightning.pt`` and ``rng/*`` are read with ``weights_only=True`` (``trainer.fit(...,
weights_only=False)`` lifts that for unusual callback state); ``weights.pt`` with ``weights_only=True``. DeepSpeed's
shards are pickles that DeepSpeed reads with ``weights_only=False``: only load or convert checkpoints you trust, and
share weights as safetensors (``lightning-zero consolidate``).
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import io
import json
import logging
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

if TYPE_CHECKING:
    from lightning_zero.strategy import ZeroStrategy

__all__ = ["FORMAT", "engine_weights", "gather_full_state_dict", "load", "load_full_state_dict", "model_key",
           "read_weights_file", "remove", "resume_method", "save", "validate_path"]

log = logging.getLogger(__name__)

FORMAT = "lightning_zero/1"
META = "meta.json"
LIGHTNING_STATE = "lightning.pt"
WEIGHTS = "weights.pt"  # a frozen model's full weights
RNG_DIR = "rng"
PARTIAL_SUFFIX = ".partial"  # a save in progress (or interrupted): never loaded
REMOVING_SUFFIX = ".removing"  # a checkpoint being deleted: renamed first, so it disappears at once
TAG = "checkpoint"
UNIVERSAL_TAG = "checkpoint_universal"
# Test hook: seconds each rank sleeps after writing its shards, before the commit (makes a kill mid-save reliable).
SAVE_DELAY_ENV = "LIGHTNING_ZERO_TEST_SAVE_DELAY"
# Lightning's own copies of weights/optimizer state are replaced by the engines' shards.
_EXCLUDED_KEYS = ("state_dict",)


def _ds_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]


def gather_full_state_dict(root: nn.Module, rank_zero_only: bool, is_rank_zero: bool) -> dict[str, Any]:
    """The state dict of a ZeRO-3 partitioned module, gathered one module at a time into CPU memory.

    Collective: every rank must call it. Never more than one module's parameters are gathered at once. Tied
    parameters (one Parameter under several names, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``)
    share one tensor, as in ``state_dict()`` of the unpartitioned module.
    """
    import deepspeed

    keep = is_rank_zero or not rank_zero_only
    out: dict[str, Any] = {}
    copies: dict[int, torch.Tensor] = {}  # id(parameter or buffer) -> its CPU copy
    for prefix, module in root.named_modules():
        prefix = f"{prefix}." if prefix else ""
        with deepspeed.zero.GatheredParameters(_ds_params(module), modifier_rank=None):
            if keep:
                part: dict[str, Any] = {}
                module._save_to_state_dict(part, prefix, keep_vars=True)
                for k, v in part.items():
                    if isinstance(v, torch.Tensor):
                        if id(v) not in copies:
                            copies[id(v)] = v.detach().cpu().clone()
                        v = copies[id(v)]
                    out[k] = v
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

    Tied parameters (one Parameter under several names, as ``tie_weights`` leaves GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``) need only one of their keys in the weights: ``save_pretrained`` leaves the tied copy
    out, and loading one name sets the other. Two keys of one tie with different values raise ``ValueError``.

    Returns ``(missing_keys, unexpected_keys)``. A shape mismatch always raises ``ValueError`` before loading. At
    stage 3 this is collective: every rank calls it with the same source (in ``configure_model`` they all do). At most
    one module's parameters are gathered at a time, and rank 0's values are the ones every rank keeps.
    """
    with _open_weights(source, prefix) as weights, _outside_zero_init():
        targets = root.state_dict(keep_vars=True)  # the parameter objects, not copies: cheap, partitioned or not
        available = set(weights.keys())
        ties = _tie_groups(targets)
        # A tied copy left out of the weights (save_pretrained leaves out lm_head.weight) is loaded through its tie.
        missing = sorted(k for k in targets if k not in available and not available.intersection(ties.get(k, ())))
        unexpected = sorted(available - set(targets))
        if strict and (missing or unexpected):
            raise ValueError(_key_report(missing, unexpected) + " Fix the keys (see `prefix=`) or pass strict=False.")
        _check_shapes(targets, weights, available)
        _check_tied_values(ties, weights, available)
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


def _tie_groups(targets: Mapping[str, Any]) -> dict[str, list[str]]:
    """Key -> every key naming the same Parameter (or buffer) object, for tied keys only. Identity is what ties
    weights in PyTorch (transformers' ``tie_weights`` assigns one Parameter to both modules), partitioned or not."""
    names: dict[int, list[str]] = {}
    for key, value in targets.items():
        if isinstance(value, torch.Tensor):
            names.setdefault(id(value), []).append(key)
    return {key: group for group in names.values() if len(group) > 1 for key in group}


def _check_tied_values(ties: Mapping[str, list[str]], weights: _Weights, available: set[str]) -> None:
    """Where the weights hold several keys of one tied parameter, they must agree: one value is all the model keeps."""
    for group in {tuple(g) for g in ties.values()}:
        present = [k for k in group if k in available]
        if len(present) > 1:
            first = weights[present[0]]
            differ = [k for k in present[1:] if not torch.equal(first, weights[k])]
            if differ:
                raise ValueError(
                    f"The weights hold different values for {present[0]!r} and {differ[0]!r}, which are one tied"
                    " parameter in the model (the same Parameter object under both names). Untie them in the model"
                    " (give the module its own nn.Parameter) or drop one of the two keys from the weights.")


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


def _load_mapped(path: str | Path, weights_only: bool) -> Any:
    """``torch.load`` onto the CPU, memory-mapped when the file format allows it (an old, non-zip file cannot be)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the file format allows it."""
    _refuse_non_torch_file(path)
    try:
        return _load_mapped(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"torch.load({str(path)!r}, weights_only=True) refused the file: {str(err).splitlines()[0]} It holds"
            " objects other than tensors. If you trust it, load it yourself"
            f" (`torch.load(path, weights_only=False)['state_dict']`) and pass the dict."
        ) from None


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


def _raise_if_save_failed(strategy: ZeroStrategy, final: Path, partial: Path, failure: BaseException | None) -> None:
    """Collective: share each rank's write error; if any failed, every rank raises one error that says where, why,
    how much space the checkpoint needs and how much is free (rank 0 removes the half-written folder first)."""
    mine = None if failure is None else f"{type(failure).__name__}: {_first_line(failure)}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reports: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, (strategy.global_rank, mine))
    else:
        reports = [(strategy.global_rank, mine)]
    failed = [(rank, error) for rank, error in reports if error is not None]
    if not failed:
        return
    written = _folder_bytes(partial)
    need, basis = _needed_bytes(strategy, final, written)
    if strategy.is_global_zero:
        shutil.rmtree(partial, ignore_errors=True)  # free the space it took; a later save removes any leftover too
    strategy.barrier()
    free = shutil.disk_usage(final.parent if final.parent.exists() else Path.cwd()).free
    code, why = _write_failure([error for _, error in failed])
    ranks = ", ".join(str(rank) for rank, _ in failed)
    message = (
        f"Saving the checkpoint {str(final)!r} failed{why}: rank(s) {ranks} could not write ({failed[0][1]}). The"
        f" checkpoint needs about {_bytes(need)} ({basis}); {_bytes(free)} is free in {str(final.parent)!r} now."
        f" Nothing was committed: earlier checkpoints are untouched and the half-written {partial.name!r} was removed."
        " Free up space there, or save elsewhere (ModelCheckpoint(dirpath=...) or trainer.save_checkpoint(<another"
        " path>))."
    )
    error = RuntimeError(message) if code is None else OSError(code, message) if code else OSError(message)
    raise error from failure


def _write_failure(errors: list[str]) -> tuple[int | None, str]:
    """(errno or 0 when only "a write was cut short" is known, None when it is no write failure; the reason)."""
    text = " ".join(errors)
    for code, why in ((errno.ENOSPC, " because the drive is full"),
                      (errno.EDQUOT, " because the disk quota is used up"),
                      (errno.EFBIG, " because a file-size limit was reached")):
        if f"[Errno {code}]" in text:
            return code, why
    if "No space left" in text:
        return errno.ENOSPC, " because the drive is full"
    # torch.save's C++ writer reports a short write without its cause: "[enforce fail at inline_container.cc:672]
    # . unexpected pos 704 vs 598" (measured under RLIMIT_FSIZE) or "PytorchStreamWriter failed writing file"
    if "unexpected pos" in text or "failed writing file" in text or "file write failed" in text:
        return 0, " because a write was cut short (a full drive, a quota or a file-size limit)"
    return None, ""


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _needed_bytes(strategy: ZeroStrategy, final: Path, written: int) -> tuple[int, str]:
    """What the checkpoint needs: the size of the newest complete checkpoint beside it, else the model's weights
    plus fp32 Adam state (master weights and two moments) of the trained engines; at least what was written."""
    beside = [p for p in (final, *final.parent.glob("*")) if p.is_dir() and (p / META).is_file()]
    if beside:
        newest = max(beside, key=lambda p: (p / META).stat().st_mtime)
        size = _folder_bytes(newest)
        if size >= written:
            return size, f"the size of {newest.name!r}, the newest complete checkpoint there"
    estimate = 0
    for slot in strategy.engines:
        for p in {id(p): p for p in slot.module.parameters()}.values():
            numel = int(getattr(p, "ds_numel", p.numel()))
            estimate += numel * (p.element_size() + (12 if slot.face is not None else 0))
    if estimate >= written:
        return estimate, "the weights plus the fp32 optimizer state of the trained models, by their size"
    return written, "what was written before the failure, at least"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _remove_stale_partials(final: Path) -> None:
    """After a committed save: remove half-written checkpoint folders beside it (saves that failed or were killed:
    they are never loaded and only take space)."""
    for stale in final.parent.glob(f"*{PARTIAL_SUFFIX}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            log.info("Removed %r, the half-written folder of an interrupted or failed save.", str(stale))


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


def _manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def _commit(partial: Path, final: Path) -> None:
    """Make ``partial`` visible as ``final``; an existing ``final`` is replaced without ever being missing."""
    if not os.path.lexists(final):
        os.replace(partial, final)
        return
    if _exchange(partial, final):
        _remove_path(partial)  # now the old checkpoint
        return
    # No atomic exchange on this OS/file system: a short window exists in which only `<final>.old` is complete.
    old = _sibling(final, ".old")
    _remove_path(old)
    os.replace(final, old)
    os.replace(partial, final)
    _remove_path(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or file system can't."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_path(path: Path) -> None:
    """Delete a file, link or folder; a folder is renamed first, so a crash never leaves a half-deleted checkpoint
    under its own name."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    trash = _sibling(path, REMOVING_SUFFIX)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def remove(path: Any) -> None:
    """Remove a checkpoint (ModelCheckpoint's top-k rotation; called after the new checkpoint is committed)."""
    _remove_path(Path(path))


def _save_rng(folder: Path, rank: int) -> None:
    from lightning_zero._compat.lightning import collect_rng_states

    state = collect_rng_states(include_cuda=torch.cuda.is_available())
    if "numpy" in state:  # stored as tensors, so the file loads with weights_only=True
        name, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / RNG_DIR / f"rank_{rank:05d}.pt")


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


# ----------------------------------------------------------------------------------------------------------------------
# Validate: what a path is, before anything is loaded
# ----------------------------------------------------------------------------------------------------------------------


def validate_path(path: str) -> dict[str, Any]:
    """Check that ``path`` is a complete ZeroStrategy checkpoint folder and return its metadata; ``{}`` for a plain
    weights file (or a folder of ``.safetensors``). Raises ``ValueError``/``FileNotFoundError`` naming the fix."""
    p = Path(path)
    if p.name.endswith(PARTIAL_SUFFIX):
        complete = _sibling(p.with_name(p.name[:-len(PARTIAL_SUFFIX)]), "")
        raise ValueError(f"{path!r} is a half-written checkpoint (its save was interrupted); it is never loaded. Resume"
                         f" from a complete checkpoint, e.g. {str(complete)!r} if it exists, or ckpt_path='last'.")
    if p.name.endswith(REMOVING_SUFFIX):
        raise ValueError(f"{path!r} is a checkpoint whose deletion was interrupted; it cannot be loaded. Resume from"
                         " another checkpoint.")
    if not p.exists():
        partial = _sibling(p, PARTIAL_SUFFIX)
        extra = (f" A half-written {partial.name!r} exists beside it: that save was interrupted and is not loadable."
                 if partial.exists() else "")
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.{extra}")
    if p.is_dir() and (p / META).is_file():
        return _read_meta(p, path)
    for parent in list(p.parents)[:4]:
        if (parent / META).is_file():
            raise ValueError(f"{path!r} is inside a ZeroStrategy checkpoint. Pass the checkpoint folder itself:"
                             f" {str(parent)!r}.")
    if p.is_dir():
        if any(p.glob("*.safetensors")):
            return {}  # exported weights (lightning-zero consolidate --format safetensors)
        inside = sorted(c.name for c in p.iterdir() if (c / META).is_file())
        hint = (f" It holds the checkpoints {inside[:4]}{' ...' if len(inside) > 4 else ''}: pass one of them, or"
                " ckpt_path='last' with the ModelCheckpoint that wrote them." if inside else
                " Pass a folder written by `trainer.save_checkpoint` with ZeroStrategy, or a weights file.")
        raise ValueError(f"{path!r} is a folder but not a ZeroStrategy checkpoint (no {META}).{hint}")
    return {}  # a single file: a plain Lightning/torch checkpoint


def _read_meta(folder: Path, path: str) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path!r} has an unreadable {META} ({err}); the checkpoint is damaged. Use another one.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} was written in format {found!r}; this version of lightning_zero reads {FORMAT!r}.")
    bad = [rel for rel, size in meta["files"].items()
           if not (folder / rel).is_file() or (folder / rel).stat().st_size != size]
    if bad:
        raise ValueError(f"{path!r} is incomplete: {len(bad)} of its {len(meta['files'])} files are missing or have"
                         f" another size ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}). It was partly deleted"
                         " or copied incompletely; resume from another checkpoint.")
    return meta


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


def _report_interrupted_saves(root: Path) -> None:
    stale = sorted(p.name for p in root.parent.glob(f"*{PARTIAL_SUFFIX}") if p.is_dir())
    if stale:
        rank_zero_warn(f"Skipped {len(stale)} half-written checkpoint(s) beside {root.name!r} (interrupted saves,"
                       f" never loaded): {', '.join(stale)}. Loading {str(root)!r}.")


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


def read_weights_file(path: str, trusted: bool = False) -> Any:
    """``torch.load`` a single-file checkpoint, with ``weights_only=True`` unless ``trusted``, memory-mapped when the
    file allows it; a file torch cannot read, or one holding objects it refuses, is a ``ValueError`` naming the fix."""
    _refuse_non_torch_file(path)
    try:
        return _load_mapped(path, weights_only=not trusted)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on a file that is not a checkpoint
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise ValueError(f"{path!r} holds objects other than tensors, which `weights_only=True` loading refuses."
                             " If you trust the file, pass `trainer.fit(..., weights_only=False)`.") from None
        raise ValueError(_not_a_checkpoint(path, err)) from None


def _refuse_non_torch_file(path: str | Path) -> None:
    what = _not_torch_file(path)
    if what:  # torch.load would call a text file "objects other than tensors" and suggest weights_only=False
        raise ValueError(f"{str(path)!r} is not a checkpoint: it is {what}. Pass a checkpoint folder written by"
                         " ZeroStrategy, a Lightning/torch checkpoint file (.ckpt/.pt), or .safetensors weights.")


def _not_torch_file(path: str | Path) -> str | None:
    """What the file is when it is neither of torch.save's formats (a zip archive, or a legacy pickle), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    if head[8:10] == b'{"':  # safetensors: an 8-byte header length, then the JSON header
        return "safetensors weights without the .safetensors suffix (rename it to end in .safetensors)"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except UnicodeDecodeError:
        return f"binary data of another format (it starts with {head[:8]!r})"
    first = (text.strip().splitlines() or [""])[0][:60]
    kind = "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"
    return f"{kind} (it starts with {first!r})"


def _not_a_checkpoint(path: str, err: Exception) -> str:
    return (f"{path!r} is not a checkpoint: torch.load cannot read it ({_first_line(err)}). Pass a checkpoint folder"
            " written by ZeroStrategy, a Lightning/torch checkpoint file, or .safetensors weights.")


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
