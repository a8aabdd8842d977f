"""The session and its outputs: :func:`run_session` answers every question (from the flags, a terminal or the
defaults); :func:`build_outputs` turns the answers into the DeepSpeed JSON and the LightningCLI YAML block, written by
:func:`_write_validated` (a temporary file, validated by ZeroStrategy, then renamed)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_zero.wizard.machine import Context
from lightning_zero.wizard.questions import QUESTIONS, Question, _state_keywords, next_question


@dataclass
class Session:
    answers: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)  # key -> how the value was chosen (for the summary)


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
