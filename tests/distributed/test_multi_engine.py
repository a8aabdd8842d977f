"""Several models, several optimizers: one DeepSpeed engine per model, manual optimization."""

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from helpers import GAN, SaveFullWeights, cpu_trainer, max_diff, reference_gan
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed
STEPS = 5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gan_parity_with_plain_pytorch(tmp_path, stage):
    out = tmp_path / "w.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=stage, start_method="spawn"), max_steps=2 * STEPS,
                          callbacks=[SaveFullWeights(str(out))])
    trainer.fit(GAN())
    got, want = torch.load(out), reference_gan(world_size=2, steps=STEPS)
    assert sorted(got) == sorted(want)
    assert max_diff(got, want) <= 1e-5
