"""No code changes: `lightning-zero config` in a real terminal writes a DeepSpeed config, and `lightning-zero launch`
trains an unchanged Lightning script (tests/distributed/launch_script.py: no strategy, no lightning_zero import) with
it at stage 3 on 2 CPU processes. Every rank runs ZeroStrategy, and the weights match the same run written with
`strategy=ZeroStrategy(config=...)` and plain single-process PyTorch over the same global batches. A script that
passes its own strategy and devices is refused with one error naming both sides."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from helpers import max_diff, reference_weights

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("launch_script.py")
CLI = Path(sys.executable).with_name("lightning-zero")
STEPS = 4  # as in launch_script.py
# the answers typed, by the prompt's key; "" takes the recommended default. "7" first shows a re-asked question.
ANSWERS = {"nodes": [""], "devices": [""], "precision": [""], "stage": ["7", "3"], "offload_optimizer": [""],
           "offload_parameters": [""], "accumulate": ["2"], "clip": ["0.5"], "activation_checkpointing": [""],
           "compile": [""]}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "NODE_RANK", "LIGHTNING_ZERO_CONFIG")}
    return {**env, "DS_ACCELERATOR": "cpu", "COLUMNS": "120"}


def _config_session(folder: Path) -> str:
    """A whole interactive `lightning-zero config` session in a pseudo-terminal; returns what the terminal showed."""
    transcript = io.StringIO()
    child = pexpect.spawn(str(CLI), ["config"], cwd=str(folder), env=_env(), encoding="utf-8", timeout=120)
    child.logfile_read = transcript
    answers = {k: list(v) for k, v in ANSWERS.items()}
    while child.expect([r"\n(\w+) \[([^\]\r\n]*)\]: ", pexpect.EOF]) == 0:
        child.sendline(answers[child.match.group(1)].pop(0))
    child.close()
    assert child.exitstatus == 0, transcript.getvalue()
    assert not any(answers.values()), answers  # every planned answer was asked for
    return transcript.getvalue()


def _interrupted_session(folder: Path, ignore_sigint: bool = False) -> str:
    # ignore_sigint: the session starts with SIGINT ignored, as every job a non-interactive shell starts with `&`
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    child = pexpect.spawn(str(CLI), ["config"], cwd=str(folder), env=_env(), encoding="utf-8", timeout=120,
                          preexec_fn=preexec)
    child.expect(r"nodes \[1\]: ")
    child.sendline("")
    child.expect(r"devices \[2\]: ")
    child.sendintr()  # Ctrl-C in the middle of the session
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    return child.before


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_config_session_then_launch_an_unchanged_script_at_stage_3(tmp_path):
    assert "nothing was written" in _interrupted_session(tmp_path)
    assert "nothing was written" in _interrupted_session(tmp_path, ignore_sigint=True)
    assert list(tmp_path.iterdir()) == []
    transcript = _config_session(tmp_path)
    (tmp_path / "session.txt").write_text(transcript)  # docs/config_session.txt is a copy of one
    assert "! '7' is not one of 0, 1, 2, 3, auto." in transcript and "validated by ZeroStrategy" in transcript
    config_path = tmp_path / "ds_config.json"
    config = json.loads(config_path.read_text())
    assert config == {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "fp16": {"enabled": False},
                      "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}

    launched = _run([str(CLI), "launch", "--config", str(config_path), "--devices", "2", str(SCRIPT),
                     str(tmp_path / "launched")])
    assert launched.returncode == 0, launched.stderr[-6000:]
    for rank, report in enumerate(_reports(tmp_path / "launched")):
        assert report == {"rank": rank, "world_size": 2, "strategy": "ZeroStrategy", "stage": 3,
                          "gradient_clipping": 0.5, "accumulate": 2, "precision": "32-true", "partitioned": True,
                          "environment": "LightningEnvironment"}

    in_code = _run([sys.executable, str(SCRIPT), str(tmp_path / "in_code"), "--in-code", str(config_path)])
    assert in_code.returncode == 0, in_code.stderr[-6000:]
    assert _reports(tmp_path / "in_code") == _reports(tmp_path / "launched")
    weights = torch.load(tmp_path / "launched" / "weights.pt")
    same_run = max_diff(weights, torch.load(tmp_path / "in_code" / "weights.pt"))
    plain = max_diff(weights, reference_weights(world_size=2, steps=STEPS, accumulate=2, clip=0.5))
    print(f"launch vs ZeroStrategy in code: {same_run:.3g}; launch vs plain PyTorch: {plain:.3g}")
    assert same_run <= 1e-6 and plain <= 1e-5


def test_launch_under_torchrun(tmp_path):
    """torchrun starts the ranks (one `lightning-zero launch` each) and Lightning's TorchElasticEnvironment takes
    them; the stage comes from --stage, the Trainer flags from the script's defaults."""
    port = str(29500 + os.getpid() % 1000)
    ran = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
                "--no-python", str(CLI), "launch", "--stage", "3", "--devices", "2", str(SCRIPT), str(tmp_path)])
    assert ran.returncode == 0, ran.stderr[-6000:]
    assert [(r["rank"], r["strategy"], r["stage"], r["environment"]) for r in _reports(tmp_path)] == [
        (0, "ZeroStrategy", 3, "TorchElasticEnvironment"), (1, "ZeroStrategy", 3, "TorchElasticEnvironment")]
    plain = max_diff(torch.load(tmp_path / "weights.pt"), reference_weights(world_size=2, steps=STEPS, accumulate=1,
                                                                            clip=None))
    assert plain <= 1e-5


def test_launch_refuses_a_script_that_sets_its_own_strategy_and_devices(tmp_path):
    refused = _run([str(CLI), "launch", "--stage", "3", "--devices", "2", str(SCRIPT), str(tmp_path), "--conflict"],
                   timeout=200)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert last == (
        f"ValueError: lightning-zero launch --stage 3 --devices 2 {SCRIPT}: the script builds Trainer(strategy='ddp')"
        f" but lightning-zero launch runs it with ZeroStrategy(stage=3): remove strategy= from the Trainer in {SCRIPT}"
        " (or pass strategy=\"auto\"), or run it without lightning-zero launch; the script builds Trainer(devices=3)"
        " but lightning-zero launch was given --devices 2: drop one of them (remove devices= from the Trainer, or the"
        " launch flag).")
    assert not list(tmp_path.glob("rank*.json"))  # refused before any process started
