"""`lightning-zero launch` and `lightning-zero env`, in this process: the Trainer arguments a launch implies, the
conflicts it refuses, the environment it hands every rank, the start-up hook's wrapping of Trainer.__init__ (a
contract test against the installed Lightning), and the env report on CPU. The real multi-process runs are in
tests/distributed/test_no_code_changes.py."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import socket
import sys
import time
import types
from pathlib import Path

import lightning as L
import pytest

from lightning_zero import ZeroStrategy, launch
from lightning_zero.cli import main
from lightning_zero.launch import LaunchSettings, config_trainer_flags, launch_environment, resolve_trainer_kwargs

SETTINGS = LaunchSettings(script="train.py", config="/cfg/ds.json", stage=3, devices=2)
SITE = Path(launch.__file__).with_name("_launch_site") / "sitecustomize.py"


def test_launch_fills_the_trainer_from_the_settings_and_the_config():
    config = {"bf16": {"enabled": True}, "gradient_accumulation_steps": 4}
    assert config_trainer_flags(config) == {"precision": "bf16-mixed", "accumulate_grad_batches": 4}
    assert config_trainer_flags({"fp16": {"enabled": True}}) == {"precision": "16-mixed"}
    assert config_trainer_flags({"bf16": {"enabled": False}, "gradient_accumulation_steps": 1}) == {}
    out = resolve_trainer_kwargs({"max_steps": 5, "strategy": "auto", "devices": "auto"}, SETTINGS, config, {})
    assert out == {"max_steps": 5, "strategy": "auto", "devices": 2, "precision": "bf16-mixed",
                   "accumulate_grad_batches": 4}
    # what the script chose itself and agrees (or is left to ZeroStrategy to compare with the config) is kept
    kept = resolve_trainer_kwargs({"devices": 2, "precision": "32-true"}, SETTINGS, config, {})
    assert kept["precision"] == "32-true" and kept["devices"] == 2


def test_a_script_with_its_own_strategy_or_devices_gets_one_error_naming_both():
    with pytest.raises(ValueError) as err:
        resolve_trainer_kwargs({"strategy": "ddp", "devices": 4}, SETTINGS, {}, {})
    assert str(err.value) == (
        "lightning-zero launch --config /cfg/ds.json --stage 3 --devices 2 train.py: the script builds"
        " Trainer(strategy='ddp') but lightning-zero launch runs it with ZeroStrategy(stage=3, config='/cfg/ds.json'):"
        " remove strategy= from the Trainer in train.py (or pass strategy=\"auto\"), or run it without lightning-zero"
        " launch; the script builds Trainer(devices=4) but lightning-zero launch was given --devices 2: drop one of"
        " them (remove devices= from the Trainer, or the launch flag).")
    with pytest.raises(ValueError, match=r"the script builds Trainer\(strategy=ZeroStrategy\(\.\.\.\)\)"):
        resolve_trainer_kwargs({"strategy": ZeroStrategy(stage=1)}, SETTINGS, {}, {})
    with pytest.raises(ValueError, match=r"the script builds \$PL_TRAINER_NUM_NODES=3 but lightning-zero launch was"
                                         r" given --nodes 2"):
        resolve_trainer_kwargs({}, LaunchSettings(script="t.py", nodes=2), {}, {"PL_TRAINER_NUM_NODES": "3"})


def test_every_rank_gets_the_settings_and_the_start_up_hook():
    env = launch_environment(SETTINGS, {"PYTHONPATH": "/mine"}, pid=123, cuda_available=False)
    assert json.loads(env["LIGHTNING_ZERO_LAUNCH"])["stage"] == 3
    assert env["LIGHTNING_ZERO_LAUNCH_PID"] == "123"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE.parent), "/mine"]
    assert env["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in launch_environment(SETTINGS, {}, pid=1, cuda_available=True)


def _load_site():
    spec = importlib.util.spec_from_file_location("_lz_site_under_test", SITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # LIGHTNING_ZERO_LAUNCH is unset here: it installs nothing
    return module


def test_start_up_hook_wraps_trainer_init_keeping_its_signature(monkeypatch):
    """Contract with the installed Lightning: the hook finds lightning.pytorch.trainer.trainer.Trainer, wrapping it
    keeps the signature LightningCLI reads, and the wrapped Trainer runs ZeroStrategy."""
    import lightning.pytorch.trainer.trainer as trainer_module

    site = _load_site()
    assert site._SETTINGS_VAR == launch.SETTINGS_ENV_VAR
    assert "lightning.pytorch.trainer.trainer" in site._TRAINER_MODULES
    assert trainer_module.Trainer is L.Trainer
    cls = type("Trainer", (L.Trainer,), {})  # wrap a subclass, not the real Trainer
    site._wrap_trainer(types.SimpleNamespace(Trainer=cls, __name__="lightning.pytorch.trainer.trainer"))
    assert inspect.signature(cls.__init__) == inspect.signature(L.Trainer.__init__)
    monkeypatch.setenv("LIGHTNING_ZERO_LAUNCH", json.dumps({"script": "t.py", "stage": 1}))
    trainer = cls(accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, ZeroStrategy) and trainer.strategy.stage == 1
    old = type("Trainer", (L.Trainer,), {})
    site._wrap_trainer(types.SimpleNamespace(Trainer=old, __name__="pytorch_lightning.trainer.trainer"))
    with pytest.raises(TypeError, match="builds a pytorch_lightning.Trainer"):
        old(accelerator="cpu", devices=1)


def test_finder_answers_only_for_the_trainer_module():
    site = _load_site()
    finder = site._TrainerFinder()
    assert finder.find_spec("json") is None
    spec = finder.find_spec("lightning.pytorch.trainer.trainer", L.pytorch.trainer.__path__)
    assert isinstance(spec.loader, site._Loader) and spec.origin.endswith("trainer.py")


def test_launch_refuses_bad_input_before_running(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("print('ran')\n")
    assert main(["launch", str(tmp_path / "missing.py")]) == 2
    assert "missing.py: no such file" in capsys.readouterr().err
    assert main(["launch", "--stage", "5", str(script)]) == 2
    assert "--stage 5: use 0, 1, 2, 3 or auto." in capsys.readouterr().err
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comn": True}}))
    assert main(["launch", "--config", str(bad), str(script)]) == 2
    assert (f"lightning-zero launch: error: --config {bad}: The DeepSpeed config has problems:\n  - unknown key"
            " 'zero_optimization.overlap_comn'. Did you mean 'overlap_comm'?") in capsys.readouterr().err


def test_env_reports_versions_ops_and_memory_on_cpu(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for line in ("Python ", "torch ", "deepspeed ", "lightning ", "torchmetrics ", "transformers ", "peft ",
                 "DeepSpeed accelerator: cpu", "[fused_adam]", "[cpu_adam]", "[async_io]", "libaio: ",
                 "host memory: ", "GiB free of"):
        assert line in out, line


def _python_with_hook(tmp_path: Path, code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    """Runs ``code`` as a script the way the launcher leaves a rank: settings, hook first on PYTHONPATH, and (through
    the shell's exec, which keeps the pid) marked as the launched process."""
    script = tmp_path / "s.py"
    script.write_text(code)
    env = launch_environment(LaunchSettings(script="s.py"), {k: v for k, v in os.environ.items()
                                                             if k != "PYTHONPATH"}, pid=0, cuda_available=True)
    env["PYTHONPATH"] += os.pathsep + extra_path if extra_path else ""
    shell = f'LIGHTNING_ZERO_LAUNCH_PID=$$ exec "{sys.executable}" "{script}"'
    return subprocess.run(["sh", "-c", shell], env=env, capture_output=True, text=True, timeout=60)


def test_hook_chains_other_sitecustomize_and_warns_when_no_trainer_ran(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.CHAINED = True\n")
    ran = _python_with_hook(tmp_path, "import builtins, sys\nprint(getattr(builtins, 'CHAINED', False),"
                                      " 'lightning' in sys.modules)\n", extra_path=str(other))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["True", "False"]  # the other hook ran; nothing heavy was imported at start-up
    assert ran.stderr.strip() == ("lightning-zero launch: s.py built no lightning.pytorch Trainer, so nothing ran with"
                                  " ZeroStrategy.")


def test_env_names_why_an_op_cannot_build():
    from lightning_zero.env import OpStatus, op_status

    line = OpStatus("async I/O (NVMe offload)", "async_io", False, False, False, "libaio not found").line()
    assert line.endswith("[async_io] NOT compatible: libaio not found")
    missing = op_status("nothing", "NoSuchBuilder")
    assert not missing.compatible and missing.reason == "the cpu accelerator has no NoSuchBuilder"


def _stale_lock(root: Path, op: str, age_s: float) -> Path:
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - age_s
    os.utime(lock, (old, old))
    return lock


def test_env_reports_the_locks_of_interrupted_op_builds(tmp_path, monkeypatch, capsys):
    """A build killed half-way leaves torch's lock file behind, and every later build of that op waits on it forever
    (a fresh clone's `make install` hung on one until CI's limit). Old locks are named with the command that fixes it;
    a lock younger than a build takes is another process building and is left alone."""
    from lightning_zero.env import STALE_LOCK_AGE_S, stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = _stale_lock(tmp_path, "async_io", STALE_LOCK_AGE_S + 60)
    _stale_lock(tmp_path, "cpu_adam", 5)  # being built right now
    assert stale_build_locks() == [stale]
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert (f"STALE BUILD LOCKS: Found 1 lock file(s) of interrupted DeepSpeed op builds (async_io); a process that"
            f" needs such an op waits on its lock forever, printing nothing. If no other process is building it right"
            f" now, remove them: rm {stale}") in out
    assert stale_build_locks(root=tmp_path / "missing") == []


def test_strategy_warns_about_stale_locks_before_deepspeed_loads_an_op(tmp_path, monkeypatch):
    """ZeroStrategy's process-group start (where DeepSpeed's CPU accelerator loads its first op) warns, on local
    rank 0."""
    import lightning as L
    import torch

    from lightning_zero import ZeroStrategy

    from lightning_zero import env

    # the lock lies in a folder of its own (the real cache keeps its ops, so nothing is rebuilt)
    monkeypatch.setattr(env, "_extensions_dir", lambda: tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the strategy sets them; restored afterwards
        monkeypatch.setenv(k, "0")
    stale = _stale_lock(tmp_path, "lightning_zero_test_op", 3600)
    trainer = L.Trainer(strategy=ZeroStrategy(stage=0), accelerator="cpu", devices=1, logger=False)
    try:
        with pytest.warns(RuntimeWarning, match=f"interrupted DeepSpeed op builds.*rm {stale}"):
            trainer.strategy.setup_environment()
    finally:
        import deepspeed.comm.comm as ds_comm

        torch.distributed.destroy_process_group()
        ds_comm.cdb = None
