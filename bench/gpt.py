"""GPT-style decoder used by every row of ``bench_gpt.py``.

One definition, shared by the FSDP, raw DeepSpeed, Lightning DeepSpeedStrategy and ZeroStrategy rows, so that the rows
differ only in how they are trained. Pre-LayerNorm blocks, fused QKV projection, ``F.scaled_dot_product_attention``
(causal), GELU MLP of width 4*d_model, learned positional embeddings, output head tied to the token embedding
(GPT-2 style). Plain PyTorch only: no DeepSpeed or Lightning imports here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304
    seq_len: int = 1024
    d_model: int = 2048
    n_layer: int = 16
    n_head: int = 16
    # Recompute each Block's activations in the backward pass (torch.utils.checkpoint, non-reentrant): a larger
    # micro-batch fits for about 1/3 more compute.
    grad_ckpt: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (b, t, c) -> (b, n_head, t, head_dim)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx, targets)`` returns the mean next-token cross-entropy (computed in float32)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len={self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            if self.cfg.grad_ckpt and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def count_params(model: nn.Module) -> int:
    """Distinct parameters (the tied embedding/head weight counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_count_for(cfg: GPTConfig) -> int:
    """Closed form of ``count_params(GPT(cfg))`` without building the model."""
    d, v, s, n = cfg.d_model, cfg.vocab_size, cfg.seq_len, cfg.n_layer
    per_block = 12 * d * d + 4 * d  # qkv 3d^2 + proj d^2 + mlp 8d^2, two LayerNorms (weight+bias)
    return v * d + s * d + n * per_block + 2 * d


def make_tokens(n_samples: int, seq_len: int, vocab_size: int, seed: int, device: str | torch.device,
                data: str = "random") -> torch.Tensor:
    """``n_samples`` rows of ``seq_len + 1`` token ids (input = row[:-1], target = row[1:]).

    ``data="random"``: uniform random ids (the loss cannot fall below ln(vocab_size); enough for throughput).
    ``data="markov"``: a fixed random Markov chain in which every token has 4 equally likely successors, so a model
    can learn it down to ln 4 = 1.39: the curve to compare convergence of numerically different runs on.
    Generated directly on ``device`` from a generator seeded with ``seed``, so every row of the benchmark sees the
    same data.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    if data == "random":
        return torch.randint(0, vocab_size, (n_samples, seq_len + 1), device=device, generator=g, dtype=torch.long)
    if data != "markov":
        raise ValueError(f"data={data!r}: use 'random' or 'markov'.")
    successors = torch.randint(0, vocab_size, (vocab_size, 4), device=device, generator=g, dtype=torch.long)
    choice = torch.randint(0, 4, (n_samples, seq_len), device=device, generator=g, dtype=torch.long)
    rows = torch.empty(n_samples, seq_len + 1, device=device, dtype=torch.long)
    rows[:, 0] = torch.randint(0, vocab_size, (n_samples,), device=device, generator=g, dtype=torch.long)
    for t in range(seq_len):
        rows[:, t + 1] = successors[rows[:, t], choice[:, t]]
    return rows


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[:, :-1], batch[:, 1:]
