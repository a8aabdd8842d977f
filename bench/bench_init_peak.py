#!/usr/bin/env python
"""Peak GPU memory while a >= 5B-parameter GPT is created in ``configure_model`` at ZeRO stage 3 with its parameters
offloaded to CPU, through the real path: ``Trainer(strategy=ZeroStrategy(stage=3, offload_parameters="cpu",
remote_device="cpu"), precision="bf16-true")`` and ``trainer.predict``.

    python bench/bench_init_peak.py --out bench/results/init_peak_h100.json     # one GPU, one process
    python bench/bench_init_peak.py --small                                      # CPU smoke test, seconds

What is measured (rank 0):
  * configure_model: ``torch.cuda.reset_peak_memory_stats()`` as the hook starts, then the peak
    ``max_memory_allocated`` / ``max_memory_reserved`` when it returns. The hook runs inside ZeroStrategy's
    ``zero.Init`` (each parameter is created on the GPU, partitioned, and its shard moved to CPU) and builds
    ``bench/gpt.py``'s GPT (its ``apply(_init_weights)`` runs too: zero.Init gathers one module at a time for it).
    The ratio is that peak over the model's bf16 size (2 bytes x parameters); the target is < 10%.
  * setup: the peak from the end of configure_model to the end of ``trainer.predict``: the strategy's setup (the
    stage-3 inference engine, no optimizer) and teardown, plus one forward on 1 x ``--tokens`` tokens with
    ``--forward``. Without ``--forward`` no batch runs (``limit_predict_batches=0``).
  * where the parameters are: every parameter must be partitioned (``ds_id``) with its shard on the CPU.
With ``--precision bf16-mixed`` the default dtype stays float32 inside configure_model: zero.Init creates each tensor
in float32 and then converts it to bf16, a transient 3x the bf16 size of the largest tensor (the 50304 x 4096
embedding: 1.2 GiB). ``bf16-true`` creates bf16 directly.
Not measured: host memory (the shards, 2 bytes x parameters, live in CPU memory). GPT's scaled init of the residual
projections (a loop over ``named_parameters`` after ``apply``) sees partitioned, empty tensors under zero.Init and
does nothing; the weights' values do not matter here.

Prints one ``BENCH_RESULT_JSON {...}`` line and writes it to ``--out``. Without CUDA (``--small``) the GPU figures are
null and the run only checks the code path: configure_model under zero.Init, partitioning, engine setup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

RESULT_MARK = "BENCH_RESULT_JSON "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-head", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--precision", default="bf16-true", help="Trainer precision (bf16-true: the model is bf16)")
    p.add_argument("--forward", action="store_true", help="also run one predict batch through the offloaded model")
    p.add_argument("--tokens", type=int, default=128, help="sequence length of the --forward batch")
    p.add_argument("--no-offload", action="store_true", help="keep the shards on the device (no remote_device)")
    p.add_argument("--small", action="store_true", help="a tiny GPT on CPU (no GPU needed): a smoke test")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.small:
        args.d_model, args.n_layer, args.n_head, args.vocab, args.seq_len, args.tokens = 64, 2, 4, 512, 64, 16
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.small
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from bench_gpt import env_info
    from gpt import GPT, GPTConfig, param_count_for
    from lightning_zero import ZeroStrategy

    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layer=args.n_layer,
                    n_head=args.n_head)
    expected = param_count_for(cfg)
    record: dict = {}

    def memory() -> dict:
        if not cuda:
            return {"allocated": None, "reserved": None, "peak_allocated": None, "peak_reserved": None}
        torch.cuda.synchronize()
        return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                "peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}

    class InitPeak(L.LightningModule):
        def configure_model(self) -> None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            record["before_configure_model"] = memory()
            start = time.perf_counter()
            self.gpt = GPT(cfg)
            record["configure_model_s"] = round(time.perf_counter() - start, 2)
            record["configure_model"] = memory()
            params = list({id(p): p for p in self.gpt.parameters()}.values())
            record["params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
            record["params_partitioned"] = sum(hasattr(p, "ds_id") for p in params)
            record["params_total"] = len(params)
            record["shard_devices"] = sorted({str(p.ds_tensor.device.type) for p in params if hasattr(p, "ds_tensor")})
            record["local_numel"] = sum(p.numel() for p in params)  # 0: no full parameter left on any device
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def predict_step(self, batch, batch_idx):
            idx, targets = batch
            return self.gpt(idx, targets)

    tokens = torch.randint(0, cfg.vocab_size, (1, args.tokens + 1), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=1)
    # (on CPU, --small, the same offload config runs too: DeepSpeed's CPU accelerator accepts it)
    offload = {} if args.no_offload else {"offload_parameters": "cpu", "remote_device": "cpu"}
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=ZeroStrategy(stage=3, **offload),
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_predict_batches=1 if args.forward else 0)
    start = time.perf_counter()
    out = trainer.predict(InitPeak(), loader)
    record["predict_s"] = round(time.perf_counter() - start, 2)
    record["setup"] = memory()
    if args.forward and out:
        record["forward_loss"] = float(out[0])

    bf16_bytes = 2 * record["params"]
    peak = record["configure_model"]["peak_allocated"]
    result = {
        "bench": "init_peak",
        "env": env_info(),
        "config": {**cfg.as_dict(), "precision": args.precision, "offload": bool(offload), "forward": args.forward,
                   "small": args.small},
        "params": record["params"],
        "params_expected": expected,
        "model_bf16_gib": round(bf16_bytes / 2**30, 3),
        "configure_model_peak_allocated_gib": None if peak is None else round(peak / 2**30, 3),
        "configure_model_peak_reserved_gib": None if peak is None else round(
            record["configure_model"]["peak_reserved"] / 2**30, 3),
        "configure_model_peak_ratio": None if peak is None else round(peak / bf16_bytes, 4),
        "setup_peak_allocated_gib": None if not cuda else round(record["setup"]["peak_allocated"] / 2**30, 3),
        "detail": record,
    }
    ok = (record["params"] == expected and record["params_partitioned"] == record["params_total"]
          and record["local_numel"] == 0 and (not offload or record["shard_devices"] == ["cpu"]))
    result["checks_ok"] = ok
    if trainer.is_global_zero:
        line = RESULT_MARK + json.dumps(result)
        print(line, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        ratio = result["configure_model_peak_ratio"]
        print(f"params {record['params'] / 1e9:.3f}B ({record['params']:,}), bf16 size"
              f" {result['model_bf16_gib']} GiB; configure_model peak allocated"
              f" {result['configure_model_peak_allocated_gib']} GiB"
              f" ({'n/a' if ratio is None else f'{100 * ratio:.2f}%'} of the bf16 size), reserved"
              f" {result['configure_model_peak_reserved_gib']} GiB; partitioned"
              f" {record['params_partitioned']}/{record['params_total']} parameters, shards on {record['shard_devices']};"
              f" checks {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
