"""GPU tier: skipped without CUDA. On the device machine run `python tests/gpu/test_gpu.py` (no pytest needed)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


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


if __name__ == "__main__":
    for args in [("16-mixed", 2), ("16-mixed", 3), ("bf16-mixed", 3)]:
        test_half_precision_trains_on_gpu(*args)
    print("GPU TESTS PASSED")
