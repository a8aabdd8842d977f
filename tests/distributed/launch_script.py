"""An unchanged Lightning script (no strategy, no lightning_zero import) for `lightning-zero launch`:

    lightning-zero launch --config ds.json --devices 2 tests/distributed/launch_script.py OUT
    python tests/distributed/launch_script.py OUT --in-code ds.json    # the same run, written with ZeroStrategy

Every rank writes OUT/rank{R}.json (the strategy it runs and the resolved ZeRO settings); rank 0 writes the full
weights to OUT/weights.pt. With --conflict the script passes its own strategy (the launcher must refuse it).
$LAUNCH_SCRIPT_ACCELERATOR picks the accelerator (default cpu; tests/gpu sets gpu).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

import lightning as L  # noqa: E402
import torch  # noqa: E402

from helpers import Regressor  # noqa: E402

STEPS = 4


class Report(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.config = out, {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.config = dict(getattr(trainer.strategy, "ds_config", None) or {})  # ZeroStrategy's resolved config

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy, config = trainer.strategy, self.config
        zero = config.get("zero_optimization", {})
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "strategy": type(strategy).__name__,
                  "stage": zero.get("stage"), "gradient_clipping": config.get("gradient_clipping"),
                  "accumulate": trainer.accumulate_grad_batches, "precision": trainer.precision,
                  "partitioned": any(hasattr(p, "ds_id") for p in pl_module.parameters()),
                  "environment": type(strategy.cluster_environment).__name__}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
        state = strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            torch.save(state, self.out / "weights.pt")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    extra = {}
    if "--in-code" in sys.argv:
        from lightning_zero import ZeroStrategy

        config = sys.argv[sys.argv.index("--in-code") + 1]
        accumulate = json.loads(Path(config).read_text()).get("gradient_accumulation_steps", 1)
        extra = dict(strategy=ZeroStrategy(config=config), devices=2, accumulate_grad_batches=accumulate)
    if "--conflict" in sys.argv:
        extra = dict(strategy="ddp", devices=3)
    accelerator = os.environ.get("LAUNCH_SCRIPT_ACCELERATOR", "cpu")  # the GPU tier sets "gpu"
    trainer = L.Trainer(accelerator=accelerator, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Report(out)], **extra)
    trainer.fit(Regressor())


if __name__ == "__main__":
    main()
