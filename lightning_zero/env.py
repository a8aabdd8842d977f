"""``lightning-zero env``: what to paste into a bug report, like DeepSpeed's ``ds_report``.

    lightning-zero env            # versions, accelerator, DeepSpeed ops (compatible / installed / JIT-built), memory
    lightning-zero env --build    # also JIT-build the compatible ops now and report each result

Fast by default: an op's compatibility is DeepSpeed's own ``is_compatible`` check (which compiles a one-line test
program for libaio), nothing is built unless ``--build``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import importlib.metadata
import io
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OpStatus", "add_parser", "collect", "op_status", "report", "run", "stale_build_locks",
           "warn_stale_build_locks"]

# (what it is for, DeepSpeed builder class) of the ops ZeroStrategy can use.
_OPS = (("fused Adam (GPU optimizer step)", "FusedAdamBuilder"),
        ("CPU Adam (offloaded optimizer step)", "CPUAdamBuilder"),
        ("async I/O (NVMe offload)", "AsyncIOBuilder"))
# A JIT build older than this still holding its lock was interrupted (the slowest op, async I/O, builds in ~3 minutes
# on 2 cores); torch's FileBaton then makes every later build of that op wait for it forever, printing nothing.
STALE_LOCK_AGE_S = 15 * 60
_PACKAGES = ("torch", "deepspeed", "lightning", "torchmetrics", "transformers", "peft", "safetensors")
GiB = 2**30


@dataclass(frozen=True)
class OpStatus:
    purpose: str
    name: str
    compatible: bool
    installed: bool  # pre-built into the DeepSpeed install (DS_BUILD_*)
    jit_built: bool  # compiled before, found in the torch extensions cache
    reason: str = ""  # why not compatible, DeepSpeed's own words

    def line(self) -> str:
        if self.installed:
            state = "installed (pre-built)"
        elif self.jit_built:
            state = "compatible, JIT-built (cached)"
        elif self.compatible:
            state = "compatible, JIT-builds on first use"
        else:
            state = f"NOT compatible: {self.reason or 'DeepSpeed gives no reason'}"
        return f"  {self.purpose:<38} [{self.name}] {state}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extensions_dir() -> Path:
    """Where torch JIT-builds extensions (torch.utils.cpp_extension's default, or $TORCH_EXTENSIONS_DIR)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def stale_build_locks(max_age_s: float = STALE_LOCK_AGE_S, root: Path | None = None) -> list[Path]:
    """The ``lock`` files of JIT builds that were killed half-way (older than ``max_age_s``).

    torch.utils.cpp_extension takes ``<extensions dir>/<python/cuda tag>/<op>/lock`` with ``O_EXCL`` while it builds an
    op and removes it when the build ends; a killed build leaves it behind and every later process that needs the op
    (DeepSpeed's CPU Adam, async I/O, shared-memory collectives) waits on it forever without a word.
    """
    import time

    root = _extensions_dir() if root is None else root
    now = time.time()
    try:
        locks = [p for p in root.glob("*/*/lock") if p.is_file()]
        return sorted(p for p in locks if now - p.stat().st_mtime > max_age_s)
    except OSError:  # the folder vanished or is unreadable: nothing to wait on
        return []


def _stale_lock_message(locks: list[Path]) -> str:
    ops = ", ".join(p.parent.name for p in locks)
    return (f"Found {len(locks)} lock file(s) of interrupted DeepSpeed op builds ({ops}); a process that needs "
            f"such an op waits on its lock forever, printing nothing. If no other process is building it right now, "
            f"remove them: rm {' '.join(str(p) for p in locks)}")


def warn_stale_build_locks() -> None:
    """Warn (before DeepSpeed loads any op) about locks that would hang this process; see :func:`stale_build_locks`."""
    import warnings

    locks = stale_build_locks()
    if locks:
        warnings.warn(_stale_lock_message(locks), RuntimeWarning, stacklevel=2)


def op_status(purpose: str, builder_class: str) -> OpStatus:
    """Compatibility of one DeepSpeed op here, with the reason when not (DeepSpeed's prints are captured)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(builder_class)
    # the CPU accelerator answers an op it lacks with a NotImplementedBuilder, whose check passes
    if builder is None or builder.NAME == "deepspeed_not_implemented":
        return OpStatus(purpose, builder_class, False, False, False,
                        f"the {get_accelerator().device_name()} accelerator has no {builder_class}")
    name = builder.NAME
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        compatible = bool(builder.is_compatible(verbose=True))
    reason = "" if compatible else (builder.error_log or printed.getvalue().strip().replace("\n", " "))
    jit = any(_extensions_dir().glob(f"*/{name}/{name}*.so"))
    return OpStatus(purpose, name, compatible, bool(installed_ops.get(name)), jit, reason)


def _libaio() -> str:
    lib = ctypes.util.find_library("aio")
    headers = any(Path(d, "libaio.h").is_file() for d in ("/usr/include", "/usr/local/include"))
    if lib and headers:
        return f"{lib}, headers found"
    missing = " and ".join(x for x, ok in (("the library", lib), ("the headers (libaio.h)", headers)) if not ok)
    from lightning_zero.offload import _LIBAIO_PACKAGES

    install = next((cmd for manager, cmd in _LIBAIO_PACKAGES if shutil.which(manager)), "install libaio-dev")
    return f"missing {missing}: `{install}` (NVMe offload needs it)"


def _accelerator() -> list[str]:
    import torch

    chosen = os.environ.get("DS_ACCELERATOR", "unset")
    lines = [f"  DeepSpeed accelerator: {_ds_accelerator()} (DS_ACCELERATOR={chosen})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}: {props.name}, {props.total_memory / GiB:.1f} GiB, compute capability"
                         f" {props.major}.{props.minor}")
        lines.append(f"  bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        lines.append(f"  no CUDA GPU: ZeroStrategy runs CPU processes (gloo); {os.cpu_count()} CPU cores")
    return lines


def _ds_accelerator() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def collect(build: bool = False) -> dict[str, Any]:
    """Everything :func:`report` prints, as data."""
    import torch

    from lightning_zero.estimate import _host_memory_available

    versions = {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}}
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build (no CUDA)"
    ops = [op_status(purpose, name) for purpose, name in _OPS]
    built: dict[str, str] = {}
    if build:
        from deepspeed.accelerator import get_accelerator

        for op in ops:
            if op.compatible and not op.installed:
                try:
                    get_accelerator().create_op_builder(next(c for p, c in _OPS if p == op.purpose)).load()
                    built[op.name] = "built"
                except Exception as err:  # noqa: BLE001 - a compiler's failure, reported as the result
                    built[op.name] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    disk = shutil.disk_usage(os.getcwd())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"versions": versions, "torch_cuda": cuda, "platform": platform.platform(), "accelerator": _accelerator(),
            "ops": ops, "built": built, "stale_locks": stale_build_locks(), "libaio": _libaio(),
            "host_memory": (_host_memory_available(), total),
            "disk": (os.getcwd(), disk.free, disk.total)}


def report(build: bool = False) -> str:
    info = collect(build)
    v = info["versions"]
    lines = ["lightning-zero env", "", "Versions:", f"  Python {v['python']} ({info['platform']})",
             f"  torch {v['torch']} ({info['torch_cuda']})"]
    lines += [f"  {p} {v[p]}" for p in _PACKAGES[1:] if v[p]]
    absent = [p for p in _PACKAGES[1:] if not v[p]]
    if absent:
        lines.append(f"  not installed: {', '.join(absent)}")
    lines += ["", "Accelerator:", *info["accelerator"], "", "DeepSpeed ops:"]
    lines += [op.line() + (f" -> --build: {info['built'][op.name]}" if op.name in info["built"] else "")
              for op in info["ops"]]
    if info["stale_locks"]:
        lines.append(f"  STALE BUILD LOCKS: {_stale_lock_message(info['stale_locks'])}")
    lines += [f"  libaio: {info['libaio']}", "", "Memory:"]
    avail, total = info["host_memory"]
    where, free, size = info["disk"]
    lines += [f"  host memory: {avail / GiB:.1f} GiB available of {total / GiB:.1f} GiB",
              f"  disk at {where}: {free / GiB:.1f} GiB free of {size / GiB:.1f} GiB"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(report(build=args.build))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("env", help="versions, accelerator, DeepSpeed ops and memory, for bug reports",
                                   description="Print what to paste into a bug report: versions, the accelerator and"
                                               " its devices, which DeepSpeed ops are compatible/built here (and why"
                                               " not), libaio, free host memory and disk.")
    parser.add_argument("--build", action="store_true", help="JIT-build every compatible op now (slow)")
    parser.set_defaults(func=run)
    return parser
