"""GPU tier: one Trainer across calls on a GPU (the CPU tier is tests/distributed/test_trainer_reuse.py), and
precision="16-mixed" training a float16 model at stage 3 (Lightning's test_deepspeed_multigpu_test_rnn).

Run on the device machine: `python tests/gpu/test_trainer_reuse_gpu.py` (or pytest; skipped without CUDA).
"""

import os
import sys
from pathlib import Path

import pytest
from gpu_tier import MARKS  # also puts tests/ on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

pytestmark = MARKS

TOL = 1e-5


def _trainer(stage, **kwargs):
    import lightning as L

    from lightning_zero import ZeroStrategy

    strategy = kwargs.pop("strategy", {})
    defaults = dict(accelerator="gpu", devices=1, precision="32-true", max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    return L.Trainer(strategy=ZeroStrategy(stage=stage, **strategy), **{**defaults, **kwargs})


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_validate_fit_predict_fit_on_one_trainer(stage):
    """validate -> fit (frozen base) -> predict -> unfreeze -> fit: plain PyTorch's two phases (fresh AdamW each)."""
    import torch

    from helpers import max_diff
    from reuse_script import Phased
    from test_trainer_reuse import reference_phases

    model, want = Phased(), reference_phases(world_size=1)
    trainer = _trainer(stage)
    model.set_base_trainable(False)
    val = trainer.validate(model, verbose=False)[0]["val_loss"]
    trainer.fit(model)
    phase1 = {k: v.detach().float().cpu().clone() for k, v in trainer.strategy.lightning_module_state_dict().items()}
    rows = torch.cat(trainer.predict(model)).float().cpu()
    model.set_base_trainable(True)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)
    phase2 = {k: v.detach().float().cpu() for k, v in trainer.strategy.lightning_module_state_dict().items()}
    with torch.no_grad():
        predict_diff = (rows[:, 8:] - want["net_after_phase1"](rows[:, :8])).abs().max().item()
    diffs = (max_diff(phase1, want["phase1"]), max_diff(phase2, want["phase2"]), predict_diff)
    print(f"stage {stage}: validate/fit/predict/fit on one GPU Trainer: phase 1, phase 2, predictions {diffs}")
    assert abs(val - want["val_before"]) <= TOL and max(diffs) <= TOL, (val, want["val_before"], diffs)
    assert model.configured == 2 and model.freed == [True, True] and len(set(model.hooks)) == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_16_mixed_parameters_are_float16_at_train_start(stage):
    import torch

    from helpers import Regressor

    dtypes = []

    class Model(Regressor):
        def on_train_epoch_start(self):
            dtypes.append({p.dtype for p in self.parameters()})

    _trainer(stage, precision="16-mixed", max_epochs=None, max_steps=2).fit(Model())
    print(f"stage {stage}, 16-mixed: parameter dtypes at train start {dtypes}")
    assert dtypes == [{torch.float16}]


def _deepcompile_fit_twice(stage):
    """DeepCompile (stage 2 or 3): fit -> fit on one Trainer; the second fit's engine is new (fresh AdamW)."""
    import torch
    from torch import nn

    from helpers import LossInside, RandomDataset, _global_batches, make_net, max_diff

    model = LossInside(n=16)
    trainer = _trainer(stage, strategy=dict(compile="deepcompile"))
    trainer.fit(model)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)
    got = {k.replace("loss_net.body.", "net."): v.float().cpu()
           for k, v in trainer.strategy.lightning_module_state_dict().items()}
    net = make_net()
    batches = _global_batches(RandomDataset(16), world_size=1, batch_size=4)
    for _ in range(2):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
        for _ in range(4):
            x, y = next(batches)
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    diff = max_diff(got, {f"net.{k}": v for k, v in net.state_dict().items()})
    print(f"DeepCompile stage {stage}: fit twice on one Trainer, max |w - w_ref| = {diff:.2e}", flush=True)
    assert diff <= 1e-6


@pytest.mark.parametrize("stage", [2, 3])
def test_deepcompile_fit_twice_on_one_trainer(stage):
    """In a fresh process: DeepCompile's runtime and pass schedule are global to the process."""
    import subprocess

    # a fresh rendezvous: this pytest process may hold a process group (and its port) from the tests above
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
    run = subprocess.run([sys.executable, __file__, "deepcompile", str(stage)], capture_output=True, text=True,
                         env=env)
    print(run.stdout[-2000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


if __name__ == "__main__":
    if sys.argv[1:2] == ["deepcompile"]:
        _deepcompile_fit_twice(int(sys.argv[2]))
        sys.exit(0)
    for stage in (0, 2, 3):
        test_validate_fit_predict_fit_on_one_trainer(stage)
    for stage in (2, 3):
        test_16_mixed_parameters_are_float16_at_train_start(stage)
    for stage in (2, 3):
        test_deepcompile_fit_twice_on_one_trainer(stage)
    print("GPU TRAINER REUSE TESTS PASSED")
