"""Proof by parity: ZeroStrategy on 2 CPU processes == plain single-process PyTorch over the same global batches."""

import json

import lightning as L
import pytest
import torch

from helpers import Regressor, SaveFullWeights, cpu_trainer, max_diff, reference_weights
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, CLIP = 6, 2, 0.5


def fit_weights(tmp_path, strategy, model=None, callbacks=(), **kwargs):
    out = tmp_path / "weights.pt"
    trainer = cpu_trainer(strategy=strategy, callbacks=[SaveFullWeights(str(out)), *callbacks], **kwargs)
    trainer.fit(model or Regressor())
    return torch.load(out), trainer


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_parity_with_plain_pytorch(tmp_path, stage):
    got, trainer = fit_weights(tmp_path, ZeroStrategy(stage=stage, start_method="spawn"), max_steps=STEPS,
                               accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP)
    want = reference_weights(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    assert sorted(got) == sorted(want)  # the LightningModule's own key names, no engine prefixes
    assert max_diff(got, want) <= 1e-5
    # the spawn launcher hands the full weights back to the main process too
    main = {k: v for k, v in trainer.lightning_module.state_dict().items()}
    assert max_diff(main, want) <= 1e-5


@pytest.mark.parametrize("stage", [1, 2])
def test_parity_with_scheduler_stepped_once_per_optimizer_step(tmp_path, stage):
    # no clipping: this also runs the speed default compute_grad_norm=false (tuning.py)
    got, _ = fit_weights(tmp_path, ZeroStrategy(stage=stage, start_method="spawn"), model=Regressor(scheduler=True),
                         max_steps=STEPS, accumulate_grad_batches=ACCUMULATE)
    want = reference_weights(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=None, scheduler=True)
    assert max_diff(got, want) <= 1e-5


class RecordGradientPath(L.Callback):
    """Writes, after the first optimizer step, whether the engine's ZeRO-1/2 optimizer writes gradients straight into
    its partition (``_compat.deepspeed.write_gradients_into_partition`` replaced its per-gradient reduction)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 1 and not self.path.exists():
            zero = next(iter(trainer.strategy.engines)).engine.optimizer
            self.path.write_text(json.dumps({"partition_write": "process_gradients" in vars(zero)}))


@pytest.mark.parametrize("stage", [1, 2])
def test_one_process_parity_with_the_gradients_written_into_the_partition(tmp_path, stage):
    """One process: the reduction is the identity, so the gradients go straight into the partition; the weights are
    plain PyTorch's, with accumulation and clipping (the norm is computed over that partition)."""
    record = tmp_path / "path.json"
    got, _ = fit_weights(tmp_path, ZeroStrategy(stage=stage, start_method="spawn"), devices=1, max_steps=STEPS,
                         accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
                         callbacks=[RecordGradientPath(record)])
    assert json.loads(record.read_text()) == {"partition_write": True}
    want = reference_weights(world_size=1, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    assert max_diff(got, want) <= 1e-5
