"""Several models, several optimizers: one DeepSpeed engine per model, manual optimization."""

import pytest
import torch

from helpers import GAN, SaveFullWeights, cpu_trainer, max_diff, reference_gan
from multi_helpers import SharedLoss, ZeroGradFirstGAN, reference_shared_loss, reference_untoggled_gan
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed
STEPS = 5


def fit_weights(tmp_path, stage, model, max_steps, devices=2):
    out = tmp_path / "w.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=stage, start_method="spawn"), max_steps=max_steps,
                          callbacks=[SaveFullWeights(str(out))], devices=devices)
    trainer.fit(model)
    return torch.load(out)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gan_parity_with_plain_pytorch(tmp_path, stage):
    got, want = fit_weights(tmp_path, stage, GAN(), 2 * STEPS), reference_gan(world_size=2, steps=STEPS)
    assert sorted(got) == sorted(want)
    assert max_diff(got, want) <= 1e-5


# One loss reaching two engines that both step (encoder and decoder with their own optimizers): manual_backward runs
# one backward per engine over the same graph; with accumulation at stages 1 and 3.
@pytest.mark.parametrize(("stage", "accumulate"), [(0, 1), (1, 2), (2, 1), (3, 2)])
def test_shared_loss_trains_both_engines(tmp_path, stage, accumulate):
    got = fit_weights(tmp_path, stage, SharedLoss(accumulate=accumulate), 2 * STEPS)
    want = reference_shared_loss(world_size=2, steps=STEPS, accumulate=accumulate)
    assert sorted(got) == sorted(want)
    assert max_diff(got, want) <= 1e-5


# One process: the gradients skip DeepSpeed's reduction and go into each engine's partition at its own step
# (_compat.deepspeed.write_gradients_into_partition); a GAN and one loss reaching two engines, with accumulation.
@pytest.mark.parametrize(("stage", "model"), [(2, "gan"), (1, "shared"), (2, "shared")])
def test_one_process_engines_match_plain_pytorch(tmp_path, stage, model):
    if model == "gan":
        got, want = fit_weights(tmp_path, stage, GAN(), 2 * STEPS, devices=1), reference_gan(world_size=1, steps=STEPS)
    else:
        got = fit_weights(tmp_path, stage, SharedLoss(accumulate=2), 2 * STEPS, devices=1)
        want = reference_shared_loss(world_size=1, steps=STEPS, accumulate=2)
    assert sorted(got) == sorted(want)
    assert max_diff(got, want) <= 1e-5


def test_untoggled_gan_matches_plain_pytorch(tmp_path):
    # the generator's loss reaches the discriminator too, exactly as in the same PyTorch code
    got = fit_weights(tmp_path, 3, GAN(toggle=False), 2 * STEPS)
    want = reference_untoggled_gan(world_size=2, steps=STEPS)
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, reference_gan(world_size=2, steps=STEPS)) > 1e-4  # and differs from the toggled run


def test_zero_grad_cannot_drop_gradients_deepspeed_already_reduced():
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), max_steps=4)
    with pytest.raises(Exception, match=r"(?s)`zero_grad\(\)` was called on Adam \(the optimizer of 'discriminator'\)"
                                        r".*cannot be discarded.*self.toggle_optimizer\(opt\)"):
        trainer.fit(ZeroGradFirstGAN())
