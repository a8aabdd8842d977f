"""Checkpoint folders under ModelCheckpoint (top-k rotation, last as copy and as link), crash safety (a rank killed
mid-save), exclude_frozen_parameters, and the error for a checkpoint of another model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt_helpers import (KillDuringSave, LoraRegressor, ResumeRegressor, TiedRegressor, bit_identical, checkpointing,
                          fit, read_events)
from helpers import cpu_trainer
from lightning_zero import ZeroStrategy, consolidated_state_dict
from lightning_zero.checkpoint import SAVE_DELAY_ENV, validate_path

pytestmark = pytest.mark.distributed


def zero(stage: int, **kwargs: Any) -> ZeroStrategy:
    return ZeroStrategy(stage=stage, start_method="spawn", **kwargs)


class RecordingZeroStrategy(ZeroStrategy):
    """Logs (rank 0) each committed save and each removal with the complete checkpoints present at that moment."""

    def __init__(self, log_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_file = log_file

    def _log(self, event: str, path: Any) -> None:
        if self.is_global_zero:
            path = Path(path)
            complete = sorted(p.name for p in path.parent.iterdir() if (p / "meta.json").is_file())
            with open(self.log_file, "a") as f:
                f.write(f"{event}\t{path.parent.name}/{path.name}\t{','.join(complete)}\n")

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)
        self._log("saved", filepath)

    def remove_checkpoint(self, filepath: Any) -> None:
        self._log("remove", filepath)
        super().remove_checkpoint(filepath)


@pytest.fixture(scope="module")
def rotation(tmp_path_factory):
    """Stage 2, 4 steps: top-2 by train_loss saved every step with last.ckpt as a copy, plus last as a link."""
    tmp = tmp_path_factory.mktemp("rotation")
    events = tmp / "events.tsv"
    topk = ModelCheckpoint(dirpath=tmp / "topk", monitor="train_loss", save_top_k=2, every_n_train_steps=1,
                           save_last=True, filename="{step}")
    linked = ModelCheckpoint(dirpath=tmp / "linked", every_n_train_steps=2, save_top_k=1, save_last="link")
    weights = fit(tmp, RecordingZeroStrategy(str(events), stage=2, start_method="spawn"), ResumeRegressor(), 4,
                  callbacks=[topk, linked])
    return tmp, weights, read_events(events)


def test_top_k_rotation_keeps_exactly_k_complete_folders_and_last(rotation):
    tmp, _, events = rotation
    names = sorted(p.name for p in (tmp / "topk").iterdir())
    assert len(names) == 3 and "last.ckpt" in names, names  # no .partial/.removing/.old left behind
    for name in names:
        validate_path(str(tmp / "topk" / name))  # complete: every file of the manifest present
    assert any(event == "remove" for event, _, _ in events)  # the rotation did remove


def test_old_checkpoint_is_removed_only_after_the_new_one_is_complete(rotation):
    _, _, events = rotation
    removals = [i for i, (event, _, _) in enumerate(events) if event == "remove"]
    assert removals
    for i in removals:
        _, removed, complete_then = events[i]
        event, saved, _ = events[i - 1]
        assert event == "saved" and saved != removed
        # at the removal, both the new checkpoint and the old one were complete folders
        assert {Path(saved).name, Path(removed).name} <= set(complete_then), events


def test_last_as_a_link_points_to_a_complete_checkpoint(rotation):
    tmp, _, _ = rotation
    last = tmp / "linked" / "last.ckpt"
    assert last.is_symlink() and last.resolve().parent == (tmp / "linked").resolve()
    assert validate_path(str(last))["world_size"] == 2
    assert sorted(p.name for p in (tmp / "linked").iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, rotation, monkeypatch, capfd):
    _, uninterrupted, _ = rotation
    ckpts = tmp_path / "ckpts"
    monkeypatch.setenv(SAVE_DELAY_ENV, "2")  # each rank sleeps 2 s after writing its shards, before the commit
    trainer = cpu_trainer(strategy=zero(2), max_steps=4, enable_checkpointing=True,
                          callbacks=[checkpointing(ckpts), KillDuringSave(step=4, rank=1, after=0.8)])
    with pytest.raises(Exception):  # noqa: B017 - rank 1 dies by SIGKILL; the launcher reports it
        trainer.fit(ResumeRegressor())
    monkeypatch.delenv(SAVE_DELAY_ENV)
    partial = ckpts / "epoch=1-step=4.ckpt.partial"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", partial.name, "last.ckpt"]
    assert not (partial / "meta.json").exists()
    with pytest.raises(ValueError, match="half-written"):
        validate_path(str(partial))

    capfd.readouterr()
    resumed = fit(tmp_path, zero(2), ResumeRegressor(), 4, ckpt_path="last", callbacks=[checkpointing(ckpts)],
                  name="resumed")
    assert "Skipped 1 half-written checkpoint(s)" in capfd.readouterr().err
    assert bit_identical(resumed, uninterrupted)  # last.ckpt (step 2) resumed exactly
    # the resumed run saved step 4 again, replacing the half-written folder
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]


def test_checkpoint_of_another_model_lists_the_mismatched_keys(rotation):
    tmp, _, _ = rotation
    trainer = cpu_trainer(strategy=zero(2), max_steps=1)
    with pytest.raises(Exception, match=r"is a checkpoint of another model.*missing key.*inp\.weight.*unexpected"
                                        r" key.*net\.0\.weight"):
        trainer.fit(TiedRegressor(), ckpt_path=str(tmp / "topk" / "last.ckpt"))


@pytest.mark.parametrize("stage", [2, 3])
def test_exclude_frozen_parameters_keeps_lora_checkpoints_small(tmp_path, stage):
    ckpts = tmp_path / "ckpts"
    full = fit(tmp_path, zero(stage, exclude_frozen_parameters=True), LoraRegressor(), 4,
               callbacks=[checkpointing(ckpts)], name="full")
    checkpoint = ckpts / "epoch=0-step=2.ckpt"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["engines"]["model"]["excluded"] == ["base.weight", "base.bias"]
    for shard in (checkpoint / "model" / "checkpoint").glob("*.pt"):  # DeepSpeed's own files: trusted pickles
        state = torch.load(shard, map_location="cpu", weights_only=False)
        assert not any(k.startswith("base.") for k in state.get("module") or {}), shard
        assert not any(k.startswith("base.") for k in state.get("frozen_param_shapes") or {}), shard
    # the frozen base is rebuilt by the model's own code: the resume is still exact
    resumed = fit(tmp_path, zero(stage, exclude_frozen_parameters=True), LoraRegressor(), 4,
                  ckpt_path=str(checkpoint), name="resumed")
    assert bit_identical(full, resumed)
    # an export refuses to drop the base silently; allow_missing exports the adapter alone
    with pytest.raises(ValueError, match=r"does not hold 2 weight\(s\).*base\.weight.*allow_missing=True"):
        consolidated_state_dict(checkpoint)
    adapter = consolidated_state_dict(ckpts / "epoch=1-step=4.ckpt", allow_missing=True)
    assert bit_identical(adapter, {k: v for k, v in full.items() if not k.startswith("base.")})
