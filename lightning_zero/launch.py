"""``lightning-zero launch``: run an unchanged Lightning script with ZeroStrategy.

    lightning-zero launch --config ds_config.json --devices 2 train.py --lr 1e-3
    lightning-zero launch --stage 3 train.py                            # all local GPUs (or one CPU process)
    srun lightning-zero launch --config ds.json --devices 8 --nodes 4 train.py   # SLURM: one task per GPU
    torchrun --nnodes 2 --nproc-per-node 8 ... --no-python lightning-zero launch --devices 8 --nodes 2 train.py

The script builds its Trainer with no ``strategy`` (or ``strategy="auto"``). Every process must see ZeroStrategy, and
Lightning's popen launcher starts the other ranks by re-running ``sys.argv`` (``python train.py ...``), so the
settings travel in the environment: ``$LIGHTNING_ZERO_LAUNCH`` (JSON) and ``PYTHONPATH`` with
``lightning_zero/_launch_site`` first, whose ``sitecustomize`` wraps ``lightning.pytorch.Trainer.__init__`` once the
script imports it (public API only; nothing is imported before the script does). The wrapped Trainer calls
:func:`apply_launch`, which adds ``strategy=ZeroStrategy(...)``, ``devices``/``num_nodes`` and the Trainer flags the
config implies (precision, accumulation), or raises one error naming both sides of a conflict. The launcher itself
validates the settings (it builds the ZeroStrategy once) and then becomes ``python script.py ...`` (``os.execve``),
so rank 0 is the script, as under torchrun or SLURM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SETTINGS_ENV_VAR", "LaunchSettings", "add_parser", "apply_launch", "config_trainer_flags",
           "launch_environment", "resolve_trainer_kwargs", "run"]

SETTINGS_ENV_VAR = "LIGHTNING_ZERO_LAUNCH"  # also named in _launch_site/sitecustomize.py (which imports nothing)
_SITE_DIR = Path(__file__).resolve().parent / "_launch_site"
# Trainer arguments whose value here means "the script did not choose" (Trainer's own defaults; LightningCLI passes
# every argument, so an explicit default cannot be told apart from none).
_UNSET: dict[str, tuple[Any, ...]] = {"strategy": ("auto", None), "devices": ("auto", None), "num_nodes": (1, None),
                                      "precision": (None,), "accumulate_grad_batches": (1, None)}


@dataclass(frozen=True)
class LaunchSettings:
    """What ``lightning-zero launch`` was asked for; ``None``: not given."""

    script: str
    config: str | None = None
    stage: int | str | None = None
    devices: int | None = None
    nodes: int | None = None
    compile: str | None = None  # "torch" or "deepcompile"

    def strategy_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.stage is not None:
            kwargs["stage"] = self.stage
        if self.config is not None:
            kwargs["config"] = self.config
        if self.compile is not None:
            kwargs["compile"] = True if self.compile == "torch" else "deepcompile"
        return kwargs

    def describe(self) -> str:
        return "ZeroStrategy(" + ", ".join(f"{k}={v!r}" for k, v in self.strategy_kwargs().items()) + ")"

    def flags(self) -> str:
        """The command-line flags that asked for this (the config as an absolute path)."""
        parts = [f"--config {self.config}" if self.config else "", f"--stage {self.stage}" if self.stage is not None
                 else "", f"--devices {self.devices}" if self.devices else "", f"--nodes {self.nodes}" if self.nodes
                 else "", f"--compile {self.compile}" if self.compile else ""]
        return " ".join(p for p in parts if p)


def config_trainer_flags(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Trainer flags a DeepSpeed config implies: ``precision`` from its fp16/bf16 section and
    ``accumulate_grad_batches`` from ``gradient_accumulation_steps`` (the Trainer owns both; without them ZeroStrategy
    would report the config and the script's defaults as a conflict)."""
    flags: dict[str, Any] = {}
    enabled = {s: (config.get(s) or {}).get("enabled") is True for s in ("fp16", "bf16")}
    if enabled["bf16"]:
        flags["precision"] = "bf16-mixed"
    elif enabled["fp16"]:
        flags["precision"] = "16-mixed"
    acc = config.get("gradient_accumulation_steps")
    if isinstance(acc, int) and not isinstance(acc, bool) and acc > 1:
        flags["accumulate_grad_batches"] = acc
    return flags


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, (str, int, float, list, tuple)) else f"{type(value).__name__}(...)"


def _given(kwargs: Mapping[str, Any], environ: Mapping[str, str], key: str) -> tuple[bool, Any, str]:
    """(whether the script chose ``key``, its value, how it said it: the Trainer argument or $PL_TRAINER_*)."""
    value = kwargs.get(key)
    if key in kwargs and not any(value is u or (u is not None and value == u) for u in _UNSET.get(key, ())):
        return True, value, f"Trainer({key}={_shown(value)})"
    env = f"PL_TRAINER_{key.upper()}"
    if environ.get(env):
        return True, environ[env], f"${env}={environ[env]}"
    return False, None, ""


def resolve_trainer_kwargs(kwargs: Mapping[str, Any], settings: LaunchSettings, config: Mapping[str, Any],
                           environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Trainer keyword arguments with the launch settings applied (a new dict; ``strategy`` is left for the
    caller). Raises one ``ValueError`` listing every conflict between the script and the launch settings."""
    environ = os.environ if environ is None else environ
    out = dict(kwargs)
    problems = []
    chose, value, said = _given(kwargs, environ, "strategy")
    if chose:
        problems.append(f"the script builds {said} but lightning-zero launch runs it with {settings.describe()}:"
                        f" remove strategy= from the Trainer in {settings.script} (or pass strategy=\"auto\"), or run"
                        " it without lightning-zero launch")
    wanted = {"devices": settings.devices, "num_nodes": settings.nodes, **config_trainer_flags(config)}
    sources = {"devices": f"--devices {settings.devices}", "num_nodes": f"--nodes {settings.nodes}"}
    for key, want in wanted.items():
        if want is None:
            continue
        chose, value, said = _given(kwargs, environ, key)
        if not chose:
            out[key] = want
        elif str(value) != str(want) and key in ("devices", "num_nodes"):
            problems.append(f"the script builds {said} but lightning-zero launch was given {sources[key]}: drop one"
                            f" of them (remove {key}= from the Trainer, or the launch flag)")
        # precision/accumulation chosen by the script: ZeroStrategy compares them with the config at setup and
        # reports any disagreement with both values.
    if problems:
        raise ValueError(f"lightning-zero launch {settings.flags()} {settings.script}: " + "; ".join(problems) + ".")
    return out


def _settings_from_env(environ: Mapping[str, str]) -> LaunchSettings:
    return LaunchSettings(**json.loads(environ[SETTINGS_ENV_VAR]))


def apply_launch(trainer_module: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Called by the wrapped ``Trainer.__init__`` in every launched process: ``kwargs`` with ZeroStrategy."""
    settings = _settings_from_env(os.environ)
    if not trainer_module.startswith("lightning."):
        raise TypeError(f"lightning-zero launch: {settings.script} builds a pytorch_lightning.Trainer; ZeroStrategy is"
                        " a `lightning.pytorch` strategy. Import the Trainer from lightning (`import lightning as L;"
                        " L.Trainer(...)`, or `from lightning.pytorch import Trainer`).")
    from lightning_zero.config import load_user_config
    from lightning_zero.strategy import ZeroStrategy

    out = resolve_trainer_kwargs(kwargs, settings, load_user_config(settings.config) if settings.config else {})
    out["strategy"] = ZeroStrategy(**settings.strategy_kwargs())
    return out


def launch_environment(settings: LaunchSettings, environ: Mapping[str, str], pid: int,
                       cuda_available: bool) -> dict[str, str]:
    """The environment the script runs in: the settings, the start-up hook first on ``PYTHONPATH`` and, without a
    GPU, DeepSpeed's CPU accelerator (a new dict)."""
    env = dict(environ)
    env[SETTINGS_ENV_VAR] = json.dumps(asdict(settings))
    env[SETTINGS_ENV_VAR + "_PID"] = str(pid)  # the process that becomes the script (it warns if no Trainer ran)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(_SITE_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(_SITE_DIR), *paths])
    if not cuda_available:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _check(args: argparse.Namespace) -> LaunchSettings:
    """Every bad input, before anything runs."""
    script = Path(args.script)
    if not script.is_file():
        raise ValueError(f"lightning-zero launch {args.script}: no such file. Give the path of the Lightning script"
                         " to run (python script.py ...).")
    for flag, value in (("--devices", args.devices), ("--nodes", args.nodes)):
        if value is not None and value < 1:
            raise ValueError(f"lightning-zero launch {flag} {value}: must be at least 1.")
    stage: int | str | None = args.stage
    if stage is not None and stage != "auto":
        if stage not in ("0", "1", "2", "3"):
            raise ValueError(f"lightning-zero launch --stage {stage}: use 0, 1, 2, 3 or auto.")
        stage = int(stage)
    config = str(Path(args.config).resolve()) if args.config else None
    settings = LaunchSettings(script=args.script, config=config, stage=stage, devices=args.devices, nodes=args.nodes,
                              compile=args.compile)
    from lightning_zero.strategy import ZeroStrategy

    try:
        ZeroStrategy(**settings.strategy_kwargs())  # validates the config and the stage now, not in every rank
    except (ValueError, TypeError) as err:
        raise type(err)(f"{settings.flags()}: {err}") from None
    return settings


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:  # before DeepSpeed is first imported (by the check below): its CPU accelerator, without a warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        settings = _check(args)
    except (ValueError, TypeError) as err:
        print(f"lightning-zero launch: error: {err}", file=sys.stderr)
        return 2
    env = launch_environment(settings, os.environ, os.getpid(), cuda)
    from lightning_zero.config import load_user_config

    implied = config_trainer_flags(load_user_config(settings.config)) if settings.config else {}
    trainer = {"devices": settings.devices, "num_nodes": settings.nodes}
    shown = [f"{k}={v!r}" for k, v in trainer.items() if v is not None]
    shown += [f"{k}={v!r} (from the config, unless the script sets it)" for k, v in implied.items()]
    print(f"lightning-zero launch: {settings.script} with Trainer(strategy={settings.describe()}"
          + "".join(f", {s}" for s in shown) + ")", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, settings.script, *args.script_args], env)
    return 0  # not reached


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "launch", help="run an unchanged Lightning script with ZeroStrategy",
        description="Run a Lightning script that builds its Trainer with no strategy (or strategy='auto') with"
                    " ZeroStrategy, in every process: the ones Lightning starts, or torchrun's / SLURM's (run this"
                    " command under them on every node). Arguments after the script go to the script.")
    parser.add_argument("--config", help="DeepSpeed JSON config (e.g. from `lightning-zero config`)")
    parser.add_argument("--stage", help="ZeRO stage 0-3 or auto (default: the config's, else 2)")
    parser.add_argument("--devices", type=int, help="processes (GPUs, or CPU processes without a GPU) per node")
    parser.add_argument("--nodes", type=int, help="number of nodes (Trainer num_nodes)")
    parser.add_argument("--compile", choices=["torch", "deepcompile"],
                        help="compile the networks: torch.compile, or DeepSpeed's DeepCompile (CUDA)")
    parser.add_argument("script", help="the Lightning script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    parser.set_defaults(func=run)
    return parser
