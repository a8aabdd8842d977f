"""Pure parts of the Hugging Face support, one process: tied keys in load_full_state_dict and gather_full_state_dict,
and what a checkpoint records for `consolidate --format hf/peft` (equal to what save_pretrained writes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_zero import consolidate_checkpoint, gather_full_state_dict, load_full_state_dict
from lightning_zero import export

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2(seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def test_tied_copy_left_out_by_save_pretrained_loads_strictly(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    model = _gpt2(seed=1)
    assert load_full_state_dict(model, tmp_path) == ([], [])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(_gpt2().state_dict().values(), model.state_dict().values()))
    # the tie's other name alone loads too; a key without a tie is still reported
    left_out = ("transformer.wte.weight", "transformer.ln_f.bias")
    state = {k: v for k, v in _gpt2().state_dict().items() if k not in left_out}
    with pytest.raises(ValueError, match=r"^The checkpoint does not match the model: 1 missing key\(s\):"
                                         r" transformer.ln_f.bias\."):
        load_full_state_dict(_gpt2(seed=1), state)


def test_tied_keys_with_different_values_raise_before_loading():
    model = _gpt2(seed=1)
    before = model.transformer.wte.weight.detach().clone()
    state = dict(_gpt2().state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="The weights hold different values for 'transformer.wte.weight' and"
                                         " 'lm_head.weight', which are one tied parameter in the model"):
        load_full_state_dict(model, state)
    assert torch.equal(model.transformer.wte.weight, before)


def test_gather_shares_tied_tensors_like_state_dict():
    model = _gpt2()
    state = gather_full_state_dict(model, rank_zero_only=True, is_rank_zero=True)
    assert list(state) == list(model.state_dict())
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Holder(nn.Module):
    def __init__(self, lora: bool) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        base = _gpt2()
        self.model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"])) if lora else base


def test_records_match_what_save_pretrained_writes(tmp_path):
    from safetensors import safe_open

    holder = Holder(lora=False)
    export.record_models(holder, tmp_path / "ckpt")
    records = json.loads((tmp_path / "ckpt" / "hf" / "models.json").read_text())
    assert records == {"model": {"kind": "transformers", "class": "GPT2LMHeadModel",
                                 "tied": {"lm_head.weight": "transformer.wte.weight"}, "dir": "0"}}
    holder.model.save_pretrained(tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "ckpt" / "hf" / "0" / name).read_text() == (tmp_path / "hf" / name).read_text()
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert sorted(export.hf_keys("model", records["model"], holder.state_dict())) == sorted(f.keys())

    lora = Holder(lora=True)
    export.record_models(lora, tmp_path / "ckpt_lora")
    records = json.loads((tmp_path / "ckpt_lora" / "hf" / "models.json").read_text())
    assert list(records) == ["model"] and records["model"]["kind"] == "peft"  # the inner GPT-2 is not recorded
    lora.model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = records["model"]["adapters"]["default"]["keys"]
        assert sorted(keys) == sorted(f.keys())
        assert all(keys[k].startswith("model.base_model.model.") and ".default." in keys[k] for k in keys)
    recorded = tmp_path / "ckpt_lora" / "hf" / "0" / "adapters" / "default" / "adapter_config.json"
    assert json.loads(recorded.read_text()) == json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert lora.model.peft_config["default"].inference_mode is False  # the live config is left as it was


def test_nothing_recorded_or_imported_without_hf_models(tmp_path):
    script = (f"import sys, torch\nfrom pathlib import Path\nfrom lightning_zero import export\n"
              "before = {m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft')}\n"
              f"export.record_models(torch.nn.Linear(2, 2), Path({str(tmp_path)!r}))\n"
              "after = {m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft')}\n"
              "assert after == before, sorted(after - before)\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert not (tmp_path / "hf").exists()


def test_export_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="format='onnx' is not supported. Use 'ckpt', 'safetensors', 'hf'"):
        consolidate_checkpoint(tmp_path, tmp_path / "out", format="onnx")
    with pytest.raises(ValueError, match="model='model' picks the model of a format='hf' or 'peft' export"):
        consolidate_checkpoint(tmp_path, tmp_path / "out", format="safetensors", model="model")
    records = {"a": {"kind": "transformers", "class": "GPT2LMHeadModel"},
               "b": {"kind": "transformers", "class": "LlamaForCausalLM"}}
    with pytest.raises(ValueError, match=r"holds several transformers models: 'a' \(GPT2LMHeadModel\), 'b'"
                                         r" \(LlamaForCausalLM\)\. Pick one with model=\.\.\. \(--model a\)"):
        export.pick(records, None, "transformers", "ckpt")
    assert export.pick(records, "b", "transformers", "ckpt")[0] == "b"
    with pytest.raises(ValueError, match="holds no PEFT model; it holds"):
        export.pick(records, None, "peft", "ckpt")
    with pytest.raises(ValueError, match="holds no Hugging Face model record"):
        export.read_records(tmp_path, "ckpt")


def test_contracts_of_the_transformers_attributes_export_reads():
    """export.py reads two attributes of transformers 5 models; a rename upstream must fail here, not silently keep
    tied copies or drop a custom model's code."""
    model = _gpt2()
    assert model.all_tied_weights_keys == {"lm_head.weight": "transformer.wte.weight"}  # _tied_copies
    assert hasattr(transformers.PreTrainedModel, "_auto_class")  # _save_config: save_pretrained's custom-code test
    from transformers.dynamic_module_utils import custom_object_save  # noqa: F401
