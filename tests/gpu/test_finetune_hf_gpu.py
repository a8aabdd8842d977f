"""GPU tier: examples/finetune_hf.py on the GPU(s) (LoRA at stage 3 in bf16-mixed, generate, adapter export).

Skipped without CUDA. On the device machine: `python tests/gpu/test_finetune_hf_gpu.py` (no pytest needed).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from gpu_tier import MARKS  # also puts tests/ on sys.path

pytestmark = MARKS
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_hf.py"


def test_finetune_hf_example_on_gpu(tmp_path=None):
    out = Path(tmp_path or tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    run = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "150", "--out", str(out)], capture_output=True,
                         text=True, timeout=900, env=env)
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-4000:]
    loss = next(line for line in run.stdout.splitlines() if line.startswith("validation loss"))
    before, after = (float(word.rstrip(",")) for word in loss.split()[2:5:2])
    assert after < before, loss
    assert {p.name for p in (out / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    meta = json.loads((out / "lora.ckpt" / "meta.json").read_text())
    assert meta["stage"] == 3 and meta["precision"] == "bf16-mixed"
    # the ranks generated in bf16, the reload generates in fp32: greedy tokens may differ, so they are reported only
    assert "the exported adapter (PeftModel.from_pretrained) generates" in run.stdout


if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    test_finetune_hf_example_on_gpu()
    print("GPU TESTS PASSED")
