"""The speed defaults (lightning_zero/tuning.py): filled only where the config is silent and the value is unused."""

import sys

import pytest
import torch
from torch import nn

from lightning_zero.tuning import block_fetch_threshold, resolve_block_fetch, resolve_speed_defaults



def resolved(config, world_size=2, **kwargs):
    """The speed defaults for ``world_size`` processes (2 unless a test is about one process)."""
    return resolve_speed_defaults(config, world_size=world_size, **kwargs)

def cfg(stage=2, clip=0.0, bf16=True, fp16=False, **zero):
    config = {"zero_optimization": {"stage": stage, **zero}, "gradient_clipping": clip}
    if bf16:
        config["bf16"] = {"enabled": True}
    if fp16:
        config["fp16"] = {"enabled": True}
    return config


def test_bf16_skips_the_overflow_check():
    assert resolved(cfg())["bf16"] == {"enabled": True, "check_grad_overflow": False}


def test_legacy_bfloat16_section_too():
    out = resolved({"zero_optimization": {"stage": 3}, "bfloat16": {"enabled": True}})
    assert out["bfloat16"]["check_grad_overflow"] is False


def test_explicit_user_values_win():
    config = cfg(compute_grad_norm=True)
    config["bf16"]["check_grad_overflow"] = True
    out = resolved(config)
    assert out["bf16"]["check_grad_overflow"] is True
    assert out["zero_optimization"]["compute_grad_norm"] is True


def test_fp16_keeps_its_overflow_check():
    out = resolved(cfg(bf16=False, fp16=True))
    assert out["fp16"] == {"enabled": True}
    assert "bf16" not in out


@pytest.mark.parametrize("stage", [1, 2])
def test_norm_skipped_at_stages_1_2_when_nothing_clips(stage):
    assert resolved(cfg(stage=stage))["zero_optimization"]["compute_grad_norm"] is False
    assert resolved(cfg(stage=stage, bf16=False))["zero_optimization"]["compute_grad_norm"] is False


@pytest.mark.parametrize("config", [
    cfg(stage=0),
    cfg(stage=3),  # DeepSpeed supports compute_grad_norm=false at stages 1-2 only
    cfg(stage=2, clip=1.0),  # clipping needs the norm
    cfg(stage=2, offload_optimizer={"device": "cpu"}),  # DeepSpeed refuses it with offload
    {**cfg(stage=1), "data_types": {"grad_accum_dtype": "fp32"}},  # DeepSpeed's BF16_Optimizer path needs it
], ids=["stage0", "stage3", "clipping", "offload", "stage1-bf16-fp32-accumulation"])
def test_norm_kept_where_it_is_needed_or_unsupported(config):
    assert "compute_grad_norm" not in resolved(config)["zero_optimization"]


def test_offload_device_none_is_not_offload():
    out = resolved(cfg(stage=2, offload_optimizer={"device": "none"}))
    assert out["zero_optimization"]["compute_grad_norm"] is False


def test_resolved_configs_are_accepted_by_deepspeed():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage in (1, 2):
        out = resolved(cfg(stage=stage))
        DeepSpeedZeroConfig(**out["zero_optimization"])
        DeepSpeedBF16Config(**out["bf16"])


def test_stage3_reduce_bucket_matches_lightnings_and_the_config_wins():
    assert resolved(cfg(stage=3))["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert "reduce_bucket_size" not in resolved(cfg(stage=2))["zero_optimization"]
    mine = cfg(stage=3)
    mine["zero_optimization"]["reduce_bucket_size"] = 5e8
    assert resolved(mine)["zero_optimization"]["reduce_bucket_size"] == 5e8


# --- stage 3 fetch units (resolve_block_fetch) -------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)  # 32
        self.up = nn.Linear(width, 2 * width)  # 544
        self.down = nn.Linear(2 * width, width)  # 528


class Net(nn.Module):
    def __init__(self, embedding: int = 0) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)  # 144
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        if embedding:
            self.table = nn.Embedding(embedding, 16)


def stage3() -> dict:
    return {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}


def test_block_granularity_as_deepspeed_computes_it():
    # a Block: 1104 parameters over 4 layers (norm, up, down, itself) -> 276
    with torch.device("meta"):
        net = Net(embedding=1000)
    threshold, units = block_fetch_threshold(net)
    assert threshold == 1104 // 4
    assert units == list(net.blocks)
    # the parent: 3 * 1104 + 144 + 16000 parameters over 12 + 2 + 1 layers = 1299 > 276, so only the blocks are units
    config, note = resolve_block_fetch(stage3(), net)
    assert config["zero_optimization"]["stage3_module_granularity_threshold"] == 276
    assert "Block x3" in note and "stage3_module_granularity_threshold=276" in note


def test_blocks_are_named_when_no_threshold_singles_them_out():
    with torch.device("meta"):
        net = Net()  # parent: 3456 / 14 = 246 <= 276, a threshold would make the whole model one unit
    assert block_fetch_threshold(net) is None
    config, note = resolve_block_fetch(stage3(), net)
    assert config["zero_optimization"]["leaf_module"] == {"names": ["blocks.0", "blocks.1", "blocks.2"]}
    assert "stage3_module_granularity_threshold" not in config["zero_optimization"]
    assert "leaf_module" in note


def test_partitioned_parameters_count_with_their_full_size():
    with torch.device("meta"):
        net = Net(embedding=1000)
    for p in net.parameters():  # what zero.Init leaves behind: an empty tensor and the full count in ds_numel
        p.ds_numel = p.numel()
        p.data = torch.empty(0, device="meta")
    assert block_fetch_threshold(net)[0] == 276


@pytest.mark.parametrize("config", [
    {"zero_optimization": {"stage": 2}},
    {"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 0}},
    {"zero_optimization": {"stage": 3, "leaf_module": {"classes": ["Block"]}}},
])
def test_block_fetch_leaves_other_stages_and_explicit_settings_alone(config):
    with torch.device("meta"):
        net = Net(embedding=1000)
    assert resolve_block_fetch(config, net) == (config, None)


def test_no_blocks_no_change():
    with torch.device("meta"):
        plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))  # repeated, but torch leaves
        huge = nn.ModuleList(nn.Sequential(nn.Linear(40_000, 30_000)) for _ in range(2))  # 1.2e9 > DeepSpeed's cap
    assert resolve_block_fetch(stage3(), plain) == (stage3(), None)
    assert resolve_block_fetch(stage3(), huge) == (stage3(), None)
    assert block_fetch_threshold(huge) is None


def test_speed_defaults_return_a_new_config():
    config = cfg(stage=2)
    before = {**config, "zero_optimization": dict(config["zero_optimization"]), "bf16": dict(config["bf16"])}
    out = resolved(config)
    assert config == before  # the input is unchanged
    assert out is not config and out["zero_optimization"] is not config["zero_optimization"]
    assert out["zero_optimization"]["compute_grad_norm"] is False


# ----------------------------------------------------------------------------------------------------------------------
# the per-call fetch-unit hooks (issue 14: their cheap tests come first, with the same outcome)
# ----------------------------------------------------------------------------------------------------------------------


def test_unit_input_hook_aliases_only_inputs_of_a_trained_unit_that_need_it():
    from deepspeed.utils import set_z3_leaf_module

    from lightning_zero.tuning import _input_hook

    unit, frozen_input = nn.Linear(4, 4), torch.randn(2, 4)
    assert _input_hook(unit, (frozen_input,)) is None  # not (or no longer) a fetch unit
    set_z3_leaf_module(unit, True)
    (alias,) = _input_hook(unit, (frozen_input,))
    assert alias.requires_grad and torch.equal(alias, frozen_input) and not frozen_input.requires_grad
    assert _input_hook(unit, (torch.randn(2, 4, requires_grad=True),)) is None  # the embedding trains
    assert _input_hook(unit, (torch.arange(4),)) is None  # no floating-point input
    with torch.no_grad():
        assert _input_hook(unit, (frozen_input,)) is None
    unit.requires_grad_(False)  # frozen after setup (e.g. by a callback): decided per call
    assert _input_hook(unit, (frozen_input,)) is None


def test_unit_counter_sees_a_gradient_anywhere_in_the_output():
    from lightning_zero.engines import _needs_grad

    x, y = torch.randn(2, requires_grad=True) * 2, torch.randn(2)
    assert _needs_grad(x) and not _needs_grad(y) and not _needs_grad(None)
    assert _needs_grad((x, None)) and _needs_grad((y, x)) and _needs_grad({"h": [y, x]})
    assert not _needs_grad((y, None)) and not _needs_grad(()) and not _needs_grad({"h": y})


def test_one_process_at_stage_3_keeps_parameters_whole():
    """World size 1: one partition, so a gathered parameter is a view of it; the persistence threshold keeps every
    parameter whole instead of gathering and releasing it around each block."""
    zero = resolved(cfg(stage=3), world_size=1)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == sys.maxsize
    assert zero["memory_efficient_linear"] is False  # every weight stays whole: torch's linear costs nothing more
    assert "memory_efficient_linear" not in resolved(cfg(stage=3))["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in resolved(cfg(stage=3))["zero_optimization"]  # 2 processes


@pytest.mark.parametrize("config, kwargs", [
    (cfg(stage=3, offload_param={"device": "cpu"}), {}),  # the partition lives on the host
    (cfg(stage=3, offload_param={"device": "nvme", "nvme_path": "/tmp"}), {}),
    (cfg(stage=3, zero_quantized_weights=True), {}),  # a gathered parameter is a dequantized copy
    (cfg(stage=3, zero_quantized_nontrainable_weights=True), {}),  # the same for frozen ones (a LoRA base)
    (cfg(stage=3), {"deepcompile": True}),  # DeepCompile schedules the gathers itself
    (cfg(stage=2), {}),
], ids=["offload-cpu", "offload-nvme", "quantized-weights", "quantized-frozen-weights", "deepcompile", "stage2"])
def test_one_process_keeps_gathering_where_whole_parameters_would_cost(config, kwargs):
    zero = resolved(config, world_size=1, **kwargs)["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in zero and "memory_efficient_linear" not in zero


def test_one_process_respects_the_users_persistence_threshold():
    zero = resolved(cfg(stage=3, stage3_param_persistence_threshold=0), world_size=1)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    assert "memory_efficient_linear" not in zero  # gathered weights: DeepSpeed's linear lets them go early
    mine = resolved(cfg(stage=3, memory_efficient_linear=True), world_size=1)["zero_optimization"]
    assert mine["memory_efficient_linear"] is True
    on = resolved(cfg(stage=3, offload_param={"device": "none"}), world_size=1)["zero_optimization"]
    assert on["stage3_param_persistence_threshold"] == sys.maxsize  # device "none" is no offload
