"""Issue 20, the cases that need processes: in ranks started by torchrun, the NVMe folder checks (every rank refuses
before zero.Init creates anything under nvme_path) and stage="auto" refusing a model that fits nowhere (every rank
gets rank 0's refusal); and a save that fails on a full drive (every rank gets one error saying where, why, how much
space it needs and is free; nothing is committed; half-written folders are cleaned)."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers import Regressor, cpu_trainer
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("bad_inputs_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_refuse_a_bad_nvme_folder_or_an_auto_stage_that_fits_nowhere(tmp_path) -> None:
    (tmp_path / "nvme.img").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "NODE_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), str(SCRIPT), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, what in (("missing", "does not exist"), ("file", "is a file, not a folder")):
            path = tmp_path / ("missing" if case == "missing" else "nvme.img")
            assert report[case] == (
                f"ZeroConfigError: zero_optimization.offload_optimizer.nvme_path={str(path)!r} {what}. Create the"
                f" folder on a local NVMe drive (`mkdir -p {path}`) or pass another ZeroStrategy(nvme_path=...)."), rank
        assert report["auto"].startswith(
            "ZeroConfigError: ZeroStrategy(stage=\"auto\"): 40.00B parameters (largest layer 10.00B) on 1 node(s) x 2"
            " process(es) fit no ZeRO stage or offload by the estimate"), rank
    assert not (tmp_path / "missing").exists()  # zero.Init never ran: no <path>/zero_stage_3
    assert (tmp_path / "nvme.img").is_file()


class FullDriveSaves(L.Callback):
    """At the end of training, on every rank: a save that succeeds, one on a "full drive" (every torch.save writes
    half of its bytes and fails with ENOSPC, as a full drive does), then one that succeeds again."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _listing(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report: dict[str, Any] = {}
        trainer.save_checkpoint(self.folder / "first.ckpt")
        report["after_first"] = self._listing()
        real_save = torch.save

        def full_drive(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            Path(f).write_bytes(buffer.getvalue()[:buffer.tell() // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        torch.save = full_drive
        try:
            trainer.save_checkpoint(self.folder / "second.ckpt")
            report["error"] = None
        except Exception as err:  # noqa: BLE001 - the test checks the type and message
            report["error"] = [type(err).__name__, getattr(err, "errno", None), str(err)]
        finally:
            torch.save = real_save
        report["after_failure"] = self._listing()
        trainer.save_checkpoint(self.folder / "third.ckpt")
        report["after_third"] = self._listing()
        (self.folder.parent / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def test_a_save_on_a_full_drive_says_where_and_how_much_space_it_needs(tmp_path) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "killed.ckpt.partial" / "model").mkdir(parents=True)  # the leftover of a save that was killed
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), max_steps=1,
                          callbacks=[FullDriveSaves(str(folder))])
    trainer.fit(Regressor())
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    first = sum(f.stat().st_size for f in (folder / "first.ckpt").rglob("*") if f.is_file())
    for report in reports:
        assert report["after_first"] == ["first.ckpt"]  # the killed save's leftover went with the first success
        name, code, message = report["error"]
        assert (name, code) == ("OSError", errno.ENOSPC)
        size = f"{first / 1024:.1f} KiB"
        assert message.startswith(
            f"[Errno 28] Saving the checkpoint {str(folder / 'second.ckpt')!r} failed because the drive is full:"
            " rank(s) 0, 1 could not write (OSError: [Errno 28] No space left on device). The checkpoint needs about"
            f" {size} (the size of 'first.ckpt', the newest complete checkpoint there); "), message
        assert message.endswith(
            f" is free in {str(folder)!r} now. Nothing was committed: earlier checkpoints are untouched and the"
            " half-written 'second.ckpt.partial' was removed. Free up space there, or save elsewhere"
            " (ModelCheckpoint(dirpath=...) or trainer.save_checkpoint(<another path>))."), message
        assert report["after_failure"] == ["first.ckpt"]
        assert report["after_third"] == ["first.ckpt", "third.ckpt"]
