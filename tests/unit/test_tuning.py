"""The speed defaults (lightning_zero/tuning.py): filled only where the config is silent and the value is unused."""

import pytest

from lightning_zero.tuning import apply_speed_defaults


def cfg(stage=2, clip=0.0, bf16=True, fp16=False, **zero):
    config = {"zero_optimization": {"stage": stage, **zero}, "gradient_clipping": clip}
    if bf16:
        config["bf16"] = {"enabled": True}
    if fp16:
        config["fp16"] = {"enabled": True}
    return config


def test_bf16_skips_the_overflow_check():
    assert apply_speed_defaults(cfg())["bf16"] == {"enabled": True, "check_grad_overflow": False}


def test_legacy_bfloat16_section_too():
    out = apply_speed_defaults({"zero_optimization": {"stage": 3}, "bfloat16": {"enabled": True}})
    assert out["bfloat16"]["check_grad_overflow"] is False


def test_explicit_user_values_win():
    config = cfg(compute_grad_norm=True)
    config["bf16"]["check_grad_overflow"] = True
    out = apply_speed_defaults(config)
    assert out["bf16"]["check_grad_overflow"] is True
    assert out["zero_optimization"]["compute_grad_norm"] is True


def test_fp16_keeps_its_overflow_check():
    out = apply_speed_defaults(cfg(bf16=False, fp16=True))
    assert out["fp16"] == {"enabled": True}
    assert "bf16" not in out


@pytest.mark.parametrize("stage", [1, 2])
def test_norm_skipped_at_stages_1_2_when_nothing_clips(stage):
    assert apply_speed_defaults(cfg(stage=stage))["zero_optimization"]["compute_grad_norm"] is False
    assert apply_speed_defaults(cfg(stage=stage, bf16=False))["zero_optimization"]["compute_grad_norm"] is False


@pytest.mark.parametrize("config", [
    cfg(stage=0),
    cfg(stage=3),  # DeepSpeed supports compute_grad_norm=false at stages 1-2 only
    cfg(stage=2, clip=1.0),  # clipping needs the norm
    cfg(stage=2, offload_optimizer={"device": "cpu"}),  # DeepSpeed refuses it with offload
    {**cfg(stage=1), "data_types": {"grad_accum_dtype": "fp32"}},  # DeepSpeed's BF16_Optimizer path needs it
], ids=["stage0", "stage3", "clipping", "offload", "stage1-bf16-fp32-accumulation"])
def test_norm_kept_where_it_is_needed_or_unsupported(config):
    assert "compute_grad_norm" not in apply_speed_defaults(config)["zero_optimization"]


def test_offload_device_none_is_not_offload():
    out = apply_speed_defaults(cfg(stage=2, offload_optimizer={"device": "none"}))
    assert out["zero_optimization"]["compute_grad_norm"] is False


def test_resolved_configs_are_accepted_by_deepspeed():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage in (1, 2):
        out = apply_speed_defaults(cfg(stage=stage))
        DeepSpeedZeroConfig(**out["zero_optimization"])
        DeepSpeedBF16Config(**out["bf16"])
