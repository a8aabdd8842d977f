"""Lightning's and DeepSpeed's own tools on ZeroStrategy checkpoint folders, and LightningCLI driving a real fit.

* Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` and DeepSpeed's ``zero_to_fp32`` (the function and the
  script copied into the folder) read a single-engine folder unchanged; Lightning's output loads with
  ``LightningModule.load_from_checkpoint``, hyperparameters included.
* On a multi-engine folder each of them fails with an error that names ``lightning-zero consolidate``.
* ``LightningCLI`` with ``--trainer.strategy=lightning_zero.ZeroStrategy --trainer.strategy.overlap_comm=true`` and a
  YAML config fits on 2 CPU processes (popen), with those values in the engines' DeepSpeed config.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt_helpers import N, FrozenGAN, fit
from helpers import Regressor, max_diff
from lightning_zero import ZeroStrategy, consolidated_state_dict

pytestmark = pytest.mark.distributed
TESTS = Path(__file__).resolve().parents[1]


class HparamRegressor(Regressor):
    """Regressor whose hyperparameters `load_from_checkpoint` must restore."""

    def __init__(self, lr: float = 1e-2, width_note: str = "default") -> None:
        super().__init__(lr=lr, n=N)
        self.save_hyperparameters()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["user_key"] = "kept"  # a key of the user's own: Lightning's converter must carry it


def _converted_by_deepspeed(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    with redirect_stdout(io.StringIO()):
        convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(out))
    return torch.load(out / "pytorch_model.bin", weights_only=True)


def _run_copied_script(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(folder / "zero_to_fp32.py"), str(folder), str(out)],
                          capture_output=True, text=True, timeout=300)


def test_single_engine_folder_converts_with_lightning_and_deepspeed_tools(tmp_path):
    """Stage 3 here (one shard file per rank); the LightningCLI test below converts a stage-2 folder."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    model = HparamRegressor(lr=0.02, width_note="custom")
    weights = fit(tmp_path, ZeroStrategy(stage=3, start_method="spawn"), model, 2,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2)])
    folder = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    assert (folder / "latest").read_text() == "model/checkpoint"

    # Lightning's converter, then load_from_checkpoint (its default weights_only loading)
    out = tmp_path / "lightning.pt"
    with redirect_stdout(io.StringIO()):
        convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(out))
    restored = HparamRegressor.load_from_checkpoint(out, map_location="cpu")
    assert restored.hparams.lr == 0.02 and restored.hparams.width_note == "custom"
    assert max_diff(restored.state_dict(), weights) == 0.0
    converted = torch.load(out, weights_only=False)
    assert converted["global_step"] == 2 and converted["user_key"] == "kept"
    assert "pytorch-lightning_version" in converted and "optimizer_states" not in converted

    # DeepSpeed's zero_to_fp32: the function and the script DeepSpeed copies into checkpoint folders
    assert max_diff(_converted_by_deepspeed(folder, tmp_path / "ds"), weights) == 0.0
    run = _run_copied_script(folder, tmp_path / "script")
    assert run.returncode == 0, run.stderr[-3000:]
    assert max_diff(torch.load(tmp_path / "script" / "pytorch_model.bin", weights_only=True), weights) == 0.0

    # the folder is still a complete ZeroStrategy checkpoint (the manifest lists the new files)
    meta = json.loads((folder / "meta.json").read_text())
    assert {"latest", "zero_to_fp32.py"} <= set(meta["files"])
    assert max_diff(consolidated_state_dict(folder), weights) == 0.0


def test_multi_engine_folder_makes_the_tools_name_consolidate(tmp_path):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    weights = fit(tmp_path, ZeroStrategy(stage=2, start_method="spawn"), FrozenGAN(), 2,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2)])
    folder = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    hint = "lightning-zero consolidate"
    with redirect_stdout(io.StringIO()), pytest.raises(FileNotFoundError, match=hint) as lightning_error:
        convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(tmp_path / "out.pt"))
    assert "3 DeepSpeed engines" in str(lightning_error.value)
    with pytest.raises(FileNotFoundError, match=hint):
        _converted_by_deepspeed(folder, tmp_path / "ds")
    run = _run_copied_script(folder, tmp_path / "script")
    assert run.returncode != 0 and hint in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "out.pt").exists()
    # the export the message names works on that folder
    assert max_diff(consolidated_state_dict(folder), weights) == 0.0


CLI_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {here!r})
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.callbacks import Callback
from test_lightning_tools import HparamRegressor

class DumpConfig(Callback):
    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open({out!r}, "w") as f:
                json.dump(trainer.strategy.ds_config, f, default=str)

cli = LightningCLI(HparamRegressor, save_config_callback=None, run=False,
                   trainer_defaults={{"callbacks": [DumpConfig()]}})
cli.trainer.fit(cli.model)
"""

CLI_YAML = """
trainer:
  accelerator: cpu
  devices: 2
  max_steps: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  strategy:
    class_path: lightning_zero.ZeroStrategy
    init_args:
      stage: 2
      reduce_bucket_size: 300000
      allgather_bucket_size: 400000
      contiguous_gradients: false
model:
  lr: 0.03
"""


def test_lightning_cli_fits_with_typed_strategy_keywords(tmp_path):
    script, config, out = tmp_path / "cli_fit.py", tmp_path / "config.yaml", tmp_path / "ds_config.json"
    script.write_text(CLI_SCRIPT.format(tests=str(TESTS), here=str(Path(__file__).parent), out=str(out)))
    config.write_text(CLI_YAML.format(root=str(tmp_path / "root")))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    run = subprocess.run([sys.executable, str(script), "--config", str(config),
                          "--trainer.strategy.overlap_comm=true"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    zero = json.loads(out.read_text())["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and zero["contiguous_gradients"] is False
    assert zero["reduce_bucket_size"] == 300000 and zero["allgather_bucket_size"] == 400000
    folder = next((tmp_path / "root").rglob("*.ckpt"))  # Lightning's default ModelCheckpoint
    restored = HparamRegressor.load_from_checkpoint(_lightning_convert(folder, tmp_path / "cli.pt"))
    assert restored.hparams.lr == 0.03


def _lightning_convert(folder: Path, out: Path) -> Path:
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with redirect_stdout(io.StringIO()):
        convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(out))
    return out
