"""Manual optimization with two engines: accumulation, per-optimizer clipping, closures and schedulers."""

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from helpers import SaveFullWeights, cpu_trainer, max_diff
from multi_helpers import ManualGAN, reference_manual_gan
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed
STEPS, ACCUMULATE = 5, 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_accumulation_clipping_closure_and_schedulers_match_plain_pytorch(tmp_path, stage):
    out = tmp_path / "w.pt"
    logger = CSVLogger(tmp_path, version=0)
    # each of the two optimizers steps STEPS times; Lightning counts every optimizer step
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=stage, start_method="spawn"), max_steps=2 * STEPS,
                          logger=logger, log_every_n_steps=1,
                          callbacks=[SaveFullWeights(str(out)), LearningRateMonitor("step")])
    trainer.fit(ManualGAN(str(tmp_path), accumulate=ACCUMULATE))

    got = torch.load(out)
    want, ref = reference_manual_gan(world_size=2, steps=STEPS, accumulate=ACCUMULATE)
    assert sorted(got) == sorted(want)
    assert max_diff(got, want) <= 1e-5
    assert ref["clipped"]["g"] >= 3 and ref["clipped"]["d"] >= 3  # both clip values were in effect
    unclipped, _ = reference_manual_gan(world_size=2, steps=STEPS, accumulate=ACCUMULATE, clip=False)
    assert max_diff(got, unclipped) > 1e-3

    record = torch.load(tmp_path / "record.pt")
    assert len(record) == STEPS
    assert all(r["closure_returned_its_loss"] and r["schedulers"] == 2 for r in record)
    assert [r["scheduler_steps"] for r in record] == [(k, k // 2) for k in range(1, STEPS + 1)]
    assert [lr for r in record for lr in r["lr"]] == pytest.approx([lr for pair in ref["lr"] for lr in pair])

    # LearningRateMonitor logs both optimizers, at the values the schedulers set
    with open(f"{logger.log_dir}/metrics.csv") as f:
        header, *rows = [line.strip().split(",") for line in f]
    columns = {name: [float(r[i]) for r in rows if r[i]] for i, name in enumerate(header)}
    assert {"lr-Adam", "lr-AdamW"} <= set(columns)
    for name, lr, gamma, steps in (("lr-Adam", 2e-2, 0.8, STEPS), ("lr-AdamW", 3e-2, 0.5, STEPS // 2)):
        expected = [lr * gamma**k for k in range(steps + 1)]
        logged = columns[name]
        assert all(min(abs(v - e) for e in expected) <= 1e-9 for v in logged), (name, logged)
        assert len({round(v, 9) for v in logged}) >= 2, (name, logged)  # the scheduled changes reached the log
