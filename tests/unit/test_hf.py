"""lightning_zero.hf and tuning.track_unit_inputs: the Hugging Face link, the capture of writes to partitioned
parameters (one real process group of one rank, real zero.Init) and the transformers/DeepSpeed internals they rely on."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_zero import hf
from lightning_zero.tuning import _inputs_requiring_grad

STAGE3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


# ----------------------------------------------------------------------------------------------------------------------
# contracts: the transformers and DeepSpeed internals hf.py and tuning.py reach into (checked with transformers 5.24,
# DeepSpeed 0.19.8); a rename upstream fails here, naming the symbol
# ----------------------------------------------------------------------------------------------------------------------


def test_transformers_internals_exist():
    pytest.importorskip("transformers")
    from transformers import modeling_utils
    from transformers.integrations import deepspeed as hf_ds

    for name in ("_hf_deepspeed_config_weak_ref", "set_hf_deepspeed_config", "unset_hf_deepspeed_config",
                 "is_deepspeed_zero3_enabled", "prevent_arange_dtype_change", "HfDeepSpeedConfig"):
        assert hasattr(hf_ds, name), name
    assert hasattr(modeling_utils, "set_zero3_state") and hasattr(modeling_utils, "_is_ds_init_called")
    assert "_initialize_weights" in modeling_utils.PreTrainedModel.__dict__
    with modeling_utils.set_zero3_state():
        assert modeling_utils._is_ds_init_called is True  # from_config / from_pretrained skip their own zero.Init
    assert modeling_utils._is_ds_init_called is False


def test_deepspeed_internals_exist():
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import z3_leaf_module

    assert ZeroParamStatus.NOT_AVAILABLE and callable(z3_leaf_module)
    for name in hf._INIT_FUNCTIONS:
        assert callable(getattr(nn.init, name)), name


# ----------------------------------------------------------------------------------------------------------------------
# HfZero3Link
# ----------------------------------------------------------------------------------------------------------------------


def test_link_turns_zero3_on_and_off_and_restores_a_users_config():
    pytest.importorskip("transformers")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    link = hf.HfZero3Link()
    assert not is_deepspeed_zero3_enabled()
    link.activate(STAGE3)
    assert link.active and is_deepspeed_zero3_enabled()
    link.activate({"zero_optimization": {"stage": 2}})  # already active: unchanged
    assert is_deepspeed_zero3_enabled()
    link.deactivate()
    assert not link.active and not is_deepspeed_zero3_enabled()
    link.deactivate()  # idempotent

    users = HfDeepSpeedConfig({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1})
    link.activate(STAGE3)
    assert is_deepspeed_zero3_enabled()
    link.deactivate()
    from transformers.integrations.deepspeed import _hf_deepspeed_config_weak_ref, unset_hf_deepspeed_config

    assert _hf_deepspeed_config_weak_ref() is users  # the user's own config is back
    unset_hf_deepspeed_config()


def test_link_does_nothing_without_transformers(monkeypatch):
    monkeypatch.setattr(hf, "transformers_installed", lambda: False)
    link = hf.HfZero3Link()
    link.activate(STAGE3)
    assert not link.active


def test_transformers_and_peft_are_imported_inside_functions_only():
    import ast
    from pathlib import Path

    package = Path(hf.__file__).parent
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("transformers", "peft") for n in names):
                assert node.col_offset > 0, f"{path}:{node.lineno} imports {names} at module level"


# ----------------------------------------------------------------------------------------------------------------------
# tuning: inputs of a trained fetch unit require grad
# ----------------------------------------------------------------------------------------------------------------------


def test_unit_inputs_get_a_detached_alias_that_requires_grad():
    unit = nn.Linear(4, 4)
    x, mask, ids = torch.randn(2, 4), torch.ones(2, 4), torch.arange(4)
    new = _inputs_requiring_grad(unit, (x, mask, ids, None))
    assert new is not None and new[0].requires_grad and new[1].requires_grad and not new[2].requires_grad
    assert new[3] is None and torch.equal(new[0], x) and not x.requires_grad  # the caller's tensor is untouched
    assert _inputs_requiring_grad(unit, (x.requires_grad_(),)) is None  # already requires grad
    with torch.no_grad():
        assert _inputs_requiring_grad(unit, (torch.randn(2, 4),)) is None
    unit.requires_grad_(False)
    assert _inputs_requiring_grad(unit, (torch.randn(2, 4),)) is None  # frozen unit: no backward through it


# ----------------------------------------------------------------------------------------------------------------------
# writes to partitioned parameters, under a real zero.Init (one rank)
# ----------------------------------------------------------------------------------------------------------------------


class Writes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        nn.init.orthogonal_(self.a.weight)  # reads the shape first
        nn.init.kaiming_normal_(self.b.weight)
        nn.init.trunc_normal_(self.a.bias, std=0.3)
        self.b.bias.data.normal_(0.0, 0.5)  # through the .data alias
        nn.init.uniform_(tensor=self.c.bias)  # by keyword
        with torch.no_grad():
            self.c.weight.data.copy_(torch.full((4, 16), 0.25))
            self.c.weight.mul_(2.0)


def test_writes_to_partitioned_parameters_take_effect(one_rank):
    deepspeed = one_rank
    torch.manual_seed(0)
    plain = Writes()
    link = hf.HfZero3Link()
    torch.manual_seed(0)
    try:
        with hf.init_context(link, STAGE3, deepspeed.zero.Init(config_dict_or_path=STAGE3)):
            zero = Writes()
    finally:
        link.deactivate()
    params = list(zero.parameters())
    assert all(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params):
        got = {k: v.clone() for k, v in zero.state_dict().items()}
    assert got.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(got[k], v), k
    assert nn.init.normal_.__module__ == "torch.nn.init"  # the wrappers are gone again


def test_replaced_data_is_named_in_a_warning(one_rank):
    deepspeed = one_rank
    with deepspeed.zero.Init(config_dict_or_path=STAGE3):
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.warn_lost_data_assignments(net)  # nothing replaced: silent
    net[1].weight.data = torch.ones(2, 4)
    with pytest.warns(UserWarning, match=r"`\.data` of 1\.weight was replaced after zero\.Init partitioned it, so that"
                                         r" value is lost.*p\.copy_\(value\)"):
        hf.warn_lost_data_assignments(net)


def test_rotary_buffers_keep_float32_under_a_bf16_zero_init(one_rank):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    deepspeed = one_rank
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32)
    plain = LlamaRotaryEmbedding(config)
    bf16 = {**STAGE3, "bf16": {"enabled": True}}
    link = hf.HfZero3Link()
    try:
        with hf.init_context(link, bf16, deepspeed.zero.Init(config_dict_or_path=bf16)):
            rope = LlamaRotaryEmbedding(config)  # zero.Init casts torch.arange to bf16 unless transformers' guard is on
    finally:
        link.deactivate()
    assert rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.inv_freq, plain.inv_freq)


def test_a_transformers_without_the_arange_guard_warns_under_a_16_bit_zero_init(one_rank, monkeypatch):
    """transformers 5.17 (the GPU machine's) has no prevent_arange_dtype_change: stage-3 creation still works, and a
    16-bit zero.Init says what is lost and how to get it back."""
    pytest.importorskip("transformers")
    from transformers.integrations import deepspeed as hf_ds

    monkeypatch.delattr(hf_ds, "prevent_arange_dtype_change", raising=False)
    monkeypatch.setattr(hf, "_warned_arange", False)
    deepspeed = one_rank
    bf16 = {**STAGE3, "bf16": {"enabled": True}}
    link = hf.HfZero3Link()
    try:
        with pytest.warns(UserWarning, match="prevent_arange_dtype_change.*transformers>=5.24"):
            with hf.init_context(link, bf16, deepspeed.zero.Init(config_dict_or_path=bf16)):
                layer = torch.nn.Linear(4, 4)
    finally:
        link.deactivate()
    assert hasattr(layer.weight, "ds_id")
