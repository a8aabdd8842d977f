"""``lightning-zero estimate``: the command line (checks, the model loaded on the meta device, the printed table,
offload modes and recommendation)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import torch
from torch import nn

from lightning_zero.estimate.auto import _mode_note, fastest_fit
from lightning_zero.estimate.memory import (
    _SUB_GROUP_SIZE,
    HOST_RUNTIME_GIB,
    GiB,
    MemoryPlan,
    _gib,
    estimate_memory,
    model_size,
    transformer_activation_bytes,
)
from lightning_zero.estimate.modes import ModeRow, _Mode, _mode_row, _ratio_for, _sub_groups, optimizer_state_bytes


def _load_model(spec: str) -> nn.Module:
    """Instantiate ``pkg.module:Class`` on the meta device and run its ``configure_model`` there."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r}: use the form package.module:ClassName.")
    try:
        factory = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({err}). Check the spelling, and run from"
                         " the folder that holds the package (or install it / add it to PYTHONPATH).") from None
    owner = module_name
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {spec!r}: {owner!r} has no {part!r}. Check the class name.")
        factory, owner = getattr(factory, part), f"{owner}.{part}"
    if not callable(factory) or isinstance(factory, type) and not issubclass(factory, nn.Module):
        what = factory.__name__ if isinstance(factory, type) else type(factory).__name__
        raise TypeError(f"--model {spec!r} is a {what}, not a LightningModule or torch.nn.Module class. Name the"
                        " model class, or give --params and --largest-layer.")
    try:
        with torch.device("meta"):
            model = factory()
            configure = getattr(model, "configure_model", None)
            if callable(configure):
                configure()
    except Exception as err:  # noqa: BLE001 - the user's constructor: report it with the way out
        raise ValueError(f"--model {spec!r}: {getattr(factory, '__name__', attr)}() could not be built with no"
                         f" arguments on the meta device ({type(err).__name__}: {err}). Give the class defaults for"
                         " every argument, or use --params and --largest-layer.") from None
    if not isinstance(model, nn.Module):  # a factory function
        raise TypeError(f"--model {spec!r} made a {type(model).__name__}, not a torch.nn.Module.")
    if model_size(model)[0] == 0:
        raise ValueError(f"--model {spec!r}: {type(model).__name__} has no parameters, even after its"
                         " configure_model. Name the class that builds the layers, or give --params and"
                         " --largest-layer.")
    return model


def _check_args(args: argparse.Namespace) -> str | None:
    """The first bad number on the command line, as the message to print (None: all fine)."""
    if args.params is not None and not args.params >= 1:
        return f"--params {args.params:g}: give the total number of parameters (at least 1), e.g. --params 7e9."
    if args.largest_layer is not None and not 0 <= args.largest_layer <= (args.params or float("inf")):
        return (f"--largest-layer {args.largest_layer:g}: give the most parameters one module holds itself, between 0"
                " and --params.")
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            return f"{flag} {value}: must be at least 1."
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory), ("--nvme", args.nvme),
                        ("--activation-memory", args.activation_memory)):
        if value is not None and not value >= 0:
            return f"{flag} {value:g}: give GiB, at least 0."
    for flag, value in (("--hidden", args.hidden), ("--layers", args.layers), ("--seq-len", args.seq_len),
                        ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:
            return f"{flag} {value}: must be at least 1."
    if args.vocab < 0:
        return f"--vocab {args.vocab}: must be at least 0."
    for ratio in getattr(args, "offload_ratio", None) or []:
        if not 0 <= ratio <= 1:
            return f"--offload-ratio {ratio:g}: the share of the optimizer state on the host, between 0 and 1."
    if getattr(args, "bf16_optimizer_states", False) and not getattr(args, "bf16_master_weights", False):
        return "--bf16-optimizer-states needs --bf16-master-weights too (DeepSpeed keeps the moments in its dtype)."
    if not getattr(args, "host_runtime", 0) >= 0:
        return (f"--host-runtime {args.host_runtime:g}: give the GiB of host memory each GPU process holds outside the"
                f" model states, at least 0 (measured: {HOST_RUNTIME_GIB}).")
    if getattr(args, "sub_group_size", 1) < 1:
        return f"--sub-group-size {args.sub_group_size:g}: must be at least 1."
    return None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "estimate", help="model-state memory of every ZeRO stage x offload choice, and the fastest that fits",
        description="Per-GPU, per-node host RAM and NVMe memory of every ZeRO stage x offload choice, and the fastest"
                    " choice that fits. Sizes in GiB. Model states only, unless the activations are given"
                    " (--activation-memory, or a transformer's --hidden/--layers/--seq-len/--micro-batch): then the"
                    " per-GPU figure is the expected peak.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", type=float, help="total parameters, e.g. 7e9")
    what.add_argument("--model", help="a LightningModule or nn.Module class, package.module:ClassName; built"
                                      " with no arguments on the meta device (configure_model included)")
    parser.add_argument("--largest-layer", type=float, help="parameters of the largest layer (with --params)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU")
    parser.add_argument("--cpu-memory", type=float, help="GiB of host RAM per node")
    parser.add_argument("--nvme", type=float, help="GiB of NVMe space per node (enables the NVMe rows)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed", "bf16-true",
                                                                        "16-true", "32-true"])
    parser.add_argument("--activation-memory", type=float, default=0.0, help="GiB per GPU to reserve for activations")
    parser.add_argument("--host-runtime", type=float, default=HOST_RUNTIME_GIB,
                        help="GiB of host memory per GPU process outside the model states (CUDA context, libraries;"
                             f" default {HOST_RUNTIME_GIB}, measured)")
    shape = parser.add_argument_group("activations of a GPT-style transformer (instead of --activation-memory)")
    shape.add_argument("--hidden", type=int, help="hidden size (d_model)")
    shape.add_argument("--layers", type=int, help="number of transformer blocks")
    shape.add_argument("--seq-len", type=int, help="tokens per sequence")
    shape.add_argument("--micro-batch", type=int, help="sequences per GPU per forward")
    shape.add_argument("--vocab", type=int, default=0, help="vocabulary size (the loss's logits)")
    shape.add_argument("--activation-checkpointing", action="store_true", help="blocks recompute their activations")
    modes = parser.add_argument_group("offload modes (rows after the table; without these flags: the modes"
                                      " stage=\"auto\" considers)")
    modes.add_argument("--offload-ratio", type=float, action="append",
                       help="stage 3 partial optimizer offload: the share stepped by CPU Adam (repeat for several)")
    modes.add_argument("--sub-group-size", type=float, default=_SUB_GROUP_SIZE,
                       help="zero_optimization.sub_group_size (partial offload moves whole sub-groups)")
    modes.add_argument("--bf16-master-weights", action="store_true", help="bf16.bf16_master_weights_and_grads")
    modes.add_argument("--bf16-optimizer-states", action="store_true",
                       help="bf16.bf16_optimizer_states (with --bf16-master-weights)")
    parser.set_defaults(func=run)
    return parser


def _error(message: str) -> int:
    print(f"lightning-zero estimate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError) as err:  # bad input, named by the message: one line, no traceback
        return _error(str(err))


def _print_modes(args: argparse.Namespace, plan: MemoryPlan, gpu_free: int | None, cpu_free: int | None) -> None:
    """The offload-mode rows: those asked for on the command line (--offload-ratio, --bf16-*), else the ones
    ``stage="auto"`` considers (:func:`fastest_fit`): partial offload at every 10% that DeepSpeed's sub-groups allow,
    and with bf16 precision the low-precision states."""
    sub, p, gpus = int(args.sub_group_size), plan.num_params, plan.num_nodes * plan.gpus_per_node
    groups = _sub_groups(p, gpus, sub)
    master, states = bool(args.bf16_master_weights), bool(args.bf16_optimizer_states)
    modes: list[tuple[_Mode, int]]
    if args.offload_ratio or master or states:
        state = optimizer_state_bytes(master, states)
        pairs = [(3, r) for r in args.offload_ratio or []] or [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
        modes = [((stage, "cpu" if r else "none", "none", r), state) for stage, r in pairs]
    else:
        steps = range(1, groups) if groups <= 10 else sorted({round(i * groups / 10) for i in range(1, 10)})
        modes = [((3, "cpu", "none", _ratio_for(k, groups)), 16) for k in steps]
        if args.precision.startswith("bf16-"):
            modes += [((2, "cpu", "none", 1.0), 12), ((3, "cpu", "none", 1.0), 12), ((2, "none", "none", 0.0), 8),
                      ((3, "none", "none", 0.0), 8), ((3, "cpu", "none", 1.0), 8)]
    what = (f"per GPU: expected peak with {_gib(plan.activation_bytes)} of activations" if plan.activation_bytes
            else "model states")
    print(f"\nOffload modes ({what}; derived from DeepSpeed's dtypes and sub-groups):\n"
          f"{'stage':>5}  {'on the host':>13}  {'optimizer state':<18}  {'per GPU':>10}  {'CPU/node':>10}  fits")
    for mode, state in modes:
        row = _mode_row(plan, mode, state, gpu_free, cpu_free, args.precision, sub)
        ratio = mode[3]  # shown as the share DeepSpeed's sub-groups make it
        share = (groups - int((1 - ratio) * groups)) / groups if 0 < ratio < 1 else float(ratio > 0)
        shown = ModeRow(row.stage, share, state, row.gpu_bytes, row.cpu_bytes)
        print(f"{shown.line()}  {({True: 'yes', False: f'no ({row.why_not})', None: '?'})[row.fits]}")
    if groups == 1 and not args.offload_ratio:
        print(f"(partial offload: one sub-group of sub_group_size={sub:.3g} per GPU, so any ratio offloads all of it;"
              " a smaller --sub-group-size splits it)")


def _run(args: argparse.Namespace) -> int:
    if args.params is not None and args.largest_layer is None:
        return _error("--params needs --largest-layer (the most parameters one module holds itself, e.g. the"
                      " embedding).")
    problem = _check_args(args)
    if problem:
        return _error(problem)
    activations = args.activation_memory
    shape = {"--hidden": args.hidden, "--layers": args.layers, "--seq-len": args.seq_len,
             "--micro-batch": args.micro_batch}
    if any(v is not None for v in shape.values()):
        missing = [k for k, v in shape.items() if v is None]
        if missing or args.activation_memory:
            return _error("the transformer's activations need --hidden, --layers, --seq-len and --micro-batch"
                          f" together ({'missing ' + ', '.join(missing) if missing else 'all given'}), and replace"
                          " --activation-memory (give one or the other).")
        activations = transformer_activation_bytes(
            hidden=args.hidden, layers=args.layers, seq_len=args.seq_len, micro_batch=args.micro_batch,
            vocab=args.vocab, checkpointing=args.activation_checkpointing,
            bytes_per_element=4 if args.precision == "32-true" else 2) / GiB
    model = _load_model(args.model) if args.model else None
    plan = estimate_memory(args.params, args.largest_layer, model=model, num_nodes=args.nodes,
                           gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory,
                           cpu_memory_gb=args.cpu_memory, nvme_gb=args.nvme, precision=args.precision,
                           activation_memory_gb=activations, host_runtime_gb=args.host_runtime)
    gpu_free, cpu_free = (None if gb is None else int(gb * GiB) for gb in (args.gpu_memory, args.cpu_memory))
    print(plan.table())
    _print_modes(args, plan, gpu_free, cpu_free)
    best = fastest_fit(plan, gpu_free, cpu_free, precision=args.precision, sub_group_size=int(args.sub_group_size))
    if best is not None:
        print(f"\nRecommended (fastest that fits): {best.strategy()}")
        if best.keywords():  # an offload mode: what it trades
            print(_mode_note(best, plan).strip())
        return 0
    if any(r.fits is None for r in plan.rows):
        print("\nGive --gpu-memory / --cpu-memory (and --nvme) for a recommendation.")
        return 0
    print("\nNothing fits: add GPUs or nodes, host memory or NVMe space.")
    return 1
