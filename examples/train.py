"""Train a small GPT-style language model with ZeroStrategy(stage=3) and watch the loss fall.

The model is created in `configure_model`, so at stage 3 its parameters are partitioned as they are created.

CPU (2 processes, what `make demo` runs):   python examples/train.py
GPUs (all visible GPUs, bf16):              python examples/train.py   (picks CUDA when available)
Compiled (GPUs):                            python examples/train.py --compile deepcompile   (or --compile torch)
Several nodes (torchrun):                   torchrun --nnodes 2 --nproc-per-node 8 ... examples/train.py --num-nodes 2

The network returns its own loss (`gpt(tokens, targets)`), nanoGPT-style, so that a compiled graph (torch.compile or
DeepCompile) covers the cross-entropy with the head.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_zero import ZeroStrategy


class Repeats(Dataset):
    """Sequences that repeat a random motif: easy to learn, so the loss visibly falls within a minute on CPU."""

    def __init__(self, n: int = 512, seq: int = 32, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, vocab, (n, 4), generator=g)
        self.data = motifs.repeat(1, seq // 4 + 1)[:, : seq + 1]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        # Build each layer (no copy.deepcopy of a template layer: copying partitioned parameters breaks them).
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with ``targets`` the mean cross-entropy."""
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        logits = self.head(self.blocks(x))
        if targets is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class TinyGPT(L.LightningModule):
    def __init__(self, vocab: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, seq: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()

    def configure_model(self) -> None:
        self.gpt = GPT(**self.hparams)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.gpt(*batch)
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        if self.trainer.is_global_zero and batch_idx % 8 == 0:
            print(f"epoch {self.current_epoch} step {self.global_step:3d} loss {loss.item():.3f}", flush=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Repeats(seq=self.hparams.seq), batch_size=16, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--compile", choices=["none", "torch", "deepcompile"], default="none",
                        help="torch: torch.compile of the GPT; deepcompile: DeepSpeed's DeepCompile (CUDA only)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    trainer = L.Trainer(
        strategy=ZeroStrategy(stage=args.stage, compile={"none": False, "torch": True, "deepcompile": "deepcompile"}[
            args.compile]),
        accelerator="gpu" if gpu else "cpu",
        devices=-1 if gpu else 2,
        num_nodes=args.num_nodes,
        precision="bf16-mixed" if gpu else "32-true",
        max_epochs=args.epochs,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyGPT())
    if trainer.is_global_zero:
        print(f"final loss {trainer.callback_metrics['loss'].item():.3f}")


if __name__ == "__main__":
    main()
