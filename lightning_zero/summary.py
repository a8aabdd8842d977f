"""True parameter counts in Lightning's model summary at ZeRO stage 3.

A ZeRO-3 parameter's own tensor is empty: its values live in ``param.ds_tensor``, this rank's 1/N shard, and its full
size in ``param.ds_numel``. Lightning's summary counts ``param.numel()`` (0 for every partitioned parameter) and picks
its DeepSpeed variant only for its own ``DeepSpeedStrategy``. :class:`ZeroSummary` counts full sizes and what each rank
holds; :func:`install_summary` makes the Trainer's ``ModelSummary`` callbacks use it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.utilities.model_summary.model_summary import LayerSummary, ModelSummary, get_human_readable_count
from torch import nn
from typing_extensions import override

from lightning_zero._compat.lightning import route_model_summary, tensor_shape_unknown

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["ZeroSummary", "full_numel", "install_summary", "local_numel"]

# The callback logs its table here (Lightning's handler prints it); the per-rank line goes to the same place.
_CALLBACK_LOG = logging.getLogger(ModelSummaryCallback.__module__)


def full_numel(p: nn.Parameter) -> int:
    """Number of elements of the whole parameter, partitioned or not."""
    return int(getattr(p, "ds_numel", p.numel()))


def local_numel(p: nn.Parameter) -> int:
    """Number of elements this rank stores (its padded shard at stage 3)."""
    shard = getattr(p, "ds_tensor", None)
    return shard.numel() if shard is not None else p.numel()


class _ZeroLayerSummary(LayerSummary):
    @property
    @override
    def num_parameters(self) -> int:
        return sum(full_numel(p) for p in self._module.parameters() if not tensor_shape_unknown(p))


class ZeroSummary(ModelSummary):
    """Lightning's ``ModelSummary`` counting full parameter sizes at ZeRO stage 3, plus the share each rank holds.

    ``str(summary)`` ends with a "Params per rank" line. Usable on its own: ``print(ZeroSummary(model, max_depth=2))``
    after setup (e.g. in ``on_fit_start``).
    """

    def __init__(self, model: pl.LightningModule, max_depth: int = 1, world_size: int | None = None) -> None:
        self._world_size = world_size
        super().__init__(model, max_depth=max_depth)

    @override
    def summarize(self) -> dict[str, LayerSummary]:
        # Same as Lightning's, with layer summaries that count full sizes.
        summary: dict[str, LayerSummary] = OrderedDict(
            (name, _ZeroLayerSummary(module)) for name, module in self.named_modules)
        if self._model.example_input_array is not None:
            self._forward_example_input()
        for layer in summary.values():
            layer.detach_hook()
        if self._max_depth >= 1:
            for k in [k for k in summary if k.count(".") >= self._max_depth]:
                del summary[k]
        return summary

    @property
    @override
    def total_parameters(self) -> int:
        return sum(full_numel(p) for p in self._model.parameters() if not tensor_shape_unknown(p))

    @property
    @override
    def trainable_parameters(self) -> int:
        return sum(full_numel(p) for p in self._model.parameters() if p.requires_grad and not tensor_shape_unknown(p))

    @property
    def params_per_rank(self) -> int:
        """Parameter elements this rank stores (ZeRO pads each shard, so every rank holds the same number)."""
        return sum(local_numel(p) for p in self._model.parameters() if not tensor_shape_unknown(p))

    def per_rank_line(self) -> str:
        ranks = f" ({self._world_size} ranks)" if self._world_size else ""
        return "{:<10}".format(get_human_readable_count(self.params_per_rank)) + f"Params per rank, ZeRO-3 shard{ranks}"

    @override
    def __str__(self) -> str:
        return super().__str__() + "\n" + self.per_rank_line()


def install_summary(trainer: pl.Trainer) -> None:
    """Make the Trainer's ``ModelSummary``/``RichModelSummary`` callbacks summarize with :class:`ZeroSummary`.

    Lightning's callback builds its summary in ``_summary`` and prints it with ``summarize``; both are replaced on the
    callback *instance* (this Trainer only): ``_summary`` returns a ZeroSummary, ``summarize`` prints the table as
    before, then the per-rank line. Idempotent.
    """
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, ModelSummaryCallback):  # (route_model_summary leaves a routed one as it is)
            _patch(callback, trainer.world_size)


def _patch(callback: ModelSummaryCallback, world_size: int) -> None:
    built: list[ZeroSummary] = []

    def build(pl_module: pl.LightningModule, max_depth: int) -> ZeroSummary:
        summary = ZeroSummary(pl_module, max_depth=max_depth, world_size=world_size)
        built[:] = [summary]
        return summary

    def after_print() -> None:
        if built:
            _CALLBACK_LOG.info(built[0].per_rank_line())

    route_model_summary(callback, build, after_print)
