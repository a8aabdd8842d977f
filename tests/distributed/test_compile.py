"""ZeroStrategy(compile=...): the networks are torch.compile-d in place and training keeps parity with plain PyTorch."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import Regressor, SaveFullWeights, cpu_trainer, max_diff, reference_weights
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, CLIP = 4, 2, 0.5


class AssertCompiled(Callback):
    """Checks inside the worker that the network, not the LightningModule, was compiled."""

    def on_train_end(self, trainer, pl_module):
        assert getattr(pl_module.net, "_compiled_call_impl", None) is not None, "the network was not compiled"
        assert getattr(pl_module, "_compiled_call_impl", None) is None, "the LightningModule itself was compiled"


@pytest.mark.parametrize(("stage", "compile"), [(2, True), (3, {"backend": "aot_eager"}), (1, {"backend": "aot_eager"})],
                         ids=["stage2-inductor", "stage3-aot_eager", "stage1-aot_eager"])
def test_compiled_training_keeps_parity(tmp_path, stage, compile):
    out = tmp_path / "weights.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=stage, compile=compile, start_method="spawn"),
                          callbacks=[SaveFullWeights(str(out)), AssertCompiled()], max_steps=STEPS,
                          accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP)
    trainer.fit(Regressor())
    want = reference_weights(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    assert max_diff(torch.load(out), want) <= 1e-5


def test_a_compiled_module_is_refused_before_launch():
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), max_steps=1)
    with pytest.raises(ValueError, match=r"compiled \(torch.compile\).*ZeroStrategy\(compile=True\)"):
        trainer.fit(torch.compile(Regressor()))


def test_deepcompile_on_cpu_is_refused_before_launch():
    """DeepCompile's runtime is CUDA only: a CPU fit stops in the main process, naming torch.compile instead."""
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, compile="deepcompile", start_method="spawn"), max_steps=1)
    with pytest.raises(ValueError, match=r"compile='deepcompile'\) needs CUDA GPUs.*Use compile=True"):
        trainer.fit(Regressor())
