"""Stage 3 fetches repeated blocks as one unit (tuning.resolve_block_fetch) and still trains exactly like plain PyTorch."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import IN, OUT, RandomDataset, Regressor, _global_batches, cpu_trainer, max_diff, train_plain
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE, LR = 4, 2, 1e-2


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class BlockNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3, recompute: bool = False, wide_input: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        # wide_input: more parameters outside the blocks (like a token embedding), so that DeepSpeed's granularity
        # threshold can single the blocks out; without it the blocks are named as leaf modules instead.
        self.inp = nn.Sequential(nn.Linear(IN, 256), nn.Linear(256, width)) if wide_input else nn.Linear(IN, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute and torch.is_grad_enabled() else block(x)
        return self.out(x)


def make_block_net(recompute: bool = False, wide_input: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return BlockNet(recompute=recompute, wide_input=wide_input)


class BlockRegressor(Regressor):
    def __init__(self, recompute: bool = False, wide_input: bool = False) -> None:
        super().__init__()
        self.net = make_block_net(recompute, wide_input)


class SaveWeightsAndUnits(L.Callback):
    """Rank 0 writes the full weights and the classes DeepSpeed treats as one fetch unit (z3 leaf modules)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        units = sorted({type(m).__name__ for m in pl_module.modules() if getattr(m, "_z3_leaf", False)})
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            torch.save({"weights": state, "units": units}, self.path)


def reference(wide_input: bool = False) -> dict[str, torch.Tensor]:
    net = make_block_net(wide_input=wide_input)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01)
    train_plain(lambda x, y: nn.functional.mse_loss(net(x), y), opt, STEPS, accumulate=ACCUMULATE)
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("kwargs,recompute,wide_input", [
    ({}, False, True),  # granularity threshold (DeepSpeed's fast path for leaf modules)
    ({"offload_optimizer": "cpu", "offload_parameters": "cpu"}, False, True),
    ({}, True, True),  # activation checkpointing: the recompute fetches each block again
    ({}, False, False),  # leaf_module.names
])
def test_stage3_block_units_keep_parity(tmp_path, kwargs, recompute, wide_input):
    out = tmp_path / "result.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn", **kwargs), max_steps=STEPS,
                          accumulate_grad_batches=ACCUMULATE, callbacks=[SaveWeightsAndUnits(str(out))])
    trainer.fit(BlockRegressor(recompute=recompute, wide_input=wide_input))
    result = torch.load(out)
    assert result["units"] == ["Block"]  # the default made each Block one fetch unit, and nothing else
    assert max_diff(result["weights"], reference(wide_input)) <= 1e-5


def test_granularity_threshold_from_the_config_wins(tmp_path):
    out = tmp_path / "result.pt"
    config = {"zero_optimization": {"stage3_module_granularity_threshold": 0}}
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, config=config, start_method="spawn"), max_steps=STEPS,
                          accumulate_grad_batches=ACCUMULATE, callbacks=[SaveWeightsAndUnits(str(out))])
    trainer.fit(BlockRegressor())
    result = torch.load(out)
    assert result["units"] == []  # DeepSpeed's per-layer fetching, as asked
    assert max_diff(result["weights"], reference()) <= 1e-5


class BlockDistill(L.LightningModule):
    """A frozen block-structured teacher inside the trained module's engine: its blocks are fetch units too, with no
    gradients to reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.student = make_block_net(wide_input=True)
        torch.manual_seed(5)
        self.teacher = BlockNet(wide_input=True).requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return distill_loss(self.student, self.teacher, *batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.student.parameters(), lr=LR, weight_decay=0.01)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(RandomDataset(64), batch_size=4, shuffle=False)


def distill_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = student(x)
    return nn.functional.mse_loss(out, y) + nn.functional.mse_loss(out, teacher(x))


def test_frozen_block_teacher_in_the_engine(tmp_path):
    out = tmp_path / "result.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), max_steps=STEPS,
                          callbacks=[SaveWeightsAndUnits(str(out))])
    module = BlockDistill()
    teacher_before = {f"teacher.{k}": v.clone() for k, v in module.teacher.state_dict().items()}
    trainer.fit(module)
    result = torch.load(out)
    assert result["units"] == ["Block"]

    ref = BlockDistill()
    opt = torch.optim.AdamW(ref.student.parameters(), lr=LR, weight_decay=0.01)
    train_plain(lambda x, y: distill_loss(ref.student, ref.teacher, x, y), opt, STEPS)
    got = result["weights"]
    want = {f"student.{k}": v for k, v in ref.student.state_dict().items()}
    assert max_diff({k: got[k] for k in want}, want) <= 1e-5
    assert max_diff({k: got[k] for k in teacher_before}, teacher_before) == 0.0


class Coder(nn.Module):
    def __init__(self, n_in: int, n_out: int, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.out = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def make_coders() -> tuple[nn.Module, nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(3)
    encoder, decoder = Coder(IN, 4), Coder(4, IN)
    return encoder, decoder, [torch.optim.AdamW(m.parameters(), lr=LR) for m in (encoder, decoder)]


class BlockSharedLoss(L.LightningModule):
    """One loss reaches two engines (encoder, decoder), each of whose blocks is a fetch unit."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder, self.decoder, _ = make_coders()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        self.manual_backward(nn.functional.mse_loss(self.decoder(self.encoder(x)), x))
        for opt in self.optimizers():
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self) -> Any:
        return [torch.optim.AdamW(m.parameters(), lr=LR) for m in (self.encoder, self.decoder)]

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(RandomDataset(64), batch_size=4, shuffle=False)


def test_one_loss_into_two_engines_with_block_units(tmp_path):
    out = tmp_path / "result.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, config=LEAF_BLOCKS, start_method="spawn"),
                          max_steps=2 * STEPS,
                          callbacks=[SaveWeightsAndUnits(str(out))])
    trainer.fit(BlockSharedLoss())
    result = torch.load(out)
    assert result["units"] == ["Block"]

    encoder, decoder, opts = make_coders()
    batches = _global_batches(RandomDataset(64), 2, 4)
    for _ in range(STEPS):
        x, _ = next(batches)
        nn.functional.mse_loss(decoder(encoder(x)), x).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    want = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    want.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    assert max_diff(result["weights"], want) <= 1e-5


class BlockGAN(L.LightningModule):
    """Two engines; the generator's step goes back through the toggled, block-structured discriminator."""

    def __init__(self, once: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.once = once
        self.g, self.d = make_gan_coders()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x, _ = batch
        for opt, which in ((opt_d, 0), (opt_g, 1)):
            self.toggle_optimizer(opt)
            self.manual_backward(gan_loss(self.g, self.d, x, self.once, which))
            opt.step()
            opt.zero_grad()
            self.untoggle_optimizer(opt)

    def configure_optimizers(self) -> Any:
        return [torch.optim.AdamW(m.parameters(), lr=LR) for m in (self.g, self.d)]

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(RandomDataset(64), batch_size=4, shuffle=False)


def make_gan_coders() -> tuple[nn.Module, nn.Module]:
    encoder, decoder, _ = make_coders()
    return decoder, encoder  # generator: 4 -> IN; discriminator: IN -> 4


def gan_loss(g: nn.Module, d: nn.Module, x: torch.Tensor, once: bool, which: int) -> torch.Tensor:
    """The discriminator's (which=0) or the generator's (1) loss; the "noise" is a function of the batch."""
    fake = g(torch.tanh(x)[:, :4])
    if which == 1:
        return d(fake).pow(2).mean()
    if once:  # the discriminator runs once, on real and generated data together
        both = d(torch.cat([x, fake.detach()]))
        return both[:len(x)].pow(2).mean() + (both[len(x):] - 1).pow(2).mean()
    return d(x).pow(2).mean() + (d(fake.detach()) - 1).pow(2).mean()


LEAF_BLOCKS = {"zero_optimization": {"leaf_module": {"classes": ["Block"]}}}


@pytest.mark.parametrize(("config", "once", "units"), [
    (None, False, []),  # several trained models keep per-layer fetching by default: D runs twice per step
    (LEAF_BLOCKS, True, ["Block"]),  # units asked for: the generator's step goes through D's units without reducing
])
def test_gan_with_a_block_discriminator(tmp_path, config, once, units):
    out = tmp_path / "result.pt"
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, config=config, start_method="spawn"), max_steps=2 * STEPS,
                          callbacks=[SaveWeightsAndUnits(str(out))])
    trainer.fit(BlockGAN(once))
    result = torch.load(out)
    assert result["units"] == units

    g, d = make_gan_coders()
    opt_g, opt_d = (torch.optim.AdamW(m.parameters(), lr=LR) for m in (g, d))
    batches = _global_batches(RandomDataset(64), 2, 4)
    for _ in range(STEPS):
        x, _ = next(batches)
        for opt, which, frozen in ((opt_d, 0, g), (opt_g, 1, d)):
            frozen.requires_grad_(False)  # Lightning's toggle_optimizer
            gan_loss(g, d, x, once, which).backward()
            opt.step()
            opt.zero_grad()
            frozen.requires_grad_(True)
    want = {f"g.{k}": v for k, v in g.state_dict().items()}
    want.update({f"d.{k}": v for k, v in d.state_dict().items()})
    assert max_diff(result["weights"], want) <= 1e-5


class TwiceRegressor(Regressor):
    """A siamese-style loss: the same blocks run on two views before one backward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_block_net(wide_input=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y) + nn.functional.mse_loss(self(0.5 * x), y)


def test_a_block_called_twice_gets_a_clear_error(tmp_path):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"), max_steps=2)
    with pytest.raises(Exception, match=r"net\.blocks\.0 \(Block\) ran a second time before the backward of its first"
                                        r" call(.|\n)*stage3_module_granularity_threshold': 0"):
        trainer.fit(TwiceRegressor())


def test_a_block_called_twice_trains_with_per_layer_fetching(tmp_path):
    out = tmp_path / "result.pt"
    config = {"zero_optimization": {"stage3_module_granularity_threshold": 0}}  # the fix the message names
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, config=config, start_method="spawn"), max_steps=STEPS,
                          callbacks=[SaveWeightsAndUnits(str(out))])
    trainer.fit(TwiceRegressor())
    result = torch.load(out)
    assert result["units"] == []

    ref = TwiceRegressor()
    opt = torch.optim.AdamW(ref.net.parameters(), lr=LR, weight_decay=0.01)
    train_plain(lambda x, y: nn.functional.mse_loss(ref.net(x), y) + nn.functional.mse_loss(ref.net(0.5 * x), y),
                opt, STEPS)
    assert max_diff(result["weights"], {f"net.{k}": v for k, v in ref.net.state_dict().items()}) <= 1e-5


class BlockPredictor(L.LightningModule):
    """Inference at stage 3 (an engine without an optimizer): the blocks are fetch units in the forward only."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out, self.predictions = out, []
        self.net = make_block_net(wide_input=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.predictions.append(self.net(batch[0]))
        return self.predictions[-1]

    def on_predict_end(self) -> None:
        units = sorted({type(m).__name__ for m in self.modules() if getattr(m, "_z3_leaf", False)})
        torch.save({"units": units, "predictions": torch.cat(self.predictions)}, f"{self.out}.{self.global_rank}")

    def predict_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(RandomDataset(16), batch_size=4)


def test_predict_with_block_units(tmp_path):
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"))
    out = str(tmp_path / "result.pt")
    trainer.predict(BlockPredictor(out))
    with torch.no_grad():
        want = make_block_net(wide_input=True)(RandomDataset(16).x)
    for rank in (0, 1):  # each rank predicts its share of the rows (DistributedSampler without shuffling)
        result = torch.load(f"{out}.{rank}")
        assert result["units"] == ["Block"]
        assert torch.allclose(result["predictions"], want[rank::2], atol=1e-6)
