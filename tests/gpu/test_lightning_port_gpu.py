"""GPU tier of the Lightning test port (tests/lightning_port): Lightning 2.6.6's CUDA DeepSpeed tests, ported to
ZeroStrategy, with Lightning's own devices and precision ("16-mixed" as Lightning runs them; the CPU tier uses
bf16-mixed). Skipped without CUDA. On the GPU machine:

    python tests/gpu/test_lightning_port_gpu.py          # every case, one launch, a line per case, exit 1 on a failure
    python -m pytest tests/gpu/test_lightning_port_gpu.py

Every case runs in one launch of tests/lightning_port/lightning_cases.py on min(2, GPUs) devices under the "popen"
launcher; the cases Lightning runs on 2 GPUs are skipped on a machine with one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from gpu_tier import MARKS  # also puts tests/ on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning_port"))
from lightning_cases import CASES, launch  # noqa: E402
from lightning_cases import failures as read_failures  # noqa: E402

pytestmark = MARKS

# Lightning's RunIf(min_cuda_gpus=2) tests
TWO_GPUS = ("test_deepspeed_multigpu", "test_deepspeed_stage_3_save_warning", "test_deepspeed_multigpu_stage_3",
            "test_deepspeed_multigpu_stage_3_manual_optimization", "test_deepspeed_multigpu_stage_3_checkpointing",
            "test_deepspeed_multigpu_stage_2_accumulated_grad_batches", "test_deepspeed_multigpu_test",
            "test_deepspeed_multigpu_no_schedulers", "test_deepspeed_multi_save_same_filepath",
            "test_deepspeed_with_bfloat16_precision", "test_deepspeed_configure_optimizer_device_set",
            "test_deepspeed_init_module_with_stage_3", "test_deepspeed_init_module_with_stages_1_2",
            "test_deepspeed_collate_checkpoint", "test_deepspeed_summary")
TIMEOUT_S = 1800


def _devices() -> int:
    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _runnable(devices: int) -> list[str]:
    return [n for n in CASES if devices >= 2 or n.split("[")[0] not in TWO_GPUS]


def run_cases(out: Path, names: list[str], devices: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed's CUDA accelerator
    env.update(PORT_ACCELERATOR="gpu", PORT_DEVICES=str(devices))
    return launch(out, names, env, TIMEOUT_S)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_port_gpu")
    devices = _devices()
    return out, run_cases(out, _runnable(devices), devices), devices


@pytest.mark.parametrize("name", list(CASES))
def test_lightning_deepspeed_test_on_gpu(outcomes, name):
    out, log, devices = outcomes
    if name not in _runnable(devices):
        pytest.skip("Lightning runs this test on 2 GPUs")
    failures = read_failures(out, name, devices, log)
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    import tempfile

    devices = _devices()
    if not devices:
        raise SystemExit("needs a CUDA GPU")
    out = Path(tempfile.mkdtemp(prefix="lightning_port_gpu_"))
    names = _runnable(devices)
    log = run_cases(out, names, devices)
    failed = 0
    for name in names:
        failures = read_failures(out, name, devices, log)
        failed += bool(failures)
        print(("FAILED " if failures else "passed ") + name)
        for f in failures:
            print("    " + f.replace("\n", "\n    ")[-3000:])
    print(f"{len(names) - failed} passed, {failed} failed, {len(CASES) - len(names)} skipped (need 2 GPUs);"
          f" on {devices} GPU(s); outputs in {out}")
    sys.exit(1 if failed else 0)
