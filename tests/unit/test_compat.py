"""The proven version ranges (lightning_zero/_compat/versions.py) and the DeepSpeed feature probes, against the
installed packages: these fail, naming the symbol, when a release changes what ZeroStrategy relies on."""

import re
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from lightning_zero._compat import versions
from lightning_zero._compat.versions import ALLOW_UNTESTED_ENV, SUPPORTED, check_versions, out_of_range

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[2]


def _pins(name):
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            dist, version = line.split("==")
            pins[dist.strip().lower()] = version.strip()
    return pins


def test_pyproject_declares_exactly_the_proven_ranges():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {Requirement(d).name: Requirement(d).specifier for d in deps}
    assert set(declared) == set(SUPPORTED)
    for name in SUPPORTED:
        assert declared[name] == versions.specifier(name), name


def test_lowest_constraints_are_the_lower_bounds_and_the_pins_lie_in_range():
    lowest, pinned = _pins("constraints-lowest.txt"), _pins("constraints.txt")
    for name, (low, _) in SUPPORTED.items():
        if name != "torch":  # torch comes from TORCH_COMPAT_SPEC (see the Makefile)
            assert Version(lowest[name]) == Version(low), name
        if name in pinned:
            assert pinned[name] in versions.specifier(name), (name, pinned[name])
    assert f"TORCH_COMPAT_SPEC ?= torch=={SUPPORTED['torch'][0]}" in (ROOT / "Makefile").read_text()


def test_the_installed_versions_are_proven():
    too_old, too_new = out_of_range()
    assert not too_old and not too_new, too_old + too_new
    check_versions()


def test_a_deepspeed_without_unmanaged_accumulation_is_refused_even_when_untested_versions_are_allowed():
    with pytest.raises(ImportError) as err:
        check_versions({"deepspeed": "0.18.3", "torch": "2.13.0+cpu"}, allow_untested=True)
    msg = str(err.value)
    assert "deepspeed 0.18.3 (needs >= 0.19.8" in msg and "managed_gradient_accumulation" in msg
    assert "pip install -U 'deepspeed>=0.19.8'" in msg
    assert ALLOW_UNTESTED_ENV not in msg  # no way around a known-wrong result


def test_a_newer_release_is_one_error_naming_every_offender_and_the_way_around(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ImportError) as err:
        check_versions({"torch": "2.15.0", "lightning": "2.7.1", "deepspeed": "0.19.8"})
    msg = str(err.value)
    assert "torch 2.15.0 (proven: >=2.11.0,<2.15)" in msg and "lightning 2.7.1" in msg and "deepspeed 0.19.8" not in msg
    assert f"{ALLOW_UNTESTED_ENV}=1" in msg
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="torch 2.15.0"):
        check_versions({"torch": "2.15.0"})


def test_local_and_dev_builds_count_as_their_release():
    assert out_of_range({"torch": "2.13.0+cpu", "deepspeed": "0.19.8+cuda128"}) == ([], [])
    assert out_of_range({"torch": "2.15.0.dev20261101"})[1]  # a 2.15 nightly is 2.15: untested
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions({"torch": "2.11.0+cu130"})


def test_zero_strategy_runs_the_check(monkeypatch):
    import lightning_zero._imports as imports

    monkeypatch.setattr(imports, "check_versions", lambda: (_ for _ in ()).throw(ImportError("checked")))
    from lightning_zero import ZeroStrategy

    with pytest.raises(ImportError, match="checked"):
        ZeroStrategy(stage=2)


# --- DeepSpeed contracts: what ZeroStrategy's correctness needs from the installed DeepSpeed ---

def test_deepspeed_has_unmanaged_gradient_accumulation():
    """ZeroStrategy sets managed_gradient_accumulation=false so that Lightning owns the accumulation boundary."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import get_managed_gradient_accumulation

    assert constants.MANAGED_GRADIENT_ACCUMULATION == "managed_gradient_accumulation"
    assert get_managed_gradient_accumulation({"managed_gradient_accumulation": False}) is False


def test_deepspeeds_zero_schema_has_the_keys_the_speed_defaults_set():
    """tuning.resolve_speed_defaults sets zero_optimization.compute_grad_norm (DeepSpeed 0.19.7+, inside the range)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert DeepSpeedZeroConfig(stage=2, compute_grad_norm=False).compute_grad_norm is False


def test_makefile_compat_target_reads_the_lowest_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test-compat:", makefile, re.M)
    assert "constraints-lowest.txt" in makefile


# --- Lightning contracts ---

def test_a_compiled_lightning_module_is_refused_with_zero_strategys_way_to_compile(tmp_path):
    """Lightning assigns `strategy._lightning_module` before its own refusal of compiled modules; ZeroStrategy's
    setter answers first. Fails (with Lightning's DDP/FSDP-only message) if Lightning stops assigning it there."""
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.trainer import trainer as trainer_module
    from lightning.pytorch.utilities import compile as lightning_compile

    from lightning_zero import ZeroStrategy

    # importing lightning_zero patches nothing in Lightning
    assert trainer_module._verify_strategy_supports_compile is lightning_compile._verify_strategy_supports_compile
    trainer = L.Trainer(strategy=ZeroStrategy(stage=2), accelerator="cpu", devices=1, max_steps=1,
                        default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"compiled \(torch.compile\).*ZeroStrategy\(compile=True\)"):
        trainer.fit(torch.compile(BoringModel()))


def test_checkpoint_state_dict_is_routed_through_the_strategy(tmp_path):
    """Lightning's dump_checkpoint takes the checkpoint's `state_dict` from `_get_lightning_module_state_dict`; the
    route replaces it on this trainer only (stage 3 then gathers nothing at a save)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_zero._compat.lightning import route_checkpoint_state_dict

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(BoringModel())
    route_checkpoint_state_dict(trainer, lambda: {"routed": 1})
    assert trainer._checkpoint_connector.dump_checkpoint()["state_dict"] == {"routed": 1}
    other = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert other._checkpoint_connector._get_lightning_module_state_dict != trainer._checkpoint_connector._get_lightning_module_state_dict


def test_a_lightning_without_the_checkpoint_hook_fails_loudly():
    from lightning_zero._compat.lightning import route_checkpoint_state_dict

    class Trainer:
        _checkpoint_connector = object()

    with pytest.raises(RuntimeError, match="_get_lightning_module_state_dict.*_compat/lightning.py"):
        route_checkpoint_state_dict(Trainer(), dict)


def test_stage3_evaluation_runs_under_no_grad_not_inference_mode(tmp_path):
    """Lightning's loops pick inference_mode from their `inference_mode` attribute; the route sets it off, and
    predict_step then runs under no_grad (DeepSpeed's stage-3 gathers would leave inference tensors otherwise)."""
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_zero._compat.lightning import evaluate_under_no_grad

    seen = []

    class Model(BoringModel):
        def predict_step(self, batch, batch_idx):
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return super().predict_step(batch, batch_idx)

    def trainer():
        return L.Trainer(accelerator="cpu", devices=1, limit_predict_batches=1, default_root_dir=tmp_path,
                         logger=False, enable_progress_bar=False, enable_model_summary=False)

    trainer().predict(Model())
    assert seen == [(True, False)]  # Lightning's default: inference mode
    routed = trainer()
    evaluate_under_no_grad(routed)
    routed.predict(Model())
    assert seen[1] == (False, False)

    class Trainer:
        validate_loop = test_loop = predict_loop = object()

    with pytest.raises(RuntimeError, match="inference_mode.*_compat/lightning.py"):
        evaluate_under_no_grad(Trainer())
