#!/usr/bin/env python
"""Training-throughput benchmark of a ~0.9B-parameter GPT on one GPU: FSDP vs raw DeepSpeed vs Lightning's built-in
DeepSpeedStrategy vs lightning_zero.ZeroStrategy.

The parent process runs every selected row in its own child process (``python bench/bench_gpt.py --row NAME ...``),
reads one JSON line from each child, prints a table and writes everything to ``--out``.

    python bench/bench_gpt.py --rows fsdp,raw_z2,builtin_z2,zero_z2 --steps 50 --out bench/results/run.json

Rows:
    fsdp                 Lightning FSDPStrategy (FULL_SHARD, one FSDP unit per Block), bf16-mixed, torch AdamW(fused)
    raw_z{1,2,3}         hand-written deepspeed.initialize loop, bf16, ZeRO stage N
    raw_z3_offload       same, stage 3, optimizer offloaded to pinned CPU memory, DeepSpeedCPUAdam
    builtin_z{1,2,3}     lightning.pytorch.strategies.DeepSpeedStrategy(stage=N), bf16-mixed
    builtin_z3_offload   DeepSpeedStrategy(stage=3, offload_optimizer=True, pin_memory=True), DeepSpeedCPUAdam
    zero_z{1,2,3}        lightning_zero.ZeroStrategy(stage=N), bf16-mixed
    zero_z3_offload      ZeroStrategy(stage=3, offload_optimizer="cpu"), DeepSpeedCPUAdam
    zero_z3_offload_r{25,50,75}   (issue 18, not in the default set) ZeroStrategy(stage=3, offload_optimizer="cpu",
                         offload_optimizer_ratio=0.25/0.5/0.75, sub_group_size=5e7): partial optimizer offload
    zero_z3_offload_bf16m, zero_z3_offload_bf16ms   the offload row with bf16 master weights (and bf16 states)
    zero_z2_bf16ms       ZeroStrategy(stage=2) with bf16 master weights + bf16 optimizer states, nothing offloaded
    zero_z3_nvme, zero_z3_nvme_all   ZeRO-Infinity: ZeroStrategy(stage=3, offload_optimizer="nvme"[, offload_parameters=
                         "nvme"], nvme_path=$LZ_BENCH_NVME or /tmp/lz_nvme); needs libaio (../shared/gpu/debs.sh)
    zero_z2_offload      ZeroStrategy(stage=2, offload_optimizer="cpu"): the ZenFlow row's plain ZeRO-Offload baseline
    zero_z2_offload_zenflow   ZeroStrategy(stage=2, offload_optimizer="cpu", zenflow={topk_ratio 0.1, step
                         selection every 10 steps, update_interval 1, overlap_step}); the optimizer (AdamW, same
                         hyperparameters) comes from the config's "optimizer" block, as ZenFlow needs
    zero_z2_offload_zenflow_u4   the same with update_interval 4 and select_interval 8 (CPU Adam steps the rest
                         once every 4 steps)
    cpu_smoke            (not in the default set) the Lightning path on CPU with strategy="auto": a check of the
                         module/data/timer code for machines without a GPU; use a tiny model

Optimizer: every row that keeps its optimizer state on the GPU uses the same optimizer, torch.optim.AdamW(fused=True)
by default (``--optimizer deepspeed`` switches the DeepSpeed rows to deepspeed.ops.adam.FusedAdam, which is
JIT-compiled on first use); offload rows use DeepSpeedCPUAdam. lr 1e-4, betas (0.9, 0.95), weight decay 0.1, no
gradient clipping (the raw rows set "gradient_clipping": 0.0 explicitly: DeepSpeed 0.19's default is 1.0), no
gradient accumulation. Each row records its per-step losses: with the same seed, data and optimizer the rows should
follow the same loss curve to about 1e-3 (bf16), which checks that they train the same thing.

Measurement: after every optimizer step, torch.cuda.synchronize() then time.perf_counter() (a Lightning Callback at
on_train_batch_end for the Lightning rows, inline for the raw rows). The first --warmup steps are not timed; the
step time is (t[last] - t[last warm-up step]) / --steps. Model TFLOPS = 6 * params * tokens/s / 1e12 (attention
score FLOPs not counted; tied embedding counted once). Peak memory = torch.cuda.max_memory_allocated over the whole
child process ("peak GiB") and over the timed steps only ("timed peak GiB").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

RESULT_MARK = "BENCH_RESULT_JSON "
ENV_ROW = "_env"

ROWS = [
    "fsdp",
    "raw_z1", "raw_z2", "raw_z3", "raw_z3_offload",
    "builtin_z1", "builtin_z2", "builtin_z3", "builtin_z3_offload",
    "zero_z1", "zero_z2", "zero_z3", "zero_z3_offload",
]
# Issue 18's offload modes: row -> (stage, ZeroStrategy keywords, config). Not in the default set.
_NVME = os.environ.get("LZ_BENCH_NVME", "/tmp/lz_nvme")
_ADAMW_CONFIG = {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95], "weight_decay": 0.1}}}
_ZENFLOW = {"topk_ratio": 0.1, "select_strategy": "step", "select_interval": 10, "update_interval": 1,
            "overlap_step": True}
MODE_ROWS = {
    **{f"zero_z3_offload_r{int(r * 100)}": (3, {"offload_optimizer": "cpu", "offload_optimizer_ratio": r,
                                                "sub_group_size": 5e7}, None) for r in (0.25, 0.5, 0.75)},
    "zero_z3_offload_bf16m": (3, {"offload_optimizer": "cpu", "bf16_master_weights_and_grads": True}, None),
    "zero_z3_offload_bf16ms": (3, {"offload_optimizer": "cpu", "bf16_master_weights_and_grads": True,
                                   "bf16_optimizer_states": True}, None),
    "zero_z2_bf16ms": (2, {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}, None),
    # plain ZeRO-Offload at stage 2: the baseline of the ZenFlow row (ZenFlow runs at stages 1-2 only)
    "zero_z2_offload": (2, {"offload_optimizer": "cpu"}, None),
    # ZeRO-Infinity: the optimizer (and the parameters) on the disk at $LZ_BENCH_NVME (default /tmp/lz_nvme)
    "zero_z3_nvme": (3, {"offload_optimizer": "nvme", "nvme_path": _NVME}, None),
    "zero_z3_nvme_all": (3, {"offload_optimizer": "nvme", "offload_parameters": "nvme", "nvme_path": _NVME}, None),
    "zero_z2_offload_zenflow": (2, {"offload_optimizer": "cpu", "zenflow": _ZENFLOW}, _ADAMW_CONFIG),
    # the same with CPU Adam stepping the less important columns once every 4 steps (overlapped with the next ones)
    "zero_z2_offload_zenflow_u4": (2, {"offload_optimizer": "cpu", "zenflow": {
        **_ZENFLOW, "select_interval": 8, "update_interval": 4}}, _ADAMW_CONFIG),
}
EXTRA_ROWS = ["cpu_smoke", *MODE_ROWS]

# Options the parent forwards unchanged to each child.
FORWARDED = [
    "d_model", "n_layer", "n_head", "vocab", "seq_len", "micro_batch", "gpus", "warmup", "steps", "seed", "lr",
    "optimizer", "init_device", "zero_config", "zero_kwargs", "profile", "compile", "grad_ckpt", "mem_trace", "raw_config",
    "data",
]


# --------------------------------------------------------------------------------------------------------------------
# helpers shared by parent and child
# --------------------------------------------------------------------------------------------------------------------


def parse_row(row: str) -> dict:
    """'raw_z3_offload' -> {'family': 'raw', 'stage': 3, 'offload': True}."""
    if row == "fsdp":
        return {"family": "fsdp", "stage": None, "offload": False}
    if row == "cpu_smoke":
        return {"family": "cpu_smoke", "stage": None, "offload": False}
    if row in MODE_ROWS:
        stage, kwargs, config = MODE_ROWS[row]
        return {"family": "zero", "stage": stage, "offload": "offload_optimizer" in kwargs, "mode": row,
                "kwargs": kwargs, "config": config}
    family, _, rest = row.partition("_z")
    offload = rest.endswith("_offload")
    stage = int(rest.removesuffix("_offload"))
    if family not in ("raw", "builtin", "zero") or stage not in (1, 2, 3) or (offload and stage != 3):
        raise ValueError(f"unknown row {row!r}")
    return {"family": family, "stage": stage, "offload": offload}


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _lightning_zero_version() -> str:
    try:
        import lightning_zero
    except Exception as e:  # noqa: BLE001 - the package may simply not exist yet
        return f"not importable ({type(e).__name__}: {e})"
    return getattr(lightning_zero, "__version__", None) or _pkg_version("lightning-zero") or "importable"


def env_info(probe_zero: bool = True) -> dict:
    """Versions, device and date, as seen by the process that calls it.

    ``probe_zero=False`` leaves lightning_zero unimported, so that the baseline rows never load it (an import could
    patch Lightning or DeepSpeed)."""
    import torch

    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "deepspeed": _pkg_version("deepspeed"),
        "lightning": _pkg_version("lightning"),
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
        "cpu_count": os.cpu_count(),
    }
    info["lightning_zero"] = _lightning_zero_version() if probe_zero else "not imported by this row"
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# child: one row
# --------------------------------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _mem_trace(args, when: str) -> None:
    """--mem-trace DIR: record the CUDA allocator's history over the timed steps and dump it to DIR/<row>.pickle
    (read it with mem_peak.py, or https://pytorch.org/memory_viz). Recording slows the steps: use it in a separate run
    with few --steps, never for the throughput figures."""
    import torch

    if not args.mem_trace:
        return
    if when == "start":
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        return
    os.makedirs(args.mem_trace, exist_ok=True)
    torch.cuda.memory._dump_snapshot(os.path.join(args.mem_trace, f"{args.row}.pickle"))
    torch.cuda.memory._record_memory_history(enabled=None)


def _gpt_config(args):
    from gpt import GPTConfig

    return GPTConfig(
        vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
        grad_ckpt=bool(args.grad_ckpt),
    )


def _build_model(args, device):
    """The same weights in every row: seeded init, on ``--init-device`` (cuda by default: fast, and the same values
    in every row because the CUDA generator is seeded too)."""
    import torch

    from gpt import GPT

    torch.manual_seed(args.seed)
    init_device = "cpu" if torch.device(device).type == "cpu" else args.init_device
    with torch.device(init_device):
        return GPT(_gpt_config(args))


def _optimizer_kind(args, spec) -> str:
    if spec["offload"]:
        return "ds_cpu_adam"
    if spec["family"] in ("fsdp", "cpu_smoke") or args.optimizer == "torch":
        return "torch_adamw_fused"
    return "ds_fused_adam"


def make_optimizer(params, kind: str, lr: float):
    import torch

    betas, wd = (0.9, 0.95), 0.1
    if kind == "torch_adamw_fused":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, fused=True)
    if kind == "torch_adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    if kind == "ds_fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=lr, betas=betas, weight_decay=wd, adam_w_mode=True)
    if kind == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=wd, adamw_mode=True)
    raise ValueError(kind)


def _summarize(args, spec, times, losses, n_params, peak_total, peak_timed) -> dict:
    import statistics

    tokens_per_step = args.micro_batch * args.seq_len * args.gpus
    t = times[args.warmup - 1:] if args.warmup > 0 else None
    if args.warmup > 0:
        elapsed = t[-1] - t[0]
        diffs = [b - a for a, b in zip(t, t[1:])]
    else:  # no warm-up: time from the end of the first step
        elapsed = times[-1] - times[0]
        diffs = [b - a for a, b in zip(times, times[1:])]
    n_timed = len(diffs)
    step_s = elapsed / n_timed
    tok_s = tokens_per_step / step_s
    return {
        "params": n_params,
        "tokens_per_step": tokens_per_step,
        "timed_steps": n_timed,
        "step_time_s": step_s,
        "step_time_median_s": statistics.median(diffs),
        "step_time_min_s": min(diffs),
        "step_time_max_s": max(diffs),
        "tokens_per_s": tok_s,
        "model_tflops": 6 * n_params * tok_s / 1e12,
        "peak_mem_gib": peak_total / 2**30 if peak_total is not None else None,
        "peak_mem_timed_gib": peak_timed / 2**30 if peak_timed is not None else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
    }


def run_raw(args, spec) -> dict:
    """Hand-written DeepSpeed engine loop: deepspeed.initialize + forward/backward/step."""
    import torch

    import deepspeed
    from gpt import count_params, make_tokens, split_batch
    from probe import StepProbe

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = torch.device("cuda", _local_rank())
    torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl", verbose=False)

    stage, offload = spec["stage"], spec["offload"]
    total = args.warmup + args.steps
    probe = StepProbe(total, args.profile, device)
    tokens = make_tokens((total + probe.total_extra) * args.micro_batch * args.gpus, args.seq_len, args.vocab,
                         args.seed, device, getattr(args, "data", "random"))

    model = _build_model(args, device).to(device)
    n_params = count_params(model)
    opt_kind = _optimizer_kind(args, spec)
    optimizer = make_optimizer(model.parameters(), opt_kind, args.lr)

    # Same ZeRO knobs as Lightning's DeepSpeedStrategy defaults, so raw vs builtin differ only by the framework.
    zero = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "allgather_partitions": True,
        "reduce_scatter": True,
        "allgather_bucket_size": 200_000_000,
        "reduce_bucket_size": 200_000_000,
        "sub_group_size": 1_000_000_000_000,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        # DeepSpeed 0.19's default is gradient_clipping=1.0; Lightning writes 0.0 (no clipping) unless the Trainer
        # has gradient_clip_val, and FSDP does not clip: state it, or the raw rows train differently.
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in json.loads(args.raw_config or "{}").items():  # --raw-config: merged one level deep
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if args.compile:
        engine.compile()

    times, losses = [], []
    peak_before = None
    for i in range(total + probe.total_extra):
        # the rows a DistributedSampler(shuffle=False) gives this rank, as in the Lightning rows
        start = i * args.micro_batch * args.gpus + _rank()
        batch = tokens[start:start + args.micro_batch * args.gpus:args.gpus]
        x, y = split_batch(batch)
        probe.step_start(i)
        loss = engine(x, y)
        probe.mark("fwd")
        engine.backward(loss)
        probe.mark("bwd")
        engine.step()
        probe.step_end(i)
        if i >= total:
            continue
        torch.cuda.synchronize(device)
        times.append(time.perf_counter())
        losses.append(loss.item())
        if i + 1 == args.warmup:
            peak_before = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _mem_trace(args, "start")
        if i + 1 == total:
            peak_timed = torch.cuda.max_memory_allocated(device)
            _mem_trace(args, "dump")
    peak_total = max(peak_before or 0, peak_timed)
    out = _summarize(args, spec, times, losses, n_params, peak_total, peak_timed if args.warmup else None)
    out.update(probe.result)
    out["optimizer"] = opt_kind
    out["ds_config"] = config
    del engine, optimizer
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


def run_lightning(args, spec) -> dict:
    """fsdp / builtin_* / zero_* / cpu_smoke: a LightningModule + Trainer.fit with a timing Callback."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from gpt import Block, count_params, make_tokens, split_batch
    from probe import StepProbe

    family, stage, offload = spec["family"], spec["stage"], spec["offload"]
    on_cpu = family == "cpu_smoke"
    device = torch.device("cpu") if on_cpu else torch.device("cuda", _local_rank())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    # Strategy first: a zero_* row whose package is missing reports an error before any work is done.
    if family == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(sharding_strategy="FULL_SHARD", auto_wrap_policy={Block})
    elif family == "builtin":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        kw = {"stage": stage, "logging_batch_size_per_gpu": args.micro_batch}
        if offload:
            kw.update(offload_optimizer=True, offload_optimizer_device="cpu", pin_memory=True)
        strategy = DeepSpeedStrategy(**kw)
    elif family == "zero":
        try:
            from lightning_zero import ZeroStrategy
        except Exception as e:  # noqa: BLE001
            return {"error": f"cannot import lightning_zero.ZeroStrategy: {type(e).__name__}: {e}"}
        kw = {"stage": stage}
        if offload:
            kw["offload_optimizer"] = "cpu"
        kw.update(spec.get("kwargs") or {})
        if spec.get("config"):  # ZenFlow: the optimizer from the config (lr filled below), none from the module
            kw["config"] = json.loads(json.dumps(spec["config"]))
            kw["config"]["optimizer"]["params"]["lr"] = args.lr
        if args.zero_config:
            kw["config"] = {**kw.get("config", {}), **json.loads(args.zero_config)}
        if args.zero_kwargs:
            kw.update(json.loads(args.zero_kwargs))
        if args.compile:
            kw.setdefault("compile", True)  # --zero-kwargs '{"compile": "deepcompile"}' picks DeepCompile instead
        strategy = ZeroStrategy(**kw)
    else:
        strategy = "auto"

    if not on_cpu:
        torch.cuda.set_device(device)
    total = args.warmup + args.steps
    probe = StepProbe(total, args.profile, device)
    tokens = make_tokens((total + probe.total_extra) * args.micro_batch * args.gpus, args.seq_len, args.vocab,
                         args.seed, device, getattr(args, "data", "random"))
    opt_kind = "torch_adamw" if on_cpu else _optimizer_kind(args, spec)

    class TokenRows(Dataset):
        """Rows of a token tensor that already lives on the device; the default collate stacks them there."""

        def __init__(self, t):
            self.t = t

        def __len__(self):
            return self.t.shape[0]

        def __getitem__(self, i):
            return self.t[i]

    class GPTModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _build_model(args, device)

        def training_step(self, batch, batch_idx):
            x, y = split_batch(batch)
            return self.model(x, y)

        def configure_optimizers(self):
            if spec.get("config"):  # the config's "optimizer" block (ZenFlow)
                return None
            return make_optimizer(self.parameters(), opt_kind, args.lr)

    class StepTimer(Callback):
        def __init__(self, warmup):
            self.warmup = warmup
            self.times, self.losses = [], []
            self.peak_before = None
            self.peak_timed = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(self.times) >= total:
                return
            _sync(device)
            self.times.append(time.perf_counter())
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            if not on_cpu and len(self.times) == self.warmup:
                self.peak_before = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                _mem_trace(args, "start")
            if not on_cpu and len(self.times) == total:
                self.peak_timed = torch.cuda.max_memory_allocated(device)
                _mem_trace(args, "dump")

    module = GPTModule()
    n_params = count_params(module.model)
    loader = DataLoader(TokenRows(tokens), batch_size=args.micro_batch, shuffle=False, num_workers=0, drop_last=True)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu" if on_cpu else "gpu",
        devices=args.gpus,
        precision="bf16-mixed",
        strategy=strategy,
        max_steps=total + probe.total_extra,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=args.gpus > 1,  # DistributedSampler(shuffle=False): rank r gets rows r, r+N, ...
        callbacks=[probe.callback(), timer],
    )
    # --compile: FSDP and the built-in strategy get the compiled LightningModule (Lightning refuses it for the built-in
    # DeepSpeedStrategy, which then reports the error); ZeroStrategy compiles the GPT itself (compile=True above).
    fit_module = torch.compile(module) if args.compile and family in ("fsdp", "builtin", "cpu_smoke") else module
    trainer.fit(fit_module, train_dataloaders=loader)
    if len(timer.times) != total:
        raise RuntimeError(f"expected {total} timed optimizer steps, the callback saw {len(timer.times)}")
    if on_cpu:
        peak_total = peak_timed = None
    else:
        peak_timed = timer.peak_timed
        peak_total = max(timer.peak_before or 0, peak_timed)
        if not args.warmup:
            peak_timed = None
    out = _summarize(args, spec, timer.times, timer.losses, n_params, peak_total, peak_timed)
    out.update(probe.result)
    out["optimizer"] = opt_kind
    out["strategy"] = type(strategy).__name__ if not isinstance(strategy, str) else strategy
    if family in ("builtin", "zero") and hasattr(strategy, "config"):
        try:
            out["ds_config"] = json.loads(json.dumps(strategy.config, default=str))
        except Exception:  # noqa: BLE001
            pass
    return out


def child_main(args) -> int:
    t0 = time.perf_counter()
    row = args.row
    if row == ENV_ROW:
        print(RESULT_MARK + json.dumps(env_info()), flush=True)
        return 0
    result = {"row": row}
    try:
        spec = parse_row(row)
        result.update(spec)
        if args.warmup + args.steps < 2:
            raise ValueError("need at least 2 steps in all (--warmup + --steps)")
        if spec["family"] == "raw":
            result.update(run_raw(args, spec))
        else:
            result.update(run_lightning(args, spec))
    except BaseException as e:  # noqa: BLE001 - report, never crash the parent's run
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback_tail"] = tb[-3000:]
    result["child_wall_s"] = time.perf_counter() - t0
    # peak resident host memory of this row's process (pinned buffers included): what the offload rows need
    import resource

    result["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    try:
        result["env"] = env_info(probe_zero=result.get("family") == "zero")
    except Exception as e:  # noqa: BLE001
        result["env"] = {"error": repr(e)}
    if _rank() == 0:  # with --gpus N every rank runs the row; rank 0 reports
        print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# parent: launch the rows, collect, print, save
# --------------------------------------------------------------------------------------------------------------------


def _child_cmd(args, row: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--row", row]
    if args.gpus > 1 and row != ENV_ROW:  # one process per GPU, started by torchrun; every row sees the same env
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"]
    for name in FORWARDED:
        val = getattr(args, name)
        if val is None:
            continue
        cmd += ["--" + name.replace("_", "-"), str(val)]
    return cmd


def run_child(args, row: str, log) -> dict:
    env = dict(os.environ)
    env["MASTER_PORT"] = str(_free_port())
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        _child_cmd(args, row), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    )
    timed_out = threading.Event()

    def _kill():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(args.row_timeout, _kill)
    timer.start()
    result, tail = None, []
    try:
        for line in proc.stdout:
            if line.startswith(RESULT_MARK):
                try:
                    result = json.loads(line[len(RESULT_MARK):])
                except json.JSONDecodeError as e:
                    result = {"row": row, "error": f"bad result line: {e}"}
                continue
            if args.verbose:
                sys.stdout.write(f"[{row}] {line}")
            if log:
                log.write(f"[{row}] {line}")
            tail = (tail + [line.rstrip()])[-40:]
        rc = proc.wait()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    if result is None:
        why = f"timed out after {args.row_timeout}s" if timed_out.is_set() else f"child exited with code {rc}"
        result = {"row": row, "error": f"{why}, no result line", "output_tail": "\n".join(tail[-25:])}
    elif "error" in result:
        result.setdefault("output_tail", "\n".join(tail[-25:]))
    result["returncode"] = rc
    result["wall_s"] = wall
    return result


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def add_loss_deviation(results: list[dict]) -> str | None:
    """Set r["loss_max_abs_dev"] = max over steps of |loss - loss of the first successful row|; return that row."""
    ref = next((r for r in results if r.get("losses")), None)
    if ref is None:
        return None
    for r in results:
        if r.get("losses") and len(r["losses"]) == len(ref["losses"]):
            r["loss_ref_row"] = ref["row"]
            r["loss_max_abs_dev"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
    return ref["row"]


def format_table(results: list[dict]) -> str:
    ref = add_loss_deviation(results)
    head = ["row", "tokens/s", "TFLOPS", "step ms", "median ms", "peak GiB", "timed peak GiB", "loss first>last",
            f"max |dloss| vs {ref}", "wall s", "status"]
    rows = []
    for r in results:
        err = r.get("error")
        rows.append([
            r["row"],
            _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(r.get("model_tflops"), ".1f"),
            _fmt(r.get("step_time_s", None) and r["step_time_s"] * 1e3, ".1f"),
            _fmt(r.get("step_time_median_s", None) and r["step_time_median_s"] * 1e3, ".1f"),
            _fmt(r.get("peak_mem_gib"), ".2f"),
            _fmt(r.get("peak_mem_timed_gib"), ".2f"),
            (f"{r['loss_first']:.3f}>{r['loss_last']:.3f}" if "loss_first" in r else "-"),
            _fmt(r.get("loss_max_abs_dev"), ".4f"),
            _fmt(r.get("wall_s"), ".0f"),
            ("ERROR: " + err.splitlines()[0][:100]) if err else "ok",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def parent_main(args) -> int:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS + EXTRA_ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {','.join(ROWS + EXTRA_ROWS)}")
    from gpt import param_count_for

    cfg = _gpt_config(args)
    n_params = param_count_for(cfg)
    run_cfg = {
        "model": cfg.as_dict(),
        "params": n_params,
        "micro_batch": args.micro_batch,
        "gpus": args.gpus,
        "tokens_per_step": args.micro_batch * args.seq_len * args.gpus,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "seed": args.seed,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "init_device": args.init_device,
        "zero_config": args.zero_config,
        "zero_kwargs": args.zero_kwargs,
        "raw_config": args.raw_config,
        "grad_ckpt": args.grad_ckpt,
        "compile": args.compile,
        "profile_steps": args.profile,
        "rows": rows,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    log = open(args.log, "w") if args.log else None
    t0 = time.perf_counter()
    env = run_child(args, ENV_ROW, log)
    if "error" not in env:
        env.pop("returncode", None)
        env.pop("wall_s", None)
    print("== bench_gpt ==", flush=True)
    for k in ("date_utc", "torch", "cuda", "cudnn", "deepspeed", "lightning", "lightning_zero", "gpu", "gpu_mem_gib",
              "gpu_capability", "driver", "python", "cpu_count", "host"):
        print(f"  {k:15s} {env.get(k)}", flush=True)
    if "error" in env:
        print(f"  env probe failed: {env['error']}\n{env.get('output_tail', '')}", flush=True)
    print(f"  model          d_model={cfg.d_model} n_layer={cfg.n_layer} n_head={cfg.n_head} vocab={cfg.vocab_size} "
          f"seq={cfg.seq_len} params={n_params / 1e6:.1f}M", flush=True)
    print(f"  run            micro_batch={args.micro_batch} tokens/step={args.micro_batch * args.seq_len} "
          f"warmup={args.warmup} steps={args.steps} optimizer={args.optimizer} rows={','.join(rows)}", flush=True)

    results = []

    def save():
        if not args.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "config": run_cfg, "results": results,
                       "total_wall_s": time.perf_counter() - t0}, f, indent=2, default=str)

    for row in rows:
        print(f"-- {row} ...", flush=True)
        r = run_child(args, row, log)
        results.append(r)
        if "error" in r:
            print(f"-- {row}: ERROR {r['error']}", flush=True)
            if args.verbose or r.get("output_tail"):
                print("   " + "\n   ".join((r.get("traceback_tail") or r.get("output_tail") or "").splitlines()[-12:]),
                      flush=True)
        else:
            print(f"-- {row}: {r['tokens_per_s']:,.0f} tokens/s, {r['model_tflops']:.1f} TFLOPS, "
                  f"{r['step_time_s'] * 1e3:.1f} ms/step, peak {r['peak_mem_gib'] or 0:.2f} GiB, "
                  f"loss {r['loss_first']:.3f}>{r['loss_last']:.3f}, {r['wall_s']:.0f} s", flush=True)
        save()
    if log:
        log.close()
    table = format_table(results)  # also adds loss_max_abs_dev to each result
    save()
    print(flush=True)
    print(f"GPT {n_params / 1e6:.1f}M params, {args.micro_batch}x{args.seq_len} tokens/step, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {env.get('gpu')}, torch {env.get('torch')} "
          f"(CUDA {env.get('cuda')}), deepspeed {env.get('deepspeed')}, lightning {env.get('lightning')}, "
          f"{env.get('date_utc')}", flush=True)
    print(table, flush=True)
    if args.out:
        print(f"wrote {args.out}", flush=True)
    return 0 if all("error" not in r for r in results) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all GPU rows)")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--log", default=None, help="write every child's output here")
    p.add_argument("--d-model", dest="d_model", type=int, default=2048)
    p.add_argument("--n-layer", dest="n_layer", type=int, default=16)
    p.add_argument("--n-head", dest="n_head", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=1024)
    p.add_argument("--micro-batch", dest="micro_batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs of this machine per row (N > 1: each row runs under torchrun, one process per GPU,"
                        " tokens/s counts all of them; the raw rows take the rows a DistributedSampler gives)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data", choices=["random", "markov"], default="random",
                   help="random token ids (throughput) or a learnable 4-successor Markov chain (convergence curves)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["torch", "deepspeed"], default="torch",
                   help="GPU optimizer of the DeepSpeed rows: torch AdamW(fused=True) or deepspeed FusedAdam "
                        "(fsdp always uses torch; offload rows always DeepSpeedCPUAdam)")
    p.add_argument("--init-device", dest="init_device", choices=["cuda", "cpu"], default="cuda",
                   help="where the model is built and initialised before the strategy takes it (default cuda)")
    p.add_argument("--zero-config", dest="zero_config", default=None,
                   help="JSON dict passed as ZeroStrategy(config=...) in the zero_* rows")
    p.add_argument("--raw-config", dest="raw_config", default=None,
                   help='JSON merged into the raw rows\' DeepSpeed config, e.g. \'{"compile": {"deepcompile": true}}\'')
    p.add_argument("--zero-kwargs", dest="zero_kwargs", default=None,
                   help='JSON dict of extra ZeroStrategy keywords in the zero_* rows, e.g. \'{"pin_memory": true}\'')
    p.add_argument("--grad-ckpt", dest="grad_ckpt", type=int, default=0, choices=[0, 1],
                   help="1: recompute each Block in the backward pass (torch.utils.checkpoint), every row")
    p.add_argument("--mem-trace", dest="mem_trace", default=None,
                   help="directory: dump the CUDA allocator history of the timed steps per row (see mem_peak.py)")
    p.add_argument("--profile", type=int, default=0,
                   help="after the timed steps, profile K steps (kernel time by category, host syncs) and time K"
                        " more with synchronised phases (forward/backward/step); see probe.py")
    p.add_argument("--compile", type=int, default=0, choices=[0, 1],
                   help="1: torch.compile: fsdp/builtin rows compile the LightningModule, raw rows call"
                        " engine.compile(), zero rows use ZeroStrategy(compile=True)")
    p.add_argument("--row-timeout", dest="row_timeout", type=float, default=900.0, help="seconds per row")
    p.add_argument("--verbose", action="store_true", help="echo every child's output")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.row is not None:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
