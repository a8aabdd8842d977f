"""Distillation: a frozen teacher created in configure_model and trained students, on 2 CPU processes."""

import pytest
import torch

from helpers import SaveFullWeights, cpu_trainer, max_diff
from multi_helpers import Distill, ReportLayout, make_student, make_teacher, reference_distill
from lightning_zero import ZeroStrategy

pytestmark = pytest.mark.distributed
STEPS = 6


# One optimizer (automatic or manual) is the one-engine case: the teacher rides in the LightningModule's engine.
# Two students (two optimizers) give each student an engine and the teacher a frozen, optimizer-less engine.
@pytest.mark.parametrize(("stage", "manual", "students"),
                         [(0, False, 1), (1, True, 2), (2, True, 1), (3, False, 1), (3, True, 2)])
def test_distill_parity_and_frozen_teacher(tmp_path, stage, manual, students):
    out = tmp_path / "w.pt"
    # DeepSpeed keeps parameters below stage3_param_persistence_threshold (1e5 elements) whole on every rank; 0 makes
    # this small teacher partitioned
    strategy = ZeroStrategy(stage=stage, start_method="spawn", stage3_param_persistence_threshold=0)
    trainer = cpu_trainer(strategy=strategy, max_steps=STEPS * students,
                          callbacks=[SaveFullWeights(str(out)), ReportLayout(str(tmp_path))])
    trainer.fit(Distill(manual=manual, students=students))

    got, want = torch.load(out), reference_distill(world_size=2, steps=STEPS, students=students)
    assert sorted(got) == sorted(want)
    student_keys = [k for k in want if k.startswith("students.")]
    assert max_diff({k: got[k] for k in student_keys}, {k: want[k] for k in student_keys}) <= 1e-5
    assert max_diff({k: got[k] for k in student_keys}, {k: v for k, v in _initial(students).items()}) > 1e-3
    teacher_keys = [k for k in want if k.startswith("teacher.")]
    assert max_diff({k: got[k] for k in teacher_keys}, {k: want[k] for k in teacher_keys}) == 0.0  # untouched

    teacher_numel = sum(p.numel() for p in make_teacher().parameters())
    student_numel = students * sum(p.numel() for p in make_student().parameters())
    for rank in (0, 1):
        layout = torch.load(tmp_path / f"layout_{rank}.pt")
        assert not layout["requires_grad"] and not layout["teacher_in_an_optimizer"]
        assert layout["devices"] == [layout["root_device"]]
        if students == 2:
            assert layout["engines"] == [("students.0", True), ("students.1", True), ("frozen", False)]
        if stage == 3:  # partitioned: each rank keeps about half, no full copy outside the forward
            assert all(layout["partitioned"]) and layout["held"] == 0
            assert abs(layout["local"] - teacher_numel / 2) <= 0.05 * teacher_numel
        else:  # a plain module on the device
            assert not any(layout["partitioned"]) and layout["held"] == layout["local"] == teacher_numel
        # Adam keeps two tensors per trained element (partitioned over 2 ranks at stages 1-3), none for the teacher
        expected = 2 * student_numel / (1 if stage == 0 else 2)
        assert expected <= layout["optimizer_state_numel"] <= expected + 64, (layout, expected)


def _initial(students):
    return {f"students.{i}.{k}": v for i in range(students) for k, v in make_student(seed=i).state_dict().items()}
