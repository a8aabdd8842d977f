"""``lightning-zero config``: an interactive DeepSpeed config generator, one question at a time.

    lightning-zero config                                         # asks; defaults from this machine
    lightning-zero config --model my_pkg.models:GPT               # defaults sized by the estimator for that model
    lightning-zero config --params 7e9 --largest-layer 2e8 --yes  # no questions: every default (scripts, CI)
    lightning-zero config --stage 3 --offload-optimizer cpu --format yaml --output zero.yaml

Every question shows a recommended default and why; every question has a flag, and ``--yes`` takes the defaults of
the questions no flag answered. Nothing is written that was not chosen: "no clipping" writes
``"gradient_clipping": 0.0``, which ZeroStrategy then holds the Trainer to. The file is written to a temporary file
next to the output, validated by building a ``ZeroStrategy`` from it, then renamed: Ctrl-C or end of input leaves no
half-written file.

The question logic is pure (:func:`next_question`, :func:`recommend`, :func:`build_outputs`); :func:`run_session`
drives it with an ``ask`` callable (``input`` in a terminal), so it can be tested without one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Context", "Machine", "ModelSize", "Question", "add_parser", "build_outputs", "detect_machine",
           "next_question", "recommend", "run", "run_session"]

GiB = 2**30
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_YES, _NO = ("yes", "y", "true", "1"), ("no", "n", "false", "0", "none")


@dataclass(frozen=True)
class Machine:
    """This machine, as the defaults see it (``gpu_memory_bytes`` None: no CUDA GPU)."""

    gpus: int = 0
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    bf16: bool = False
    host_memory_bytes: int = 0
    nodes: int = 1
    nodes_source: str = ""  # e.g. "$SLURM_NNODES"
    disk_free_bytes: int | None = None  # in the output's folder

    def describe(self) -> str:
        gpus = (f"{self.gpus} x {self.gpu_name} ({_gib(self.gpu_memory_bytes or 0)} each)" if self.gpus
                else "no CUDA GPU")
        disk = f", {_gib(self.disk_free_bytes)} free disk here" if self.disk_free_bytes is not None else ""
        return f"{gpus}, {_gib(self.host_memory_bytes)} host memory available{disk}"


@dataclass(frozen=True)
class ModelSize:
    params: int
    largest_layer: int
    name: str


@dataclass(frozen=True)
class Context:
    machine: Machine
    model: ModelSize | None = None


@dataclass(frozen=True)
class Question:
    key: str
    flag: str
    text: str
    default: str
    why: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] = ()


@dataclass
class Session:
    answers: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)  # key -> how the value was chosen (for the summary)


def detect_machine(environ: Mapping[str, str] | None = None, folder: str = ".") -> Machine:
    import shutil

    import torch

    from lightning_zero.estimate import _host_memory_available

    environ = os.environ if environ is None else environ
    nodes, source = 1, ""
    for var in ("SLURM_NNODES", "NNODES", "PET_NNODES"):
        if environ.get(var, "").isdigit():
            nodes, source = int(environ[var]), f"${var}"
            break
    disk = int(shutil.disk_usage(folder).free)
    if not torch.cuda.is_available():
        return Machine(host_memory_bytes=_host_memory_available(), nodes=nodes, nodes_source=source,
                       disk_free_bytes=disk)
    props = torch.cuda.get_device_properties(0)
    return Machine(torch.cuda.device_count(), props.name, int(props.total_memory), torch.cuda.is_bf16_supported(),
                   _host_memory_available(), nodes, source, disk)


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
# Defaults from the estimator
# --------------------------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _plan(ctx: Context, answers: Mapping[str, Any]) -> Any:
    from lightning_zero.estimate import estimate_memory

    m, model = ctx.machine, ctx.model
    gpu = m.gpu_memory_bytes / GiB if m.gpu_memory_bytes else None
    return estimate_memory(model.params, model.largest_layer, num_nodes=answers["nodes"],  # type: ignore[union-attr]
                           gpus_per_node=answers["devices"], gpu_memory_gb=gpu,
                           cpu_memory_gb=m.host_memory_bytes / GiB, precision=answers["precision"])


def recommend(ctx: Context, answers: Mapping[str, Any]) -> tuple[int, str, str, str]:
    """``(stage, offload_optimizer, offload_parameters, why)`` from the estimator, for the answers so far."""
    if ctx.model is None:
        return 2, "none", "none", ("no model given (--model pkg.module:Class, or --params/--largest-layer), so no"
                                   " size to plan for: stage 2 partitions gradients and optimizer state at DDP's"
                                   " speed; stage 3 also partitions the parameters, for models too big for stage 2")
    size = f"{ctx.model.name} ({ctx.model.params / 1e9:.2f}B parameters)"
    if ctx.machine.gpu_memory_bytes is None:
        from lightning_zero.estimate import auto_choice

        try:
            row, _ = auto_choice(ctx.model.params, ctx.model.largest_layer, num_nodes=answers["nodes"],
                                 devices_per_node=answers["devices"], device_type="cpu",
                                 precision=answers["precision"], gpu_free_bytes=None,
                                 cpu_free_bytes=ctx.machine.host_memory_bytes)
        except ValueError:
            return 3, "none", "none", (f"{size} does not fit this machine's host memory at any stage (CPU processes"
                                       " keep the model states in host memory); stage 3 needs the least")
        return row.stage, "none", "none", (f"{size} on CPU processes: the model states live in host memory whatever"
                                           f" the stage, so offload gains nothing; stage {row.stage} is the fastest"
                                           f" that fits ({_gib(row.gpu_bytes)} per process of"
                                           f" {_gib(ctx.machine.host_memory_bytes)} available)")
    plan, row = _fastest(ctx, answers)
    of = f"of your {_gib(ctx.machine.gpu_memory_bytes)}"
    if row is None:
        frugal = [r for r in plan.rows if "nvme" not in (r.offload_optimizer, r.offload_parameters)][-1]
        return 3, "cpu", "cpu", (f"{size} fits no choice by the estimate: the most frugal without NVMe needs"
                                 f" {_gib(frugal.gpu_bytes)} per GPU {of} and {_gib(frugal.cpu_bytes)} host memory;"
                                 " offload to NVMe below, or use more nodes")
    why = (f"{size}: {row.strategy()} is the fastest choice that fits, model states about {_gib(row.gpu_bytes)} per"
           f" GPU {of} and {_gib(row.cpu_bytes)} host memory per node (activations come on top)")
    roomier = min((r for r in plan.rows if r.fits and r.gpu_bytes < row.gpu_bytes), key=lambda r: r.gpu_bytes,
                  default=None)
    if roomier is not None:
        why += f"; {roomier.strategy()} leaves the most room for activations ({_gib(roomier.gpu_bytes)} per GPU)"
    return row.stage, row.offload_optimizer, row.offload_parameters, why + _mode_note(row, plan)


def _fastest(ctx: Context, answers: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(plan, the fastest row that fits with the offload modes, or None)``, as ``stage="auto"`` would choose on
    this machine's GPUs (:func:`lightning_zero.estimate.fastest_fit`)."""
    from lightning_zero.estimate import fastest_fit

    plan = _plan(ctx, answers)
    return plan, fastest_fit(plan, ctx.machine.gpu_memory_bytes, ctx.machine.host_memory_bytes,
                             precision=answers["precision"])


def _mode_note(row: Any, plan: Any) -> str:
    from lightning_zero.estimate import _mode_note as note

    return (". " + note(row, plan).strip().rstrip(".")) if row.keywords() else ""


def _offload_default(ctx: Context, answers: Mapping[str, Any], which: str) -> tuple[str, str]:
    """The estimator's ``which`` offload for the chosen stage (and optimizer offload): the fastest that fits."""
    stage, opt_rec, param_rec, why = recommend(ctx, answers)
    if ctx.model is None:
        return "none", "no model size to plan for, and offload costs speed"
    if ctx.machine.gpu_memory_bytes is None:
        return "none", "CPU processes: the model states are in host memory already, offload gains nothing"
    if answers["stage"] == stage and (which == "offload_optimizer" or answers["offload_optimizer"] == opt_rec):
        return (opt_rec if which == "offload_optimizer" else param_rec), why
    rows = [r for r in _plan(ctx, answers).rows if r.stage == answers["stage"]
            and (which == "offload_optimizer" or r.offload_optimizer == answers["offload_optimizer"])]
    row = next((r for r in rows if r.fits), None)
    verdict = "the fastest choice that fits at this stage"
    if row is None:
        row = ([r for r in rows if "nvme" not in (r.offload_optimizer, r.offload_parameters)] or rows)[-1]
        verdict = "nothing fits at this stage by the estimate; the most frugal without NVMe"
    return getattr(row, which), f"{verdict}: {row.strategy()}, model states about {_gib(row.gpu_bytes)} per GPU"


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


def _matching_recommendation(ctx: Context, a: Mapping[str, Any]) -> Any:
    """The estimator's row with its offload modes when the answers so far chose the same stage and offload."""
    if ctx.model is None or ctx.machine.gpu_memory_bytes is None:
        return None
    row = _fastest(ctx, a)[1]
    same = row is not None and (row.stage, row.offload_optimizer, row.offload_parameters) == (
        a["stage"], a.get("offload_optimizer", "none"), a.get("offload_parameters", "none"))
    return row if same else None


def _ratio_default(ctx: Context, a: Mapping[str, Any]) -> tuple[str, str]:
    from lightning_zero.estimate import partial_offload_fit

    full = ("1.0 offloads the whole optimizer; a share below 1 keeps the rest on the GPU (stepped there, faster) for"
            " 16 bytes per parameter of GPU memory")
    row = _matching_recommendation(ctx, a)
    if row is not None:
        return str(row.offload_ratio), f"the estimator's choice: {row.strategy()}"
    if ctx.model is None or ctx.machine.gpu_memory_bytes is None or a.get("offload_parameters", "none") != "none":
        return "1.0", full
    fit = partial_offload_fit(_plan(ctx, a), ctx.machine.gpu_memory_bytes, ctx.machine.host_memory_bytes,
                              precision=a["precision"])
    if fit is None:
        return "1.0", f"{full}; by the estimate no share below 1 fits (or one sub-group per GPU cannot be split)"
    return str(fit.offload_ratio), (f"the smallest share on the host that fits by the estimate: {fit.strategy()},"
                                    f" model states about {_gib(fit.gpu_bytes)} per GPU")


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


def run_session(ctx: Context, flags: Mapping[str, str], ask: Callable[[Question, int], str] | None,
                out: Callable[[str], None] = print, check_defaults: bool = True) -> Session:
    """Answer every question: from ``flags`` (flag -> text), else by ``ask`` (re-asked until it parses), else (ask
    None) the default. A flag that does not parse raises ValueError; so does a flag whose question never applied.
    ``check_defaults=False`` (the check of the flags before an interactive session) keeps a default that does not
    parse (an NVMe folder that is not there yet) as it is written, and leaves the flags whose question the defaults
    skip to the real session."""
    session, number = Session(), 0
    while (question := next_question(ctx, session.answers)) is not None:
        number += 1
        if question.flag in flags:
            try:
                value = question.parse(flags[question.flag])
            except ValueError as err:
                raise ValueError(f"{question.flag} {flags[question.flag]}: {err}") from None
            session.answers[question.key], session.why[question.key] = value, f"{question.flag}"
            continue
        if ask is None:
            try:
                session.answers[question.key] = question.parse(question.default)
            except ValueError as err:
                if check_defaults:
                    raise ValueError(f"the default of {question.flag} ({question.default}) does not work here: {err}"
                                     f" Give {question.flag} yourself.") from None
                session.answers[question.key] = question.default
            session.why[question.key] = f"default: {question.why}"
            continue
        while True:
            text = ask(question, number).strip() or question.default
            try:
                session.answers[question.key] = question.parse(text)
                break
            except ValueError as err:
                out(f"  ! {err}")
        session.why[question.key] = ("default: " + question.why) if text == question.default else "your answer"
    unused = [f for f in flags if f not in {q(ctx, session.answers).flag for q in QUESTIONS
                                            if q(ctx, session.answers) is not None}]
    if unused and check_defaults:  # (the pre-check's default answers may differ from what will be answered)
        raise ValueError(f"{', '.join(f'{f} {flags[f]}' for f in unused)}: that question does not apply with these"
                         f" answers (stage {session.answers['stage']!r}, {session.answers['nodes']} node(s)). Remove"
                         " the flag or change the answer it depends on (e.g. --stage 3 for parameter offload or"
                         " ZeRO++, --nodes 2+ for ZeRO++, an nvme offload for --nvme-path, --stage 3 with"
                         " --offload-optimizer cpu for --offload-optimizer-ratio, a bf16 precision at stages 1-3 for"
                         " --optimizer-states).")
    return session


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


def _strategy_kwargs(a: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"stage": a["stage"]}
    for key in ("offload_optimizer", "offload_parameters"):
        if a.get(key, "none") != "none":
            kwargs[key] = a[key]
    if "nvme_path" in a:
        kwargs["nvme_path"] = a["nvme_path"]
    kwargs.update(_state_keywords(a))
    if a.get("zero_hpz_partition_size", 1) > 1:
        kwargs["zero_hpz_partition_size"] = a["zero_hpz_partition_size"]
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if a.get(key):
            kwargs[key] = True
    if a["activation_checkpointing"] != "no":
        kwargs["partition_activations"] = True
        kwargs["cpu_checkpointing"] = a["activation_checkpointing"] == "cpu"
    if a["compile"] != "none":
        kwargs["compile"] = True if a["compile"] == "torch" else "deepcompile"
    return kwargs


def trainer_flags(a: Mapping[str, Any]) -> dict[str, Any]:
    return {"precision": a["precision"], "accumulate_grad_batches": a["accumulate"], "gradient_clip_val": a["clip"]}


def build_outputs(a: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(DeepSpeed JSON config, LightningCLI YAML block)`` for the answers."""
    from lightning_zero.config import resolve_knobs

    kwargs = _strategy_kwargs(a)
    stage = kwargs.pop("stage")
    compile_ = kwargs.pop("compile", None)
    ds = resolve_knobs(None if stage == "auto" else stage, **kwargs)
    ds["bf16"] = {"enabled": a["precision"].startswith("bf16"), **ds.get("bf16", {})}  # + the bf16 states
    ds["fp16"] = {"enabled": a["precision"].startswith("16")}
    ds["gradient_accumulation_steps"] = a["accumulate"]
    ds["gradient_clipping"] = a["clip"] or 0.0  # 0.0: no clipping, said explicitly
    if compile_ == "deepcompile":
        ds["compile"] = {"deepcompile": True}
    init_args = _strategy_kwargs(a)
    yaml_block = {"trainer": {"strategy": {"class_path": "lightning_zero.ZeroStrategy", "init_args": init_args},
                              **trainer_flags(a)}}
    return ds, yaml_block


def _write_validated(path: Path, text: str, validate: Callable[[Path], None]) -> None:
    """Write ``text`` to a temporary file next to ``path``, validate it, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        validate(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _validate_json(a: Mapping[str, Any]) -> Callable[[Path], None]:
    def validate(tmp: Path) -> None:
        from lightning_zero.strategy import ZeroStrategy

        ZeroStrategy(config=str(tmp), **({"stage": "auto"} if a["stage"] == "auto" else {}),
                     **({"compile": True} if a["compile"] == "torch" else {}))
    return validate


def _validate_yaml(tmp: Path) -> None:
    import yaml

    from lightning_zero.strategy import ZeroStrategy

    ZeroStrategy(**yaml.safe_load(tmp.read_text())["trainer"]["strategy"]["init_args"])


def _usage(path: Path, a: Mapping[str, Any], fmt: str) -> str:
    flags = trainer_flags(a)
    if fmt == "yaml":
        return (f"Use it with LightningCLI: python train.py fit --config {path}\n"
                "(it sets trainer.strategy, precision, accumulate_grad_batches and gradient_clip_val).")
    launch = ["lightning-zero launch", f"--config {path}", f"--devices {a['devices']}"]
    if a["nodes"] > 1:
        launch.append(f"--nodes {a['nodes']}")
    if a["stage"] == "auto":
        launch.append("--stage auto")
    if a["compile"] == "torch":
        launch.append("--compile torch")
    extra = ", stage=\"auto\"" if a["stage"] == "auto" else ""
    extra += ", compile=True" if a["compile"] == "torch" else ""
    trainer = ", ".join(f"{k}={v!r}" for k, v in flags.items() if v is not None)
    lines = ["Use it:", f"  no code changes:  {' '.join(launch)} train.py",
             f"  in code:          Trainer(strategy=ZeroStrategy(config={str(path)!r}{extra}), {trainer},"
             f" devices={a['devices']}" + (f", num_nodes={a['nodes']})" if a["nodes"] > 1 else ")")]
    if a["nodes"] > 1:
        lines.append(f"  on {a['nodes']} nodes: run the launch command on each node under torchrun or srun.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------

_FLAG_KEYS = ("nodes", "devices", "precision", "stage", "offload_optimizer", "offload_parameters", "nvme_path",
              "offload_optimizer_ratio", "optimizer_states", "zero_hpz_partition_size", "zero_quantized_weights",
              "zero_quantized_gradients", "accumulate_grad_batches", "gradient_clip_val", "activation_checkpointing", "compile")


def _model_size(args: argparse.Namespace) -> ModelSize | None:
    from lightning_zero.estimate import _load_model, model_size

    if args.model:
        params, largest = model_size(_load_model(args.model))
        return ModelSize(params, largest, args.model.rpartition(":")[2])
    if args.params is None:
        if args.largest_layer is not None:
            raise ValueError("--largest-layer needs --params (the total number of parameters).")
        return None
    if args.largest_layer is None:
        raise ValueError("--params needs --largest-layer (the most parameters one module holds itself, e.g. the"
                         " embedding).")
    if not args.params >= 1 or not 0 <= args.largest_layer <= args.params:
        raise ValueError(f"--params {args.params:g} --largest-layer {args.largest_layer:g}: need params >= 1 and"
                         " 0 <= largest layer <= params.")
    return ModelSize(int(args.params), int(args.largest_layer), "the model")


def _ask_terminal(question: Question, number: int) -> str:
    choices = f" ({'/'.join(question.choices)})" if question.choices else ""
    print(f"\n[{number}] {question.text}{choices}\n    recommended: {question.default} - {question.why}", flush=True)
    return input(f"{question.key} [{question.default}]: ")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (KeyboardInterrupt, EOFError):
        print("\nlightning-zero config: stopped; nothing was written.", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as err:
        print(f"lightning-zero config: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    path = Path(args.output or ("zero.yaml" if args.format == "yaml" else "ds_config.json"))
    if path.exists() and not args.force:
        raise ValueError(f"--output {path} exists. Pass --force to replace it, or another --output.")
    if not path.parent.is_dir():
        raise ValueError(f"--output {path}: the folder {str(path.parent)!r} does not exist.")
    flags = {f"--{k.replace('_', '-')}": getattr(args, k) for k in _FLAG_KEYS if getattr(args, k) is not None}
    ctx = Context(detect_machine(folder=str(path.parent)), _model_size(args))
    if not args.yes:  # every flag checked before the first question
        run_session(ctx, flags, None, out=lambda _: None, check_defaults=False)
    model = (f"{ctx.model.name}, {ctx.model.params:,} parameters (largest layer {ctx.model.largest_layer:,})"
             if ctx.model else "no model given (--model or --params: defaults sized by the estimator)")
    print(f"lightning-zero config: this machine has {ctx.machine.describe()}; {model}."
          + ("" if args.yes else " Enter takes the recommended answer; Ctrl-C stops without writing anything."))
    session = run_session(ctx, flags, None if args.yes else _ask_terminal)
    ds, yaml_block = build_outputs(session.answers)
    if args.format == "yaml":
        import yaml

        text = "# lightning-zero config: a LightningCLI block (python train.py fit --config THIS_FILE)\n"
        _write_validated(path, text + yaml.safe_dump(yaml_block, sort_keys=False), _validate_yaml)
    else:
        _write_validated(path, json.dumps(ds, indent=2) + "\n", _validate_json(session.answers))
    print("\nChoices:")
    for key, value in session.answers.items():
        print(f"  {key} = {'none' if value is None else value}  ({session.why[key]})")
    if session.answers["stage"] == "auto" and args.format == "json":
        print("\nNote: a DeepSpeed JSON cannot hold stage \"auto\" (ZeroStrategy would read it as its default, 2), so"
              " the file has no stage: pass --stage auto to lightning-zero launch, or ZeroStrategy(stage=\"auto\"),"
              " as below.")
    print(f"\nWrote {path} (validated by ZeroStrategy).\n{_usage(path, session.answers, args.format)}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "config", help="write a DeepSpeed config (or LightningCLI block) by answering questions",
        description="Asks one question at a time, each with a recommended default and the reason; defaults come from"
                    " this machine and, given a model, from the memory estimator. Every question has a flag; --yes"
                    " takes the defaults for the rest. The file is validated by ZeroStrategy before it is written.")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", help="a LightningModule or nn.Module class, package.module:ClassName (built on the"
                                      " meta device to count its parameters)")
    what.add_argument("--params", type=float, help="total parameters, e.g. 7e9 (with --largest-layer)")
    parser.add_argument("--largest-layer", type=float, help="parameters of the largest layer (with --params)")
    parser.add_argument("--format", choices=["json", "yaml"], default="json",
                        help="json: a DeepSpeed config (default); yaml: a LightningCLI trainer.strategy block")
    parser.add_argument("--output", help="file to write (default ds_config.json, or zero.yaml)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    parser.add_argument("--yes", "-y", action="store_true", help="take the default of every question no flag answers")
    answers = parser.add_argument_group("answers (each skips its question)")
    for key in _FLAG_KEYS:
        answers.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="ANSWER")
    parser.set_defaults(func=run)
    return parser
