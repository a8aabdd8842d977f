"""Lightning's own DeepSpeed tests (lightning 2.6.6: tests_pytorch/strategies/test_deepspeed.py,
utilities/test_deepspeed_collate_checkpoint.py, utilities/test_deepspeed_model_summary.py) ported to ZeroStrategy and
run on 2 CPU processes under the default "popen" launcher: one launch of lightning_cases.py runs every case (both
ranks run the same cases in order, each with its own Trainers), and each test below reads its case's outcome on
both ranks. Ported tests that need CUDA or float16 run in tests/gpu/test_lightning_port_gpu.py. The list of what was
changed or left out, and why: docs/lightning_tests_port.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_cases import CASES

pytestmark = pytest.mark.distributed

GPU_ONLY = ("test_deepspeed_custom_precision_params",  # the fp16 section: float16 needs a GPU (or an FP16 CPU)
            "test_deepspeed_inference_precision_during_inference[fp16]")
CPU_CASES = [name for name in CASES if name not in GPU_ONLY]
SCRIPT = Path(__file__).with_name("lightning_cases.py")
TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_port")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), *CPU_CASES], env=env, cwd=out,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's rank 1 is in the same session
        log, _ = proc.communicate()
        log += f"\n[killed after {TIMEOUT_S} s]"
    return out, log


@pytest.mark.parametrize("name", CPU_CASES)
def test_lightning_deepspeed_test(outcomes, name):
    out, log = outcomes
    failures = []
    for rank in (0, 1):
        path = out / f"{name}.rank{rank}.json"
        if not path.exists():
            failures.append(f"rank {rank}: the case did not run to its end. Launch output (tail):\n{log[-4000:]}")
            continue
        result = json.loads(path.read_text())
        if not result["ok"]:
            failures.append(f"rank {rank}:\n{result['error']}")
    assert not failures, "\n".join(failures)
