"""The NVMe folder checks in processes that torchrun started (no ZeroStrategy launcher, so no pre-launch check),
launched by tests/distributed/test_bad_inputs_distributed.py as

    torchrun --nproc-per-node 2 tests/distributed/bad_inputs_script.py OUT_DIR

Each rank fits a stage-3 model built in configure_model (inside zero.Init, whose NVMe swapper would create
<nvme_path>/zero_stage_3) with a missing nvme_path, then with one that is a file, and writes the errors it got to
OUT_DIR/rank{global}.json; then it fits a model too large for any stage with stage="auto".
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


class Huge(Regressor):
    """4e10 parameters in configure_model (160 GB in fp32): stage="auto" must refuse it after counting it on the meta
    device, on every rank (rank 0 decides and broadcasts), before zero.Init allocates anything."""

    def configure_model(self) -> None:
        self.layers = nn.ModuleList(nn.Linear(200_000, 50_000, bias=False) for _ in range(4))


def _fit(strategy: ZeroStrategy, model: Regressor) -> str:
    try:
        cpu_trainer(strategy=strategy, max_steps=1).fit(model)
        return "no error: it trained"
    except Exception as err:  # noqa: BLE001 - the test checks the type and message
        return f"{type(err).__name__}: {err}"


def main() -> None:
    out = Path(sys.argv[1])
    report: dict[str, str] = {}
    for case, path in (("missing", out / "missing"), ("file", out / "nvme.img")):
        strategy = ZeroStrategy(stage=3, offload_optimizer="nvme", offload_parameters="nvme", nvme_path=str(path))
        report[case] = _fit(strategy, BuiltInConfigureModel())
    report["auto"] = _fit(ZeroStrategy(stage="auto"), Huge())
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
