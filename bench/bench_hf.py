#!/usr/bin/env python
"""Training throughput of a Hugging Face ``LlamaForCausalLM`` (0.93B parameters, sdpa attention) on one GPU: Lightning
FSDP (eager and torch.compile) vs Lightning's built-in DeepSpeedStrategy vs lightning_zero.ZeroStrategy at stages 1-3
(eager, ``compile=True`` and stage-3 DeepCompile). bf16-mixed, 8 x 1024 tokens per step, torch AdamW(fused=True).

    python bench/bench_hf.py --out bench/results/bench_hf_h200.json --log bench/results/bench_hf_h200.log
    python bench/bench_hf.py --tiny --rows cpu_zero_z3,cpu_zero_z2   # the code path on CPU, tiny Llama, 2 steps

Rows:
    fsdp                 FSDPStrategy(FULL_SHARD, one unit per LlamaDecoderLayer)
    fsdp_compile         the same, torch.compile(LightningModule)
    zero_z{1,2,3}        ZeroStrategy(stage=N)
    zero_z{1,2,3}_compile  ZeroStrategy(stage=N, compile=True)
    zero_z3_deepcompile  ZeroStrategy(stage=3, compile="deepcompile")
    builtin_z3           lightning.pytorch.strategies.DeepSpeedStrategy(stage=3)
    cpu_zero_z{1,2,3}    (not in the default set) ZeroStrategy(stage=N) on one CPU process, fp32; use with --tiny

Every row builds the model with the same seed from a config (nothing is downloaded), on the GPU, in the
LightningModule's ``__init__``; the data are seeded random tokens with ``labels = input_ids``. The measurement, the
summary fields and the parent/child layout are bench_gpt.py's (see bench/README.md). ZeroStrategy rows also report
``fetch_units``: the module classes ZeRO-3 gathers as one unit (``deepspeed.utils.z3_leaf_module``), which should be
``{"LlamaDecoderLayer": 16}`` at stage 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_gpt as bg  # noqa: E402  (the shared measurement, summary, child launch and table)

ROWS = ["fsdp", "fsdp_compile", "zero_z1", "zero_z2", "zero_z3", "zero_z1_compile", "zero_z2_compile",
        "zero_z3_compile", "zero_z3_deepcompile", "builtin_z3"]
EXTRA_ROWS = ["cpu_zero_z1", "cpu_zero_z2", "cpu_zero_z3"]
_DEEPCOMPILE_WARMUP = 5  # deepspeed.compile.init_z3.WARMUP in DeepSpeed 0.19.8
FORWARDED = ["micro_batch", "seq_len", "warmup", "steps", "seed", "lr", "tiny", "hidden", "layers", "intermediate",
             "heads", "vocab", "zero_kwargs", "zero_config", "profile"]


def llama_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
                           attn_implementation="sdpa")
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       max_position_embeddings=args.seq_len, attn_implementation="sdpa", tie_word_embeddings=False)


def parse_row(row: str) -> dict:
    if row not in ROWS + EXTRA_ROWS:
        raise ValueError(f"unknown row {row!r}; choose from {','.join(ROWS + EXTRA_ROWS)}")
    cpu = row.startswith("cpu_")
    name = row.removeprefix("cpu_")
    family = name.split("_")[0]
    stage = int(name.split("_z")[1][0]) if "_z" in name else None
    compile_ = "deepcompile" if name.endswith("deepcompile") else name.endswith("_compile")
    return {"family": family, "stage": stage, "compile": compile_, "cpu": cpu, "offload": False}


def run_row(args, spec) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from probe import StepProbe
    from torch.utils.data import DataLoader, Dataset
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    family, stage, cpu = spec["family"], spec["stage"], spec["cpu"]
    if spec["compile"] == "deepcompile" and args.warmup <= _DEEPCOMPILE_WARMUP:
        # DeepSpeed's ZeRO-3 schedule (deepspeed/compile/init_z3.py, WARMUP = 5) recompiles with its prefetch and
        # selective-gather passes at step 5: inside the timed steps it turns 64k tokens/s into 1.6k (seen on an H200)
        raise ValueError(f"--warmup {args.warmup}: the {args.row} row needs --warmup {_DEEPCOMPILE_WARMUP + 1} or more"
                         f" (DeepCompile recompiles at step {_DEEPCOMPILE_WARMUP}).")
    device = torch.device("cpu") if cpu else torch.device("cuda", bg._local_rank())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(bg._free_port()))
    if family == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(sharding_strategy="FULL_SHARD", auto_wrap_policy={LlamaDecoderLayer})
    elif family == "builtin":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=stage, logging_batch_size_per_gpu=args.micro_batch)
    else:
        from lightning_zero import ZeroStrategy

        strategy = ZeroStrategy(stage=stage, compile=spec["compile"], config=json.loads(args.zero_config or "null"),
                                **json.loads(args.zero_kwargs or "{}"))
    if not cpu:
        torch.cuda.set_device(device)
    total = args.warmup + args.steps
    probe = StepProbe(total, args.profile, device)
    config = llama_config(args)
    g = torch.Generator(device=device).manual_seed(args.seed)
    rows = (total + probe.total_extra) * args.micro_batch
    tokens = torch.randint(0, config.vocab_size, (rows, args.seq_len), generator=g, device=device)

    class Rows(Dataset):
        def __len__(self):
            return tokens.shape[0]

        def __getitem__(self, i):
            return tokens[i]

    class Llama(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(args.seed)
            with torch.device(device):
                self.model = LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return bg.make_optimizer(self.parameters(), "torch_adamw" if cpu else "torch_adamw_fused", args.lr)

    class StepTimer(Callback):
        def __init__(self):
            self.times, self.losses, self.peak_before, self.peak_timed, self.units = [], [], None, None, {}

        def on_train_start(self, trainer, pl_module):
            from collections import Counter

            from deepspeed.utils import z3_leaf_module

            self.units = dict(Counter(type(m).__name__ for m in pl_module.modules() if z3_leaf_module(m)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(self.times) >= total:
                return
            bg._sync(device)
            self.times.append(time.perf_counter())
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            if not cpu and len(self.times) == args.warmup:
                self.peak_before = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            if not cpu and len(self.times) == total:
                self.peak_timed = torch.cuda.max_memory_allocated(device)

    module = Llama()
    n_params = sum(p.numel() for p in module.model.parameters())
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu" if cpu else "gpu", devices=1, precision="32-true" if cpu else "bf16-mixed",
                        strategy=strategy, max_steps=total + probe.total_extra, max_epochs=1, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[probe.callback(), timer])
    fit_module = torch.compile(module) if family == "fsdp" and spec["compile"] else module
    trainer.fit(fit_module, train_dataloaders=DataLoader(Rows(), batch_size=args.micro_batch, shuffle=False))
    if len(timer.times) != total:
        raise RuntimeError(f"expected {total} timed optimizer steps, the callback saw {len(timer.times)}")
    args.gpus = 1
    peak_timed = None if cpu else timer.peak_timed
    peak_total = None if cpu else max(timer.peak_before or 0, timer.peak_timed)
    out = bg._summarize(args, spec, timer.times, timer.losses, n_params, peak_total, peak_timed)
    out.update(probe.result)
    out.update(strategy=type(strategy).__name__, fetch_units=timer.units, model_config=config.to_diff_dict())
    return out


def child_main(args) -> int:
    t0 = time.perf_counter()
    result = {"row": args.row}
    try:
        spec = parse_row(args.row)
        result.update(spec)
        result.update(run_row(args, spec))
    except BaseException as e:  # noqa: BLE001 - report, never crash the parent's run
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback_tail"] = tb[-3000:]
    result["child_wall_s"] = time.perf_counter() - t0
    try:
        result["env"] = bg.env_info(probe_zero=result.get("family") == "zero")
    except Exception as e:  # noqa: BLE001
        result["env"] = {"error": repr(e)}
    print(bg.RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


def parent_main(args) -> int:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        parse_row(r)
    # bench_gpt's child launcher with this script and its options
    bg.FORWARDED[:] = FORWARDED
    bg.__file__ = os.path.abspath(__file__)
    args.gpus = 1
    log = open(args.log, "w") if args.log else None
    results = []
    t0 = time.perf_counter()
    for row in rows:
        print(f"-- {row} ...", flush=True)
        r = bg.run_child(args, row, log)
        results.append(r)
        if "error" in r:
            print(f"-- {row}: ERROR {r['error']}\n   " + "\n   ".join(
                (r.get("traceback_tail") or r.get("output_tail") or "").splitlines()[-12:]), flush=True)
        else:
            print(f"-- {row}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_time_s'] * 1e3:.1f} ms/step, peak"
                  f" {r['peak_mem_gib'] or 0:.2f} GiB, loss {r['loss_first']:.3f}>{r['loss_last']:.3f}, fetch units"
                  f" {r.get('fetch_units')}, {r['wall_s']:.0f} s", flush=True)
    if log:
        log.close()
    table = bg.format_table(results)
    first = next((r for r in results if "params" in r), {})
    print(f"\nLlamaForCausalLM {first.get('params', 0) / 1e6:.1f}M params, {args.micro_batch}x{args.seq_len}"
          f" tokens/step, {args.warmup} warm-up + {args.steps} timed steps, {(first.get('env') or {}).get('gpu')}")
    print(table, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "results": results, "total_wall_s": time.perf_counter() - t0},
                      f, indent=2, default=str)
        print(f"wrote {args.out}", flush=True)
    return 0 if all("error" not in r for r in results) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: every GPU row)")
    p.add_argument("--out", default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--tiny", type=int, default=0, choices=[0, 1], nargs="?", const=1,
                   help="a tiny Llama (2 layers, width 64): checks the code path, e.g. on CPU")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5376)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=1024)
    p.add_argument("--micro-batch", dest="micro_batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--zero-kwargs", dest="zero_kwargs", default=None,
                   help='JSON dict of extra ZeroStrategy keywords in the zero_* rows, e.g. \'{"pin_memory": true}\'')
    p.add_argument("--zero-config", dest="zero_config", default=None,
                   help="JSON dict passed as ZeroStrategy(config=...) in the zero_* rows")
    p.add_argument("--profile", type=int, default=0,
                   help="after the timed steps, profile K steps and time K more by phase (bench_gpt.py, probe.py)")
    p.add_argument("--row-timeout", dest="row_timeout", type=float, default=900.0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gpus = 1
    if args.tiny and "--seq-len" not in (argv or sys.argv):
        args.seq_len, args.micro_batch = 32, 2
    return child_main(args) if args.row else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
