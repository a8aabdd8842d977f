"""Checkpoint paths, layout and messages without any process: validation, atomic commit and removal, key mapping,
resume decisions, export arguments and the console command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_zero import checkpoint as ckpt
from lightning_zero import consolidate
from lightning_zero.cli import main as cli
from lightning_zero.engines import _ModelGroup


def fake_checkpoint(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    """A folder laid out like a committed checkpoint, with a manifest of its files."""
    if files is None:
        files = {"lightning.pt": b"x" * 10, "model/checkpoint/mp_rank_00_model_states.pt": b"y"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    meta = {"format": ckpt.FORMAT, "world_size": 2, "stage": 2, "engines": {},
            "files": {rel: len(data) for rel, data in files.items()}}
    (folder / ckpt.META).write_text(json.dumps(meta))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# validate_path
# ----------------------------------------------------------------------------------------------------------------------


def test_a_complete_checkpoint_returns_its_metadata(tmp_path):
    meta = ckpt.validate_path(str(fake_checkpoint(tmp_path / "a.ckpt")))
    assert meta["world_size"] == 2


def test_missing_path_is_reported_with_a_half_written_sibling(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope.ckpt' does not exist\.$"):
        ckpt.validate_path(str(tmp_path / "nope.ckpt"))
    (tmp_path / "step=4.ckpt.partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"half-written 'step=4.ckpt.partial' exists beside it"):
        ckpt.validate_path(str(tmp_path / "step=4.ckpt"))


def test_half_written_and_half_deleted_folders_are_never_loaded(tmp_path):
    partial = fake_checkpoint(tmp_path / "step=4.ckpt.partial")  # even with a meta.json
    with pytest.raises(ValueError, match=r"half-written checkpoint .* never loaded.*'.*step=4.ckpt' if it exists"):
        ckpt.validate_path(str(partial))
    with pytest.raises(ValueError, match="deletion was interrupted"):
        ckpt.validate_path(str(fake_checkpoint(tmp_path / "old.ckpt.removing")))


def test_subfolder_of_a_checkpoint_names_the_parent(tmp_path):
    root = fake_checkpoint(tmp_path / "a.ckpt")
    for inner in (root / "model", root / "model" / "checkpoint", root / "model/checkpoint/mp_rank_00_model_states.pt"):
        with pytest.raises(ValueError, match=rf"inside a ZeroStrategy checkpoint.*folder itself: '{root}'"):
            ckpt.validate_path(str(inner))


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "logs").mkdir()
    with pytest.raises(ValueError, match=r"folder but not a ZeroStrategy checkpoint \(no meta.json\)\. Pass a folder"):
        ckpt.validate_path(str(tmp_path / "logs"))
    # the ModelCheckpoint folder itself: name what is inside
    fake_checkpoint(tmp_path / "logs" / "epoch=0-step=2.ckpt")
    with pytest.raises(ValueError, match=r"holds the checkpoints \['epoch=0-step=2.ckpt'\].*ckpt_path='last'"):
        ckpt.validate_path(str(tmp_path / "logs"))


def test_damaged_or_foreign_metadata(tmp_path):
    root = fake_checkpoint(tmp_path / "a.ckpt")
    (root / ckpt.META).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable meta.json"):
        ckpt.validate_path(str(root))
    (root / ckpt.META).write_text(json.dumps({"format": "lightning_zero/0"}))
    with pytest.raises(ValueError, match="format 'lightning_zero/0'; this version .* reads 'lightning_zero/1'"):
        ckpt.validate_path(str(root))


def test_missing_or_truncated_files_make_a_checkpoint_incomplete(tmp_path):
    root = fake_checkpoint(tmp_path / "a.ckpt")
    (root / "lightning.pt").write_bytes(b"xx")  # truncated
    os.remove(root / "model/checkpoint/mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"incomplete: 2 of its 2 files are missing or have another size"
                                         r" \(lightning.pt, model/checkpoint/mp_rank_00_model_states.pt\)"):
        ckpt.validate_path(str(root))


def test_weights_files_and_safetensors_folders_are_plain_weights(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.ckpt")
    assert ckpt.validate_path(str(tmp_path / "w.ckpt")) == {}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"")
    assert ckpt.validate_path(str(tmp_path / "export")) == {}


# ----------------------------------------------------------------------------------------------------------------------
# Commit and removal
# ----------------------------------------------------------------------------------------------------------------------


def test_commit_replaces_an_existing_checkpoint_atomically(tmp_path):
    final = fake_checkpoint(tmp_path / "last.ckpt", {"lightning.pt": b"old"})
    partial = fake_checkpoint(tmp_path / "last.ckpt.partial", {"lightning.pt": b"new!"})
    assert ckpt._exchange(partial, final)  # Linux renameat2 on this file system: the swap the commit relies on
    ckpt._exchange(partial, final)  # swap back
    ckpt._commit(partial, final)
    assert (final / "lightning.pt").read_bytes() == b"new!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_commit_replaces_a_link_and_removal_leaves_no_half_deleted_folder(tmp_path):
    target = fake_checkpoint(tmp_path / "epoch=0.ckpt")
    (tmp_path / "last.ckpt").symlink_to("epoch=0.ckpt")
    ckpt._commit(fake_checkpoint(tmp_path / "last.ckpt.partial"), tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink() and target.is_dir()
    ckpt.remove(tmp_path / "epoch=0.ckpt")
    ckpt.remove(tmp_path / "missing.ckpt")  # already gone: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping, model check, resume decisions
# ----------------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(2, 2))
        self.dec = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)


def test_engine_keys_map_back_to_the_lightning_module_names():
    root = Net()
    group = _ModelGroup({"enc.0": root.enc[0], "dec": root.dec})  # one optimizer training two submodules
    assert ckpt._module_prefixes(root, root) == {"": ""}
    assert ckpt._module_prefixes(root, root.head) == {"": "head"}
    prefixes = ckpt._module_prefixes(root, group)
    assert prefixes == {"enc__0": "enc.0", "dec": "dec"}
    assert sorted(ckpt._state_keys(group, prefixes)) == ["dec.bias", "dec.weight", "enc.0.bias", "enc.0.weight"]
    assert ckpt.model_key("weight", {"": "head"}) == "head.weight"
    assert ckpt.model_key("net.0.weight", {"": ""}) == "net.0.weight"


def test_a_checkpoint_of_another_model_lists_keys_and_shapes():
    saved = Net()
    saved.head = nn.Linear(2, 3)
    saved.extra = nn.Linear(1, 1)
    meta = {"engines": {"model": {"keys": ckpt._state_keys(saved, {"": ""})}}}
    model = Net()
    model.strict_loading = True
    strategy = SimpleNamespace(engines=[SimpleNamespace(name="model", module=model)], lightning_module=model)
    with pytest.raises(ValueError, match=r"'x.ckpt' is a checkpoint of another model\. .*2 unexpected key\(s\):"
                                         r" extra.bias, extra.weight\. 2 shape mismatch\(es\): head.weight"
                                         r" \(checkpoint \[3, 2\], model \[1, 2\]\), head.bias .* Pass a checkpoint"
                                         r" written by this model\."):
        ckpt._check_model(strategy, meta, "x.ckpt")


def test_another_optimizer_layout_is_named():
    model = Net()
    model.strict_loading = True
    meta = {"engines": {"enc": {"keys": {}}, "dec+head": {"keys": {}}}}
    strategy = SimpleNamespace(engines=[SimpleNamespace(name="model", module=model)], lightning_module=model)
    meta["engines"]["enc"]["keys"] = ckpt._state_keys(model, {"": ""})
    with pytest.raises(ValueError, match=r"holds engines \['dec\+head', 'enc'\] \(one per optimizer\) but this model"
                                         r" has \['model'\]: `configure_optimizers` changed"):
        ckpt._check_model(strategy, meta, "x.ckpt")


@pytest.mark.parametrize(("saved", "now", "optimizer", "expected"), [
    ((2, 2), (2, 2), True, "native"),
    ((2, 0), (1, 0), True, "native"),  # stage 0 holds the whole state on every rank
    ((2, 2), (1, 2), True, "universal"),
    ((1, 3), (2, 3), True, "universal"),
    ((2, 2), (2, 3), True, "universal"),
    ((2, 3), (4, 1), True, "universal"),
    ((2, 2), (1, 3), False, "weights"),  # validate/test/predict: weights only
    ((2, 3), (2, 3), False, "weights"),  # stage 3 keeps the weights in the optimizer shards only
    ((2, 2), (2, 2), False, "native"),
])
def test_resume_method(saved, now, optimizer, expected):
    assert ckpt.resume_method(saved[0], saved[1], now[0], now[1], optimizer) == expected


def test_stage_zero_cannot_convert_optimizer_state():
    with pytest.raises(ValueError, match=r"saved at stage 0 by 2 processes, resumed at stage 2 by 2\).*stage 0 keeps"
                                         r" a plain.*ZeroStrategy\(stage=0\) \(any number of processes works at"
                                         r" stage 0\)"):
        ckpt.resume_method(2, 0, 2, 2, True)
    with pytest.raises(ValueError, match=r"Resume with ZeroStrategy\(stage=3\), or .*lightning-zero consolidate"):
        ckpt.resume_method(2, 3, 2, 0, True)


# ----------------------------------------------------------------------------------------------------------------------
# Export arguments and the console command
# ----------------------------------------------------------------------------------------------------------------------


def test_export_arguments_are_checked_before_any_work(tmp_path):
    root = str(fake_checkpoint(tmp_path / "a.ckpt"))
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported\. Use one of \['bf16', 'bfloat16'"):
        consolidate.consolidate_checkpoint(root, tmp_path / "o.ckpt", dtype="int8")
    with pytest.raises(ValueError, match=r"format='onnx' is not supported\. Use 'ckpt', 'safetensors', 'hf'"):
        consolidate.consolidate_checkpoint(root, tmp_path / "o", format="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"writes a folder .* got the file name '.*m.safetensors'.*e.g. '.*m'"):
        consolidate.consolidate_checkpoint(root, tmp_path / "m.safetensors", format="safetensors")
    with pytest.raises(ValueError, match=r"max_shard_size='5 parsecs' is not a size\. Use a number of bytes or e.g."):
        consolidate.consolidate_checkpoint(root, tmp_path / "o", max_shard_size="5 parsecs")
    torch.save({}, tmp_path / "w.ckpt")
    with pytest.raises(ValueError, match="already a single weights file .* nothing to consolidate"):
        consolidate.consolidate_checkpoint(tmp_path / "w.ckpt", tmp_path / "o.ckpt")


@pytest.mark.parametrize(("size", "expected"), [(123, 123), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30),
                                                ("1.5MB", 1_500_000), ("600B", 600)])
def test_shard_sizes(size, expected):
    assert consolidate._parse_size(size) == expected


def test_shard_plan_keeps_order_and_puts_big_tensors_alone():
    keys = {"a": [[10], "float32"], "b": [[100], "bfloat16"], "c": [[10], "int64"], "d": [[5], "float32"]}
    assert consolidate._plan_shards(keys, torch.float32, 100) == [["a"], ["b"], ["c", "d"]]
    assert consolidate._plan_shards(keys, torch.float32, 10**6) == [["a", "b", "c", "d"]]


def test_console_command_reports_errors(tmp_path, capsys):
    assert cli(["consolidate", str(tmp_path / "nope"), str(tmp_path / "o.ckpt")]) == 2
    assert "lightning-zero consolidate: error: Checkpoint '" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["consolidate", "--help"])
    assert "--max-shard-size" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Strategy glue
# ----------------------------------------------------------------------------------------------------------------------


def test_saving_in_the_main_process_after_a_spawned_fit_is_explained(tmp_path):
    from lightning_zero import ZeroStrategy

    strategy = ZeroStrategy(stage=2, start_method="spawn")
    with pytest.raises(RuntimeError, match=r"found no DeepSpeed engine in this process.*start_method='spawn'.*save"
                                           r" during fit \(ModelCheckpoint"):
        strategy.save_checkpoint({}, str(tmp_path / "x.ckpt"))


def test_optimizer_hyperparameters_round_trip_through_lightning_state():
    from lightning_zero import ZeroStrategy

    strategy = ZeroStrategy(stage=2)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=0.1)
    saved = strategy.optimizer_state(opt)
    assert saved["state"] == {} and saved["param_groups"][0]["lr"] == 0.1  # no moments: they live in the shards
    opt.param_groups[0]["lr"] = 0.5
    strategy.optimizers = [opt]
    strategy.load_optimizer_state_dict({"optimizer_states": [saved]})
    assert opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match=r"holds 2 optimizer\(s\) but `configure_optimizers` returned 1"):
        strategy.load_optimizer_state_dict({"optimizer_states": [saved, saved]})


def test_a_file_that_is_not_a_checkpoint_or_holds_arbitrary_objects(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"'.*notes.txt' is not a checkpoint: it is a text file \(it starts with"
                                         r" 'hello'\)\. Pass a checkpoint folder written by ZeroStrategy"):
        ckpt.read_weights_file(str(tmp_path / "notes.txt"))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        ckpt.read_weights_file(str(tmp_path / "empty.ckpt"))
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": SimpleNamespace(a=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"holds objects other than tensors.*trainer.fit\(\.\.\.,"
                                         r" weights_only=False\)"):
        ckpt.read_weights_file(str(tmp_path / "pickled.ckpt"))
    assert ckpt.read_weights_file(str(tmp_path / "pickled.ckpt"), trusted=True)["extra"].a == 1
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "plain.ckpt")
    assert torch.equal(ckpt.read_weights_file(str(tmp_path / "plain.ckpt"))["state_dict"]["w"], torch.ones(1))
