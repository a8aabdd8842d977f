"""Hugging Face models through ZeroStrategy on 2 processes: tied weights loaded strictly from a save_pretrained folder
(stages 0 and 3, the tie kept through partitioning and training), the full-model export (`--format hf`) that
`from_pretrained` loads, and the PEFT adapter export (`--format peft`, also from exclude_frozen_parameters
checkpoints) that `PeftModel.from_pretrained` loads, each with equal weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from ckpt_helpers import fit
from helpers import max_diff, train_plain
from lightning_zero import ZeroStrategy, consolidate_checkpoint, load_full_state_dict
from lightning_zero.cli import main as cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.distributed
VOCAB, SEQ, N, STEPS = 64, 8, 16, 2


def save_tiny(folder: Path, kind: str) -> Path:
    """A tiny tied model (GPT-2, or Llama with tie_word_embeddings) written by save_pretrained: no lm_head.weight."""
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
    else:
        config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                          max_position_embeddings=SEQ, tie_word_embeddings=True, bos_token_id=0,
                                          eos_token_id=0)  # no pad_token_id: HF inits padding_idx in place
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


class Tokens(Dataset):
    def __init__(self, n: int = N) -> None:
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(3))
        self.y = self.x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _lora(kind: str) -> Any:
    modules = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)


class CausalLM(L.LightningModule):
    """A transformers model built from its config in configure_model (partitioned at stage 3) and loaded strictly
    from a save_pretrained folder, optionally wrapped in a LoRA adapter."""

    def __init__(self, folder: str, kind: str, lora: bool = False) -> None:
        super().__init__()
        self.folder, self.kind, self.lora = folder, kind, lora
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(1)  # not the saved init: the values must come from the folder
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(self.folder))
        assert load_full_state_dict(model, self.folder) == ([], [])  # strict: lm_head.weight comes through the tie
        self.model = peft.get_peft_model(model, _lora(self.kind)) if self.lora else model

    def base(self) -> Any:
        return self.model.get_base_model() if self.lora else self.model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.model(input_ids=x, labels=y).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(), batch_size=2)


class CheckTie(L.Callback):
    """Writes, per rank, whether the output embedding is the input embedding's Parameter at train start and end."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def _check(self, pl_module: CausalLM) -> None:
        base = pl_module.base()
        self.seen.append(base.get_output_embeddings().weight is base.get_input_embeddings().weight)

    def on_train_start(self, trainer: L.Trainer, pl_module: CausalLM) -> None:
        self._check(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: CausalLM) -> None:
        self._check(pl_module)
        torch.save(self.seen, self.folder / f"tie_{trainer.global_rank}.pt")


def _run(tmp: Path, kind: str, stage: int, lora: bool, **strategy: Any) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    folder = save_tiny(tmp / kind, kind)
    saver = ModelCheckpoint(dirpath=tmp / "ckpts", every_n_train_steps=STEPS, save_top_k=-1)
    weights = fit(tmp, ZeroStrategy(stage=stage, start_method="spawn", **strategy), CausalLM(str(folder), kind, lora),
                  STEPS, callbacks=[saver, CheckTie(tmp)])
    assert [torch.load(tmp / f"tie_{rank}.pt") for rank in (0, 1)] == [[True, True]] * 2, "the tie was lost"
    return folder, tmp / "ckpts" / f"epoch=0-step={STEPS}.ckpt", {k.removeprefix("model."): v
                                                                    for k, v in weights.items()}


def _plain_reference(folder: Path) -> dict[str, torch.Tensor]:
    """Plain single-process PyTorch over the same global batches (the model as from_pretrained loads it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    train_plain(lambda x, y: model(input_ids=x, labels=y).loss, opt, STEPS, data=Tokens(), batch_size=2)
    return dict(model.state_dict())


def test_gpt2_stage3_tied_load_parity_and_hf_export(tmp_path):
    from safetensors import safe_open

    folder, checkpoint, weights = _run(tmp_path, "gpt2", 3, lora=False)
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]  # gathered once, shared like state_dict()
    diff = max_diff(weights, _plain_reference(folder))
    print(f"GPT-2 stage 3 vs plain PyTorch: max abs diff {diff:.3g}")
    assert diff <= 1e-5, diff

    files = consolidate_checkpoint(checkpoint, tmp_path / "hf", format="hf", progress=False)
    assert {p.name for p in files} == {"config.json", "generation_config.json", "model.safetensors"}
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f, \
            safe_open(folder / "model.safetensors", "pt") as saved_by_hf:
        assert sorted(f.keys()) == sorted(saved_by_hf.keys())  # the tied copy left out, as save_pretrained does
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert max_diff(dict(loaded.state_dict()), weights) == 0.0
    # bf16, sharded: Hugging Face's index and dtype, which from_pretrained follows
    files = consolidate_checkpoint(checkpoint, tmp_path / "bf16", format="hf", dtype="bf16", max_shard_size="2KB",
                                   progress=False)
    assert len([p for p in files if p.suffix == ".safetensors"]) > 2 and (tmp_path / "bf16" / "model.safetensors"
                                                                          ".index.json") in files
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16 and half.lm_head.weight is half.transformer.wte.weight
    assert max_diff(dict(half.state_dict()), {k: v.to(torch.bfloat16) for k, v in weights.items()}) == 0.0
    with pytest.raises(ValueError, match="is a transformers GPT2LMHeadModel without a PEFT adapter: export it with"
                                         r" format='hf' \(--format hf\)"):
        consolidate_checkpoint(checkpoint, tmp_path / "adapter", format="peft")
    with pytest.raises(ValueError, match=r"model='net' is not a Hugging Face model of .*it holds 'model'"
                                         r" \(GPT2LMHeadModel\)"):
        consolidate_checkpoint(checkpoint, tmp_path / "hf2", format="hf", model="net")


def _check_adapter(folder: Path, out: Path, weights: dict[str, torch.Tensor], kind: str) -> None:
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["r"] == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    loaded = peft.PeftModel.from_pretrained(base, out)
    state = dict(loaded.state_dict())
    assert any("lora_A" in k for k in state) and max_diff(state, weights) == 0.0


def test_llama_lora_stage3_peft_export(tmp_path):
    folder, checkpoint, weights = _run(tmp_path, "llama", 3, lora=True)  # default block fetch, frozen base
    assert cli(["consolidate", str(checkpoint), str(tmp_path / "adapter"), "--format", "peft", "--no-progress"]) == 0
    _check_adapter(folder, tmp_path / "adapter", weights, "llama")
    with pytest.raises(ValueError, match=r"The model at 'model' is a PEFT model \(PeftModel\): export its"
                                         r" adapter with format='peft'"):
        consolidate_checkpoint(checkpoint, tmp_path / "hf", format="hf")


def test_gpt2_lora_stage0_exclude_frozen_peft_export(tmp_path):
    folder, checkpoint, weights = _run(tmp_path, "gpt2", 0, lora=True, exclude_frozen_parameters=True)
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert "model.base_model.model.transformer.wte.weight" in meta["engines"]["model"]["excluded"]
    (out,) = {p.parent for p in consolidate_checkpoint(checkpoint, tmp_path / "adapter", format="peft",
                                                       progress=False)}
    _check_adapter(folder, out, weights, "gpt2")


def test_finetune_example_exports_an_adapter_that_generates_like_the_ranks(tmp_path):
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[2] / "examples" / "finetune_hf.py"
    run = subprocess.run([sys.executable, str(example), "--steps", "4", "--prompts", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generates 4/4 of the ranks' generations exactly" in run.stdout, run.stdout
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    meta = json.loads((tmp_path / "lora.ckpt" / "meta.json").read_text())
    assert meta["stage"] == 3 and meta["engines"]["model"]["excluded"]  # the frozen base was left out
