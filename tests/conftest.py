import os

import pytest

import torch

# DeepSpeed must pick its CPU accelerator before it is first imported. With a GPU present nothing is set, so the GPU
# tier gets DeepSpeed's CUDA accelerator; `make test` sets DS_ACCELERATOR=cpu itself for the CPU tiers.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PL_DISABLE_FORK", "1")

_LEAKY = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LIGHTNING_ZERO_CONFIG")


@pytest.fixture(autouse=True)
def _no_leaked_distributed_state(request):
    """Each test starts and ends without a process group or rendezvous variables in the main process.

    Not for the GPU tier: it trains on one GPU in this process, like a script, and keeps that process group (and
    DeepSpeed's handles to it) from one test to the next."""
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    before = {k: os.environ.get(k) for k in _LEAKY}
    yield
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        pytest.fail("the test left a process group initialised in the main process")
    # Lightning's spawn launcher sets MASTER_ADDR/PORT in the main process by design; anything else is a leak.
    leaked = {k: os.environ[k] for k in _LEAKY
              if os.environ.get(k) != before[k] and k in os.environ and not k.startswith("MASTER_")}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"the test leaked environment variables: {leaked}"
