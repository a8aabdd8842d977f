"""One "node" of the 2 x 2 multi-node test (tests/distributed/test_multinode.py), launched as

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank {0,1} --master-addr 127.0.0.1 --master-port PORT \\
        tests/distributed/multinode_script.py OUT_DIR STAGE HPZ

Lightning's TorchElasticEnvironment reads the ranks torchrun sets. Every rank writes OUT_DIR/rank{global}.pt: what the
strategy saw (world size, node rank, ...) and the full weights it gathered, so the test can check all four agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (helpers)

import lightning as L  # noqa: E402
import torch  # noqa: E402

from helpers import Regressor, cpu_trainer  # noqa: E402
from lightning_zero import ZeroStrategy, gather_full_state_dict  # noqa: E402

STEPS, ACCUMULATE, CLIP = 6, 2, 0.5


class WriteRankReport(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        weights = (gather_full_state_dict(pl_module, rank_zero_only=False, is_rank_zero=trainer.is_global_zero)
                   if strategy.stage == 3 else pl_module.state_dict())
        engine = next(iter(strategy.engines)).engine
        report = {
            "world_size": trainer.world_size, "global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank, "num_nodes": trainer.num_nodes,
            "environment": type(strategy.cluster_environment).__name__,
            "torch_world_size": torch.distributed.get_world_size(),
            "hpz": engine.zero_hpz_partition_size() if strategy.stage == 3 else 1,
            # hpZ's secondary partition (within the node) of the weights, on every parameter
            "secondary": sorted({type(getattr(p, "ds_secondary_tensor", None)).__name__ for p in pl_module.parameters()}),
            "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
        }
        torch.save(report, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, stage, hpz = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    # threshold 0: DeepSpeed would otherwise keep these small parameters whole on every rank (nothing for hpZ to do)
    extra = {"zero_hpz_partition_size": hpz, "stage3_param_persistence_threshold": 0} if hpz > 1 else {}
    trainer = cpu_trainer(num_nodes=2, devices=2, strategy=ZeroStrategy(stage=stage, **extra),
                          callbacks=[WriteRankReport(out)], max_steps=STEPS, accumulate_grad_batches=ACCUMULATE,
                          gradient_clip_val=CLIP)
    trainer.fit(Regressor())


if __name__ == "__main__":
    main()
