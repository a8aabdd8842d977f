"""The checkpoint folder's mechanics: its file names, the commit that makes ``<path>.partial`` visible as ``<path>``
(an atomic exchange of the two folders where the OS allows it), removal, half-written folders beside a checkpoint, the
manifest, ``validate_path`` (what a path is, before anything is loaded) and the error of a save that could not write
(why, how much space the checkpoint needs, how much is free)."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

if TYPE_CHECKING:
    from lightning_zero.strategy import ZeroStrategy

log = logging.getLogger(__package__)  # "lightning_zero.checkpoint": the logger's name before the split into modules

FORMAT = "lightning_zero/1"
META = "meta.json"
LIGHTNING_STATE = "lightning.pt"
WEIGHTS = "weights.pt"  # a frozen model's full weights
RNG_DIR = "rng"
PARTIAL_SUFFIX = ".partial"  # a save in progress (or interrupted): never loaded
REMOVING_SUFFIX = ".removing"  # a checkpoint being deleted: renamed first, so it disappears at once
TAG = "checkpoint"
UNIVERSAL_TAG = "checkpoint_universal"


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


def _manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def _remove_stale_partials(final: Path) -> None:
    """After a committed save: remove half-written checkpoint folders beside it (saves that failed or were killed:
    they are never loaded and only take space)."""
    for stale in final.parent.glob(f"*{PARTIAL_SUFFIX}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            log.info("Removed %r, the half-written folder of an interrupted or failed save.", str(stale))


def _report_interrupted_saves(root: Path) -> None:
    stale = sorted(p.name for p in root.parent.glob(f"*{PARTIAL_SUFFIX}") if p.is_dir())
    if stale:
        rank_zero_warn(f"Skipped {len(stale)} half-written checkpoint(s) beside {root.name!r} (interrupted saves,"
                       f" never loaded): {', '.join(stale)}. Loading {str(root)!r}.")


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


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
