"""The questions of ``lightning-zero config``, in order (:data:`QUESTIONS`, :func:`next_question`), the
:class:`Question` type and the answer parsers. Each question returns None when it does not apply to the answers so
far; each parser raises ValueError quoting the answer."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_zero.wizard.defaults import _matching_recommendation, _offload_default, _ratio_default, recommend
from lightning_zero.wizard.machine import Context, _gib

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_YES, _NO = ("yes", "y", "true", "1"), ("no", "n", "false", "0", "none")


@dataclass(frozen=True)
class Question:
    key: str
    flag: str
    text: str
    default: str
    why: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------------------------
# Parsers: each raises ValueError quoting the answer
# --------------------------------------------------------------------------------------------------------------------


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}.")
        return value
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number; give one of at least 1.") from None
    if value < 1:
        raise ValueError(f"{text!r}: give a whole number of at least 1.")
    return value


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in _YES or value in _NO:
        return value in _YES
    raise ValueError(f"{text!r}: answer yes or no.")


def _clip(text: str) -> float | None:
    value = text.strip().lower()
    if value in _NO or value == "0":
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r}: give the largest gradient norm (e.g. 1.0), or none.") from None
    if not number > 0:
        raise ValueError(f"{text!r}: the clipping norm must be above 0 (none turns clipping off).")
    return number

# --------------------------------------------------------------------------------------------------------------------
# The questions, in order. Each returns None when it does not apply to the answers so far.
# --------------------------------------------------------------------------------------------------------------------


def _q_nodes(ctx: Context, a: Mapping[str, Any]) -> Question:
    m = ctx.machine
    why = f"from {m.nodes_source}" if m.nodes_source else "this machine alone; more nodes run under torchrun or SLURM"
    return Question("nodes", "--nodes", "How many nodes (machines)?", str(m.nodes), why, _positive_int)


def _q_devices(ctx: Context, a: Mapping[str, Any]) -> Question:
    m = ctx.machine
    if m.gpus:
        return Question("devices", "--devices", "GPUs per node?", str(m.gpus), f"{m.gpus} x {m.gpu_name} here,"
                        f" {_gib(m.gpu_memory_bytes or 0)} each", _positive_int)
    return Question("devices", "--devices", "Processes per node (no GPU here: CPU processes)?", "2",
                    "no CUDA GPU here: ZeroStrategy runs DeepSpeed on CPU processes (gloo), 2 to try it out",
                    _positive_int)


def _q_precision(ctx: Context, a: Mapping[str, Any]) -> Question:
    m = ctx.machine
    if m.gpus and m.bf16:
        default, why = "bf16-mixed", f"{m.gpu_name} supports bfloat16: half the memory, no loss scaling needed"
    elif m.gpus:
        default, why = "16-mixed", f"{m.gpu_name} has no bfloat16; float16 with DeepSpeed's dynamic loss scaling"
    else:
        default, why = "32-true", "CPU processes: float32 (the parity-tested CPU setting)"
    return Question("precision", "--precision", "Precision?", default, why, _choice(PRECISIONS), PRECISIONS)


def _stage(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _q_stage(ctx: Context, a: Mapping[str, Any]) -> Question:
    stage, _, _, why = recommend(ctx, a)
    choices = ("0", "1", "2", "3", "auto")
    return Question("stage", "--stage", "ZeRO stage (auto: ZeroStrategy decides at setup from the model and the free"
                    " memory)?", str(stage), why, lambda t: _stage(_choice(choices)(t)), choices)


def _q_offload_optimizer(ctx: Context, a: Mapping[str, Any]) -> Question | None:
    if a["stage"] in (0, "auto"):
        return None
    choices = ("none", "cpu", "nvme") if a["stage"] == 3 else ("none", "cpu")
    default, why = _offload_default(ctx, a, "offload_optimizer")
    return Question("offload_optimizer", "--offload-optimizer", "Offload the optimizer state and step?", default,
                    why or "keeps the optimizer on the GPU (fastest)", _choice(choices), choices)


def _q_offload_parameters(ctx: Context, a: Mapping[str, Any]) -> Question | None:
    if a["stage"] != 3:
        return None
    choices = ("none", "cpu", "nvme")
    default, why = _offload_default(ctx, a, "offload_parameters")
    return Question("offload_parameters", "--offload-parameters", "Offload the parameters?", default,
                    why or "keeps the parameter shards on the GPU (fastest)", _choice(choices), choices)


def _q_nvme_path(ctx: Context, a: Mapping[str, Any]) -> Question | None:
    if "nvme" not in (a.get("offload_optimizer"), a.get("offload_parameters")):
        return None
    from lightning_zero.config import NVME_PATH_ENV_VAR

    default = os.environ.get(NVME_PATH_ENV_VAR) or "/local_nvme"
    why = f"from ${NVME_PATH_ENV_VAR}" if os.environ.get(NVME_PATH_ENV_VAR) else "a folder on a local NVMe drive"
    return Question("nvme_path", "--nvme-path", "NVMe folder (checked now: exists, writable, free space)?", default,
                    why, lambda text: _check_nvme_path(text, ctx, a))


def _check_nvme_path(text: str, ctx: Context, a: Mapping[str, Any]) -> str:
    from lightning_zero.config import resolve_knobs
    from lightning_zero.offload import check_nvme

    path = os.path.abspath(os.path.expanduser(text.strip()))
    offload = [None if a.get(k, "none") == "none" else a[k] for k in ("offload_optimizer", "offload_parameters")]
    knobs = resolve_knobs(3, *offload, path)
    if a["precision"] != "32-true":
        knobs["bf16"] = {"enabled": True}
    world = a["nodes"] * a["devices"]
    check_nvme(knobs, ctx.model.params if ctx.model else None, a["devices"], world)  # ZeroConfigError: ValueError
    return path


STATES = {"fp32": 16, "bf16-master": 12, "bf16-master-states": 8}  # optimizer bytes per parameter


def _q_offload_ratio(ctx: Context, a: Mapping[str, Any]) -> Question | None:
    if a["stage"] != 3 or a.get("offload_optimizer") != "cpu":
        return None
    default, why = _ratio_default(ctx, a)

    def parse(text: str) -> float:
        from lightning_zero.config import resolve_knobs

        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number; give the share of the optimizer states CPU Adam steps,"
                             " above 0 and at most 1 (1.0: all of it).") from None
        resolve_knobs(3, "cpu", offload_optimizer_ratio=value)  # ZeroStrategy's own check and message
        return value
    return Question("offload_optimizer_ratio", "--offload-optimizer-ratio", "Partial offload: the share of the"
                    " optimizer states stepped by CPU Adam (the rest stays on the GPU)?", default, why, parse)


def _q_optimizer_states(ctx: Context, a: Mapping[str, Any]) -> Question | None:
    if not a["precision"].startswith("bf16-") or a["stage"] not in (1, 2, 3):
        return None
    row = _matching_recommendation(ctx, a)
    if row is not None and row.offload_ratio != a.get("offload_optimizer_ratio", 1.0):
        row = None
    default = next((k for k, v in STATES.items() if row is not None and v == row.state_bytes), "fp32")
    why = ("fp32 master weights and Adam states (16 bytes per parameter) train as without ZeRO; bf16-master (12,"
           " needs offload_optimizer) and bf16-master-states (8) cut the optimizer memory but change the numerics"
           " (convergence: docs/benchmarks.md)")
    if default != "fp32":
        why = f"nothing fits in fp32 by the estimate, {row.strategy()} does; {why}"

    def parse(text: str) -> str:
        from lightning_zero.config import TrainerFlags, check_zero_features, resolve_knobs

        value = _choice(tuple(STATES))(text)
        offload = [None if a.get(k, "none") == "none" else a[k] for k in ("offload_optimizer", "offload_parameters")]
        knobs = resolve_knobs(a["stage"], *offload, a.get("nvme_path"), **_state_keywords(a, value))
        check_zero_features(knobs, TrainerFlags(precision=a["precision"]))  # ZeroStrategy's checks and messages
        return value
    return Question("optimizer_states", "--optimizer-states", "Optimizer states: fp32, or bf16 to save memory?",
                    default, why, parse, tuple(STATES))


def _state_keywords(a: Mapping[str, Any], states: str | None = None) -> dict[str, Any]:
    """The ZeroStrategy keywords of the offload-mode answers (partial offload ratio, bf16 states)."""
    kwargs: dict[str, Any] = {}
    if a.get("offload_optimizer_ratio", 1.0) < 1.0:
        kwargs["offload_optimizer_ratio"] = a["offload_optimizer_ratio"]
    size = STATES[states or a.get("optimizer_states", "fp32")]
    if size <= 12:
        kwargs["bf16_master_weights_and_grads"] = True
    if size <= 8:
        kwargs["bf16_optimizer_states"] = True
    return kwargs


def _q_hpz(ctx: Context, a: Mapping[str, Any]) -> Question | None:
    if a["nodes"] < 2 or a["stage"] != 3:
        return None
    devices = a["devices"]

    def parse(text: str) -> int:
        value = _positive_int(text)
        if devices % value:
            raise ValueError(f"{text!r} must divide the GPUs per node ({devices}); 1 turns hpZ off.")
        return value
    return Question("zero_hpz_partition_size", "--zero-hpz-partition-size", "ZeRO++ hpZ: secondary weight partition"
                    " size (1 = off)?", str(devices), "a copy of the weights partitioned within each node: the"
                    " backward's all-gather stays on the fast intra-node links, for some GPU memory", parse)


def _q_quantized(key: str, what: str) -> Callable[[Context, Mapping[str, Any]], Question | None]:
    def question(ctx: Context, a: Mapping[str, Any]) -> Question | None:
        if a["nodes"] < 2 or a["stage"] != 3:
            return None
        return Question(key, f"--{key.replace('_', '-')}", f"ZeRO++: quantize the {what} (CUDA only)?", "no",
                        "halves that traffic across nodes but changes the numerics; try it when inter-node"
                        " bandwidth is the bottleneck", _yes_no, ("yes", "no"))
    return question


def _q_accumulate(ctx: Context, a: Mapping[str, Any]) -> Question:
    return Question("accumulate", "--accumulate-grad-batches", "Gradient accumulation (micro-batches per optimizer"
                    " step)?", "1", "one step per batch; more reaches a larger global batch without more memory",
                    _positive_int)


def _q_clip(ctx: Context, a: Mapping[str, Any]) -> Question:
    return Question("clip", "--gradient-clip-val", "Clip gradients at a global norm (a number, or none)?", "none",
                    "clipping changes the update, so it is off unless you choose it (1.0 is common for"
                    " transformers)", _clip)


def _q_activation(ctx: Context, a: Mapping[str, Any]) -> Question:
    choices = ("no", "yes", "cpu")
    return Question("activation_checkpointing", "--activation-checkpointing", "DeepSpeed activation checkpointing"
                    " (yes: partition checkpoints; cpu: also keep them in host memory)?", "no", "it applies only"
                    " where your model calls deepspeed.checkpointing.checkpoint(...)", _choice(choices), choices)


def _q_compile(ctx: Context, a: Mapping[str, Any]) -> Question:
    choices = ("none", "torch", "deepcompile")

    def parse(text: str) -> str:
        value = _choice(choices)(text)
        if value == "deepcompile" and not ctx.machine.gpus:
            raise ValueError("deepcompile needs a CUDA GPU (DeepSpeed's DeepCompile); use torch or none here.")
        if value == "deepcompile" and a["stage"] == 0:
            raise ValueError("deepcompile needs stage 1, 2 or 3; use torch or none at stage 0.")
        return value
    return Question("compile", "--compile", "Compile the networks (torch.compile, or DeepSpeed's DeepCompile)?",
                    "none", "compiling adds a warm-up and not every model captures a graph; turn it on once the run"
                    " works", parse, choices)


QUESTIONS = (_q_nodes, _q_devices, _q_precision, _q_stage, _q_offload_optimizer, _q_offload_parameters, _q_nvme_path,
             _q_offload_ratio, _q_optimizer_states, _q_hpz,
             _q_quantized("zero_quantized_weights", "weights' all-gather"),
             _q_quantized("zero_quantized_gradients", "gradients' reduce-scatter"), _q_accumulate, _q_clip,
             _q_activation, _q_compile)


def next_question(ctx: Context, answers: Mapping[str, Any]) -> Question | None:
    """The first question that applies to ``answers`` and is not answered yet (None: done)."""
    for build in QUESTIONS:
        question = build(ctx, answers)
        if question is not None and question.key not in answers:
            return question
    return None
