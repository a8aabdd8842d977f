"""ZeroStrategy(compile=...): the networks are torch.compile-d in place and training keeps parity with plain PyTorch."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import Regressor, SaveFullWeights, cpu_trainer, max_diff, reference_weights
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, CLIP = 4, 2, 0.5


class AssertCompiled(Callback):
    """Checks inside the worker that the network, not the LightningModule, was compiled."""

    def on_train_end(self, trainer, pl_module):
        from lightning_zero.compiling import is_compiled

        assert is_compiled(pl_module.net), "the network was not compiled"
        assert not is_compiled(pl_module), "the LightningModule itself was compiled"


# stage 1 on one process: compiled networks with the gradients written straight into the partition
# (_compat.deepspeed.write_gradients_into_partition); stages 2-3 on two, through DeepSpeed's reduction
@pytest.mark.parametrize(("stage", "compile", "devices"),
                         [(2, True, 2), (3, {"backend": "aot_eager"}, 2), (1, {"backend": "aot_eager"}, 1)],
                         ids=["stage2-inductor", "stage3-aot_eager", "stage1-aot_eager-one-process"])
def test_compiled_training_keeps_parity(tmp_path, stage, compile, devices):
    out = tmp_path / "weights.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=stage, compile=compile, start_method="spawn"),
                          callbacks=[SaveFullWeights(str(out)), AssertCompiled()], max_steps=STEPS,
                          accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP, devices=devices)
    trainer.fit(Regressor())
    want = reference_weights(world_size=devices, steps=STEPS, accumulate=ACCUMULATE, clip=CLIP)
    assert max_diff(torch.load(out), want) <= 1e-5


def test_a_compiled_module_is_refused_before_launch():
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=2, start_method="spawn"), max_steps=1)
    with pytest.raises(ValueError, match=r"compiled \(torch.compile\).*ZeroStrategy\(compile=True\)"):
        trainer.fit(torch.compile(Regressor()))


def test_deepcompile_on_cpu_is_refused_before_launch():
    """DeepCompile's runtime is CUDA only: a CPU fit stops in the main process, naming torch.compile instead."""
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, compile="deepcompile", start_method="spawn"), max_steps=1)
    with pytest.raises(ValueError, match=r"compile='deepcompile'\) needs CUDA GPUs.*Use compile=True"):
        trainer.fit(Regressor())


@pytest.mark.parametrize("network", ["custom module", "Sequential"])
def test_deepcompile_glue_runs_through_a_real_engine(monkeypatch, network):
    """DeepCompile itself needs CUDA, but its glue runs on CPU: `DeepSpeedEngine.compile()` makes one
    `module.compile(backend=...)` call, which `deepcompile_engine` points at the LightningModule's networks (an
    `nn.Sequential` through its forward, see compiling._compile_in_place), and `engine(...)` then runs the compiled
    graph. GPU parity: tests/gpu/test_deepcompile.py."""
    import socket

    import deepspeed
    from torch import nn

    from helpers import LossInside
    from lightning_zero.compiling import deepcompile_engine, is_compiled

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    # DeepSpeed caches its world group across engines; this test's process group lasts only as long as the test
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        module = LossInside() if network == "custom module" else Regressor()
        net = module.loss_net if network == "custom module" else module.net
        engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters()),
                                          config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
        assert deepcompile_engine(engine, module, {"backend": "aot_eager"}) == [net]
        assert is_compiled(net) and not is_compiled(module)
        assert engine.is_compiled and "compile" not in module.__dict__  # the redirect is undone
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        out = engine(x, y) if network == "custom module" else nn.functional.mse_loss(engine(x), y)
        graph = out.grad_fn if network == "custom module" else out.grad_fn.next_functions[0][0]
        assert type(graph).__name__ == "CompiledFunctionBackward"  # through DeepSpeed's forward and output hooks
    finally:
        torch.distributed.destroy_process_group()
