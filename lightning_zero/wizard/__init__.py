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

The package: ``machine`` (this machine and the model size), ``defaults`` (the estimator's recommendations),
``questions`` (the questions, their order and parsers), ``session`` (:func:`run_session` and the validated outputs).
The command itself (``add_parser``, ``run``) is here; every public name of the package, and the private ones
used elsewhere, are imported here.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lightning_zero.wizard.defaults import recommend
# _run looks detect_machine up in this module (tests patch lightning_zero.wizard.detect_machine): the command stays here
from lightning_zero.wizard.machine import Context, GiB, Machine, ModelSize, detect_machine
from lightning_zero.wizard.questions import PRECISIONS, QUESTIONS, STATES, Question, next_question
from lightning_zero.wizard.session import (Session, _usage, _validate_json, _validate_yaml, _write_validated,
                                           build_outputs, run_session, trainer_flags)

__all__ = ["Context", "Machine", "ModelSize", "Question", "add_parser", "build_outputs", "detect_machine",
           "next_question", "recommend", "run", "run_session"]


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------

_FLAG_KEYS = ("nodes", "devices", "precision", "stage", "offload_optimizer", "offload_parameters", "nvme_path",
              "offload_optimizer_ratio", "optimizer_states", "zero_hpz_partition_size", "zero_quantized_weights",
              "zero_quantized_gradients", "accumulate_grad_batches", "gradient_clip_val", "activation_checkpointing",
              "compile")


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
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops the session even where SIGINT came in ignored (a job started with `&` by a non-interactive
        # shell, nohup): Python leaves an inherited SIG_IGN in place, and the prompt would then wait forever
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
