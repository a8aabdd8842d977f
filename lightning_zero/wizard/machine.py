"""The machine and the model that ``lightning-zero config``'s defaults are sized for: :class:`Machine` (with
:func:`detect_machine`), :class:`ModelSize` and the :class:`Context` the questions see."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

GiB = 2**30


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Machine:
    """This machine, as the defaults see it (``gpu_memory_bytes`` None: no CUDA GPU)."""

    gpus: int = 0
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    bf16: bool = False
    host_memory_bytes: int = 0
    nodes: int = 1
    nodes_source: str = ""  # e.g. "$SLURM_NNODES"
    disk_free_bytes: int | None = None  # in the output's folder

    def describe(self) -> str:
        gpus = (f"{self.gpus} x {self.gpu_name} ({_gib(self.gpu_memory_bytes or 0)} each)" if self.gpus
                else "no CUDA GPU")
        disk = f", {_gib(self.disk_free_bytes)} free disk here" if self.disk_free_bytes is not None else ""
        return f"{gpus}, {_gib(self.host_memory_bytes)} host memory available{disk}"


@dataclass(frozen=True)
class ModelSize:
    params: int
    largest_layer: int
    name: str


@dataclass(frozen=True)
class Context:
    machine: Machine
    model: ModelSize | None = None


def detect_machine(environ: Mapping[str, str] | None = None, folder: str = ".") -> Machine:
    import shutil

    import torch

    from lightning_zero.estimate import _host_memory_available

    environ = os.environ if environ is None else environ
    nodes, source = 1, ""
    for var in ("SLURM_NNODES", "NNODES", "PET_NNODES"):
        if environ.get(var, "").isdigit():
            nodes, source = int(environ[var]), f"${var}"
            break
    disk = int(shutil.disk_usage(folder).free)
    if not torch.cuda.is_available():
        return Machine(host_memory_bytes=_host_memory_available(), nodes=nodes, nodes_source=source,
                       disk_free_bytes=disk)
    props = torch.cuda.get_device_properties(0)
    return Machine(torch.cuda.device_count(), props.name, int(props.total_memory), torch.cuda.is_bf16_supported(),
                   _host_memory_available(), nodes, source, disk)
