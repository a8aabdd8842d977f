"""Helpers ZeroStrategy's hooks call: stage-3 partitioning checks at setup, the DeepCompile evaluation warning and
shape-error pattern, the device-index check, the train batch size, and the process-group release at exit."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.distributed
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module

from lightning_zero import offload
from lightning_zero._compat.deepspeed import release_comm_backend
from lightning_zero._compat.lightning import distributed_is_initialized as _distributed_is_initialized
from lightning_zero._compat.lightning import train_dataloader

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["_SHAPE_ERROR", "_check_device_indices", "_destroy_process_group", "_match_partitioned_dtype",
           "_train_micro_batch_size", "_warn_eager_stage3_evaluation", "_warn_unpartitioned"]


_SHAPE_ERROR = re.compile(r"matrix|shape|size|dimension", re.IGNORECASE)


def _warn_unpartitioned(module: Module) -> None:
    """Warn (once, rank 0) when stage-3 parameters were created outside zero.Init: each rank held them whole."""
    whole = sum(p.numel() for p in module.parameters() if not hasattr(p, "ds_id"))
    if whole:
        rank_zero_warn(
            f"ZeroStrategy(stage=3): {get_human_readable_count(whole).strip()} parameters ({whole:,} elements) were"
            " created outside `configure_model`, so every rank materialized them whole before DeepSpeed partitioned"
            " them at setup. Create the layers in `LightningModule.configure_model` (or under"
            " `with trainer.init_module():`) so that each rank only ever holds its shard."
        )


def _match_partitioned_dtype(module: Module) -> None:
    """Parameters created in ``__init__`` next to ones zero.Init created in ``configure_model`` (in the 16-bit compute
    dtype) get that dtype too: DeepSpeed's stage-3 optimizer flattens all of them into one buffer of one dtype."""
    dtypes = {p.dtype for p in module.parameters() if hasattr(p, "ds_id")}
    if len(dtypes) != 1:
        return  # none created partitioned: DeepSpeed converts them all itself
    (dtype,) = dtypes
    for p in module.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _warn_eager_stage3_evaluation(module: Module) -> None:
    """Warn (once, rank 0) that an evaluation pass with a DeepCompile stage-3 engine gathers the whole model."""
    elements = offload.count_parameters(module)
    size = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters()) / 2**30
    rank_zero_warn(
        "ZeroStrategy(stage=3, compile='deepcompile'): evaluation with this fit's engines runs the networks eagerly"
        " (through DeepCompile it aborted training), and DeepSpeed's ZeRO-3 eager fallback keeps every weight a"
        " forward touches gathered until the next forward: each GPU holds the whole model during this pass"
        f" ({get_human_readable_count(elements).strip()} parameters, {size:.2f} GiB). If that does not fit, set"
        " `limit_val_batches=0` for the fit and evaluate with a new Trainer (`trainer.validate/test/predict` on their"
        " own gather layer by layer), or train at stage 2."
    )


def _check_device_indices(devices: list[torch.device] | None) -> None:
    """DeepSpeed puts local rank i on device i (its engine reads LOCAL_RANK): a device picked by index would get a
    module on one GPU and its engine on another."""
    indices = [d.index for d in devices or [] if d.type == "cuda"]
    if indices and indices != list(range(len(indices))):
        raise ValueError(f"Trainer(devices={indices!r}): the device indices {indices!r} don't match the local rank"
                         " values of processes: DeepSpeed runs local rank i on device i. Use"
                         f" Trainer(devices={len(indices)}) and pick the GPUs with"
                         f" CUDA_VISIBLE_DEVICES={','.join(map(str, indices))}.")


def _destroy_process_group() -> None:
    """At exit: release every process group and the rendezvous store while the interpreter is whole.

    DeepSpeed's communication backend (``deepspeed.comm.comm.cdb``) keeps the groups (and through them the TCP store
    and its server thread on rank 0) alive until the interpreter's final teardown, where destroying them aborts the
    process ("terminate called without an active exception", exit code 134) and a finished run reports failure.
    """
    import gc

    if _distributed_is_initialized():
        torch.distributed.destroy_process_group()
    release_comm_backend()
    gc.collect()


def _train_micro_batch_size(trainer: pl.Trainer) -> int | None:
    """The train DataLoader's batch size, or None when there is none (validate/predict, iterable batches)."""
    if trainer.state.fn != TrainerFn.FITTING:
        return None
    loader = train_dataloader(trainer)
    if loader is None:
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    size = getattr(batch_sampler, "batch_size", None) or getattr(loader, "batch_size", None)
    return int(size) if isinstance(size, int) else None
