"""One Trainer across calls: validate/test/predict/fit in any order (and fit twice) at stages 0-3, under the default
"popen" launcher, torchrun and spawn, with one engine and with two (a GAN). Every fit calls configure_optimizers,
starts from a fresh optimizer state and trains the parameters trainable now: two-phase fine-tuning (frozen base, then
everything) ends with plain PyTorch's weights after the same two phases; a fit after an evaluation trains like a fit
alone. The scenarios run in tests/distributed/reuse_script.py, several in one process launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers import (GanDataset, RandomDataset, Regressor, _global_batches, cpu_trainer, gan_losses, gan_optimizers,
                     make_gan, make_net, max_diff)
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("reuse_script.py")
N, STEPS_PER_FIT, TOL = 16, 2, 1e-5  # as in reuse_script.py: one epoch of 2 steps per fit


# ----------------------------------------------------------------------------------------------------------------------
# Plain PyTorch references
# ----------------------------------------------------------------------------------------------------------------------


def _adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def _mse(net: nn.Module, seed: int = 9) -> float:
    data = RandomDataset(N, seed=seed)
    with torch.no_grad():
        return nn.functional.mse_loss(net(data.x), data.y).item()


def reference_phases(new_trainer: bool = False, world_size: int = 2) -> dict[str, Any]:
    """Phase 1 trains the head (base frozen) with its own AdamW, phase 2 everything with a new AdamW; the data of
    phase 2 is the second epoch (with ``new_trainer``: the first epoch again, as a new Trainer starts at epoch 0).
    Phase 3 resumes phase 2's checkpoint: the same AdamW, its state included, on the third epoch; phase 4 is a new
    Trainer's fit (a new AdamW, the first epoch's data). Each fit is one
    epoch of RandomDataset(16) in global batches of 4 x ``world_size``."""
    net, steps = make_net(), N // (4 * world_size)
    out: dict[str, Any] = {"val_before": _mse(net)}
    batches = _global_batches(RandomDataset(N), world_size=world_size, batch_size=4)
    for phase, base_trainable in (("phase1", False), ("phase2", True)):
        for layer in (net[0], net[2]):
            layer.requires_grad_(base_trainable)
        opt = _adamw(net)
        if new_trainer and phase == "phase2":
            batches = _global_batches(RandomDataset(N), world_size=world_size, batch_size=4)
        for _ in range(steps):
            x, y = next(batches)
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
        out[phase] = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
        if phase == "phase1":
            out["test_after_phase1"], out["net_after_phase1"] = _mse(net), _copy(net)
    out["val_after"] = _mse(net)
    for _ in range(steps):
        x, y = next(batches)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    out["phase3"] = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    opt = _adamw(net)  # phase 4: a new Trainer, so the data starts at epoch 0 again
    batches = _global_batches(RandomDataset(N), world_size=world_size, batch_size=4)
    for _ in range(steps):
        x, y = next(batches)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    out["phase4"] = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    return out


def _copy(net: nn.Module) -> nn.Module:
    clone = make_net()
    clone.load_state_dict(net.state_dict())
    return clone


def reference_gan_fits() -> dict[str, Any]:
    """Two fits of the test GAN (toggling, two optimizers with their schedulers); each fit builds new optimizers and
    schedulers from configure_optimizers."""
    g, d = make_gan()
    data = GanDataset(N, seed=4)
    out: dict[str, Any] = {"val_before": gan_losses(g, d, data.x, data.y, "d").item()}
    batches = _global_batches(GanDataset(N), world_size=2, batch_size=4)
    for fit in ("fit1", "fit2"):
        (opt_g, opt_d), (sched_g, sched_d) = gan_optimizers(g, d)
        for _ in range(STEPS_PER_FIT):
            real, z = next(batches)
            for opt, sched, which in ((opt_d, sched_d, "d"), (opt_g, sched_g, "g")):
                other = g if which == "d" else d
                other.requires_grad_(False)
                gan_losses(g, d, real, z, which).backward()
                opt.step()
                opt.zero_grad()
                sched.step()
                other.requires_grad_(True)
        out[fit] = {**{f"generator.{k}": v.clone() for k, v in g.state_dict().items()},
                    **{f"discriminator.{k}": v.clone() for k, v in d.state_dict().items()}}
    return out


def reference_block_fits() -> dict[str, Any]:
    from test_block_fetch import make_block_net

    net, out = make_block_net(), {}
    batches = _global_batches(RandomDataset(N), world_size=2, batch_size=4)
    for fit in ("fit1", "fit2"):
        opt = _adamw(net)
        for _ in range(STEPS_PER_FIT):
            x, y = next(batches)
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
        out[fit] = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    return out


def reference_block_gan() -> dict[str, Any]:
    """test_block_fetch's GAN with a block discriminator that runs twice per step (once=False), one epoch."""
    from test_block_fetch import LR, gan_loss, make_gan_coders

    g, d = make_gan_coders()
    opt_g, opt_d = (torch.optim.AdamW(m.parameters(), lr=LR) for m in (g, d))
    out = {"val": gan_loss(g, d, RandomDataset(N).x, True, 0).item()}  # discriminator loss, before training
    batches = _global_batches(RandomDataset(N), world_size=2, batch_size=4)
    for _ in range(STEPS_PER_FIT):
        x, _ = next(batches)
        for opt, which, frozen in ((opt_d, 0, g), (opt_g, 1, d)):
            frozen.requires_grad_(False)  # Lightning's toggle_optimizer
            gan_loss(g, d, x, False, which).backward()
            opt.step()
            opt.zero_grad()
            frozen.requires_grad_(True)
    out["fit"] = {**{f"g.{k}": v.clone() for k, v in g.state_dict().items()},
                  **{f"d.{k}": v.clone() for k, v in d.state_dict().items()}}
    return out


def check_phases(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    diffs = {phase: max_diff(got[phase], want[phase]) for phase in ("phase1", "phase2", "phase3", "phase4")}
    assert max(diffs.values()) <= TOL, diffs
    # the second fit really trained, from the first fit's weights
    assert max_diff(got["phase1"], got["phase2"]) > 1e-3
    for key in ("val_before", "test_after_phase1", "val_after"):
        assert got[key] == pytest.approx(want[key], abs=TOL), key
    rows = got["predictions"]  # rank 0's share of RandomDataset(16, seed=9): inputs and outputs after phase 1
    assert rows.shape == (N // 2, 9)
    with torch.no_grad():
        assert torch.allclose(rows[:, 8:], want["net_after_phase1"](rows[:, :8]), atol=TOL)
    assert got["configured"] == 4 and got["global_step"] == 3 * STEPS_PER_FIT
    head, every = sum(p.numel() for p in make_net()[4].parameters()), sum(p.numel() for p in make_net().parameters())
    assert got["engine_trains"] == [head, every, every, every]
    assert len(set(got["hooks"])) == 1, f"hooks of the previous engines were left on the module: {got['hooks']}"
    assert got["freed"] == [True] * 4  # at each fit start, the earlier engines (and their optimizer state) are gone
    return diffs


def check_gan(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    diffs = {fit: max_diff(got[fit], want[fit]) for fit in ("fit1", "fit2")}
    assert diffs["fit1"] <= TOL and diffs["fit2"] <= TOL, diffs
    assert got["val_before"] == pytest.approx(want["val_before"], abs=TOL)
    assert got["configured"] == 2 and got["engines"] == ["discriminator", "generator"]
    return diffs


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(out: Path, stages: str, *extra: str, torchrun: bool = False, timeout: float = 550) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "NODE_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    launch = [sys.executable]
    if torchrun:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port())]
    run = subprocess.run([*launch, str(SCRIPT), str(out), stages, *extra], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    return torch.load(out / "results.pt")


def test_popen_any_call_order_at_every_stage(tmp_path):
    """Default launcher: stages 0-3 one after the other in the same two processes, single engine and GAN; then stage 3
    with block units and CPU offload."""
    results = run_script(tmp_path, "0,1,2,3", "gan", "blocks")
    phases, gan = reference_phases(), reference_gan_fits()
    for stage in (0, 1, 2, 3):
        print(f"stage {stage}: phases {check_phases(results[f'phased{stage}'], phases)},"
              f" GAN {check_gan(results[f'gan{stage}'], gan)}")
    want = reference_block_fits()
    diffs = {fit: max_diff(results["blocks"][fit], want[fit]) for fit in ("fit1", "fit2")}
    print(f"stage 3, block units, CPU offload: {diffs}")
    assert max(diffs.values()) <= TOL and results["blocks"]["units"] == ["Block"], (diffs, results["blocks"]["units"])
    # validate (one engine, Blocks as fetch units) then fit a GAN whose discriminator runs twice per step: the fit's
    # engines fetch layer by layer, as without the validation (the units the validation's engine marked are unmarked)
    got, want = results["blocks"], reference_block_gan()
    assert (got["gan_val_units"], got["gan_fit_units"]) == (["Block"], [])
    assert got["gan_val"] == pytest.approx(want["val"], abs=TOL)
    print(f"stage 3, validate then fit a GAN with a block discriminator: {max_diff(got['gan_fit'], want['fit'])}")
    assert max_diff(got["gan_fit"], want["fit"]) <= TOL


def test_torchrun_any_call_order(tmp_path):
    results = run_script(tmp_path, "3", torchrun=True)
    print(f"stage 3 (torchrun): {check_phases(results['phased3'], reference_phases())}")


def test_spawn_validate_then_fit_then_fit_on_a_new_trainer(tmp_path):
    """spawn starts new processes at each call (the main process keeps the full weights in between). A second fit on
    the same Trainer is Lightning's own refusal for every spawn-based strategy; a new Trainer continues from the
    weights, as its message says."""
    import reuse_script

    model, want = reuse_script.Phased(), reference_phases(new_trainer=True)
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), max_epochs=1)
    model.set_base_trainable(False)
    assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(want["val_before"], abs=TOL)
    trainer.fit(model)
    got1 = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_base_trainable(True)
    with pytest.raises(NotImplementedError, match=r"Calling `trainer.fit\(\)` twice on the same Trainer instance"
                                                  r" using a spawn-based strategy is not supported"):
        trainer.fit(model)
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), max_epochs=1)
    trainer.fit(model)
    diffs = (max_diff(got1, want["phase1"]), max_diff(model.state_dict(), want["phase2"]))
    print(f"stage 3 (spawn): {diffs}")
    assert max(diffs) <= TOL, diffs


# ----------------------------------------------------------------------------------------------------------------------
# 16-mixed on CPU processes: float16 parameters at train start, as on CUDA (Lightning's
# test_deepspeed_multigpu_test_rnn)
# ----------------------------------------------------------------------------------------------------------------------


class Float16AtTrainStart(Regressor):
    def on_train_epoch_start(self) -> None:
        dtypes = {p.dtype for p in self.parameters()}
        assert dtypes == {torch.float16}, dtypes


def test_16_mixed_trains_float16_on_cpu_processes():
    """Where DeepSpeed's CPU accelerator has float16 (oneDNN fp16) this trains; elsewhere the unit test
    test_float16_on_a_cpu_without_it_is_refused_before_launch checks the error. Measured on a CPU without it, with
    DeepSpeed's probe forced on: the parameters are float16 at train start and the fp16 losses train."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has no oneDNN float16, so DeepSpeed cannot train fp16 on it")
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), precision="16-mixed", max_steps=2)
    assert trainer.strategy.precision_plugin.precision == "16-mixed"
    trainer.fit(Float16AtTrainStart(n=N))
