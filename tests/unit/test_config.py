"""lightning_zero.config: loading, validation, keyword knobs and Trainer-flag resolution (pure functions)."""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest

from lightning_zero.config import (
    CONFIG_ENV_VAR,
    KNOWN_TOP_LEVEL_KEYS,
    TrainerFlags,
    ZeroConfigError,
    inference_config,
    load_user_config,
    merge_knobs,
    resolve_ds_config,
    resolve_knobs,
    validate_user_config,
    zero_stage,
)


def resolve(user: dict[str, Any] | None = None, knobs: dict[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
    return resolve_ds_config(user or {}, knobs or {}, TrainerFlags(**flags))


# ----------------------------------------------------------------------------------------------------------------------
# load_user_config
# ----------------------------------------------------------------------------------------------------------------------


def test_load_none_is_empty() -> None:
    assert load_user_config(None, environ={}) == {}


def test_load_dict_is_deep_copied() -> None:
    user = {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}
    loaded = load_user_config(user, environ={})
    assert loaded == user
    loaded["zero_optimization"]["stage"] = 1
    loaded["new"] = 1
    assert user == {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}


def test_load_json_path(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert load_user_config(path, environ={}) == {"zero_optimization": {"stage": 3}}
    assert load_user_config(str(path), environ={}) == {"zero_optimization": {"stage": 3}}


def test_load_env_var(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.5}))
    assert load_user_config(None, environ={CONFIG_ENV_VAR: str(path)}) == {"gradient_clipping": 0.5}
    # an explicit config wins over the environment
    assert load_user_config({"steps_per_print": 3}, environ={CONFIG_ENV_VAR: str(path)}) == {"steps_per_print": 3}
    # an empty variable means "not set"
    assert load_user_config(None, environ={CONFIG_ENV_VAR: ""}) == {}


def test_load_env_var_missing_file_names_the_variable(tmp_path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ZeroConfigError, match=re.escape(f"${CONFIG_ENV_VAR} points to {missing!r}, which is not a"
                                                        " file.")):
        load_user_config(None, environ={CONFIG_ENV_VAR: missing})


def test_load_missing_file(tmp_path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"ZeroStrategy(config=...) points to {missing!r}, which is not a file. Pass a path to a DeepSpeed JSON"
            " config or a dict.")):
        load_user_config(missing, environ={})


def test_load_directory(tmp_path) -> None:
    with pytest.raises(ZeroConfigError, match=r"which is not a file\. It is a directory; pass the JSON file inside it"):
        load_user_config(tmp_path, environ={})


def test_load_invalid_json(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{'stage': 3}")
    with pytest.raises(ZeroConfigError, match=r"which is not valid JSON: Expecting property name .*Fix the file or"
                                              r" pass a dict\."):
        load_user_config(path, environ={})


def test_load_binary_file(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ZeroConfigError, match=r"which is not valid JSON"):
        load_user_config(path, environ={})


def test_load_non_object_json(tmp_path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ZeroConfigError, match=r"file '.*list\.json' holds a list; it must hold a JSON object \(a"
                                              r" DeepSpeed config\)\."):
        load_user_config(path, environ={})


def test_load_wrong_type() -> None:
    with pytest.raises(TypeError, match=re.escape("ZeroStrategy(config=...) got a int; pass a dict, a path to a"
                                                  " DeepSpeed JSON config, or None.")):
        load_user_config(3, environ={})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------------
# validate_user_config
# ----------------------------------------------------------------------------------------------------------------------


def test_validate_accepts_a_typical_config() -> None:
    validate_user_config({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1,
        "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    })


def test_validate_unknown_top_level_key_suggests() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("unknown key 'zero_optimisation'. Did you mean"
                                                        " 'zero_optimization'?")):
        validate_user_config({"zero_optimisation": {"stage": 3}})


def test_validate_unknown_key_without_close_match() -> None:
    with pytest.raises(ZeroConfigError, match=r"unknown key 'qqqqqqqq'\.\n"):
        validate_user_config({"qqqqqqqq": 1})


def test_validate_unknown_zero_key_suggests() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("unknown key 'zero_optimization.reduce_bucket_sise'. Did you"
                                                        " mean 'reduce_bucket_size'?")):
        validate_user_config({"zero_optimization": {"reduce_bucket_sise": 5}})


def test_validate_unknown_nested_offload_key_suggests() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("unknown key 'zero_optimization.offload_optimizer.pin_memroy'."
                                                        " Did you mean 'pin_memory'?")):
        validate_user_config({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memroy": True}}})


@pytest.mark.parametrize(("config", "message"), [
    ({"gradient_clipping": "big"}, "'gradient_clipping' must be int or float (or \"auto\"), got str: 'big'"),
    ({"train_micro_batch_size_per_gpu": True},
     "'train_micro_batch_size_per_gpu' must be int (or \"auto\"), got bool: True"),
    ({"gradient_accumulation_steps": 2.0}, "'gradient_accumulation_steps' must be int (or \"auto\"), got float: 2.0"),
    ({"zero_allow_untested_optimizer": 1}, "'zero_allow_untested_optimizer' must be bool (or \"auto\"), got int: 1"),
    ({"zero_optimization": 3}, "'zero_optimization' must be a JSON object (dict), got int: 3"),
    ({"fp16": True}, "'fp16' must be a JSON object (dict), got bool: True"),
    ({"zero_optimization": {"stage": "three"}}, "'zero_optimization.stage' = 'three': must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 4}}, "'zero_optimization.stage' = 4: must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
     "'zero_optimization.offload_optimizer.device' = 'gpu': Input should be 'none', 'cpu' or 'nvme'"),
    ({"train_micro_batch_size_per_gpu": 0}, "'train_micro_batch_size_per_gpu' must be at least 1, got 0"),
    ({"gradient_accumulation_steps": -1}, "'gradient_accumulation_steps' must be at least 1, got -1"),
    ({"gradient_clipping": -1.0}, "'gradient_clipping' must be at least 0, got -1.0"),
])
def test_validate_wrong_types(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ZeroConfigError, match=r"^The DeepSpeed config has problems:\n  - " + re.escape(message)
                       + r"\nFix these keys \(see https://www\.deepspeed\.ai/docs/config-json/\)\.$"):
        validate_user_config(config)


def test_validate_rejects_managed_gradient_accumulation() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("'managed_gradient_accumulation': lightning_zero lets the"
                                                        " Trainer own the accumulation boundary; remove the key")):
        validate_user_config({"managed_gradient_accumulation": False})


def test_validate_reports_every_problem_in_one_error() -> None:
    with pytest.raises(ZeroConfigError) as info:
        validate_user_config({
            "zero_optimisation": {}, "gradient_clipping": "big", "train_micro_batch_size_per_gpu": True,
            "managed_gradient_accumulation": True, "bf16": {"enabled": True, "typo": 1},
            "zero_optimization": {"stage": "three", "reduce_bucket_sise": 1},
        })
    lines = str(info.value).splitlines()
    assert lines[0] == "The DeepSpeed config has problems:"
    assert lines[1:-1] == [
        "  - unknown key 'zero_optimisation'. Did you mean 'zero_optimization'?",
        "  - 'gradient_clipping' must be int or float (or \"auto\"), got str: 'big'",
        "  - 'train_micro_batch_size_per_gpu' must be int (or \"auto\"), got bool: True",
        "  - 'managed_gradient_accumulation': lightning_zero lets the Trainer own the accumulation boundary; remove"
        " the key",
        "  - 'zero_optimization.stage' = 'three': must be 0, 1, 2 or 3",
        "  - unknown key 'zero_optimization.reduce_bucket_sise'. Did you mean 'reduce_bucket_size'?",
        "  - unknown key 'bf16.typo'.",
    ]


def test_validate_checks_the_legacy_bfloat16_section() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("unknown key 'bfloat16.enabeld'. Did you mean 'enabled'?")):
        validate_user_config({"bfloat16": {"enabeld": True}})


class _RecordingDict(dict):
    """A config that records every top-level key DeepSpeed looks up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)


class _FakeMpu:
    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def test_known_top_level_keys_cover_installed_deepspeed() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _RecordingDict({"train_batch_size": 1})
    DeepSpeedConfig(recorder, mpu=_FakeMpu())
    assert len(recorder.seen) > 30, "the recorder saw almost nothing: DeepSpeed no longer reads through get/[]/in"
    unknown = recorder.seen - KNOWN_TOP_LEVEL_KEYS
    assert not unknown, f"DeepSpeed reads keys missing from KNOWN_TOP_LEVEL_KEYS: {sorted(unknown)}"


# ----------------------------------------------------------------------------------------------------------------------
# resolve_knobs
# ----------------------------------------------------------------------------------------------------------------------


def test_knobs_none_means_not_given() -> None:
    assert resolve_knobs() == {}
    assert resolve_knobs(stage=None, offload_optimizer=None, offload_parameters=False, reduce_bucket_size=None) == {}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_knobs_stage(stage: int) -> None:
    assert resolve_knobs(stage=stage) == {"zero_optimization": {"stage": stage}}


@pytest.mark.parametrize("stage", [True, False, 4, -1, "3", 3.0])
def test_knobs_invalid_stage(stage: Any) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(f"ZeroStrategy(stage={stage!r}) is not supported. Use 0, 1,"
                                                        " 2 or 3.")):
        resolve_knobs(stage=stage)


def test_knobs_offload_cpu() -> None:
    assert resolve_knobs(stage=3, offload_optimizer="cpu", offload_parameters=True, pin_memory=True) == {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}}}


def test_knobs_offload_true_means_cpu() -> None:
    assert resolve_knobs(offload_optimizer=True) == {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}


def test_knobs_offload_nvme() -> None:
    knobs = resolve_knobs(stage=3, offload_optimizer="nvme", offload_parameters="nvme", nvme_path="/nvme",
                          optimizer_buffer_count=4, params_buffer_count=5, params_buffer_size=10**8, max_in_cpu=10**9)
    assert knobs == {"zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme", "buffer_count": 4},
        "offload_param": {"device": "nvme", "nvme_path": "/nvme", "buffer_count": 5, "buffer_size": 10**8,
                          "max_in_cpu": 10**9},
    }}


def test_knobs_offload_cpu_ignores_nvme_only_path_when_other_is_nvme() -> None:
    knobs = resolve_knobs(offload_optimizer="cpu", offload_parameters="nvme", nvme_path="/nvme")
    assert knobs["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert knobs["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/nvme"}


@pytest.mark.parametrize(("name", "value"), [("offload_optimizer", "gpu"), ("offload_parameters", "disk"),
                                             ("offload_optimizer", 1), ("offload_parameters", 0)])
def test_knobs_invalid_offload(name: str, value: Any) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(f"ZeroStrategy({name}={value!r}) is not supported. Use"
                                                        " False, \"cpu\" or \"nvme\".")):
        resolve_knobs(**{name: value})


@pytest.mark.parametrize(("kwargs", "orphan"), [
    ({"nvme_path": "/nvme"}, "nvme_path (needs offload_optimizer='nvme' or offload_parameters='nvme')"),
    ({"nvme_path": "/nvme", "offload_optimizer": "cpu"},
     "nvme_path (needs offload_optimizer='nvme' or offload_parameters='nvme')"),
    ({"pin_memory": True}, "pin_memory (needs offload_optimizer or offload_parameters)"),
    ({"optimizer_buffer_count": 4, "offload_parameters": "cpu"}, "optimizer_buffer_count (needs offload_optimizer)"),
    ({"max_in_cpu": 10}, "max_in_cpu (needs offload_parameters)"),
])
def test_knobs_refinement_without_its_offload(kwargs: dict[str, Any], orphan: str) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(f"ZeroStrategy got {orphan} without the offload it configures,"
                                                        " so it would be ignored.")):
        resolve_knobs(**kwargs)


def test_knobs_extra_zero_keys_pass_through() -> None:
    assert resolve_knobs(stage=2, reduce_bucket_size=10**6, contiguous_gradients=False, overlap_comm=None) == {
        "zero_optimization": {"reduce_bucket_size": 10**6, "contiguous_gradients": False, "stage": 2}}


# ----------------------------------------------------------------------------------------------------------------------
# merge_knobs
# ----------------------------------------------------------------------------------------------------------------------


def test_merge_conflict_lists_both_values() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            "ZeroStrategy keywords contradict the DeepSpeed config:\n"
            "  - zero_optimization.reduce_bucket_size: ZeroStrategy(...) says 5, the config says 7\n"
            "  - zero_optimization.stage: ZeroStrategy(...) says 3, the config says 2\n"
            "Set each value in one place only (either the keyword or the config).")):
        merge_knobs({"zero_optimization": {"stage": 2, "reduce_bucket_size": 7}},
                    resolve_knobs(stage=3, reduce_bucket_size=5))


def test_merge_agreeing_values_accepted() -> None:
    user = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 1.0}
    merged = merge_knobs(user, resolve_knobs(stage=3, overlap_comm=True, reduce_bucket_size=5))
    assert merged == {"zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5},
                      "gradient_clipping": 1.0}


def test_merge_string_stage_agrees_with_int_keyword() -> None:
    assert merge_knobs({"zero_optimization": {"stage": "3"}}, resolve_knobs(stage=3))["zero_optimization"] == {
        "stage": 3}


def test_merge_auto_in_config_is_replaced() -> None:
    merged = merge_knobs({"zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto"}},
                         resolve_knobs(stage=1, reduce_bucket_size=9))
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 9}


def test_merge_offload_sections_key_by_key() -> None:
    user = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "pin_memory": True}}}
    merged = merge_knobs(user, resolve_knobs(offload_optimizer="nvme"))
    assert merged["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": "/x",
                                                                 "pin_memory": True}
    merged = merge_knobs({"zero_optimization": {"offload_optimizer": {"pin_memory": True}}},
                         resolve_knobs(offload_optimizer="cpu"))
    assert merged["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_merge_offload_conflict_names_the_nested_key() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("zero_optimization.offload_optimizer.device: ZeroStrategy(...)"
                                                        " says 'nvme', the config says 'cpu'")):
        merge_knobs({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
                    resolve_knobs(offload_optimizer="nvme", nvme_path="/x"))


@pytest.mark.parametrize(("user", "knobs"), [
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, {}),
    ({}, {"zero_optimization": {"offload_param": {"device": "nvme"}}}),
])
def test_merge_nvme_offload_needs_a_path(user: dict[str, Any], knobs: dict[str, Any]) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            "zero_optimization.offload_param offloads to NVMe but names no nvme_path. Pass"
            " ZeroStrategy(nvme_path=...) with the offload keyword, or set zero_optimization.offload_param.nvme_path"
            " in the config.")):
        merge_knobs(user, knobs)


def test_merge_rejects_a_non_dict_zero_section() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("'zero_optimization' must be a JSON object (dict), got int:"
                                                        " 3")):
        merge_knobs({"zero_optimization": 3}, resolve_knobs(stage=3))


def test_merge_does_not_mutate_or_share() -> None:
    user = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    knobs = resolve_knobs(stage=3, offload_optimizer="cpu", pin_memory=True)
    user_before, knobs_before = copy.deepcopy(user), copy.deepcopy(knobs)
    merged = merge_knobs(user, knobs)
    merged["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    merged["zero_optimization"]["offload_param"]["device"] = "nvme"
    assert user == user_before and knobs == knobs_before


# ----------------------------------------------------------------------------------------------------------------------
# resolve_ds_config: mappings
# ----------------------------------------------------------------------------------------------------------------------


def test_resolve_defaults() -> None:
    config = resolve()
    assert config == {
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.0,
        "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": 1,
        "managed_gradient_accumulation": False,
        "steps_per_print": 2**31 - 1,
        "zero_allow_untested_optimizer": True,
    }
    assert zero_stage(config) == 2 == zero_stage({})


@pytest.mark.parametrize(("precision", "fp16", "bf16"), [
    ("32-true", None, None),
    ("16-mixed", True, None),
    ("16-true", True, None),
    ("bf16-mixed", None, True),
    ("bf16-true", None, True),
])
def test_resolve_precision(precision: str, fp16: bool | None, bf16: bool | None) -> None:
    config = resolve(precision=precision)
    assert config.get("fp16", {}).get("enabled") == fp16
    assert config.get("bf16", {}).get("enabled") == bf16


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_resolve_precision_auto_sections(precision: str) -> None:
    user = {"fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": "auto"}, "bf16": {"enabled": "auto"}}
    config = resolve(user, precision=precision)
    assert config["fp16"] == {"enabled": precision.startswith("16-"), "loss_scale": 0}
    assert config["bf16"] == {"enabled": precision.startswith("bf16-")}


def test_resolve_precision_section_without_enabled_follows_the_trainer() -> None:
    # DeepSpeed reads a section without "enabled" as disabled, so it does not contradict the Trainer either way.
    assert resolve({"fp16": {"loss_scale": 0}}, precision="32-true")["fp16"] == {"loss_scale": 0, "enabled": False}
    assert resolve({"fp16": {"loss_scale": 0}}, precision="16-mixed")["fp16"] == {"loss_scale": 0, "enabled": True}


def test_resolve_precision_agreeing_explicit_values() -> None:
    config = resolve({"fp16": {"enabled": True, "loss_scale": 0}, "bf16": {"enabled": False}}, precision="16-mixed")
    assert config["fp16"] == {"enabled": True, "loss_scale": 0}
    assert config["bf16"] == {"enabled": False}
    assert resolve({"fp16": {"enabled": False}}, precision="bf16-mixed")["fp16"] == {"enabled": False}


def test_resolve_legacy_bfloat16_section_is_reconciled() -> None:
    assert resolve({"bfloat16": {"enabled": "auto"}}, precision="bf16-mixed")["bf16"] == {"enabled": True}
    assert "bfloat16" not in resolve({"bfloat16": {"enabled": "auto"}}, precision="bf16-mixed")
    with pytest.raises(ZeroConfigError, match=re.escape("bf16.enabled: the DeepSpeed config says True but the Trainer"
                                                        " says '32-true'.")):
        resolve({"bfloat16": {"enabled": True}}, precision="32-true")


def test_resolve_accumulation() -> None:
    config = resolve(accumulate_grad_batches=4, micro_batch_size=2)
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8


@pytest.mark.parametrize(("clip", "expected"), [(None, 0.0), (0.5, 0.5), (2, 2.0)])
def test_resolve_clipping(clip: float | None, expected: float) -> None:
    config = resolve(gradient_clip_val=clip, gradient_clip_algorithm="norm" if clip else None)
    assert config["gradient_clipping"] == expected
    assert isinstance(config["gradient_clipping"], float)


def test_resolve_clipping_from_config_when_trainer_does_not_say() -> None:
    assert resolve({"gradient_clipping": 1.5})["gradient_clipping"] == 1.5


def test_resolve_micro_batch_and_world_size() -> None:
    config = resolve(micro_batch_size=4, accumulate_grad_batches=3, world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["train_batch_size"] == 4 * 3 * 8


def test_resolve_unknown_micro_batch_from_config_or_one() -> None:
    assert resolve({"train_micro_batch_size_per_gpu": 5}, world_size=2)["train_batch_size"] == 10
    config = resolve(world_size=2, accumulate_grad_batches=2)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (1, 4)


def test_resolve_unknown_micro_batch_derived_from_train_batch_size() -> None:
    config = resolve({"train_batch_size": 32}, accumulate_grad_batches=2, world_size=4)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 32)


@pytest.mark.parametrize("train", [10, 3])
def test_resolve_train_batch_size_not_a_multiple(train: int) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"train_batch_size: the DeepSpeed config says {train} but it must be a multiple of accumulate_grad_batches"
            " (1) x world size (4) = 4. Fix: set train_batch_size to a multiple of 4")):
        resolve({"train_batch_size": train}, world_size=4)


def test_resolve_every_auto() -> None:
    user = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "steps_per_print": "auto", "wall_clock_breakdown": "auto",
        "fp16": {"enabled": "auto", "loss_scale": "auto"}, "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto", "allgather_bucket_size": 5},
    }
    validate_user_config(user)
    config = resolve(user, precision="16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0,
                     gradient_clip_algorithm="norm", micro_batch_size=3, world_size=2)
    assert config == {
        "train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0, "fp16": {"enabled": True}, "bf16": {"enabled": False},
        "zero_optimization": {"stage": 2, "allgather_bucket_size": 5},
        "managed_gradient_accumulation": False, "steps_per_print": 2**31 - 1, "zero_allow_untested_optimizer": True,
    }
    assert "auto" not in repr(config)


def test_resolve_agreeing_explicit_values_accepted() -> None:
    user = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "gradient_clipping": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    config = resolve(user, precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0,
                     micro_batch_size=4, world_size=2)
    assert {k: config[k] for k in user} == user


# ----------------------------------------------------------------------------------------------------------------------
# resolve_ds_config: conflicts
# ----------------------------------------------------------------------------------------------------------------------


def _one_conflict(line: str) -> str:
    return r"^The DeepSpeed config disagrees with the Trainer in 1 place\(s\):\n  - " + re.escape(line) + "$"


@pytest.mark.parametrize(("user", "flags", "line"), [
    ({"fp16": {"enabled": True}}, {"precision": "bf16-mixed"},
     "fp16.enabled: the DeepSpeed config says True but the Trainer says 'bf16-mixed'. Fix: use"
     " Trainer(precision='16-mixed') or remove the 'fp16' section (or set its \"enabled\" to \"auto\")"),
    ({"bf16": {"enabled": True}}, {"precision": "32-true"},
     "bf16.enabled: the DeepSpeed config says True but the Trainer says '32-true'. Fix: use"
     " Trainer(precision='bf16-mixed') or remove the 'bf16' section (or set its \"enabled\" to \"auto\")"),
    ({"bf16": {"enabled": False}}, {"precision": "bf16-true"},
     "bf16.enabled: the DeepSpeed config says False but the Trainer says 'bf16-true'. Fix: use"
     " Trainer(precision='32-true') or set bf16.enabled to true/\"auto\""),
    ({"gradient_accumulation_steps": 4}, {"accumulate_grad_batches": 2},
     "gradient_accumulation_steps: the DeepSpeed config says 4 but the Trainer says 2. Fix: use"
     " Trainer(accumulate_grad_batches=4) or remove 'gradient_accumulation_steps' from the config"),
    ({"gradient_clipping": 2.0}, {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"},
     "gradient_clipping: the DeepSpeed config says 2.0 but the Trainer says 1.0. Fix: use"
     " Trainer(gradient_clip_val=2.0) or remove 'gradient_clipping' from the config"),
    ({"train_micro_batch_size_per_gpu": 8}, {"micro_batch_size": 4},
     "train_micro_batch_size_per_gpu: the DeepSpeed config says 8 but the Trainer says 4. Fix: make the train"
     " DataLoader's batch_size match, or remove 'train_micro_batch_size_per_gpu' from the config"),
    ({"train_batch_size": 64}, {"micro_batch_size": 4, "world_size": 2},
     "train_batch_size: the DeepSpeed config says 64 but the Trainer says 8. Fix: train_batch_size must equal micro"
     " batch (4) x accumulate_grad_batches (1) x world size (2); remove it from the config or set it to \"auto\""),
])
def test_resolve_conflict(user: dict[str, Any], flags: dict[str, Any], line: str) -> None:
    with pytest.raises(ZeroConfigError, match=_one_conflict(line)):
        resolve(user, **flags)


def test_resolve_three_conflicts_in_one_error() -> None:
    user = {"fp16": {"enabled": True}, "gradient_accumulation_steps": 4, "gradient_clipping": 2.0}
    with pytest.raises(ZeroConfigError) as info:
        resolve(user, precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0,
                gradient_clip_algorithm="norm", micro_batch_size=4)
    message = str(info.value)
    assert message.startswith("The DeepSpeed config disagrees with the Trainer in 3 place(s):\n")
    lines = message.splitlines()[1:]
    assert len(lines) == 3
    for key, config_value, trainer_value, fix in [
        ("fp16.enabled", "True", "'bf16-mixed'", "Fix: use Trainer(precision='16-mixed')"),
        ("gradient_clipping", "2.0", "1.0", "Fix: use Trainer(gradient_clip_val=2.0)"),
        ("gradient_accumulation_steps", "4", "2", "Fix: use Trainer(accumulate_grad_batches=4)"),
    ]:
        line = next(line for line in lines if line.startswith(f"  - {key}:"))
        assert f"the DeepSpeed config says {config_value} but the Trainer says {trainer_value}." in line
        assert fix in line


def test_resolve_clip_by_value_raises() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            "Trainer(gradient_clip_algorithm='value') is not supported: DeepSpeed clips by global norm only. Use"
            " Trainer(gradient_clip_algorithm='norm')")):
        resolve(gradient_clip_val=1.0, gradient_clip_algorithm="value")


def test_resolve_unsupported_precision() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            "Trainer(precision='64-true') is not supported by ZeroStrategy. Use one of ('32-true', '16-mixed',"
            " 'bf16-mixed', '16-true', 'bf16-true').")):
        resolve(precision="64-true")


@pytest.mark.parametrize("stage", [0, 1])
def test_resolve_overlap_comm_needs_stage_2(stage: int) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"zero_optimization.overlap_comm=True needs stage 2 or 3 (stage is {stage}): gradients are reduced once"
            " per optimizer step at stages 0-1. Remove overlap_comm or use ZeroStrategy(stage=2).")):
        resolve({"zero_optimization": {"stage": stage, "overlap_comm": True}})
    assert resolve(knobs=resolve_knobs(stage=stage))["zero_optimization"] == {"stage": stage, "overlap_comm": False}
    assert resolve({"zero_optimization": {"overlap_comm": "auto"}},
                   resolve_knobs(stage=stage))["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("stage", [2, 3])
def test_resolve_overlap_comm_untouched_at_stage_2_and_3(stage: int) -> None:
    assert "overlap_comm" not in resolve(knobs=resolve_knobs(stage=stage))["zero_optimization"]
    assert resolve({"zero_optimization": {"stage": stage, "overlap_comm": True}})["zero_optimization"][
        "overlap_comm"] is True


@pytest.mark.parametrize(("stage", "expected"), [("auto", 2), ("3", 3), (1.0, 1)])
def test_resolve_stage_spellings(stage: Any, expected: int) -> None:
    config = resolve({"zero_optimization": {"stage": stage}})
    assert config["zero_optimization"]["stage"] == expected
    assert zero_stage({"zero_optimization": {"stage": stage}}) == expected


def test_resolve_bad_stage_without_validation() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("zero_optimization.stage = 'three' is not a ZeRO stage. Use 0,"
                                                        " 1, 2 or 3.")):
        resolve({"zero_optimization": {"stage": "three"}})


def test_resolve_keyword_stage_and_default_stage() -> None:
    assert resolve(knobs=resolve_knobs(stage=3))["zero_optimization"]["stage"] == 3
    assert resolve({"zero_optimization": {"reduce_bucket_size": 5}})["zero_optimization"] == {
        "stage": 2, "reduce_bucket_size": 5}


def test_resolve_user_defaults_win() -> None:
    config = resolve({"steps_per_print": 10, "zero_allow_untested_optimizer": False})
    assert (config["steps_per_print"], config["zero_allow_untested_optimizer"]) == (10, False)


def test_resolve_does_not_mutate_inputs() -> None:
    user = {"fp16": {"enabled": "auto"}, "gradient_clipping": "auto", "bfloat16": {"enabled": "auto"},
            "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto",
                                  "offload_optimizer": {"device": "cpu"}}}
    knobs = resolve_knobs(stage=3, offload_optimizer="cpu", pin_memory=True)
    user_before, knobs_before = copy.deepcopy(user), copy.deepcopy(knobs)
    config = resolve(user, knobs, precision="bf16-mixed", gradient_clip_val=1.0, micro_batch_size=2)
    assert user == user_before and knobs == knobs_before
    config["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    assert user == user_before and knobs == knobs_before
    assert config["managed_gradient_accumulation"] is False


# ----------------------------------------------------------------------------------------------------------------------
# inference_config
# ----------------------------------------------------------------------------------------------------------------------


def test_inference_config_drops_optimizer_parts() -> None:
    config = resolve({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "scheduler": {"type": "WarmupLR"}},
                     resolve_knobs(stage=3, offload_optimizer="cpu", offload_parameters="cpu"))
    before = copy.deepcopy(config)
    out = inference_config(config)
    assert "optimizer" not in out and "scheduler" not in out
    assert "offload_optimizer" not in out["zero_optimization"]
    assert out["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert out["zero_optimization"]["stage"] == 3
    assert config == before  # the training config is untouched
    assert inference_config({}) == {}


# ----------------------------------------------------------------------------------------------------------------------
# Offload, NVMe async I/O, ZeRO++ and activation checkpointing keys (keywords and config file)
# ----------------------------------------------------------------------------------------------------------------------

from lightning_zero.config import check_auto_stage, check_zero_features, offload_device  # noqa: E402


def test_knobs_aio_and_activation_checkpointing_sections() -> None:
    aio = {"block_size": 262144, "queue_depth": 16, "intra_op_parallelism": 2}
    knobs = resolve_knobs(stage=3, offload_optimizer="nvme", nvme_path="/nvme", aio=aio, partition_activations=True,
                          cpu_checkpointing=True, contiguous_memory_optimization=None,
                          synchronize_checkpoint_boundary=False, zero_hpz_partition_size=8,
                          zero_quantized_weights=True, zero_quantized_gradients=True)
    assert knobs == {
        "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8, "zero_quantized_weights": True,
                              "zero_quantized_gradients": True,
                              "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
        "aio": aio,
        "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True,
                                     "synchronize_checkpoint_boundary": False},
    }
    assert knobs["aio"] is not aio  # copied


def test_knobs_aio_without_nvme_offload_is_an_orphan() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            "ZeroStrategy got aio (needs offload_optimizer='nvme' or offload_parameters='nvme') without the offload it"
            " configures, so it would be ignored.")):
        resolve_knobs(stage=3, offload_optimizer="cpu", aio={"queue_depth": 8})


def test_knobs_aio_must_be_a_dict() -> None:
    with pytest.raises(TypeError, match=re.escape("ZeroStrategy(aio=8) must be a dict of DeepSpeed's aio keys")):
        resolve_knobs(offload_optimizer="nvme", nvme_path="/n", aio=8)


@pytest.mark.parametrize("name", ["partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                                  "synchronize_checkpoint_boundary"])
def test_knobs_activation_flags_must_be_bool(name: str) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(f"ZeroStrategy({name}=1) must be True or False.")):
        resolve_knobs(**{name: 1})


def test_merge_aio_and_activation_sections_key_by_key() -> None:
    user = {"aio": {"block_size": 1048576, "single_submit": False}, "activation_checkpointing": {"profile": True}}
    knobs = resolve_knobs(stage=3, offload_parameters="nvme", nvme_path="/n", aio={"queue_depth": 4},
                          cpu_checkpointing=True)
    merged = merge_knobs(user, knobs)
    assert merged["aio"] == {"block_size": 1048576, "single_submit": False, "queue_depth": 4}
    assert merged["activation_checkpointing"] == {"profile": True, "cpu_checkpointing": True}
    assert "aio" not in merge_knobs({}, resolve_knobs(stage=2))  # no empty sections added


def test_merge_aio_conflict_names_both_values() -> None:
    with pytest.raises(ZeroConfigError, match=re.escape("aio.queue_depth: ZeroStrategy(...) says 4, the config says"
                                                        " 32")):
        merge_knobs({"aio": {"queue_depth": 32}}, resolve_knobs(stage=3, offload_parameters="nvme", nvme_path="/n",
                                                                aio={"queue_depth": 4}))


@pytest.mark.parametrize(("config", "message"), [
    ({"aio": {"thread_count": 4}}, "unknown key 'aio.thread_count'. DeepSpeed calls it 'intra_op_parallelism'."),
    ({"aio": {"queue_dept": 4}}, "unknown key 'aio.queue_dept'. Did you mean 'queue_depth'?"),
    ({"aio": {"block_size": "1M"}}, "'aio.block_size' must be a positive integer, got str: '1M'"),
    ({"aio": {"queue_depth": 0}}, "'aio.queue_depth' must be a positive integer, got int: 0"),
    ({"aio": {"single_submit": 1}}, "'aio.single_submit' must be true or false, got int: 1"),
    ({"aio": []}, "'aio' must be a JSON object (dict), got list: []"),
    ({"activation_checkpointing": {"partitioned_activations": True}},
     "unknown key 'activation_checkpointing.partitioned_activations'. DeepSpeed calls it 'partition_activations'."),
    ({"activation_checkpointing": {"cpu_checkpointing": "yes"}},
     "'activation_checkpointing.cpu_checkpointing' must be true or false, got str: 'yes'"),
    ({"activation_checkpointing": {"number_checkpoints": True}},
     "'activation_checkpointing.number_checkpoints' must be a positive integer, got bool: True"),
    ({"zero_optimization": {"zero_hpz_partition_size": -1}},
     "'zero_optimization.zero_hpz_partition_size' = -1: Input should be greater than or equal to 0"),
    ({"zero_optimization": {"zero_quantized_weights": "sometimes"}},
     "'zero_optimization.zero_quantized_weights' = 'sometimes': Input should be a valid boolean"),
])
def test_validate_offload_and_zeropp_sections(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(message)):
        validate_user_config(config)


def test_validate_accepts_deepspeeds_aio_and_activation_keys() -> None:
    validate_user_config({
        "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True, "use_gds": False},
        "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": False,
                                     "contiguous_memory_optimization": False, "number_checkpoints": None,
                                     "synchronize_checkpoint_boundary": False, "profile": False},
        "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8, "zero_quantized_weights": True,
                              "zero_quantized_gradients": True,
                              "offload_param": {"device": "nvme", "nvme_path": "/n", "buffer_count": 5,
                                                "buffer_size": 100000000, "max_in_cpu": 1000000000}},
    })


def test_offload_device() -> None:
    assert offload_device({"zero_optimization": {"offload_param": {"device": "nvme"}}}, "offload_param") == "nvme"
    assert offload_device({"zero_optimization": {"offload_param": {"device": "none"}}}, "offload_param") is None
    assert offload_device({}, "offload_optimizer") is None


def _feature_error(config: dict[str, Any], flags: TrainerFlags | None = None) -> str:
    with pytest.raises(ZeroConfigError) as info:
        check_zero_features(config, flags)
    return str(info.value)


@pytest.mark.parametrize(("zero", "line"), [
    ({"stage": 2, "offload_param": {"device": "cpu"}},
     "zero_optimization.offload_param.device='cpu' needs stage 3 (stage is 2): only ZeRO-3 partitions parameters."
     " Use ZeroStrategy(stage=3) or remove offload_param"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}},
     "zero_optimization.offload_optimizer.device='cpu' needs stage 1, 2 or 3 (stage is 0): stage 0 has no optimizer"
     " partition to offload. Use ZeroStrategy(stage=2) or remove offload_optimizer"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/n"}},
     "zero_optimization.offload_optimizer.device='nvme' at stage 2: DeepSpeed swaps optimizer state to NVMe at stage 3"
     " only (ZeRO-Infinity); at stages 1-2 it would keep it in CPU memory and ignore nvme_path. Use"
     " ZeroStrategy(stage=3) or offload_optimizer='cpu'"),
    ({"stage": 2, "zero_hpz_partition_size": 4, "zero_quantized_gradients": True},
     "zero_optimization zero_hpz_partition_size=4, zero_quantized_gradients=True: ZeRO++ works at stage 3 only (stage"
     " is 2) and DeepSpeed would ignore it. Use ZeroStrategy(stage=3) or remove it"),
])
def test_features_need_their_stage(zero: dict[str, Any], line: str) -> None:
    assert _feature_error({"zero_optimization": zero}) == f"These ZeRO settings cannot work:\n  - {line}"


def test_features_accept_what_works() -> None:
    check_zero_features({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2,
                                               "offload_optimizer": {"device": "nvme"},
                                               "offload_param": {"device": "cpu"}}},
                        TrainerFlags(world_size=8, devices_per_node=4, device_type="cuda"))
    check_zero_features({"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 1,
                                               "zero_quantized_weights": False, "offload_param": {"device": "none"}}})
    check_zero_features({"zero_optimization": {"stage": "three"}})  # reported by validate_user_config instead


@pytest.mark.parametrize(("hpz", "world", "per_node", "divisors"), [(3, 4, 2, [2, 1]), (4, 4, 2, [2, 1]),
                                                                     (2, 6, 3, [3, 1]), (8, 16, 8, [8, 4, 2, 1])])
def test_features_hpz_must_divide_devices_per_node_and_world(hpz: int, world: int, per_node: int,
                                                             divisors: list[int]) -> None:
    zero = {"stage": 3, "zero_hpz_partition_size": hpz}
    flags = TrainerFlags(world_size=world, devices_per_node=per_node)
    if per_node % hpz == 0 and world % hpz == 0:
        check_zero_features({"zero_optimization": zero}, flags)
        return
    assert _feature_error({"zero_optimization": zero}, flags).endswith(
        f"zero_optimization.zero_hpz_partition_size={hpz} must divide the devices per node ({per_node}) and the world"
        f" size ({world}): hpZ keeps a secondary copy of the weights partitioned within each node. Use one of"
        f" {divisors} (1 turns hpZ off)")


def test_features_quantization_and_gds_need_a_gpu() -> None:
    config = {"zero_optimization": {"stage": 3, "zero_quantized_weights": True, "zero_quantized_gradients": True},
              "aio": {"use_gds": True}}
    message = _feature_error(config, TrainerFlags(world_size=2, devices_per_node=2, device_type="cpu"))
    assert message.splitlines()[1:] == [
        "  - zero_optimization zero_quantized_weights=True, zero_quantized_gradients=True needs a CUDA GPU: DeepSpeed's"
        " quantization kernels (CUDAQuantizer) have no CPU implementation. Remove it for CPU runs, or train with"
        " Trainer(accelerator='gpu')",
        "  - aio.use_gds=True needs a CUDA GPU (GPUDirect Storage). Remove it for CPU runs",
    ]
    check_zero_features(config, TrainerFlags(world_size=2, devices_per_node=2, device_type="cuda"))


def test_features_contiguous_activation_checkpointing_needs_partitioning_and_a_count() -> None:
    message = _feature_error({"activation_checkpointing": {"contiguous_memory_optimization": True}})
    assert message.splitlines()[1:] == [
        "  - activation_checkpointing.contiguous_memory_optimization=True needs partition_activations=True: DeepSpeed"
        " copies the partitioned checkpoints into the contiguous buffer. Set ZeroStrategy(partition_activations=True)"
        " too",
        "  - activation_checkpointing.contiguous_memory_optimization=True needs activation_checkpointing.number_checkpoints"
        " (how many layers you checkpoint) to size its buffer. Set it in the config",
    ]
    check_zero_features({"activation_checkpointing": {"contiguous_memory_optimization": True,
                                                      "partition_activations": True, "number_checkpoints": 4}})


def test_resolve_runs_the_feature_checks_with_the_trainer_topology() -> None:
    knobs = resolve_knobs(stage=3, zero_hpz_partition_size=4)
    with pytest.raises(ZeroConfigError, match=re.escape("zero_hpz_partition_size=4 must divide the devices per node"
                                                        " (2) and the world size (4)")):
        resolve(None, knobs, world_size=4, devices_per_node=2)
    config = resolve(None, knobs, world_size=8, devices_per_node=4)
    assert config["zero_optimization"]["zero_hpz_partition_size"] == 4


@pytest.mark.parametrize(("user", "keywords", "pinned"), [
    ({}, {"offload_optimizer": "cpu"}, "offload_optimizer='cpu'"),
    ({}, {"pin_memory": True, "zero_quantized_weights": True}, "pin_memory=True, zero_quantized_weights=True"),
    ({"zero_optimization": {"stage": 1}}, {}, "config zero_optimization.stage"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, {}, "config zero_optimization.offload_param"),
    ({"zero_optimization": {"zero_hpz_partition_size": 2}}, {}, "config zero_optimization.zero_hpz_partition_size"),
])
def test_auto_stage_refuses_pinned_choices(user: dict[str, Any], keywords: dict[str, Any], pinned: str) -> None:
    with pytest.raises(ZeroConfigError, match=re.escape(
            f"ZeroStrategy(stage=\"auto\") chooses the stage and the offload from the model size and the hardware, so it"
            f" cannot be combined with {pinned}. Remove them, or name the stage yourself (run `lightning-zero"
            " estimate` to see the choices).")):
        check_auto_stage(user, keywords)


def test_auto_stage_accepts_the_rest() -> None:
    check_auto_stage({"zero_optimization": {"stage": "auto", "zero_hpz_partition_size": 1,
                                            "offload_param": {"device": "none"}, "reduce_bucket_size": 5}},
                     {"offload_optimizer": None, "offload_parameters": False, "overlap_comm": True})


def test_strategy_arguments_resolve_in_one_pure_call():
    """ZeroStrategy.__init__'s checks and resolution (config.resolve_strategy_args) need no Trainer and no process
    group, and return new values: the user's dicts are left as they were."""
    import logging
    from datetime import timedelta

    from lightning_zero.config import StrategyArgs, resolve_strategy_args

    user = {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}
    zero = {"overlap_comm": True}
    before = copy.deepcopy((user, zero))
    common = dict(start_method="popen", offload_optimizer="cpu", offload_parameters=None, nvme_path=None,
                  pin_memory=None, remote_device=None, logging_level="INFO", timeout=timedelta(minutes=5),
                  zero_optimization=zero)
    args = resolve_strategy_args(None, user, **common)
    assert isinstance(args, StrategyArgs) and (user, zero) == before
    assert (args.stage, args.auto, args.timeout, args.logging_level) == (3, False, timedelta(minutes=5), logging.INFO)
    assert args.merged["zero_optimization"]["overlap_comm"] is True
    assert args.merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert args.merged is not user and args.user_config == user
    with pytest.raises(ValueError, match=r"start_method='forkserver'\) is not supported"):
        resolve_strategy_args(None, user, **{**common, "start_method": "forkserver"})
    with pytest.raises(ValueError, match=r"offload_optimizer='cpu'\) needs stage 1, 2 or 3"):
        resolve_strategy_args(0, None, **common)
