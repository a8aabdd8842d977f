"""Hugging Face / PEFT checks on 2 CPU processes, several Trainer calls per launch (run by test_hf.py).

``python hf_script.py OUT parity``: full fine-tune, LoRA and LoRA with gradient checkpointing at stages 0-3 (rank 0
writes the final and the initial full weights of each run). ``python hf_script.py OUT checks``: initial weights of
several models at stage 3, ``from_pretrained`` at stage 3, uneven-length ``generate`` in predict_step, and whether
transformers sees ZeRO-3 before, during and after each run (a stage-2 run last). The default "popen" launcher re-runs
this script once for rank 1, so every Trainer call below runs on both processes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from hf_models import (LR, STEPS, TokenData, build, init_models, zero3_enabled)  # noqa: E402
from lightning_zero import ZeroStrategy  # noqa: E402


def trainer(stage: int, **kwargs: Any) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=2, strategy=ZeroStrategy(stage=stage), logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class FineTune(L.LightningModule):
    def __init__(self, kind: str, out: str) -> None:
        super().__init__()
        self.kind, self.out, self.net = kind, out, None
        self.seen_zero3: list[bool] = []

    def configure_model(self) -> None:
        if self.net is None:
            self.net = build(self.kind)
        self.seen_zero3.append(zero3_enabled())

    def on_fit_start(self) -> None:
        state = self.trainer.strategy.lightning_module_state_dict()
        if self.trainer.is_global_zero:
            torch.save(state, f"{self.out}_init.pt")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen_zero3.append(zero3_enabled())
        x, y = batch
        return self.net(input_ids=x, labels=y).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenData(), batch_size=2)

    def on_fit_end(self) -> None:
        state = self.trainer.strategy.lightning_module_state_dict()
        if self.trainer.is_global_zero:
            torch.save({"final": state, "seen_zero3": self.seen_zero3}, f"{self.out}.pt")


class InitModels(L.LightningModule):
    """Every model kind whose initial weights must equal a plain single-process build with the same seed."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out, self.models = out, None

    def configure_model(self) -> None:
        if self.models is None:
            self.models = nn.ModuleDict(init_models())

    def on_predict_start(self) -> None:
        state = self.trainer.strategy.lightning_module_state_dict()
        local = {n: (p.numel(), getattr(p, "ds_tensor", p).numel()) for n, p in self.named_parameters()}
        if self.trainer.is_global_zero:
            torch.save({"state": state, "local": local}, f"{self.out}/init_models.pt")

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(range(2), batch_size=1)


class Pretrained(L.LightningModule):
    """``from_pretrained(folder)`` in configure_model, then uneven-length greedy ``generate`` in predict_step."""

    def __init__(self, folder: str, out: str) -> None:
        super().__init__()
        self.folder, self.out, self.net = folder, out, None
        self.seen_zero3: list[bool] = []

    def configure_model(self) -> None:
        from transformers import AutoModelForCausalLM

        self.seen_zero3.append(zero3_enabled())
        if self.net is None:
            self.net = AutoModelForCausalLM.from_pretrained(self.folder)
        params = list(self.net.parameters())
        self.loaded = {"numel": sum(p.numel() for p in params), "ds": all(hasattr(p, "ds_id") for p in params),
                       "local": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))}

    def on_predict_start(self) -> None:
        state = self.trainer.strategy.lightning_module_state_dict()
        if self.trainer.is_global_zero:
            torch.save(state, f"{self.out}/pretrained_state.pt")

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_zero3.append(zero3_enabled())
        rank = self.trainer.global_rank
        prompt = TokenData().x[rank, : 3 + 3 * rank].unsqueeze(0)  # 3 tokens on rank 0, 6 on rank 1
        ids = self.net.generate(prompt, max_length=14, do_sample=False, pad_token_id=0)
        torch.save({"prompt": prompt, "ids": ids, "seen_zero3": self.seen_zero3, "loaded": self.loaded},
                   f"{self.out}/generate_{rank}.pt")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(range(2), batch_size=1)


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "parity":
        for stage in (0, 1, 2, 3):
            for kind in ("full", "lora", "lora_gc"):
                t = trainer(stage, max_steps=STEPS)
                t.fit(FineTune(kind, f"{out}/{kind}_{stage}"))
        return
    before = zero3_enabled()
    t = trainer(3)
    t.predict(InitModels(out), return_predictions=False)
    t = trainer(3)
    model = Pretrained(f"{out}/saved", out)
    t.predict(model, return_predictions=False)
    after_stage3 = zero3_enabled()
    t = trainer(2, max_steps=2)
    late = FineTune("full", f"{out}/late_stage2")
    t.fit(late)
    if t.is_global_zero:
        torch.save({"before": before, "after_stage3": after_stage3, "after_stage2": zero3_enabled()}, f"{out}/leak.pt")


if __name__ == "__main__":
    main()
