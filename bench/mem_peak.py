#!/usr/bin/env python
"""What is alive at the peak of a CUDA allocator trace (``bench_gpt.py --mem-trace DIR``), grouped by allocation site.

    python bench/mem_peak.py DIR/raw_z3.pickle                      # the peak and what makes it up
    python bench/mem_peak.py DIR/raw_z3.pickle DIR/zero_z3.pickle   # and the difference, site by site

The trace starts after the warm-up steps, so blocks allocated before it (parameters, optimizer state) come from the
snapshot's segments and are listed as "allocated before the trace". The live set is rebuilt backwards from the
snapshot at the end: an ``alloc`` event means the block did not exist before it, a ``free_completed`` that it did.
"""

from __future__ import annotations

import argparse
import pickle
from collections import Counter

GiB = 2**30
_SKIP = ("/torch/", "/contextlib.py", "<frozen", "/threading.py")


def _site(frames: list[dict], depth: int) -> str:
    """The first ``depth`` frames outside torch itself (the code that asked for the memory)."""
    if not frames:
        return "allocated before the trace"
    own = [f for f in frames if not any(s in f["filename"] for s in _SKIP)] or frames
    return " < ".join(f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in own[:depth])


def peak_blocks(path: str, device: int = 0) -> tuple[int, dict[int, tuple[int, list]]]:
    with open(path, "rb") as f:
        snap = pickle.load(f)
    live = {b["address"]: (b["size"], b.get("frames", [])) for seg in snap["segments"]
            if seg.get("device", device) == device for b in seg["blocks"] if b["state"] == "active_allocated"}
    total = sum(size for size, _ in live.values())
    best, best_live = total, dict(live)
    for ev in reversed(snap["device_traces"][device]):
        action, addr = ev["action"], ev["addr"]
        if action == "alloc" and addr in live:
            total -= live.pop(addr)[0]
        elif action == "free_completed" and addr not in live:
            live[addr] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > best:
                best, best_live = total, dict(live)
    return best, best_live


def by_site(blocks: dict[int, tuple[int, list]], depth: int) -> Counter:
    sites: Counter = Counter()
    for size, frames in blocks.values():
        sites[_site(frames, depth)] += size
    return sites


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", help="one trace, or two to compare (second minus first)")
    p.add_argument("--depth", type=int, default=3, help="frames per allocation site (default 3)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    results = []
    for path in args.traces[:2]:
        peak, blocks = peak_blocks(path)
        sites = by_site(blocks, args.depth)
        results.append(sites)
        print(f"{path}: peak {peak / GiB:.3f} GiB in {len(blocks)} blocks")
        for site, size in sites.most_common(args.top):
            print(f"  {size / GiB:8.3f} GiB  {site}")
    if len(results) == 2:
        diff = Counter(results[1])
        diff.subtract(results[0])
        print(f"\ndifference ({args.traces[1]} - {args.traces[0]}), largest first:")
        for site, size in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
            if size:
                print(f"  {size / GiB:+8.3f} GiB  {site}")


if __name__ == "__main__":
    main()
