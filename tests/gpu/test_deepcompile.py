"""GPU tier: ZeroStrategy(compile="deepcompile") keeps parity with plain PyTorch (DeepCompile's runtime is CUDA only).

DeepSpeed 0.19.8's DeepCompile reduces gradients correctly only when the backward starts at the compiled graph's
scalar output, so the module here computes its loss inside the compiled network (as GPT-style models do); a loss
computed in training_step from the network's output is refused with a ValueError before its backward.

Run on the device machine: `python tests/gpu/test_deepcompile.py` (or pytest; skipped without CUDA)."""

import pytest
import torch
from gpu_tier import MARKS  # also puts tests/ on sys.path

from helpers import LossInside, Regressor

pytestmark = MARKS

# DeepCompile's ZeRO-3 schedule switches to its prefetch/selective-gather passes at step 5: train past it.
STEPS, CLIP = 8, 0.5
TOLERANCE = 1e-6  # fp32; compiled kernels may sum in another order than the CPU reference


def _train(tmp_path, module, accumulate, **strategy_kwargs):
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from helpers import SaveFullWeights
    from lightning_zero import ZeroStrategy

    seen = {}

    class Inspect(Callback):
        def on_train_end(self, trainer, pl_module):
            engine = trainer.strategy.engines.trained[0].engine
            seen.update(active=engine.is_deepcompile_active(), steps=engine.global_steps)

    out = tmp_path / "weights.pt"
    trainer = L.Trainer(strategy=ZeroStrategy(**strategy_kwargs), accelerator="gpu", devices=1, precision="32-true",
                        max_steps=STEPS, accumulate_grad_batches=accumulate, gradient_clip_val=CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[SaveFullWeights(str(out)), Inspect()])
    trainer.fit(module)
    weights = {k.replace("loss_net.body.", "net."): v.float().cpu() for k, v in torch.load(out).items()}
    return weights, seen


@pytest.mark.parametrize(("stage", "accumulate"), [(1, 1), (2, 2), (3, 2)],
                         ids=["stage1", "stage2-accumulate", "stage3-accumulate"])
def test_deepcompile_training_keeps_parity(tmp_path, stage, accumulate):
    from helpers import max_diff, reference_weights

    weights, seen = _train(tmp_path, LossInside(), accumulate, stage=stage, compile="deepcompile")
    diff = max_diff(weights, reference_weights(world_size=1, steps=STEPS, accumulate=accumulate, clip=CLIP))
    print(f"DeepCompile stage {stage} accumulate {accumulate}: max |w - w_ref| = {diff:.2e}, {seen}", flush=True)
    assert seen == {"active": True, "steps": STEPS}
    assert diff <= TOLERANCE


@pytest.mark.parametrize("stage", [2, 3])
def test_a_loss_computed_outside_the_compiled_network_is_refused(tmp_path, stage):
    # stage 2: refused before the backward; stage 3: the eager forward fails on partitioned weights first, and the
    # error names the same cause and fix
    with pytest.raises(ValueError, match=r"not computed inside the compiled network.*return self.net\(x, y\)"):
        _train(tmp_path, Regressor(), 1, stage=stage, compile="deepcompile")


def _main() -> None:  # the device machine may lack pytest; one process per case (DeepCompile's state is global)
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if len(sys.argv) > 1:
        kind, args = json.loads(sys.argv[1])
        with tempfile.TemporaryDirectory() as d:
            if kind == "parity":
                test_deepcompile_training_keeps_parity(Path(d), *args)
            else:
                test_a_loss_computed_outside_the_compiled_network_is_refused(Path(d), *args)
        return
    cases = [("parity", c) for c in [(1, 1), (2, 2), (3, 2)]]
    cases += [("refused", [stage]) for stage in (2, 3)]
    for case in cases:
        r = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True)
        tail = [line for line in (r.stdout + r.stderr).splitlines() if "DeepCompile stage" in line or "Error" in line]
        print("PASS" if r.returncode == 0 else "FAIL", case, tail[-3:], flush=True)


if __name__ == "__main__":
    _main()
