#!/usr/bin/env python
"""Chart of the offload modes (issue 18): tokens/s and GPU / host peak per mode from one bench_gpt.py run, and the
loss curves of fp32 vs bf16 optimizer states from a ``--data markov`` run (docs/offload_modes_h200.png).

    python bench/plot_offload.py bench/results/offload_modes_h200.json bench/results/converge_bf16_states_h200.json \
        --out docs/offload_modes_h200.png

ZenFlow's curves against the fp32 stage-2 run (docs/zenflow_convergence_h200.png), one or more ``--data markov`` result
files, each with its label:

    python bench/plot_offload.py --curves-only --out docs/zenflow_convergence_h200.png \
        "run 1:bench/results/s10_converge_zenflow_u4_h200.json" \
        "run 2:bench/results/s10_converge_zenflow_u4_restart_h200.json" ...

Needs matplotlib (the ``examples`` extra).
"""

from __future__ import annotations

import argparse
import json

LABELS = {
    "builtin_z3_offload": "built-in\nDeepSpeedStrategy\nstage 3 + offload",
    "zero_z3_offload": "ZeroStrategy\nstage 3\n+ offload",
    "zero_z3_offload_r75": "partial offload\n75% on\nthe host",
    "zero_z3_offload_r50": "partial offload\n50% on\nthe host",
    "zero_z3_offload_r25": "partial offload\n25% on\nthe host",
    "zero_z3_offload_bf16m": "offload\nbf16 master\nweights",
    "zero_z3_offload_bf16ms": "offload\nbf16 master\n+ states",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modes", help="bench_gpt.py result file with the offload rows (with --curves-only: LABEL:FILE of"
                   " --data markov runs, several)", nargs="+")
    p.add_argument("curves", help="bench_gpt.py result file of a --data markov run (two rows)", nargs="?")
    p.add_argument("--curves-only", action="store_true", help="only loss curves: every row of every LABEL:FILE")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.curves_only:
        return _plot_curves(plt, [*args.modes, *([args.curves] if args.curves else [])], args.out)
    if len(args.modes) != 1 or args.curves is None:
        p.error("give MODES CURVES (two result files), or --curves-only LABEL:FILE ...")
    args.modes = args.modes[0]

    rows = [r for r in json.load(open(args.modes))["results"] if r.get("row") in LABELS and "tokens_per_s" in r]
    rows.sort(key=lambda r: list(LABELS).index(r["row"]))
    curves = [r for r in json.load(open(args.curves))["results"] if "losses" in r]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    plain = next(r["tokens_per_s"] for r in rows if r["row"] == "zero_z3_offload")
    colors = ["#ff7f0e" if r["row"].startswith("builtin") else "#2ca02c" for r in rows]
    bars = ax.bar(range(len(rows)), [r["tokens_per_s"] / 1e3 for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['tokens_per_s'] / plain:.2f}x\nGPU {r['peak_mem_gib']:.1f} GiB\nhost {r['host_peak_gib']:.1f} GiB",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [LABELS[r["row"]] for r in rows], fontsize=8)
    ax.set_ylabel("thousand tokens/s")
    ax.set_ylim(0, max(r["tokens_per_s"] for r in rows) / 1e3 * 1.3)
    ax.set_title("0.91B GPT, stage 3 with the optimizer (partly) on the CPU; x = vs plain ZeRO-Offload")
    for r in curves:
        bx.plot(r["losses"], label=r["row"].replace("zero_z2_bf16ms", "stage 2, bf16 master + states")
                .replace("zero_z2", "stage 2, fp32 master + states"), linewidth=1)
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("training loss (Markov-chain tokens)")
    bx.set_title(f"fp32 vs bf16 optimizer states, {len(curves[0]['losses'])} steps")
    bx.legend()
    env = rows[0].get("env") or {}
    fig.suptitle(f"one {env.get('gpu', 'GPU')}, torch {env.get('torch', '')}, deepspeed {env.get('deepspeed', '')},"
                 " 8 x 1024 tokens per step, bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


def _plot_curves(plt, specs: list[str], out: str) -> int:
    """Every row's loss curve of each ``LABEL:FILE`` (the same fp32 reference row is drawn once per file)."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    env = {}
    for spec in specs:
        label, _, path = spec.rpartition(":")
        for r in json.load(open(path))["results"]:
            if "losses" in r:
                env = r.get("env") or env
                ax.plot(r["losses"], label=f"{r['row']} ({label})" if label else r["row"], linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (Markov-chain tokens)")
    ax.legend(fontsize=8)
    ax.set_title(f"one {env.get('gpu', 'GPU')}, torch {env.get('torch', '')}, deepspeed {env.get('deepspeed', '')},"
                 " 0.91B GPT, 8 x 1024 tokens per step, bf16, lr 3e-4", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
