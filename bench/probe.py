"""Where one training step's time goes, for ``bench_gpt.py --profile K``.

After the timed steps, a row runs K more steps under ``torch.profiler`` and then K steps with a device
synchronisation at each phase boundary (forward / backward / optimizer step), and reports:

* ``kernels``: GPU kernel time per step by category (matmul, attention, optimizer, copy/cast, reduce/norm,
  elementwise, communication, other), the GPU busy time (union of kernel intervals) and idle time per step;
* ``host_syncs``: per step, how many host-side synchronisations and device-to-host copies the step made;
* ``top_kernels``: the 15 kernels with the most time per step;
* ``phases_ms``: forward, backward and optimizer-step wall time (synchronised, so slightly inflated).

The profiled and phase-timed steps are not part of the throughput figures.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

_CATEGORIES = [
    ("communication", re.compile(r"nccl|allreduce|all_reduce|reduce_scatter|allgather|all_gather", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|sm90_|nvjet|cublas|wgmma|xmma|ampere_|matmul", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|fused_.*optim|_foreach", re.I)),
    ("copy/cast", re.compile(r"copy|cast|convert|memcpy|memset|to_copy|cat_|CatArray|flatten", re.I)),
    ("reduce/norm", re.compile(r"reduce|norm|sum_|layer_norm|vector_norm|max_|amax", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|gelu|add|mul|div|fill", re.I)),
]
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "cudaMemcpyAsync")


def _category(name: str) -> str:
    for cat, rx in _CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


class StepProbe:
    """Drives the profiled and phase-timed steps. Call ``step_end(i)`` after every optimizer step and
    ``mark(phase)`` at phase boundaries (it does nothing outside the phase-timed steps)."""

    def __init__(self, first: int, k: int, device) -> None:
        self.first, self.k, self.device = first, k, device
        self.prof = None
        self.wall: list[float] = []
        self.phase_times: dict[str, list[float]] = defaultdict(list)
        self._t = None
        self.result: dict = {}

    @property
    def total_extra(self) -> int:
        return 2 * self.k if self.k else 0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _phase_active(self, i: int) -> bool:
        return self.k > 0 and self.first + self.k <= i < self.first + 2 * self.k

    def step_start(self, i: int) -> None:
        if self.k and i == self.first:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self._prof_t0 = time.perf_counter()
        self._i = i
        if self._phase_active(i):
            self._sync()
            self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self._t is None or not self._phase_active(self._i):
            return
        self._sync()
        now = time.perf_counter()
        self.phase_times[phase].append((now - self._t) * 1e3)
        self._t = now

    def step_end(self, i: int) -> None:
        if self.k and i == self.first + self.k - 1 and self.prof is not None:
            self._sync()
            wall = time.perf_counter() - self._prof_t0
            self.prof.__exit__(None, None, None)
            self.result.update(self._summarize(self.prof, wall))
            self.prof = None
        if self._phase_active(i):
            self.mark("step")
            self._t = None
        if self.k and i == self.first + 2 * self.k - 1:
            self.result["phases_ms"] = {p: round(sum(v) / len(v), 2) for p, v in self.phase_times.items()}

    def callback(self):
        """A Lightning ``Callback`` that drives this probe from the Trainer's hooks (list it before the callbacks that
        time the steps, so that ``step_end`` runs first)."""
        from lightning.pytorch.callbacks import Callback

        probe = self

        class ProbeCallback(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                probe.step_start(trainer.global_step)

            def on_before_backward(self, trainer, pl_module, loss):
                probe.mark("fwd")

            def on_after_backward(self, trainer, pl_module):
                probe.mark("bwd")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                probe.step_end(trainer.global_step - 1)

        return ProbeCallback()

    def _summarize(self, prof, wall_s: float) -> dict:
        import torch

        k = self.k
        by_cat: dict[str, float] = defaultdict(float)
        by_name: dict[str, float] = defaultdict(float)
        intervals = []
        syncs: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for evt in prof.events():
            dev = getattr(evt, "device_type", None)
            # GPU-side user annotations (e.g. "Optimizer.step#AdamW.step", "FullyShardedDataParallel.forward") span
            # many kernels: counting them as kernels would count that time twice.
            if dev == torch.autograd.DeviceType.CUDA and not getattr(evt, "is_user_annotation", False) \
                    and "#" not in evt.name and not evt.name.endswith((".forward", ".backward")):
                dur = evt.time_range.end - evt.time_range.start
                by_cat[_category(evt.name)] += dur
                by_name[evt.name] += dur
                intervals.append((evt.time_range.start, evt.time_range.end))
            elif evt.name in _SYNC_CALLS:
                s = syncs[evt.name]
                s[0] += 1
                s[1] += evt.time_range.end - evt.time_range.start
        busy = _union_us(intervals)
        step_ms = wall_s * 1e3 / k
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
        return {
            "profile_steps": k,
            "step_ms_profiled": round(step_ms, 2),
            "kernels_ms_per_step": {c: round(v / 1e3 / k, 2) for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "gpu_busy_ms_per_step": round(busy / 1e3 / k, 2),
            "gpu_idle_ms_per_step": round(step_ms - busy / 1e3 / k, 2),
            "host_syncs_per_step": {n: {"calls": round(c / k, 1), "ms": round(t / 1e3 / k, 2)}
                                    for n, (c, t) in syncs.items()},
            "top_kernels_ms_per_step": [[n[:120], round(v / 1e3 / k, 3)] for n, v in top],
        }
