#!/usr/bin/env python
"""Bar chart of tokens/s per configuration from bench_gpt.py result files (docs/throughput_h100.png).

    python bench/plot_results.py bench/results/bench_gpt_h100_tuned.json bench/results/bench_gpt_h100_compile.json \
        --out docs/throughput_h100.png

Rows of a run made with ``--compile 1`` are labelled "+ compile", zero rows of a run with
``--zero-kwargs '{"compile": "deepcompile"}'`` "+ DeepCompile". Needs matplotlib (the ``examples`` extra).
"""

from __future__ import annotations

import argparse
import json

LABELS = {"fsdp": "Lightning FSDP", "raw": "raw DeepSpeed loop", "builtin": "Lightning DeepSpeedStrategy",
          "zero": "ZeroStrategy"}
COLORS = {"fsdp": "#7f7f7f", "raw": "#1f77b4", "builtin": "#ff7f0e", "zero": "#2ca02c"}


def rows_of(path: str) -> list[tuple[str, str, float]]:
    data = json.load(open(path))
    compiled = " + compile" if data["config"].get("compile") else ""
    deepcompile = "deepcompile" in (data["config"].get("zero_kwargs") or "")  # --zero-kwargs '{"compile": "deepcompile"}'
    out = []
    for r in data["results"]:
        if "tokens_per_s" not in r:
            continue
        family = r["row"].split("_")[0]
        stage = r["row"].partition("_z")[2]
        stage = stage.replace("_offload", " + CPU optimizer offload")
        suffix = " + DeepCompile" if deepcompile and family == "zero" else compiled
        label = LABELS.get(family, family) + (f", ZeRO-{stage}" if stage else "") + suffix
        out.append((label, family, r["tokens_per_s"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default="docs/throughput_h100.png")
    p.add_argument("--title", default="GPT 910.6M, bf16, 8 x 1024 tokens/step, one H100, 2026-11-25")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for path in args.results for r in rows_of(path)]
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r[2] / 1e3 for r in rows], color=[COLORS.get(r[1], "#9467bd") for r in rows])
    for yi, r in zip(y, rows):
        ax.text(r[2] / 1e3 + 0.5, yi, f"{r[2] / 1e3:.1f}k", va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("tokens/s (thousands)")
    ax.set_title(args.title, fontsize=9)
    ax.set_xlim(0, max(r[2] for r in rows) / 1e3 * 1.12)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
