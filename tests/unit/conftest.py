import socket
import sys
from pathlib import Path

import pytest

# the spawned workers import test modules by name; make tests/helpers.py importable everywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    """A real one-rank gloo process group through DeepSpeed (released afterwards); yields the deepspeed module.
    DeepSpeed caches its groups per process: build at most one engine per test."""
    import deepspeed
    import torch

    port = _free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed("gloo", distributed_port=port)
    try:
        yield deepspeed
    finally:
        torch.distributed.destroy_process_group()
        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups

        ds_comm.cdb = None
        # DeepSpeed caches the groups of the destroyed process group: the next test's engine would use them
        groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
        groups.mpu = None
