"""Resume: bit-identical on CPU in fp32 at stages 0-3 (scheduler, dropout, several engines), and on another number of
processes or another ZeRO stage through DeepSpeed's universal format, compared with runs that never stopped."""

from __future__ import annotations

import pytest
import torch

from ckpt_helpers import (FrozenGAN, PredictRegressor, ResumeRegressor, SavePredictions, bit_identical,
                          checkpointing, fit)
from helpers import cpu_trainer
from helpers import max_diff
from lightning_zero import ZeroStrategy, consolidated_state_dict
from lightning_zero.checkpoint import UNIVERSAL_TAG

pytestmark = pytest.mark.distributed


def zero(stage: int, **kwargs) -> ZeroStrategy:
    return ZeroStrategy(stage=stage, start_method="spawn", **kwargs)


# Stages 1 and 2 share DeepSpeed's ZeRO-1/2 optimizer, whose state_dict/load_state_dict differ only in the stage tag:
# 0, 2 and 3 cover every resume path (as for several engines below).
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_exact_resume_with_scheduler_and_dropout(tmp_path, stage):
    # The uninterrupted run writes a checkpoint every 2 steps (= every epoch); the second run resumes at step 2.
    # Dropout makes the result depend on each rank's RNG state, which the checkpoint restores.
    full = fit(tmp_path, zero(stage), ResumeRegressor(dropout=0.25), 4, callbacks=[checkpointing(tmp_path / "ckpts")],
               name="full")
    resumed = fit(tmp_path, zero(stage), ResumeRegressor(dropout=0.25), 4,
                  ckpt_path=str(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"), name="resumed")
    assert bit_identical(full, resumed)
    # the export rebuilds exactly these weights from the final checkpoint, and the resumed steps did train
    assert bit_identical(consolidated_state_dict(tmp_path / "ckpts" / "epoch=1-step=4.ckpt"), full)
    assert max_diff(consolidated_state_dict(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"), full) > 1e-3


# Stages 1 and 2 share DeepSpeed's ZeRO-1/2 optimizer: 0, 2 and 3 cover every checkpoint code path.
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_exact_resume_of_several_engines(tmp_path, stage):
    # generator + discriminator (each its own engine, optimizer and StepLR) + a frozen optimizer-less model.
    # Manual optimization counts both optimizers' steps: 4 steps per epoch here.
    full = fit(tmp_path, zero(stage), FrozenGAN(), 8, callbacks=[checkpointing(tmp_path / "ckpts",
                                                                               every_n_train_steps=4)], name="full")
    resumed = fit(tmp_path, zero(stage), FrozenGAN(), 8, ckpt_path=str(tmp_path / "ckpts" / "epoch=0-step=4.ckpt"),
                  name="resumed")
    assert bit_identical(full, resumed)
    exported = consolidated_state_dict(tmp_path / "ckpts" / "epoch=1-step=8.ckpt")
    assert bit_identical(exported, full)  # every engine's keys mapped back to the LightningModule's names
    assert {k.split(".")[0] for k in exported} == {"generator", "discriminator", "prior"}


# ----------------------------------------------------------------------------------------------------------------------
# Another number of processes (the global batch is kept: batch 4 x 2 processes = batch 8 x 1), another stage
# ----------------------------------------------------------------------------------------------------------------------

TOLERANCE = 1e-5  # same global batches; only the order of float additions differs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per stage: a 2-process run of 4 steps with a checkpoint at step 2, and its final weights (cached)."""
    runs: dict[int, tuple] = {}

    def get(stage: int):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"uninterrupted{stage}")
            weights = fit(tmp, zero(stage), ResumeRegressor(), 4, callbacks=[checkpointing(tmp / "ckpts")])
            runs[stage] = (tmp / "ckpts" / "epoch=0-step=2.ckpt", weights)
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_two_processes_on_one(tmp_path, stage, uninterrupted, capfd):
    checkpoint, full = uninterrupted(stage)
    resumed = fit(tmp_path, zero(stage), ResumeRegressor(batch_size=8), 4, ckpt_path=str(checkpoint), devices=1)
    assert max_diff(resumed, full) <= TOLERANCE
    assert (checkpoint / "model" / UNIVERSAL_TAG).is_dir()  # the conversion is cached beside the shards
    assert "saved by 2 processes, this run has 1" in capfd.readouterr().err


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_one_process_on_two(tmp_path, stage, uninterrupted):
    _, full = uninterrupted(stage)
    fit(tmp_path, zero(stage), ResumeRegressor(batch_size=8), 2, callbacks=[checkpointing(tmp_path / "one")],
        devices=1, name="one")
    resumed = fit(tmp_path, zero(stage), ResumeRegressor(), 4, ckpt_path=str(tmp_path / "one" / "epoch=0-step=2.ckpt"))
    assert max_diff(resumed, full) <= TOLERANCE


@pytest.mark.parametrize(("saved", "resumed_at"), [(2, 3), (3, 1)])
def test_resume_at_another_zero_stage(tmp_path, saved, resumed_at, uninterrupted):
    checkpoint, full = uninterrupted(saved)
    resumed = fit(tmp_path, zero(resumed_at), ResumeRegressor(), 4, ckpt_path=str(checkpoint))
    assert max_diff(resumed, full) <= TOLERANCE


def test_predict_from_a_checkpoint_of_another_world_size(tmp_path, uninterrupted):
    # no optimizer state needed: the full weights are rebuilt from the 2-process shards and loaded on 1 process
    checkpoint, _ = uninterrupted(3)
    trainer = cpu_trainer(strategy=zero(3), devices=1, callbacks=[SavePredictions(tmp_path / "pred.pt")])
    trainer.predict(PredictRegressor(), ckpt_path=str(checkpoint), return_predictions=False)
    predictions = torch.load(tmp_path / "pred.pt")
    reference = PredictRegressor()
    reference.load_state_dict(consolidated_state_dict(checkpoint))
    with torch.no_grad():
        batches = enumerate(reference.predict_dataloader())
        expected = torch.cat([reference.predict_step(batch, i) for i, batch in batches])
    assert torch.equal(predictions, expected)
