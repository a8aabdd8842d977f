"""The NVMe folder checks in processes that torchrun started (no ZeroStrategy launcher, so no pre-launch check),
launched by tests/distributed/test_bad_inputs_distributed.py as

    torchrun --nproc-per-node 2 tests/distributed/bad_inputs_script.py OUT_DIR

Each rank fits a stage-3 model built in configure_model (inside zero.Init, whose NVMe swapper would create
<nvme_path>/zero_stage_3) with a missing nvme_path, then with one that is a file, and writes the errors it got to
OUT_DIR/rank{global}.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (helpers)

from torch import nn  # noqa: E402

from helpers import Regressor, cpu_trainer, make_net  # noqa: E402
from lightning_zero import ZeroStrategy  # noqa: E402


class BuiltInConfigureModel(Regressor):
    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        self.net: nn.Module = make_net()


def main() -> None:
    out = Path(sys.argv[1])
    report: dict[str, str] = {}
    for case, path in (("missing", out / "missing"), ("file", out / "nvme.img")):
        strategy = ZeroStrategy(stage=3, offload_optimizer="nvme", offload_parameters="nvme", nvme_path=str(path))
        try:
            cpu_trainer(strategy=strategy, max_steps=1).fit(BuiltInConfigureModel())
            report[case] = "no error: it trained"
        except Exception as err:  # noqa: BLE001 - the test checks the type and message
            report[case] = f"{type(err).__name__}: {err}"
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
