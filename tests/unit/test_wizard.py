"""`lightning-zero config`: the question logic and its defaults, without a terminal (tests/distributed/
test_no_code_changes.py drives a real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_zero import wizard
from lightning_zero.cli import main
from lightning_zero.wizard import Context, Machine, ModelSize, build_outputs, next_question, recommend, run_session

GiB = 2**30
H100 = Machine(gpus=8, gpu_name="H100", gpu_memory_bytes=80 * GiB, bf16=True, host_memory_bytes=1000 * GiB)
CPU = Machine(host_memory_bytes=20 * GiB)
BASE = {"nodes": 1, "devices": 8, "precision": "bf16-mixed"}


def keys(ctx: Context, flags: dict[str, str]) -> list[str]:
    return list(run_session(ctx, flags, None).answers)


def test_questions_follow_the_answers():
    assert keys(Context(H100), {"--stage": "2"}) == [
        "nodes", "devices", "precision", "stage", "offload_optimizer", "optimizer_states", "accumulate", "clip",
        "activation_checkpointing", "compile"]  # optimizer_states: bf16 precision (the H100's default)
    assert "offload_parameters" in keys(Context(H100), {"--stage": "3"})
    assert "offload_optimizer" not in keys(Context(H100), {"--stage": "0"})
    assert "offload_optimizer" not in keys(Context(H100), {"--stage": "auto"})
    zeropp = keys(Context(H100), {"--stage": "3", "--nodes": "2"})
    assert {"zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients"} <= set(zeropp)
    assert "zero_hpz_partition_size" not in keys(Context(H100), {"--stage": "3"})


def test_machine_defaults():
    gpu = run_session(Context(H100), {}, None).answers
    assert (gpu["devices"], gpu["precision"], gpu["stage"], gpu["clip"]) == (8, "bf16-mixed", 2, None)
    cpu = run_session(Context(CPU), {}, None).answers
    assert (cpu["devices"], cpu["precision"]) == (2, "32-true")
    old = Machine(gpus=2, gpu_name="V100", gpu_memory_bytes=32 * GiB, host_memory_bytes=100 * GiB)
    assert run_session(Context(old), {}, None).answers["precision"] == "16-mixed"
    slurm = wizard.detect_machine({"SLURM_NNODES": "4"})
    assert (slurm.nodes, slurm.nodes_source) == (4, "$SLURM_NNODES")


def test_estimator_picks_the_stage_and_offload():
    small = Context(H100, ModelSize(int(1e9), int(5e7), "GPT"))
    stage, opt, param, why = recommend(small, BASE)
    assert (stage, opt, param) == (2, "none", "none")
    assert "fastest choice that fits" in why and "of your 80.0 GiB" in why and "leaves the most room" in why
    gpt = recommend(Context(H100, ModelSize(int(6.25e9), int(2.06e8), "GPT")), BASE)[3]  # the README's example
    assert gpt.startswith("GPT (6.25B parameters): ZeroStrategy(stage=2) is the fastest choice that fits, model states"
                          " about 24.7 GiB per GPU of your 80.0 GiB")
    # 30B parameters: 2 bytes/param of weights + 18/8 of the rest do not fit 80 GiB per GPU at stage 2
    big = Context(H100, ModelSize(int(30e9), int(5e8), "GPT"))
    stage, opt, param, _ = recommend(big, BASE)
    assert stage == 3
    # choosing stage 2 anyway: the offload default is the fastest that fits at stage 2
    answers = run_session(big, {"--stage": "2"}, None).answers
    assert answers["offload_optimizer"] == "cpu"
    huge = Context(Machine(gpus=1, gpu_name="T4", gpu_memory_bytes=16 * GiB, host_memory_bytes=8 * GiB),
                   ModelSize(int(70e9), int(1e9), "GPT"))
    assert recommend(huge, {"nodes": 1, "devices": 1, "precision": "16-mixed"})[:3] == (3, "cpu", "cpu")
    assert "fits no choice" in recommend(huge, {"nodes": 1, "devices": 1, "precision": "16-mixed"})[3]
    cpu = recommend(Context(CPU, ModelSize(int(1e8), int(1e7), "MLP")), {"nodes": 1, "devices": 2,
                                                                         "precision": "32-true"})
    assert cpu[:3] == (2, "none", "none") and "offload gains nothing" in cpu[3]


def test_interactive_answers_are_re_asked_until_they_parse():
    replies = iter(["", "", "", "7", "3", "", "cpu", "2", "0.5", "", ""])
    shown: list[str] = []
    asked: list[str] = []

    def ask(question, number):
        asked.append(question.key)
        return next(replies)
    session = run_session(Context(CPU), {}, ask, out=shown.append)
    assert shown == ["  ! '7' is not one of 0, 1, 2, 3, auto."]
    a = session.answers
    assert (a["stage"], a["offload_optimizer"], a["offload_parameters"], a["accumulate"], a["clip"]) == (
        3, "none", "cpu", 2, 0.5)
    assert session.why["clip"] == "your answer" and session.why["nodes"].startswith("default: ")


def test_outputs_write_only_what_was_chosen(tmp_path):
    a = run_session(Context(CPU), {"--stage": "3", "--offload-parameters": "cpu", "--gradient-clip-val": "none",
                                   "--accumulate-grad-batches": "4", "--activation-checkpointing": "cpu"}, None).answers
    ds, block = build_outputs(a)
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert ds["gradient_clipping"] == 0.0  # "no clipping" is written, not left to a default
    assert (ds["gradient_accumulation_steps"], ds["bf16"], ds["fp16"]) == (4, {"enabled": False}, {"enabled": False})
    assert ds["activation_checkpointing"] == {"partition_activations": True, "cpu_checkpointing": True}
    assert block["trainer"]["strategy"] == {"class_path": "lightning_zero.ZeroStrategy", "init_args": {
        "stage": 3, "offload_parameters": "cpu", "partition_activations": True, "cpu_checkpointing": True}}
    assert block["trainer"]["gradient_clip_val"] is None and block["trainer"]["accumulate_grad_batches"] == 4
    zeropp, block = build_outputs(run_session(Context(H100), {"--nodes": "2", "--stage": "3", "--zero-hpz-partition-size":
                                                              "8", "--zero-quantized-weights": "yes"}, None).answers)
    assert zeropp["zero_optimization"] == {"stage": 3, "zero_hpz_partition_size": 8, "zero_quantized_weights": True}
    assert zeropp["bf16"] == {"enabled": True} and block["trainer"]["precision"] == "bf16-mixed"
    with pytest.raises(ValueError, match=r"--zero-hpz-partition-size 3: '3' must divide the GPUs per node \(8\)"):
        run_session(Context(H100), {"--nodes": "2", "--stage": "3", "--zero-hpz-partition-size": "3"}, None)
    auto, _ = build_outputs(run_session(Context(CPU), {"--stage": "auto"}, None).answers)
    assert "stage" not in auto.get("zero_optimization", {})  # JSON cannot say "auto": launch --stage auto does


@pytest.mark.parametrize(("flags", "message"), [
    ({"--stage": "4"}, "--stage 4: '4' is not one of 0, 1, 2, 3, auto."),
    ({"--devices": "two"}, "--devices two: 'two' is not a whole number"),
    ({"--gradient-clip-val": "-1"}, "--gradient-clip-val -1: '-1': the clipping norm must be above 0"),
    ({"--stage": "2", "--offload-parameters": "cpu"}, "--offload-parameters cpu: that question does not apply"),
    ({"--stage": "3", "--offload-optimizer": "nvme", "--nvme-path": "/no/such/folder"},
     "--nvme-path /no/such/folder: zero_optimization.offload_optimizer.nvme_path='/no/such/folder' does not exist"),
    ({"--compile": "deepcompile"}, "deepcompile needs a CUDA GPU"),
])
def test_bad_flags_raise_one_clear_error(flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_session(Context(CPU), flags, None)


def test_nvme_path_is_checked_on_the_spot(tmp_path):
    a = run_session(Context(CPU, ModelSize(1000, 100, "m")), {"--stage": "3", "--offload-optimizer": "nvme",
                                                              "--nvme-path": str(tmp_path)}, None).answers
    assert a["nvme_path"] == str(tmp_path)
    assert next_question(Context(CPU), a) is None


def test_command_writes_a_validated_config_and_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(wizard, "detect_machine", lambda folder: CPU)
    out = tmp_path / "ds.json"
    assert main(["config", "--yes", "--stage", "3", "--accumulate-grad-batches", "2", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["gradient_accumulation_steps"] == 2
    printed = capsys.readouterr().out
    assert f"lightning-zero launch --config {out} --devices 2 train.py" in printed
    assert main(["config", "--yes", "--output", str(out)]) == 2
    assert f"--output {out} exists. Pass --force" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind
    yaml_out = tmp_path / "zero.yaml"
    assert main(["config", "--yes", "--stage", "2", "--format", "yaml", "--output", str(yaml_out)]) == 0
    import yaml

    block = yaml.safe_load(yaml_out.read_text())["trainer"]
    assert block["strategy"]["init_args"] == {"stage": 2} and block["precision"] == "32-true"


def test_interrupt_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(wizard, "detect_machine", lambda folder: CPU)

    def interrupted(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["config", "--output", str(tmp_path / "ds.json")]) == 130
    assert "nothing was written" in capsys.readouterr().err and not list(tmp_path.iterdir())

    def end_of_input(prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", end_of_input)
    assert main(["config", "--output", str(tmp_path / "ds.json")]) == 130
    assert "nothing was written" in capsys.readouterr().err and not list(tmp_path.iterdir())
    # a flag whose question the defaults skip is kept for the session, where the answers decide
    replies = iter(["", "", "", "3"] + [""] * 10)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["config", "--offload-parameters", "cpu", "--output", str(tmp_path / "ds.json")]) == 0
    assert json.loads((tmp_path / "ds.json").read_text())["zero_optimization"]["offload_param"] == {"device": "cpu"}

    def failing_validation(tmp):
        raise ValueError("broken")
    with pytest.raises(ValueError, match="broken"):
        wizard._write_validated(tmp_path / "x.json", "{}", failing_validation)
    assert list(tmp_path.iterdir()) == [tmp_path / "ds.json"]  # no x.json, no temporary file


def test_lightning_cli_reads_the_yaml_block(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from lightning_zero import ZeroStrategy
    monkeypatch.setattr(wizard, "detect_machine", lambda folder: CPU)
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI reads args=, not pytest's command line
    path = tmp_path / "zero.yaml"
    assert main(["config", "--yes", "--stage", "3", "--accumulate-grad-batches", "2", "--format", "yaml", "--output",
                 str(path)]) == 0
    from lightning.pytorch.demos.boring_classes import BoringModel

    cli = LightningCLI(BoringModel, run=False, args=["--config", str(path), "--trainer.devices", "1",
                                                     "--trainer.logger", "false"])
    assert isinstance(cli.trainer.strategy, ZeroStrategy) and cli.trainer.strategy.stage == 3
    assert cli.trainer.accumulate_grad_batches == 2


def test_model_flag_sizes_a_transformers_model(tmp_path, capsys, monkeypatch):
    """--model builds the class on the meta device (as `estimate` does): a tiny GPT-2 from its config."""
    import transformers

    (tmp_path / "tiny_models.py").write_text(
        "import transformers\n\n"
        "class TinyGPT(transformers.GPT2LMHeadModel):\n"
        "    def __init__(self):\n"
        "        super().__init__(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,"
        " n_positions=128))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(wizard, "detect_machine", lambda folder: H100)
    out = tmp_path / "ds.json"
    assert main(["config", "--yes", "--model", "tiny_models:TinyGPT", "--output", str(out)]) == 0
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                                                 n_positions=128))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied weights once
    printed = capsys.readouterr().out
    assert f"TinyGPT, {total:,} parameters" in printed
    assert "TinyGPT (0.00B parameters): ZeroStrategy(stage=2) is the fastest choice that fits" in printed
    assert main(["config", "--yes", "--model", "tiny_models:Nope", "--output", str(tmp_path / "x.json")]) == 2
    assert "--model 'tiny_models:Nope': 'tiny_models' has no 'Nope'. Check the class name." in capsys.readouterr().err
