"""Issue 20: bad inputs that used to escape as a traceback, a misleading message or nothing. Each gets one clear error
from lightning_zero before any work (the CLI: one line on stderr, exit code 2). The cases that need processes (the
NVMe checks in torchrun-started ranks, a save that fails on a full drive) are in
tests/distributed/test_bad_inputs_distributed.py."""

from __future__ import annotations

import errno
import logging
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_zero import ZeroStrategy
from lightning_zero import checkpoint as ckpt
from lightning_zero import consolidate
from lightning_zero.cli import main as cli
from lightning_zero.config import ZeroConfigError, supported_optimizer_types
from lightning_zero.estimate import GiB, auto_choice, plan_auto


def _nvme(path: Path) -> ZeroStrategy:
    return ZeroStrategy(stage=3, offload_optimizer="nvme", offload_parameters="nvme", nvme_path=str(path))


# ----------------------------------------------------------------------------------------------------------------------
# 1-2: the NVMe folder is checked where the config is resolved, in every process, before zero.Init (whose swapper
# creates <nvme_path>/zero_stage_3). The torchrun run is in tests/distributed/test_bad_inputs_distributed.py.
# ----------------------------------------------------------------------------------------------------------------------


def test_nvme_path_is_checked_where_each_process_resolves_its_config(tmp_path) -> None:
    missing, file = tmp_path / "missing", tmp_path / "nvme.img"
    file.write_bytes(b"")
    for path, what in ((missing, "does not exist"), (file, "is a file, not a folder")):
        strategy = _nvme(path)  # constructing is fine: the folder may only exist on the compute nodes
        with pytest.raises(ZeroConfigError, match=re.escape(
                f"zero_optimization.offload_optimizer.nvme_path={str(path)!r} {what}. Create the folder on a local"
                f" NVMe drive (`mkdir -p {path}`) or pass another ZeroStrategy(nvme_path=...).")):
            strategy.resolve_config(None)  # what tensor_init_context (configure_model) and setup call
    assert not (missing / "zero_stage_3").exists() and not missing.exists()


def test_registered_nvme_strategy_names_the_environment_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LIGHTNING_ZERO_NVME_PATH", raising=False)
    with pytest.raises(ZeroConfigError, match=re.escape(
            "strategy=\"zero_stage_3_offload_nvme\" takes its NVMe folder from $LIGHTNING_ZERO_NVME_PATH, which is not"
            " set. Set it to a folder on a local NVMe drive (`export LIGHTNING_ZERO_NVME_PATH=/local_nvme`, in every"
            " process's environment), or pass ZeroStrategy(stage=3, offload_optimizer=\"nvme\",")):
        L.Trainer(strategy="zero_stage_3_offload_nvme", accelerator="cpu", devices=2, logger=False)
    # read when the strategy is built (not when lightning_zero was imported)
    monkeypatch.setenv("LIGHTNING_ZERO_NVME_PATH", str(tmp_path))
    trainer = L.Trainer(strategy="zero_stage_3_offload_nvme", accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy.knobs["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# 3-5: timeout, remote_device, logging_level
# ----------------------------------------------------------------------------------------------------------------------


def test_timeout_must_be_a_timedelta() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "ZeroStrategy(timeout=1800) must be a datetime.timedelta (the process group timeout), got int. Use `from"
            " datetime import timedelta` and timeout=timedelta(seconds=1800).")):
        ZeroStrategy(timeout=1800)
    with pytest.raises(TypeError, match=r"ZeroStrategy\(timeout='30m'\) must be a datetime.timedelta"):
        ZeroStrategy(timeout="30m")
    with pytest.raises(ValueError, match=r"timeout=datetime.timedelta\(days=-1, seconds=86399\)\) must be positive"):
        ZeroStrategy(timeout=timedelta(seconds=-1))
    assert ZeroStrategy(timeout=timedelta(minutes=5))._timeout == timedelta(minutes=5)
    assert ZeroStrategy(timeout=None)._timeout == timedelta(minutes=30)  # None: the default (DeepSpeed asserts on it)


def test_remote_device_accepts_none_cpu_or_nvme(tmp_path) -> None:
    with pytest.raises(ValueError, match=re.escape(
            "ZeroStrategy(remote_device='gpu') is not supported. Use None (the parameter offload device, else the"
            " GPU), \"cpu\" or \"nvme\": where zero.Init puts the parameters created in configure_model at stage 3.")):
        ZeroStrategy(stage=3, remote_device="gpu")
    with pytest.raises(ValueError, match=re.escape(
            "ZeroStrategy(remote_device='cpu') applies at stage 3 only (stage is 2): zero.Init creates partitioned"
            " parameters only there. Remove it or use ZeroStrategy(stage=3, ...).")):
        ZeroStrategy(stage=2, remote_device="cpu")
    with pytest.raises(ValueError, match=re.escape(
            "ZeroStrategy(remote_device=\"nvme\") needs the parameters offloaded to NVMe (zero.Init takes the swap"
            " folder from there). Add offload_parameters=\"nvme\" and nvme_path=..., or use remote_device=\"cpu\".")):
        ZeroStrategy(stage=3, remote_device="nvme")
    assert ZeroStrategy(stage=3, remote_device="cpu").remote_device == "cpu"
    assert ZeroStrategy(stage=3, offload_parameters="nvme", nvme_path=str(tmp_path),
                        remote_device="nvme").remote_device == "nvme"


def test_logging_level_accepts_logging_constants_and_names() -> None:
    from deepspeed.utils import logger

    with pytest.raises(ValueError, match=re.escape(
            "ZeroStrategy(logging_level='loud') is not a log level. Use a logging constant such as logging.INFO, or"
            " one of the names ['CRITICAL', 'ERROR', 'WARNING', 'INFO', 'DEBUG', 'NOTSET'].")):
        ZeroStrategy(logging_level="loud")
    with pytest.raises(ValueError, match=r"logging_level=-5\) is not a log level"):
        ZeroStrategy(logging_level=-5)
    try:
        ZeroStrategy(logging_level="info")
        assert logger.level == logging.INFO
        ZeroStrategy(logging_level=logging.ERROR)
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------------------------------
# 6: a config optimizer DeepSpeed does not have
# ----------------------------------------------------------------------------------------------------------------------


def test_config_optimizer_type_must_be_one_deepspeed_supports() -> None:
    names = supported_optimizer_types()
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    assert set(DEEPSPEED_OPTIMIZERS) <= set(names) and {"SGD", "RMSprop"} <= set(names) and "Optimizer" not in names
    with pytest.raises(ZeroConfigError, match=re.escape(
            "'optimizer.type' = 'Adamm' is not an optimizer DeepSpeed supports. Did you mean 'adam'? Use one of"
            f" {names} (DeepSpeed's own names in any case, torch.optim classes by their exact name)")):
        ZeroStrategy(config={"optimizer": {"type": "Adamm", "params": {"lr": 1e-3}}})
    with pytest.raises(ZeroConfigError, match=re.escape("'optimizer.type' = 'sgd' is not an optimizer DeepSpeed"
                                                        " supports. Did you mean 'SGD'?")):
        ZeroStrategy(config={"optimizer": {"type": "sgd"}})
    with pytest.raises(ZeroConfigError, match=re.escape("'optimizer' has no \"type\": name one of")):
        ZeroStrategy(config={"optimizer": {"params": {"lr": 1e-3}}})
    for name in ("AdamW", "adam", "Lamb", "SGD", "RMSprop"):  # as DeepSpeedEngine._is_supported_optimizer accepts
        ZeroStrategy(config={"optimizer": {"type": name, "params": {"lr": 1e-3}}})


# ----------------------------------------------------------------------------------------------------------------------
# 7: ckpt_path to a file that is not a checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def test_a_text_file_is_named_as_such_not_as_unsafe_objects(tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3: loss 0.25\nepoch 4: loss 0.2\n")
    expected = (f"{str(notes)!r} is not a checkpoint: it is a text file (it starts with 'epoch 3: loss 0.25'). Pass"
                " a checkpoint folder written by ZeroStrategy, a Lightning/torch checkpoint file (.ckpt/.pt), or"
                " .safetensors weights.")
    for trusted in (False, True):  # weights_only=False does not change what the file is
        with pytest.raises(ValueError, match=re.escape(expected)):
            ckpt.read_weights_file(str(notes), trusted=trusted)
    with pytest.raises(ValueError, match=re.escape(expected)):
        ckpt.load_full_state_dict(nn.Linear(1, 1), notes)
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    with pytest.raises(ValueError, match=r"is not a checkpoint: it is a JSON file \(it starts with"
                                         r" '\{\"lr\": 0.1\}'\)"):
        ckpt.read_weights_file(str(tmp_path / "config.json"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"is not a checkpoint: it is binary data of another format \(it starts with"
                                         r" b'\\x89PNG"):
        ckpt.read_weights_file(str(tmp_path / "image.png"))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "weights.pt"))
    with pytest.raises(ValueError, match=r"is not a checkpoint: it is safetensors weights without the .safetensors"
                                         r" suffix \(rename it to end in .safetensors\)"):
        ckpt.read_weights_file(str(tmp_path / "weights.pt"))
    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("ok.pt", "legacy.pt"):  # both torch.save formats still load
        assert torch.equal(ckpt.read_weights_file(str(tmp_path / name))["w"], torch.ones(1))


# ----------------------------------------------------------------------------------------------------------------------
# 8: consolidate into an existing folder as a .ckpt
# ----------------------------------------------------------------------------------------------------------------------


def _fake_checkpoint(folder: Path) -> Path:
    import json

    (folder / "lightning.pt").parent.mkdir(parents=True)
    (folder / "lightning.pt").write_bytes(b"x")
    (folder / ckpt.META).write_text(json.dumps({"format": ckpt.FORMAT, "world_size": 2, "stage": 2, "engines": {},
                                                "files": {"lightning.pt": 1}}))
    return folder


def test_consolidate_to_an_existing_folder_as_ckpt_refuses_cleanly(tmp_path, capsys) -> None:
    checkpoint, out = _fake_checkpoint(tmp_path / "last.ckpt"), tmp_path / "export"
    out.mkdir()
    assert cli(["consolidate", str(checkpoint), str(out), "--format", "ckpt", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"lightning-zero consolidate: error: {str(out)!r} is an existing folder, but format='ckpt' writes"
                   f" one file. Pass a file path, e.g. {str(out / 'model.ckpt')!r}, or format='safetensors'"
                   " (--format safetensors) to write into the folder.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "last.ckpt"]  # no export.partial
    (tmp_path / "weights").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'.*weights' is an existing file, but format='safetensors' writes a"
                                         r" folder"):
        consolidate.consolidate_checkpoint(checkpoint, tmp_path / "weights", format="safetensors")


def test_a_ckpt_export_that_fails_to_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    root = tmp_path / "last.ckpt"
    root.mkdir()
    torch.save({"epoch": 1}, root / ckpt.LIGHTNING_STATE)

    def full_drive(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_drive)
    with pytest.raises(OSError, match="No space left on device"):
        consolidate._write_ckpt(root, tmp_path / "model.ckpt", {"w": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------------------------------------------------
# 9-12: lightning-zero estimate with bad arguments: one line on stderr, exit code 2
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--params", "-1", "--largest-layer", "1"],
     "--params -1: give the total number of parameters (at least 1), e.g. --params 7e9."),
    (["--params", "1e9", "--largest-layer", "1e8", "--gpus-per-node", "0"], "--gpus-per-node 0: must be at least 1."),
    (["--params", "1e9", "--largest-layer", "2e9"],
     "--largest-layer 2e+09: give the most parameters one module holds itself, between 0 and --params."),
    (["--params", "1e9", "--largest-layer", "1e8", "--gpu-memory", "-8"], "--gpu-memory -8: give GiB, at least 0."),
    (["--model", "no.such:Class"],
     "--model 'no.such:Class': cannot import 'no.such' (No module named 'no'). Check the spelling, and run from the"
     " folder that holds the package (or install it / add it to PYTHONPATH)."),
    (["--model", "torch.nn:Linear"],
     "--model 'torch.nn:Linear': Linear() could not be built with no arguments on the meta device (TypeError:"
     " Linear.__init__() missing 2 required positional arguments: 'in_features' and 'out_features'). Give the class"
     " defaults for every argument, or use --params and --largest-layer."),
    (["--model", "torch.nn:Lineer"], "--model 'torch.nn:Lineer': 'torch.nn' has no 'Lineer'. Check the class name."),
    (["--model", "torch.nn:Module"],
     "--model 'torch.nn:Module': Module has no parameters, even after its configure_model. Name the class that builds"
     " the layers, or give --params and --largest-layer."),
    (["--model", "torch.nn:functional"],
     "--model 'torch.nn:functional' is a module, not a LightningModule or torch.nn.Module class. Name the model"
     " class, or give --params and --largest-layer."),
])
def test_estimate_command_line_errors(args, message, capsys) -> None:
    """What the console script prints: main() returns 2 without raising, so no traceback."""
    assert cli(["estimate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"lightning-zero estimate: error: {message}\n" and captured.out == ""


# ----------------------------------------------------------------------------------------------------------------------
# 13: stage="auto" for a model that fits nowhere
# ----------------------------------------------------------------------------------------------------------------------


class Huge(L.LightningModule):
    """4e10 parameters, created in configure_model: 160 GB in fp32 if it were ever allocated."""

    def configure_model(self) -> None:
        self.layers = nn.ModuleList(nn.Linear(200_000, 50_000, bias=False) for _ in range(4))


def test_auto_stage_refuses_a_model_that_fits_nowhere_before_allocating() -> None:
    # the real planner: the model counted on the meta device, this machine's available memory
    with pytest.raises(ZeroConfigError, match=re.escape(
            "ZeroStrategy(stage=\"auto\"): 40.00B parameters (largest layer 10.00B) on 1 node(s) x 2 process(es) fit"
            " no ZeRO stage or offload by the estimate (model states only, activations excluded): without a GPU the"
            " model states live in host memory: the most frugal choice (stage 3) needs about")):
        plan_auto(Huge(), num_nodes=1, devices_per_node=2, device=torch.device("cpu"), precision="32-true")


def test_auto_stage_refusal_names_more_nodes_and_nvme() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            "ZeroStrategy(stage=\"auto\"): 40.00B parameters (largest layer 100.0M) on 1 node(s) x 2 process(es) fit no"
            " ZeRO stage or offload by the estimate (model states only, activations excluded): without a GPU the model"
            " states live in host memory: the most frugal choice (stage 3) needs about 410.34 GiB per process x 2"
            " process(es) per node, and 20.00 GiB of host memory is available. Options: more processes: 35 nodes of 2"
            " (Trainer(num_nodes=35, ...)), where ZeroStrategy(stage=3) fits; a smaller model. `lightning-zero"
            " estimate --params 4e+10 --largest-layer 1e+08 --nodes 1 --gpus-per-node 2` prints every choice; or name"
            " the stage yourself to try anyway.")):
        auto_choice(int(4e10), int(1e8), num_nodes=1, devices_per_node=2, device_type="cpu", precision="32-true",
                    gpu_free_bytes=None, cpu_free_bytes=20 * GiB)
    # on GPUs without nvme_path: NVMe offload (with the space it needs) and more nodes are the ways out (16-mixed: with
    # bf16 precision the bf16 states would fit in the 140 GiB; NVMe's host buffers need 133 GiB here)
    with pytest.raises(ZeroConfigError) as info:
        auto_choice(10**10, 10**8, num_nodes=1, devices_per_node=4, device_type="cuda", precision="16-mixed",
                    gpu_free_bytes=4 * GiB, cpu_free_bytes=140 * GiB)
    message = str(info.value)
    assert "Options: more processes: 2 nodes of 4 (Trainer(num_nodes=2, ...)), where" in message
    assert re.search(r"; NVMe offload: ZeroStrategy\(stage=\"auto\", nvme_path=\.\.\.\) with a local NVMe folder that"
                     r" has [\d.]+ GiB free per node \(ZeroStrategy\(stage=3, offload_optimizer='nvme'", message)
    # nothing helps when one GPU cannot hold its share at any size
    with pytest.raises(ZeroConfigError, match=r"Options: devices with more free memory \(the figures above are the"
                                              r" least each needs\); a smaller model\."):
        auto_choice(10**9, 10**8, num_nodes=1, devices_per_node=4, device_type="cuda", precision="bf16-mixed",
                    gpu_free_bytes=GiB // 4, cpu_free_bytes=10 * GiB)


# ----------------------------------------------------------------------------------------------------------------------
# A save that cannot write: torch.save's own error under a real file-size limit (the 2-rank full-drive run is in
# tests/distributed/test_bad_inputs_distributed.py)
# ----------------------------------------------------------------------------------------------------------------------

_CUT_SHORT = """
import resource, signal, sys
import torch

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    torch.save({"w": torch.ones(10_000)}, sys.argv[1])
except RuntimeError as err:
    print(str(err).splitlines()[0])
"""


def test_a_save_cut_short_by_torch_says_so_and_leaves_no_partial(tmp_path) -> None:
    from types import SimpleNamespace

    final, partial = tmp_path / "step=1.ckpt", tmp_path / "step=1.ckpt.partial"
    partial.mkdir()
    # torch.save's own error under a real file-size limit, in a process of its own (the limit is process-wide)
    run = subprocess.run([sys.executable, "-c", _CUT_SHORT, str(partial / "lightning.pt")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "unexpected pos" in run.stdout, run.stdout + run.stderr[-3000:]
    strategy = SimpleNamespace(global_rank=0, is_global_zero=True, barrier=lambda: None, engines=[])
    with pytest.raises(OSError) as info:  # no process group here: this rank's report is the only one
        ckpt._raise_if_save_failed(strategy, final, partial, RuntimeError(run.stdout.strip()))
    assert info.value.errno is None and sorted(tmp_path.iterdir()) == []
    assert re.fullmatch(
        re.escape(f"Saving the checkpoint {str(final)!r} failed because a write was cut short (a full drive, a quota"
                  " or a file-size limit): rank(s) 0 could not write (RuntimeError: [enforce fail at"
                  " inline_container.cc:") + r"\d+\] \. unexpected pos \d+ vs \d+\)\. The checkpoint needs about"
        r" [\d.]+ (B|KiB) \(what was written before the failure, at least\); [\d.]+ [KMGT]?i?B is free in "
        + re.escape(f"{str(tmp_path)!r} now. Nothing was committed: earlier checkpoints are untouched and the"
                    " half-written 'step=1.ckpt.partial' was removed. Free up space there, or save elsewhere"
                    " (ModelCheckpoint(dirpath=...) or trainer.save_checkpoint(<another path>))."), str(info.value))
