"""Lightning's own DeepSpeed tests (lightning 2.6.6: tests_pytorch/strategies/test_deepspeed.py,
utilities/test_deepspeed_collate_checkpoint.py, utilities/test_deepspeed_model_summary.py) ported to ZeroStrategy and
run on 2 CPU processes under the default "popen" launcher: one launch of lightning_cases.py runs every case (both
ranks run the same cases in order, each with its own Trainers), and each test below reads its case's outcome on
both ranks. Ported tests that need CUDA or float16 run in tests/gpu/test_lightning_port_gpu.py. The list of what was
changed or left out, and why: docs/lightning_tests_port.md."""

from __future__ import annotations

import os

import pytest

from lightning_cases import CASES, failures, launch

pytestmark = pytest.mark.distributed

GPU_ONLY = ("test_deepspeed_custom_precision_params",  # the fp16 section: float16 needs a GPU (or an FP16 CPU)
            "test_deepspeed_inference_precision_during_inference[fp16]")
CPU_CASES = [name for name in CASES if name not in GPU_ONLY]
TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_port")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    log = launch(out, CPU_CASES, env, TIMEOUT_S)
    return out, log


@pytest.mark.parametrize("name", CPU_CASES)
def test_lightning_deepspeed_test(outcomes, name):
    out, log = outcomes
    found = failures(out, name, 2, log)
    assert not found, "\n".join(found)
