"""Consolidated export (one Lightning .ckpt, safetensors shards) and plain weights files as a fine-tuning start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt_helpers import NoGatherOnSave, ResumeRegressor, TiedRegressor, WeightsAtStart, bit_identical, fit
from lightning_zero import ZeroStrategy, consolidate_checkpoint
from lightning_zero.cli import main as cli

pytestmark = pytest.mark.distributed
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A stage-3 checkpoint of a model with tied weights and a buffer, and its full weights."""
    tmp = tmp_path_factory.mktemp("tied")
    weights = fit(tmp, ZeroStrategy(stage=3, start_method="spawn"), TiedRegressor(), 2,
                  callbacks=[ModelCheckpoint(dirpath=tmp / "ckpts", every_n_train_steps=2, save_top_k=-1),
                             NoGatherOnSave()])
    assert torch.equal(weights["inp.weight"], weights["out.weight"])
    return tmp / "ckpts" / "epoch=0-step=2.ckpt", weights


def _predictions(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


LOAD_WITHOUT_DEEPSPEED = """
import sys, torch
sys.path.insert(0, {tests!r})
from ckpt_helpers import TiedRegressor
model = TiedRegressor.load_from_checkpoint({path!r}, map_location="cpu")
assert "deepspeed" not in sys.modules, "deepspeed was imported"
assert model.out.weight is model.inp.weight, "the tie was lost"
x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model(x), {out!r})
"""


def test_ckpt_export_loads_without_deepspeed_and_predicts_identically(tied, tmp_path):
    checkpoint, weights = tied
    (path,) = consolidate_checkpoint(checkpoint, tmp_path / "model.ckpt", progress=False)
    exported = torch.load(path, weights_only=True)  # plain tensors and primitives only
    assert bit_identical(exported["state_dict"], weights)
    assert exported["global_step"] == 2 and "pytorch-lightning_version" in exported
    out = tmp_path / "pred.pt"
    script = LOAD_WITHOUT_DEEPSPEED.format(tests=str(TESTS), path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    reference = TiedRegressor()
    reference.load_state_dict(weights)
    assert torch.equal(torch.load(out), _predictions(reference))


def test_safetensors_export_round_trips_sharded_and_in_bf16(tied, tmp_path, capfd):
    from safetensors.torch import load_file

    checkpoint, weights = tied
    files = consolidate_checkpoint(checkpoint, tmp_path / "fp32", format="safetensors", max_shard_size="300B")
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    shards = sorted(p for p in files if p.suffix == ".safetensors")
    assert len(shards) >= 3 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    assert sorted(index["weight_map"]) == sorted(weights)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    loaded = {k: v for p in shards for k, v in load_file(p).items()}
    assert bit_identical(loaded, weights)  # tied weights: each key stored (safetensors cannot share memory)
    assert "Consolidating" in capfd.readouterr().err  # the progress bar

    assert cli(["consolidate", str(checkpoint), str(tmp_path / "bf16"), "--dtype", "bf16", "--no-progress"]) == 0
    half = load_file(tmp_path / "bf16" / "model.safetensors")  # small: a single file, no index
    assert bit_identical(half, {k: v.to(torch.bfloat16) for k, v in weights.items()})


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A checkpoint from Lightning's single-device strategy after 2 steps (DDP writes the same format), the same
    weights as safetensors, and the weights."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("plain")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ResumeRegressor())
    trained = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}
    trainer.save_checkpoint(tmp / "plain.ckpt")
    save_file(trained, tmp / "plain.safetensors")
    return tmp, trained


@pytest.mark.parametrize(("stage", "kind"), [(2, "ckpt"), (3, "ckpt"), (3, "safetensors")])
def test_plain_weights_file_starts_fine_tuning(tmp_path, stage, kind, plain, capfd):
    folder, trained = plain
    final = fit(tmp_path, ZeroStrategy(stage=stage, start_method="spawn"), ResumeRegressor(), 2,
                ckpt_path=str(folder / f"plain.{kind}"), callbacks=[WeightsAtStart(tmp_path / "start.pt")])
    assert bit_identical(torch.load(tmp_path / "start.pt"), trained)  # the weights were loaded before step 1
    assert not bit_identical(final, trained)  # and 2 fresh steps ran (loops start at 0, not at the file's step 2)
    assert "loaded its weights only" in capfd.readouterr().err
