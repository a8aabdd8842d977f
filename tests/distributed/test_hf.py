"""Hugging Face models and PEFT adapters at ZeRO stages 0-3 on 2 CPU processes (real transformers, peft, DeepSpeed).

Two launches of hf_script.py (several Trainer calls each, the default "popen" launcher): see its docstring.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import max_diff  # noqa: E402
from hf_models import TokenData, init_models, llama_config, reference, zero3_enabled  # noqa: E402

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("hf_script.py")
ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples"),
                                                                   env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    return run


def test_fine_tune_and_lora_match_plain_pytorch_at_every_stage(tmp_path):
    run = run_script(str(tmp_path), "parity")
    # the default block fetch made each LlamaDecoderLayer one fetch unit at stage 3, LoRA included
    assert run.stderr.count("LlamaDecoderLayer x2") + run.stdout.count("LlamaDecoderLayer x2") >= 3
    for kind in ("full", "lora", "lora_gc"):
        init, final = reference(kind)
        for stage in (0, 1, 2, 3):
            result = torch.load(tmp_path / f"{kind}_{stage}.pt")
            assert result["seen_zero3"] and set(result["seen_zero3"]) == {stage == 3}, (kind, stage)
            assert max_diff(torch.load(tmp_path / f"{kind}_{stage}_init.pt"), init) == 0.0, (kind, stage)
            diff = max_diff(result["final"], final)
            print(f"{kind} stage {stage}: max abs diff {diff:.2e}")
            assert diff <= 1e-5, (kind, stage, diff)


def test_init_from_pretrained_generate_and_no_leak(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    saved = LlamaForCausalLM(llama_config())
    with torch.no_grad():  # values no initialisation would produce
        for p in saved.parameters():
            p.add_(torch.rand_like(p))
    saved.save_pretrained(tmp_path / "saved")
    want = {f"net.{k}": v for k, v in saved.state_dict().items()}
    assert not zero3_enabled()

    run = run_script(str(tmp_path), "checks")
    assert "was replaced after zero.Init" not in run.stderr  # no false alarm from hf.warn_lost_data_assignments

    # initial weights at stage 3 equal a plain single-process build with the same seed, every parameter partitioned
    result = torch.load(tmp_path / "init_models.pt")
    plain = {f"models.{k}": v for k, v in torch.nn.ModuleDict(init_models()).state_dict().items()}
    assert max_diff(result["state"], plain) == 0.0
    assert all(numel == 0 and local > 0 for numel, local in result["local"].values())
    # Hugging Face's init took effect (not torch's defaults): embeddings std 0.02, LoRA B zero
    state = result["state"]
    assert abs(state["models.llama.model.embed_tokens.weight"].std() - 0.02) < 0.003
    assert all(v.abs().max() == 0 for k, v in state.items() if "lora_B" in k)
    assert state["models.llama.model.embed_tokens.weight"][0].abs().max() == 0  # weight[padding_idx] zeroed

    # from_pretrained at stage 3: exactly the saved values, loaded into the partitions
    assert max_diff(torch.load(tmp_path / "pretrained_state.pt"), want) == 0.0
    total = sum(p.numel() for p in saved.parameters())
    outputs = {}
    for rank in (0, 1):
        gen = torch.load(tmp_path / f"generate_{rank}.pt")
        assert gen["loaded"]["ds"] and gen["loaded"]["numel"] == 0
        assert total / 2 <= gen["loaded"]["local"] <= total / 2 + 64
        assert gen["seen_zero3"] == [True, True]
        outputs[rank] = gen
    # uneven-length greedy generate (3 and 6 prompt tokens, max_length=14) equals plain Hugging Face generate
    for rank, gen in outputs.items():
        plain_ids = saved.generate(gen["prompt"], max_length=14, do_sample=False, pad_token_id=0)
        assert torch.equal(gen["ids"], plain_ids), rank
    assert outputs[0]["prompt"].shape[1] == 3 and outputs[1]["prompt"].shape[1] == 6

    # transformers saw ZeRO-3 only during the stage-3 runs: not before, not after, not in the later stage-2 run
    leak = torch.load(tmp_path / "leak.pt")
    assert leak == {"before": False, "after_stage3": False, "after_stage2": False}
    late = torch.load(tmp_path / "late_stage2.pt")
    assert set(late["seen_zero3"]) == {False}
