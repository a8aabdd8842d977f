"""LoRA fine-tune of a Hugging Face causal LM at ZeRO stage 3, `generate` on every rank, then the PEFT adapter export.

CPU (2 processes, a few minutes):  python examples/finetune_hf.py
GPUs (all visible GPUs, bf16):     python examples/finetune_hf.py --model /path/to/local/model   (a save_pretrained
                                   folder, e.g. a Llama; nothing is downloaded)

Without ``--model`` it builds a tiny Llama (tied embeddings) from a config and ``save_pretrained``'s it into
``--out`` first. Then:

1. fit: ``from_pretrained`` inside ``configure_model`` (at stage 3 each module is partitioned as it loads), a LoRA
   adapter on every linear layer, trained on a synthetic task (continue a run of consecutive token ids); the
   checkpoint keeps the adapter only (``exclude_frozen_parameters=True``).
2. predict: greedy ``generate`` on every rank, with prompts of different lengths on each rank at the same step
   (transformers synchronises the ranks itself at stage 3).
3. export: ``consolidate_checkpoint(..., format="peft")`` writes PEFT's adapter folder (adapter_config.json +
   adapter_model.safetensors; the same as ``lightning-zero consolidate CKPT OUT --format peft``), which rank 0 loads
   with ``PeftModel.from_pretrained(base, folder)`` in a plain process and generates again.

Prints the loss before and after training, each rank's generations with their accuracy, and how many generations of
the exported adapter equal those of the ranks (all of them on CPU in fp32).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_zero import ZeroStrategy, consolidate_checkpoint

NEW_TOKENS = 6


def tiny_llama(folder: Path) -> None:
    """A small Llama written by save_pretrained (rank 0, before the other processes start)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


class Runs(Dataset):
    """Runs of consecutive token ids (start, start+1, ...), modulo the usable vocabulary [3, vocab)."""

    def __init__(self, n: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, vocab - 3, (n,), generator=g)
        self.lengths = [length] * n if length else [3 + i % 5 for i in range(n)]  # length 0: 3 to 7 tokens
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return 3 + (self.starts[i] + torch.arange(self.lengths[i])) % (self.vocab - 3)


class LoraFineTune(L.LightningModule):
    def __init__(self, model_path: str, lr: float = 1e-2) -> None:
        super().__init__()
        self.model_path, self.lr = model_path, lr
        self.model: Any = None

    def configure_model(self) -> None:
        # Lightning calls this hook at every fit/validate/test/predict: build once.
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.model_path)  # stage 3: partitioned as it loads
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        self.model = get_peft_model(base, config)  # lora_B starts at zero at stage 3 as well

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss, sync_dist=True)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one prompt per batch: its length differs between the ranks at the same step
        out = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return batch.cpu(), out[:, batch.shape[1]:].cpu()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def accuracy(prompt: torch.Tensor, generated: torch.Tensor, vocab: int) -> float:
    """Share of generated tokens that continue the run."""
    last = prompt[:, -1:] - 3
    want = 3 + (last + torch.arange(1, generated.shape[1] + 1)) % (vocab - 3)
    return (generated == want).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local save_pretrained folder (default: a tiny Llama)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lightning_zero_finetune_hf"),
                        help="folder for the tiny model, the checkpoint and the adapter (shared by the processes)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--prompts", type=int, default=8, help="prompts to generate from (split over the ranks)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(args.out)
    model_path = Path(args.model) if args.model else out / "tiny-llama"
    if not args.model:
        tiny_llama(model_path)
    from transformers import AutoConfig

    vocab = min(AutoConfig.from_pretrained(model_path).vocab_size, 1000)

    trainer = L.Trainer(strategy=ZeroStrategy(stage=args.stage, exclude_frozen_parameters=True),
                        accelerator="gpu" if gpu else "cpu", devices=-1 if gpu else 2,
                        precision="bf16-mixed" if gpu else "32-true", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=args.steps, num_sanity_val_steps=0)
    module = LoraFineTune(str(model_path))
    train = DataLoader(Runs(64 * args.steps, 16, vocab, seed=0), batch_size=8, shuffle=True)
    val = DataLoader(Runs(64, 16, vocab, seed=1), batch_size=8)
    before = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    trainer.fit(module, train, val)
    after = trainer.callback_metrics["val_loss"].item()
    checkpoint = out / "lora.ckpt"
    trainer.save_checkpoint(checkpoint)  # a folder: every rank writes its shards of the adapter (frozen base left out)

    prompts = Runs(args.prompts, 0, vocab, seed=2)  # 3 to 7 tokens: rank 0 and rank 1 differ at every step
    results = trainer.predict(module, DataLoader(prompts, batch_size=1))
    torch.save(results, out / f"generated_rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return
    print(f"validation loss: {before:.3f} before, {after:.3f} after {args.steps} steps")
    generated = [r for rank in range(trainer.world_size) for r in torch.load(out / f"generated_rank{rank}.pt")]
    for prompt, tokens in generated:
        print(f"  prompt {prompt[0].tolist()} -> {tokens[0].tolist()} (accuracy {accuracy(prompt, tokens, vocab):.2f})")

    adapter = out / "adapter"
    consolidate_checkpoint(checkpoint, adapter, format="peft", progress=False)
    print(f"adapter: {', '.join(sorted(p.name for p in adapter.iterdir()))} in {adapter}")
    same = check_export(model_path, adapter, generated)
    print(f"the exported adapter (PeftModel.from_pretrained) generates {same}/{len(generated)} of the ranks'"
          " generations exactly")


def check_export(model_path: Path, adapter: Path, generated: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Load the adapter as a PEFT user would, in this process without ZeRO, and count equal greedy generations."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), adapter)
    model.eval()
    same = 0
    with torch.no_grad():
        for prompt, tokens in generated:
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            same += int(torch.equal(out[:, prompt.shape[1]:], tokens))
    return same


if __name__ == "__main__":
    main()
