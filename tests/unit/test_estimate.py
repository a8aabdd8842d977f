"""lightning_zero.estimate: the arithmetic against hand-computed values, the recommendation, the command line and the
choice ZeroStrategy(stage="auto") makes."""

from __future__ import annotations

import os
import re

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest
import torch
from torch import nn

from helpers import GAN, Regressor
from lightning_zero.cli import main
from lightning_zero.estimate import (HOST_RUNTIME_GIB, GiB, auto_choice, count_with_configure_model, estimate_memory,
                                     estimate_offload_mode, model_size, transformer_activation_bytes)

P, LAYER = 10**9, 10**8  # 1B parameters, largest layer 100M; 1 node x 4 GPUs (N = 4)
F = 1.15  # host buffer factor (measured; DeepSpeed's estimators default to 1.5)

# (stage, offload_optimizer, offload_param) -> (bytes per GPU, host bytes per node, NVMe bytes per node), by hand,
# without the process runtime (host_runtime_gb=0; test_host_runtime_is_added_per_gpu_process adds it):
HAND = {
    # DeepSpeed ZeRO-2: GPU 2P + 18P/N = 2e9 + 4.5e9; host: nothing (DeepSpeed's 4P x 4 GPUs is the model loaded on
    # the CPU first, which a model built in configure_model never is)
    (2, "none", "none"): (6.5e9, 0, 0),
    # stage 1: + full 16-bit gradients: 2P - 2P/N = 1.5e9 more
    (1, "none", "none"): (8.0e9, 0, 0),
    # stage 0: the ZeRO-2 GPU figure on one GPU, 2P + 18P = 20e9
    (0, "none", "none"): (20e9, 0, 0),
    # ZeRO-3: GPU 4 x largest layer + 18P/N = 0.4e9 + 4.5e9; host: each GPU's 16-bit partition copied through host
    # memory at setup (defragment), 2P/N x 4 GPUs = 2e9
    (3, "none", "none"): (4.9e9, 2e9, 0),
    # ZeRO-2 offload: GPU 2P; host P x max(4N, 16) x F = 16e9 F
    (2, "cpu", "none"): (2e9, 16e9 * F, 0),
    # stage 1 offload: + full 16-bit gradients 2P
    (1, "cpu", "none"): (4e9, 16e9 * F, 0),
    # ZeRO-3 optimizer offload: GPU 4 x layer + 2P/N = 0.4e9 + 0.5e9; host 16P x F (1 node) + the setup copy 2e9
    (3, "cpu", "none"): (0.9e9, 16e9 * F + 2e9, 0),
    # ZeRO-3 everything offloaded: GPU 4 x layer; host 18P x F + the setup copy
    (3, "cpu", "cpu"): (0.4e9, 18e9 * F + 2e9, 0),
    # optimizer on NVMe: the optimizer's 16P go to the drive; host keeps 4 GPUs x 4 buffers x min(1e9, P/N = 2.5e8)
    # fp32 elements = 16e9, the fp32 gradients (partition + one sub-group: 4 GPUs x 4 bytes x 5e8 = 8e9, x F) and
    # the setup copy
    (3, "nvme", "none"): (0.9e9, 16e9 + 8e9 * F + 2e9, 16e9),
    # + parameters in host RAM: their part of DeepSpeed's host figure, (18P - 16P) x F, and the setup copy
    (3, "nvme", "cpu"): (0.4e9, 16e9 + 8e9 * F + 2e9 * F + 2e9, 16e9),
    # parameters on NVMe: 2P to the drive; host keeps 4 GPUs x 5 buffers x 1e8 elements x 2 bytes = 4e9 (no setup
    # copy)
    (3, "cpu", "nvme"): (0.4e9, 16e9 * F + 4e9, 2e9),
    (3, "nvme", "nvme"): (0.4e9, 16e9 + 8e9 * F + 4e9, 18e9),
}


def _by_choice(plan) -> dict:
    return {(r.stage, r.offload_optimizer, r.offload_parameters): (r.gpu_bytes, r.cpu_bytes, r.nvme_bytes)
            for r in plan.rows}


def test_every_row_matches_the_hand_computation() -> None:
    plan = estimate_memory(P, LAYER, num_nodes=1, gpus_per_node=4, precision="bf16-mixed", host_runtime_gb=0)
    assert list(_by_choice(plan)) == list(HAND)  # every stage x offload choice, fastest first
    for choice, got in _by_choice(plan).items():
        assert got == pytest.approx(HAND[choice], rel=1e-9), choice
    assert all(r.fits is False for r in plan.rows if r.nvme_bytes)  # NVMe rows need nvme_gb
    assert all(r.fits is None for r in plan.rows if not r.nvme_bytes)  # no capacity given: not checked
    assert plan.recommended is None


def test_two_nodes_split_the_host_figures() -> None:
    # 2 nodes x 4 GPUs (N = 8): ZeRO-3 offload host figure per node 16P / 2 nodes x F + 4 GPUs' setup copies of
    # 2P/8; GPU 0.4e9 + 2P/8
    plan = _by_choice(estimate_memory(P, LAYER, num_nodes=2, gpus_per_node=4, host_runtime_gb=0))
    assert plan[(3, "cpu", "none")] == pytest.approx((0.65e9, 8e9 * F + 1e9, 0))
    # ZeRO-2 offload host: P x max(4 x 8, 16) x F per node (DeepSpeed's figure)
    assert plan[(2, "cpu", "none")] == pytest.approx((2e9, 32e9 * F, 0))
    # optimizer on NVMe: 16P / 2 nodes = 8e9 per node on the drive
    assert plan[(3, "nvme", "none")][2] == pytest.approx(8e9)


def test_fp32_adds_two_bytes_per_resident_weight_and_gradient() -> None:
    plan = _by_choice(estimate_memory(P, LAYER, gpus_per_node=4, precision="32-true", host_runtime_gb=0))
    # stage 2: weights P + gradient partition P/4 -> 6.5e9 + 2 x 1.25e9
    assert plan[(2, "none", "none")][0] == pytest.approx(9e9)
    # stage 3, nothing offloaded: gathered layer + weight and gradient partitions -> 4.9e9 + 2 x (1e8 + 5e8)
    assert plan[(3, "none", "none")][0] == pytest.approx(6.1e9)
    # everything offloaded: the host keeps 4-byte weights, its parameter part 2P x F doubles, and so does the setup
    # copy
    assert plan[(3, "cpu", "cpu")][1] == pytest.approx(20e9 * F + 4e9)


def test_activations_add_to_the_model_states_per_gpu() -> None:
    plan = _by_choice(estimate_memory(P, LAYER, gpus_per_node=4, activation_memory_gb=2))
    # stages 1-2: the fp32 gradient partition (4P/N = 1e9) exists only in the optimizer step, never with activations
    assert plan[(2, "none", "none")][0] == pytest.approx(6.5e9 - 1e9 + 2 * GiB)
    assert plan[(1, "none", "none")][0] == pytest.approx(8.0e9 - 1e9 + 2 * GiB)
    assert plan[(3, "none", "none")][0] == pytest.approx(4.9e9 + 2 * GiB)
    assert plan[(2, "cpu", "none")][0] == pytest.approx(2e9 + 2 * GiB)  # offloaded: the step runs on the host
    # activations smaller than the step-only part: the step is the peak
    small = _by_choice(estimate_memory(P, LAYER, gpus_per_node=4, activation_memory_gb=0.5))
    assert small[(2, "none", "none")][0] == pytest.approx(6.5e9)


def test_transformer_activations_by_hand() -> None:
    # 8 x 1024 tokens, d 2048, 16 layers, vocab 50304, 16-bit: 17 elements x 2 bytes per token, layer and hidden unit
    # = 34 x 8192 x 2048 x 16; the loss 8192 x 50304 x (2 + 4 + 4)
    got = transformer_activation_bytes(hidden=2048, layers=16, seq_len=1024, micro_batch=8, vocab=50304)
    assert got == 34 * 8192 * 2048 * 16 + 8192 * 50304 * 10
    # checkpointing: each layer keeps its 16-bit input, plus one layer recomputed at a time
    ckpt = transformer_activation_bytes(hidden=2048, layers=16, seq_len=1024, micro_batch=8, checkpointing=True)
    assert ckpt == 2 * 8192 * 2048 * 16 + 34 * 8192 * 2048
    # float32: twice the bytes, and no separate float32 copy of the logits
    fp32 = transformer_activation_bytes(hidden=2048, layers=16, seq_len=1024, micro_batch=8, vocab=50304,
                                        bytes_per_element=4)
    assert fp32 == 68 * 8192 * 2048 * 16 + 8192 * 50304 * 8


@pytest.mark.parametrize(("stage", "offload", "micro_batch", "checkpointing", "measured_gib"), [
    # measured peaks on one H100 (bench/results, docs/benchmarks.md "Memory estimate against measured peaks")
    (2, "none", 8, False, 24.62), (3, "none", 8, False, 26.69), (3, "cpu", 8, False, 14.81),
])
def test_expected_peak_is_within_15_percent_of_the_measured_one_for_the_09b_gpt(stage, offload, micro_batch,
                                                                               checkpointing, measured_gib) -> None:
    act = transformer_activation_bytes(hidden=2048, layers=16, seq_len=1024, micro_batch=micro_batch, vocab=50304,
                                       checkpointing=checkpointing)
    plan = _by_choice(estimate_memory(910_561_280, 50304 * 2048, activation_memory_gb=act / GiB,
                                      choices=((stage, offload, "none"),)))
    assert plan[(stage, offload, "none")][0] / GiB == pytest.approx(measured_gib, rel=0.15)


@pytest.mark.parametrize(("gpu", "cpu", "nvme", "expected"), [
    (80, 512, None, (2, "none", "none")),  # everything fits: stage 2
    (5, 100, None, (3, "none", "none")),  # 6.5e9 B = 6.05 GiB > 5: stage 3 (4.56 GiB)
    (4, 100, None, (2, "cpu", "none")),  # stage 3 needs 4.56 GiB: offload the optimizer (1.86 GiB GPU, 24.3 GiB host)
    (0.5, 100, None, (3, "cpu", "cpu")),  # only 0.37 GiB (4 x largest layer) fits the GPU (28.3 GiB host)
    # host 28.3 GiB > 27 and NVMe does not help: with sub_group_size 1e9 > the partition (2.5e8) DeepSpeed's swap
    # buffers hold 4 x the whole partition in fp32, as much as the offloaded states (28.1 to 34.7 GiB host)
    (0.5, 27, 100, None),
    (0.5, 10, 100, None),  # nothing fits
])
def test_recommendation_is_the_fastest_row_that_fits(gpu, cpu, nvme, expected) -> None:
    plan = estimate_memory(P, LAYER, gpus_per_node=4, gpu_memory_gb=gpu, cpu_memory_gb=cpu, nvme_gb=nvme)
    got = plan.recommended
    assert (got and (got.stage, got.offload_optimizer, got.offload_parameters)) == expected
    if got:
        assert got.fits and got.gpu_bytes <= gpu * GiB and got.cpu_bytes <= cpu * GiB
        faster = [r for r in plan.rows[:plan.rows.index(got)]]
        assert all(not r.fits and r.why_not for r in faster)


def test_strategy_call_of_a_row() -> None:
    # 10B on 4 GPUs: partitions of 2.5e9 > sub_group_size, so NVMe's swap buffers (4 x 1e9 fp32 per GPU) are smaller
    # than the offloaded states: everything offloaded to CPU needs 219 GiB of host memory, the optimizer on NVMe 167
    plan = estimate_memory(10 * P, LAYER, gpus_per_node=4, gpu_memory_gb=0.5, cpu_memory_gb=170, nvme_gb=1000)
    assert plan.recommended.strategy("/nvme") == ("ZeroStrategy(stage=3, offload_optimizer='nvme',"
                                                  " offload_parameters='cpu', nvme_path='/nvme')")
    assert plan.rows[0].strategy() == "ZeroStrategy(stage=2)"


def test_bad_inputs_name_the_fix() -> None:
    with pytest.raises(ValueError, match="needs largest_layer_params"):
        estimate_memory(P)
    with pytest.raises(ValueError, match="needs num_params"):
        estimate_memory()
    with pytest.raises(ValueError, match=r"estimate_memory\(gpus_per_node=0\) must be a positive integer"):
        estimate_memory(P, LAYER, gpus_per_node=0)
    with pytest.raises(ValueError, match="0 <= largest_layer_params <= num_params"):
        estimate_memory(10, 20)


def test_model_size_counts_like_deepspeed_without_allocating() -> None:
    with torch.device("meta"):
        shared = nn.Linear(100, 50)  # 5050, the largest layer
        model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(50, 10))  # + 510
    assert model_size(model) == (5560, 5050)
    plan = estimate_memory(model=model, gpus_per_node=2)
    assert (plan.num_params, plan.largest_layer_params) == (5560, 5050)


def test_count_with_configure_model_leaves_the_module_untouched() -> None:
    # GAN builds generator (4x16+16, 16x2+2) and discriminator (2x16+16, 16x1+1) in configure_model: 114 + 65 = 179
    gan = GAN()
    rng = torch.random.get_rng_state()
    assert count_with_configure_model(gan) == (179, 80)
    assert not hasattr(gan, "generator") and not list(gan.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)
    # a module without configure_model is counted as it is: 8x16+16 + 16x16+16 + 16+1 = 433, largest 272
    assert count_with_configure_model(Regressor()) == (433, 272)


def test_count_with_configure_model_explains_a_failure() -> None:
    class Broken(Regressor):
        def configure_model(self) -> None:
            self.extra = nn.Linear(2, 2).to("cpu").weight.sum().item()  # needs real data

    with pytest.raises(RuntimeError, match=r"counts the parameters by running Broken.configure_model\(\) on the meta"
                                           r" device first, which failed: .*Name the stage instead"):
        count_with_configure_model(Broken())


def test_auto_choice_on_cpu_keeps_the_states_in_host_memory() -> None:
    # 1e9 parameters, 2 processes: stage 2 needs 2e9 + 18e9/2 = 11e9 B = 10.2 GiB per process
    row, message = auto_choice(P, LAYER, num_nodes=1, devices_per_node=2, device_type="cpu", precision="bf16-mixed",
                               gpu_free_bytes=None, cpu_free_bytes=64 * GiB)
    assert (row.stage, row.offload_optimizer, row.offload_parameters) == (2, "none", "none")
    assert message == ("ZeroStrategy(stage=\"auto\"): no GPU, so the model states live in host memory whatever the"
                       " stage and offloading gains nothing; chose stage 2 (1.00B parameters: about 10.24 GiB per"
                       " process, 2 process(es) per node, 64.00 GiB host memory available).")
    # 20 GiB host for 2 processes = 10 GiB each: stage 2 (10.24 GiB) does not fit, stage 3 (0.4e9 + 9e9 = 8.75 GiB)
    # does; with 16 GiB (8 each) nothing fits: refused (tests/unit/test_bad_inputs.py checks the message)
    row, _ = auto_choice(P, LAYER, num_nodes=1, devices_per_node=2, device_type="cpu", precision="bf16-mixed",
                         gpu_free_bytes=None, cpu_free_bytes=20 * GiB)
    assert (row.stage, row.offload_optimizer, row.offload_parameters) == (3, "none", "none")
    with pytest.raises(ValueError, match="fit no ZeRO stage or offload by the estimate"):
        auto_choice(P, LAYER, num_nodes=1, devices_per_node=2, device_type="cpu", precision="bf16-mixed",
                    gpu_free_bytes=None, cpu_free_bytes=16 * GiB)


def test_auto_choice_on_gpus() -> None:
    row, message = auto_choice(P, LAYER, num_nodes=1, devices_per_node=4, device_type="cuda", precision="bf16-mixed",
                               gpu_free_bytes=4 * GiB, cpu_free_bytes=100 * GiB)
    assert (row.stage, row.offload_optimizer) == (2, "cpu")
    assert message.startswith("ZeroStrategy(stage=\"auto\"): 1.00B parameters (largest layer 100.0M) on 1 x 4"
                              " GPU(s) with 4.00 GiB free per GPU and 100.00 GiB host memory available:"
                              " ZeroStrategy(stage=2, offload_optimizer='cpu') is the fastest choice that fits")
    # without nvme_path NVMe is never chosen; when nothing fits, "auto" refuses (test_bad_inputs.py: the options)
    with pytest.raises(ValueError, match=r"fit no ZeRO stage or offload by the estimate.*Options: devices with more"):
        auto_choice(P, LAYER, num_nodes=1, devices_per_node=4, device_type="cuda", precision="bf16-mixed",
                    gpu_free_bytes=GiB // 4, cpu_free_bytes=10 * GiB)


def test_command_line_with_parameter_counts(capsys) -> None:
    code = main(["estimate", "--params", "1e9", "--largest-layer", "1e8", "--nodes", "1", "--gpus-per-node", "4",
                 "--gpu-memory", "5", "--cpu-memory", "100"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == ("Model states of 1.00B parameters (largest layer 100.0M) on 1 node(s) x 4"
                                   " GPU(s); activations not included.")
    # host: 4 processes x 1.8 GiB of runtime (+ stage 3's setup copies of the 16-bit partitions, 4 x 2P/4)
    assert "    2  none               none             6.05 GiB    7.20 GiB           -  no (GPU)" in out
    assert "    3  none               none             4.56 GiB    9.06 GiB           -  yes" in out
    assert out.rstrip().endswith("Recommended (fastest that fits): ZeroStrategy(stage=3)")


def test_command_line_with_a_model_class(capsys) -> None:
    assert main(["estimate", "--model", "helpers:GAN", "--gpus-per-node", "2", "--gpu-memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "Model states of 179 parameters (largest layer 80)" in out and out.rstrip().endswith("ZeroStrategy(stage=2)")


def test_command_line_errors(capsys) -> None:
    assert main(["estimate", "--params", "1e9"]) == 2
    assert "--params needs --largest-layer" in capsys.readouterr().err
    assert main(["estimate", "--params", "1e12", "--largest-layer", "1e9", "--gpu-memory", "80", "--cpu-memory",
                 "64"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("Nothing fits: add GPUs or nodes, host memory or NVMe space.")


def test_host_runtime_is_added_per_gpu_process(capsys) -> None:
    # every host figure holds HOST_RUNTIME_GIB (1.8) per GPU process: 4 per node here
    plain = _by_choice(estimate_memory(P, LAYER, gpus_per_node=4, host_runtime_gb=0))
    for runtime in (HOST_RUNTIME_GIB, 3.0):
        got = _by_choice(estimate_memory(P, LAYER, gpus_per_node=4, host_runtime_gb=runtime))
        assert {k: v[1] - plain[k][1] for k, v in got.items()} == pytest.approx(
            dict.fromkeys(plain, 4 * runtime * GiB), abs=2)
    mode = estimate_offload_mode(P, LAYER, gpus_per_node=4, offload_ratio=0.5, sub_group_size=10**8)
    bare = estimate_offload_mode(P, LAYER, gpus_per_node=4, offload_ratio=0.5, sub_group_size=10**8,
                                 host_runtime_gb=0)
    assert mode.cpu_bytes - bare.cpu_bytes == pytest.approx(4 * HOST_RUNTIME_GIB * GiB, abs=2)
    # stage="auto" fits the host memory with it: 24 GiB for 4 processes leaves no room for stage 2 + full fp32
    # offload (17.14 GiB of states + 7.2 of runtime), so the optimizer keeps bf16 master weights (12.85 + 7.2 GiB)
    kwargs = dict(num_nodes=1, devices_per_node=4, device_type="cuda", precision="bf16-mixed",
                  gpu_free_bytes=4 * GiB, cpu_free_bytes=24 * GiB)
    assert auto_choice(P, LAYER, **kwargs)[0].keywords() == {"bf16_master_weights_and_grads": True}
    row, _ = auto_choice(P, LAYER, host_runtime_gb=0, **kwargs)
    assert (row.stage, row.offload_optimizer, row.keywords()) == (2, "cpu", {})
    with pytest.raises(ValueError, match=r"estimate_memory\(host_runtime_gb=-1\) must be at least 0: the GiB of host"
                                         r" memory each GPU process holds outside the model states \(measured: 1.8\)"):
        estimate_memory(P, LAYER, host_runtime_gb=-1)
    # the command line: --host-runtime 0 leaves stage 2's host column empty (no model state lives there)
    assert main(["estimate", "--params", "1e9", "--largest-layer", "1e8", "--gpus-per-node", "4",
                 "--host-runtime", "0"]) == 0
    assert "    2  none               none             6.05 GiB           -" in capsys.readouterr().out
    assert main(["estimate", "--params", "1e9", "--largest-layer", "1e8", "--host-runtime", "-1"]) == 2
    assert "--host-runtime -1: give the GiB of host memory each GPU process holds" in capsys.readouterr().err


def _estimate_rows(argv: list[str], capsys) -> dict:
    """The CLI's figures in GiB: table rows by (stage, offload_optimizer, offload_param), offload-mode rows by
    (stage, share on the host, optimizer state)."""
    assert main(["estimate", *argv]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if m := re.match(r"\s+(\d)\s+(none|cpu|nvme)\s+(none|cpu|nvme)\s+([\d.]+) GiB\s+([\d.]+) GiB", line):
            rows[(int(m[1]), m[2], m[3])] = (float(m[4]), float(m[5]))
        elif m := re.match(r"\s+(\d)\s+(\d+%)\s+(fp32|bf16 master\+states|bf16 master)\s+([\d.]+) GiB\s+([\d.]+) GiB",
                           line):
            rows[(int(m[1]), m[2], m[3])] = (float(m[4]), float(m[5]))
    return rows


GPT09 = ["--params", "910561280", "--largest-layer", "103022592", "--hidden", "2048", "--layers", "16", "--seq-len",
         "1024", "--micro-batch", "8", "--vocab", "50304"]
GPT10B = ["--params", "10329794560", "--largest-layer", "257556480", "--hidden", "5120", "--layers", "32",
          "--seq-len", "1024", "--micro-batch", "8", "--vocab", "50304", "--activation-checkpointing"]
GPT6B = ["--params", "6250536960", "--largest-layer", "2.06e8", "--hidden", "4096", "--layers", "30", "--seq-len",
         "1024", "--micro-batch", "4", "--vocab", "50304"]
PARTIAL = ["--sub-group-size", "5e7", "--offload-ratio"]  # 19 sub-groups: 0.25 -> 5 of 19 (26%), 0.5 -> 10, 0.75 -> 15
BF16M, BF16MS = ["--bf16-master-weights"], ["--bf16-master-weights", "--bf16-optimizer-states"]


@pytest.mark.parametrize(("argv", "row", "gpu_gib", "host_gib"), [
    # measured on one H200 (bench/results/offload_goal_h200.json, offload_modes_h200.json, offload_nvme_h200.json,
    # largest_10b_h200.json; host: peak RSS of the training process), GPT 0.9B, 8 x 1024 tokens, bf16-mixed
    (GPT09, (3, "none", "none"), 26.68, 3.32),
    (GPT09, (3, "cpu", "none"), 14.81, 19.99),
    (GPT09 + PARTIAL + ["0.25"], (3, "26%", "fp32"), 25.38, 8.03),
    (GPT09 + PARTIAL + ["0.5"], (3, "53%", "fp32"), 22.38, 11.28),
    (GPT09 + PARTIAL + ["0.75"], (3, "79%", "fp32"), 18.63, 15.34),
    (GPT09 + BF16M, (3, "100%", "bf16 master"), 14.81, 14.60),
    (GPT09 + BF16MS, (3, "100%", "bf16 master+states"), 14.81, 11.21),
    (GPT09 + BF16MS, (2, "0%", "bf16 master+states"), 19.54, 1.83),
    (GPT09, (3, "nvme", "none"), 14.81, 26.17),
    # 10.3B at stage 2 with bf16 master weights and states, activation checkpointing: the peak is the optimizer step
    (GPT10B + BF16MS, (2, "0%", "bf16 master+states"), 115.51, 1.82),
    # on one H100 (bench/results/host_1b_params.json, host_6b.json): parameters offloaded too; 6.25B, 4 x 1024
    (GPT09, (3, "cpu", "cpu"), None, 22.17),
    (GPT6B, (3, "cpu", "none"), 29.46, 114.91),
])
def test_estimate_is_within_10_percent_of_the_measured_peaks(argv, row, gpu_gib, host_gib, capsys) -> None:
    gpu, host = _estimate_rows(argv, capsys)[row]
    if gpu_gib is not None:
        assert gpu == pytest.approx(gpu_gib, rel=0.10)
    assert host == pytest.approx(host_gib, rel=0.10)
