"""Proof by parity: ZeroStrategy on 2 CPU processes == plain single-process PyTorch over the same global batches."""

import pytest
import torch

from helpers import Regressor, SaveFullWeights, cpu_trainer, max_diff, reference_weights
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, CLIP = 6, 2, 0.5


def fit_weights(tmp_path, strategy, model=None, **kwargs):
    out = tmp_path / "weights.pt"
    trainer = cpu_trainer(strategy=strategy, callbacks=[SaveFullWeights(str(out))], **kwargs)
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
