"""lightning_zero.engines: which submodules each optimizer trains, and the private optimizer clone (plain torch)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_zero.engines import ModelAssignment, assign_models, clone_optimizer

Adam = torch.optim.Adam


def summary(assignments: list[ModelAssignment]) -> list[tuple[str, list[str], int | None]]:
    return [(a.name, list(a.modules), a.optimizer_index) for a in assignments]


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class Distill(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Linear(4, 4).requires_grad_(False)
        self.student = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)


def params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


# ----------------------------------------------------------------------------------------------------------------------
# assign_models: valid splits
# ----------------------------------------------------------------------------------------------------------------------


def test_single_optimizer_trains_the_root() -> None:
    model = GAN()
    (assignment,) = assign_models(model, [Adam(model.parameters())])
    assert (assignment.name, assignment.modules, assignment.optimizer_index) == ("model", {"": model}, 0)
    assert assignment.as_module(model) is model


def test_single_optimizer_over_a_submodule_still_wraps_the_root() -> None:
    # one optimizer is the one-engine case: the frozen teacher rides along in the root's engine (README)
    model = Distill()
    assert summary(assign_models(model, [Adam(params(model.student, model.head))])) == [("model", [""], 0)]


def test_no_optimizer_is_one_frozen_model() -> None:
    model = GAN()
    assert summary(assign_models(model, [])) == [("model", [""], None)]


def test_gan_two_optimizers() -> None:
    model = GAN()
    assignments = assign_models(model, [Adam(model.generator.parameters()), Adam(model.discriminator.parameters())])
    assert summary(assignments) == [("generator", ["generator"], 0), ("discriminator", ["discriminator"], 1)]
    assert assignments[0].modules["generator"] is model.generator
    assert assignments[1].modules["discriminator"] is model.discriminator
    assert assignments[1].as_module(model) is model.discriminator


def test_gan_optimizer_order_decides_the_index() -> None:
    model = GAN()
    assignments = assign_models(model, [Adam(model.discriminator.parameters()), Adam(model.generator.parameters())])
    assert summary(assignments) == [("discriminator", ["discriminator"], 0), ("generator", ["generator"], 1)]


def test_frozen_teacher_gets_a_frozen_assignment() -> None:
    model = Distill()
    assignments = assign_models(model, [Adam(model.student.parameters()), Adam(model.head.parameters())])
    assert summary(assignments) == [("student", ["student"], 0), ("head", ["head"], 1), ("frozen", ["teacher"], None)]
    assert assignments[-1].modules["teacher"] is model.teacher


def test_partly_frozen_submodule_goes_with_its_optimizer() -> None:
    model = Three()
    model.a.bias.requires_grad_(False)
    model.c.requires_grad_(False)
    assert summary(assign_models(model, [Adam([model.a.weight]), Adam(model.b.parameters())])) == [
        ("a", ["a"], 0), ("b", ["b"], 1), ("frozen", ["c"], None)]


def test_one_optimizer_over_two_siblings_is_one_assignment() -> None:
    model = Three()
    assignments = assign_models(model, [Adam(params(model.a, model.b)), Adam(model.c.parameters())])
    assert summary(assignments) == [("a+b", ["a", "b"], 0), ("c", ["c"], 1)]
    group = assignments[0].as_module(model)
    assert group.a is model.a and group.b is model.b  # shared with the LightningModule, not copied
    assert [n for n, _ in group.named_parameters()] == ["a.weight", "a.bias", "b.weight", "b.bias"]


def test_nested_submodules_split_at_the_right_depth() -> None:
    model = nn.Module()
    model.enc = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model.dec = nn.Linear(2, 2)
    assignments = assign_models(model, [Adam(model.enc[0].parameters()), Adam(params(model.enc[1], model.dec))])
    assert summary(assignments) == [("enc.0", ["enc.0"], 0), ("enc.1+dec", ["enc.1", "dec"], 1)]
    group = assignments[1].as_module(model)
    assert group.enc__1 is model.enc[1]  # dots in names are replaced for add_module


# ----------------------------------------------------------------------------------------------------------------------
# assign_models: errors
# ----------------------------------------------------------------------------------------------------------------------


def test_parameter_in_two_optimizers() -> None:
    model = Three()
    with pytest.raises(ValueError, match=re.escape(
            "Parameter 'b.weight' is in optimizer 0 (Adam) and optimizer 1 (SGD). ZeroStrategy gives each optimizer its"
            " own DeepSpeed engine, so a parameter can belong to one optimizer only.")):
        assign_models(model, [Adam(params(model.a, model.b)), torch.optim.SGD(params(model.b, model.c), lr=0.1)])


def test_root_level_parameter_with_two_optimizers() -> None:
    model = Three()
    model.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=re.escape(
            "Cannot give each optimizer its own model: the LightningModule itself directly holds parameters scale while"
            " its submodules belong to optimizers [0, 1].")):
        assign_models(model, [Adam([*model.a.parameters(), model.scale]), Adam(params(model.b, model.c))])


def test_optimizer_over_parameters_outside_the_model() -> None:
    model = GAN()
    with pytest.raises(ValueError, match=re.escape(
            "Optimizer(s) [1] hold parameters that are not in the LightningModule. Create optimizers in"
            " `configure_optimizers` from the module's own parameters")):
        assign_models(model, [Adam(model.parameters()), Adam(nn.Linear(2, 2).parameters())])


def test_foreign_parameter_in_two_optimizers_is_named_as_such() -> None:
    model = GAN()
    foreign = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=re.escape("Parameter '<not in the model>' is in optimizer 1 (Adam) and"
                                                   " optimizer 2 (Adam).")):
        assign_models(model, [Adam(model.parameters()), Adam(foreign.parameters()), Adam(foreign.parameters())])


def test_single_optimizer_outside_the_model() -> None:
    model = GAN()
    with pytest.raises(ValueError, match=re.escape("Optimizer(s) [0] hold parameters that are not in the LightningModule")):
        assign_models(model, [Adam(nn.Linear(2, 2).parameters())])


def test_foreign_parameter_mixed_into_an_optimizer() -> None:
    model = Three()
    with pytest.raises(ValueError, match=re.escape("Optimizer(s) [1] hold parameters that are not in the LightningModule")):
        assign_models(model, [Adam(params(model.a, model.c)), Adam(params(model.b, nn.Linear(2, 2)))])


def test_trainable_submodule_in_no_optimizer_message() -> None:
    model = Three()
    with pytest.raises(ValueError, match=re.escape("submodule 'b' has trainable parameters that no optimizer"
                                                   " trains (b.weight, b.bias)")):
        assign_models(model, [Adam(model.a.parameters()), Adam(model.c.parameters())])


def test_foreign_optimizer_reported_before_uncovered_submodule() -> None:
    model = Three()
    with pytest.raises(ValueError, match=re.escape("Optimizer(s) [1] hold parameters that are not in the LightningModule")):
        assign_models(model, [Adam(params(model.a, model.b)), Adam(nn.Linear(2, 2).parameters())])


# ----------------------------------------------------------------------------------------------------------------------
# clone_optimizer
# ----------------------------------------------------------------------------------------------------------------------


def _two_group_model() -> Three:
    torch.manual_seed(0)
    return Three()


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.AdamW([{"params": m.a.parameters(), "lr": 1e-3},
                                 {"params": m.b.parameters(), "lr": 1e-2, "weight_decay": 0.5}],
                                betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    lambda m: torch.optim.SGD([{"params": m.a.parameters(), "lr": 1e-3},
                               {"params": m.b.parameters(), "lr": 1e-1, "momentum": 0.5}],
                              lr=0.3, momentum=0.9, nesterov=True),
], ids=["AdamW", "SGD"])
def test_clone_optimizer(make) -> None:
    model = _two_group_model()
    original = make(model)
    model.b(model.a(torch.ones(1, 2))).sum().backward()
    original.step()  # the original has state; the clone must not
    assert original.state

    clone = clone_optimizer(original)
    assert type(clone) is type(original)
    assert not clone.state
    assert clone.defaults == original.defaults
    assert len(clone.param_groups) == 2
    for got, want in zip(clone.param_groups, original.param_groups):
        assert {k: v for k, v in got.items() if k != "params"} == {k: v for k, v in want.items() if k != "params"}
        assert all(p is q for p, q in zip(got["params"], want["params"], strict=True))
    assert [g["lr"] for g in clone.param_groups] == [g["lr"] for g in original.param_groups]
    assert clone.param_groups[0]["lr"] != clone.param_groups[1]["lr"]

    clone.param_groups[0]["lr"] = 123.0  # groups are new dicts: the user's optimizer is untouched
    assert original.param_groups[0]["lr"] != 123.0


def test_clone_optimizer_rejects_unrebuildable_optimizers() -> None:
    class Custom(torch.optim.SGD):
        def __init__(self, params, lr, scale) -> None:  # `scale` is not in defaults
            super().__init__(params, lr=lr)
            self.scale = scale

    original = Custom(nn.Linear(2, 2).parameters(), lr=0.1, scale=2.0)
    with pytest.raises(TypeError, match=re.escape("ZeroStrategy could not rebuild Custom from its `defaults` (")):
        clone_optimizer(original)
