"""Two "nodes" x 2 processes on one machine through torchrun (Lightning's TorchElasticEnvironment supplies the ranks):
every rank sees world size 4 and its node rank, and all ranks end with the weights of plain PyTorch over the same
global batches (world size 4). Each case starts two `torchrun --nnodes 2 --nproc-per-node 2 --node-rank R` commands,
as two machines would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import max_diff, reference_weights

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("multinode_script.py")
STEPS, ACCUMULATE, CLIP = 6, 2, 0.5  # as in multinode_script.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(out: Path, stage: int, hpz: int = 1, timeout: float = 240) -> list[dict]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "NODE_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [subprocess.Popen([*torchrun, "--node-rank", str(rank), str(SCRIPT), str(out), str(stage), str(hpz)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=timeout)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank} exited with {node.returncode}:\n{log[-6000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize(("stage", "hpz"), [(2, 1), (3, 2)])
def test_two_nodes_of_two_processes_keep_parity(tmp_path, stage, hpz):
    """Stage 3 runs with ZeRO++ hierarchical partitioning (hpZ) of size 2: DeepSpeed keeps a secondary copy of the
    weights partitioned within each node (ranks {0,1} and {2,3}); it works on CPU (gloo) in DeepSpeed 0.19.8."""
    reports = run_two_nodes(tmp_path, stage, hpz)
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in reports] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert {(r["world_size"], r["torch_world_size"], r["num_nodes"], r["environment"]) for r in reports} == {
        (4, 4, 2, "TorchElasticEnvironment")}
    if hpz > 1:
        assert {(r["hpz"], tuple(r["secondary"])) for r in reports} == {(2, ("Tensor",))}  # every parameter has one
    want = reference_weights(world_size=4, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    for r in reports:
        assert max_diff(r["weights"], want) <= 1e-5, r["global_rank"]
