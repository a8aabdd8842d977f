"""Where models are created: the warning for stage-3 parameters built outside zero.Init, `trainer.init_module()` at
stage 3 (real popen launch), the true stage-3 summary, and stages 0-2 building in the target dtype."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from torch import nn
from torch.utils.data import DataLoader

from helpers import RandomDataset, Regressor, cpu_trainer, make_net, max_diff, reference_weights
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

WARNING = "were created outside `configure_model`"


class BuiltInConfigureModel(L.LightningModule):
    """`net` (trained) and a frozen `head`, both created in configure_model."""

    def configure_model(self):
        self.net = make_net()
        self.head = nn.Linear(1, 1)
        self.head.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(RandomDataset(16), batch_size=4)


def test_parameters_built_in_init_warn_once_and_still_train(tmp_path, capfd):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), max_steps=2)
    trainer.fit(Regressor())  # builds its net in __init__
    err = capfd.readouterr().err
    assert err.count(WARNING) == 1, err
    n = sum(p.numel() for p in make_net().parameters())
    assert f"ZeroStrategy(stage=3): {n} parameters ({n:,} elements) {WARNING}, so every rank materialized them whole" \
           " before DeepSpeed partitioned them at setup. Create the layers in `LightningModule.configure_model` (or" \
           " under `with trainer.init_module():`)" in " ".join(err.split())
    # still trains correctly: partitioned at setup, same weights as plain PyTorch (handed back by the spawn launcher)
    want = reference_weights(world_size=2, steps=2, accumulate=1, clip=None)
    assert max_diff(trainer.lightning_module.state_dict(), want) <= 1e-5


class RecordSummary(L.Callback):
    """Asks the Trainer's ModelSummary callback for its summary object, as it does at fit start."""

    def __init__(self, folder):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, ModelSummary))
        summary = callback._summary(trainer, pl_module)
        counts = {"total": summary.total_parameters, "trainable": summary.trainable_parameters,
                  "per_rank": summary.params_per_rank, "local_numel": sum(p.numel() for p in pl_module.parameters())}
        torch.save(counts, f"{self.folder}/summary_{trainer.global_rank}.pt")


def test_configure_model_does_not_warn_and_summary_shows_true_counts(tmp_path, capfd):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), max_steps=1,
                          callbacks=[ModelSummary(max_depth=1), RecordSummary(str(tmp_path))])
    trainer.fit(BuiltInConfigureModel())
    out = capfd.readouterr()
    printed = out.out + out.err
    assert WARNING not in printed

    reference = BuiltInConfigureModel()
    reference.configure_model()
    total = sum(p.numel() for p in reference.parameters())
    trainable = sum(p.numel() for p in reference.net.parameters())
    per_rank = sum(math.ceil(p.numel() / 2) for p in reference.parameters())  # DeepSpeed pads shards evenly
    assert (total, trainable) == (435, 433)
    for rank in (0, 1):
        counts = torch.load(tmp_path / f"summary_{rank}.pt")
        assert counts == {"total": total, "trainable": trainable, "per_rank": per_rank, "local_numel": 0}
    # the table printed at fit start (rank 0 only)
    assert printed.count("Total params") == 1
    assert f"{total:<10}Total params" in printed  # get_human_readable_count(435) == "435  "
    assert f"{trainable}       Trainable params" in printed
    assert f"{per_rank}       Params per rank, ZeRO-3 shard (2 ranks)" in printed


# `trainer.init_module()` runs before `fit`, so it needs the processes of a real launch: the default "popen" launcher
# re-runs this script once per extra rank. Each rank records what init_module built, then trains.
INIT_MODULE_SCRIPT = """
    import sys
    import lightning as L
    import torch
    from helpers import Regressor
    from lightning_zero import ZeroStrategy

    out = sys.argv[1]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ZeroStrategy(stage=3), max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with trainer.init_module():
        model = Regressor()
    params = list(model.parameters())
    torch.save({"ds": all(hasattr(p, "ds_id") for p in params), "numel": sum(p.numel() for p in params),
                "local": sum(p.ds_tensor.numel() for p in params), "total": sum(p.ds_numel for p in params)},
               f"{out}/init_{trainer.global_rank}.pt")
    trainer.fit(model)
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.global_rank == 0:
        torch.save(state, f"{out}/final.pt")
"""


def test_init_module_partitions_at_creation_and_trains(tmp_path):
    script = tmp_path / "train_init_module.py"
    script.write_text(textwrap.dedent(INIT_MODULE_SCRIPT))
    tests = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([tests, env.get("PYTHONPATH", "")]), DS_ACCELERATOR="cpu")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert WARNING not in run.stderr
    assert "cannot fully support" not in run.stderr  # Lightning's init_module warning for unsupported strategies
    total = sum(p.numel() for p in make_net().parameters())
    for rank in (0, 1):
        built = torch.load(tmp_path / f"init_{rank}.pt")
        assert built["ds"] and built["numel"] == 0 and built["total"] == total
        assert total / 2 <= built["local"] <= total / 2 + 8  # half each, padded per parameter
    want = reference_weights(world_size=2, steps=3, accumulate=1, clip=None)
    assert max_diff(torch.load(tmp_path / "final.pt"), want) <= 1e-5


def test_init_module_with_spawn_says_it_cannot_partition():
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"))
    with pytest.warns(UserWarning, match=r"`trainer.init_module\(\)` cannot partition the model with"
                                         r" ZeroStrategy\(stage=3, start_method='spawn'\).*configure_model"):
        with trainer.init_module():
            net = make_net()
    assert not any(hasattr(p, "ds_id") for p in net.parameters())


class RecordCreation(L.LightningModule):
    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def configure_model(self):
        self.net = make_net()
        p = next(self.net.parameters())
        torch.save({"dtype": p.dtype, "device": p.device.type, "default": torch.get_default_dtype()},
                   f"{self.folder}/created_{self.global_rank}.pt")

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def predict_dataloader(self):
        return DataLoader(RandomDataset(8), batch_size=4)


def test_stage2_bf16_true_creates_parameters_in_bf16(tmp_path):
    # configure_model (on 2 processes): the parameters are bf16 from the start, not cast from an fp32 copy
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), precision="bf16-true")
    trainer.predict(RecordCreation(str(tmp_path)), return_predictions=False)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"created_{rank}.pt") == {"dtype": torch.bfloat16, "device": "cpu",
                                                               "default": torch.bfloat16}
    # trainer.init_module() (no process needed at stages 0-2)
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), precision="bf16-true")
    with trainer.init_module():
        net = make_net()
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_bench_init_peak_smoke(tmp_path):
    """bench/bench_init_peak.py --small: the GPU benchmark's code path (Trainer, configure_model under zero.Init,
    partitioned GPT, inference engine, one forward) on one CPU process."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "bench_init_peak.py"
    out = tmp_path / "init_peak.json"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    run = subprocess.run([sys.executable, str(bench), "--small", "--forward", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks_ok"] and result["params"] == result["params_expected"] == 135_808
    assert result["detail"]["params_partitioned"] == result["detail"]["params_total"]
    assert 5.5 < result["detail"]["forward_loss"] < 7.0  # about ln(vocab=512) = 6.24 for an untrained model
