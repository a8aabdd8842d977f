"""GPU tier: skipped without CUDA. On the device machine run `python tests/gpu/test_gpu.py` (no pytest needed)."""

import pytest
from gpu_tier import MARKS  # also puts tests/ on sys.path

pytestmark = MARKS


@pytest.mark.parametrize(("precision", "stage"), [("16-mixed", 2), ("16-mixed", 3), ("bf16-mixed", 3)])
def test_half_precision_trains_on_gpu(precision, stage):
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from helpers import Regressor
    from lightning_zero import ZeroStrategy

    losses = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(strategy=ZeroStrategy(stage=stage), accelerator="gpu", devices=1, precision=precision,
                        max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[Record()], gradient_clip_val=1.0, accumulate_grad_batches=2)
    trainer.fit(Regressor(lr=1e-2, n=64, learnable=True))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"{precision} stage {stage}: loss {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first, losses


def test_gan_fp16_has_a_loss_scaler_per_engine():
    """Two engines, fp16 at stage 2: each engine scales its own loss with its own dynamic loss scaler."""
    import math

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from helpers import GAN
    from lightning_zero import ZeroStrategy

    losses, scalers = [], {}

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(trainer.callback_metrics["loss_d"]), float(trainer.callback_metrics["loss_g"])))

        def on_train_end(self, trainer, pl_module):
            for slot in trainer.strategy.engines:
                assert slot.engine.fp16_enabled(), slot.name
                scaler = slot.engine.optimizer.loss_scaler
                scalers[slot.name] = (id(scaler), float(slot.engine.optimizer.loss_scale), slot.engine.skipped_steps,
                                      slot.engine.global_steps)

    trainer = L.Trainer(strategy=ZeroStrategy(stage=2), accelerator="gpu", devices=1, precision="16-mixed",
                        max_steps=2 * 24, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[Record()])
    trainer.fit(GAN(n=96))
    print(f"GAN fp16 stage 2: {len(losses)} batches, last losses {losses[-1]}, engines {scalers}")
    assert sorted(scalers) == ["discriminator", "generator"]
    assert len({ident for ident, *_ in scalers.values()}) == 2  # one scaler object per engine
    assert all(math.isfinite(scale) and scale > 0 and steps == 24 for _, scale, _, steps in scalers.values())
    assert len(losses) == 24 and all(math.isfinite(d) and math.isfinite(g) for d, g in losses)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_predict_after_fit_on_the_same_trainer(stage):
    """fit, then predict with the same Trainer and module (the engines are kept): on the GPU, the predictions of plain
    PyTorch's weights after the same steps. At stages 0-2 this failed with CPU weights and CUDA inputs while teardown
    moved the module to the CPU (CPU runs cannot show it)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from helpers import RandomDataset, Regressor, make_net, reference_weights
    from lightning_zero import ZeroStrategy

    module = Regressor()
    module.predict_step = lambda batch, batch_idx: module(batch[0]).float().cpu()
    trainer = L.Trainer(strategy=ZeroStrategy(stage=stage), accelerator="gpu", devices=1, precision="32-true",
                        max_steps=8, gradient_clip_val=0.5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    data = RandomDataset(16, seed=5)
    predicted = torch.cat(trainer.predict(module, DataLoader(data, batch_size=4)))
    reference = make_net()
    reference.load_state_dict({k.removeprefix("net."): v for k, v in reference_weights(1, 8, 1, 0.5).items()})
    with torch.no_grad():
        diff = (predicted - reference(data.x)).abs().max().item()
    print(f"stage {stage}: predict after fit, max |y - y_ref| = {diff:.2e}")
    assert diff <= 1e-5


if __name__ == "__main__":
    for stage in (0, 2, 3):
        test_predict_after_fit_on_the_same_trainer(stage)
    for args in [("16-mixed", 2), ("16-mixed", 3), ("bf16-mixed", 3)]:
        test_half_precision_trains_on_gpu(*args)
    test_gan_fp16_has_a_loss_scaler_per_engine()
    print("GPU TESTS PASSED")
