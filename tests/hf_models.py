"""Tiny Hugging Face models (built from configs, nothing downloaded), token data and the plain-PyTorch reference for
the Hugging Face tests (tests/distributed/test_hf.py, tests/distributed/hf_script.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

STEPS, LR, VOCAB, SEQ = 3, 1e-3, 64, 12
EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")


class TokenData(Dataset):
    """Random token sequences; the labels are the inputs (causal LM loss)."""

    def __init__(self, n: int = 32, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.y = self.x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, attn_implementation="sdpa")  # pad: HF's init zeroes weight[padding_idx]


def gpt2_config() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                      eos_token_id=0)


def lora(base: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def build(kind: str, seed: int = 0) -> nn.Module:
    """``full``: a Llama trained in full; ``lora`` / ``lora_gc``: LoRA on it (with gradient checkpointing)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config())
    if kind == "lora_gc":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base if kind == "full" else lora(base)


class UserInit(nn.Module):
    """A user's own initialisation after the layers were built (partitioned, at stage 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        nn.init.orthogonal_(self.a.weight)
        nn.init.zeros_(self.a.bias)
        self.b.weight.data.normal_(0.0, 0.5)
        with torch.no_grad():
            self.b.bias.copy_(torch.arange(16.0))
            self.c.weight.data.copy_(torch.full((4, 16), 0.25))
            self.c.bias.fill_(-1.0)
            self.c.weight.mul_(2.0)


def init_models(seed: int = 0) -> dict[str, nn.Module]:
    """Models whose initial weights at stage 3 must equal a plain build's: Llama (constructor and from_config),
    GPT-2, LoRA on Llama, examples/train.py's GPT and UserInit."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    from train import GPT

    models = {}
    torch.manual_seed(seed)
    models["llama"] = LlamaForCausalLM(llama_config())
    models["llama_from_config"] = AutoModelForCausalLM.from_config(llama_config())
    models["gpt2"] = GPT2LMHeadModel(gpt2_config())
    models["lora"] = lora(LlamaForCausalLM(llama_config()))
    models["gpt"] = GPT(vocab=VOCAB, dim=32, layers=2, heads=4, seq=16)
    models["user"] = UserInit()
    return models


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def reference(kind: str, world_size: int = 2, batch_size: int = 2) -> tuple[dict, dict]:
    """Initial and final weights of plain single-process PyTorch over the same global batches (keys as in FineTune)."""
    from helpers import train_plain

    net = build(kind)
    init = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    train_plain(lambda x, y: net(input_ids=x, labels=y).loss, opt, STEPS, data=TokenData(), world_size=world_size,
                batch_size=batch_size)
    return init, {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


def std(t: torch.Tensor) -> float:
    return float(t.float().std()) if t.numel() > 1 else math.nan
