"""GPU tier for `lightning-zero config`, `launch` and `env`: on this GPU the config's defaults follow the hardware
(bf16 where supported, the GPU count), `launch` trains the unchanged tests/distributed/launch_script.py on one GPU with
that config (precision from the config, the script sets none), and `env` lists the GPU and the fused Adam op.
Run `python tests/gpu/test_no_code_changes_gpu.py` (no pytest needed) or `make test-gpu`."""

import json
import os
import subprocess
import sys
from pathlib import Path

from gpu_tier import MARKS  # also puts tests/ on sys.path

pytestmark = MARKS

_SCRIPT = Path(sys.executable).with_name("lightning-zero")
# the console script where the package is installed; the module where it is only on PYTHONPATH (the GPU machine)
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "lightning_zero.cli"]
SCRIPT = Path(__file__).resolve().parents[1] / "distributed" / "launch_script.py"


def _run(cmd, cwd, **env):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def test_config_launch_and_env_on_gpu(tmp_path):
    import torch

    printed = _run([*CLI, "config", "--yes", "--stage", "3", "--accumulate-grad-batches", "2"], tmp_path).stdout
    config = json.loads((tmp_path / "ds_config.json").read_text())
    bf16 = torch.cuda.is_bf16_supported()
    assert config["bf16"]["enabled"] is bf16 and config["fp16"]["enabled"] is not bf16
    assert f"--devices {torch.cuda.device_count()} train.py" in printed
    _run([*CLI, "launch", "--config", "ds_config.json", "--devices", "1", SCRIPT, "out"], tmp_path,
         LAUNCH_SCRIPT_ACCELERATOR="gpu")
    report = json.loads((tmp_path / "out" / "rank0.json").read_text())
    want_precision = "bf16-mixed" if bf16 else "16-mixed"
    print(f"launch on GPU: {report}")
    assert (report["strategy"], report["stage"], report["precision"], report["accumulate"]) == (
        "ZeroStrategy", 3, want_precision, 2)
    env = _run([*CLI, "env"], tmp_path).stdout
    print(env)
    assert "cuda:0: " in env and ("[fused_adam] compatible" in env or "[fused_adam] installed" in env)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        test_config_launch_and_env_on_gpu(Path(folder))
    print("GPU NO-CODE-CHANGES TEST PASSED")
