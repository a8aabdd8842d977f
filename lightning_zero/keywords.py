"""The typed DeepSpeed keywords of ``ZeroStrategy(**zero_optimization)``.

``ZeroStrategy`` takes them as ``**zero_optimization: Unpack[ZeroKeywords]`` (PEP 692): IDEs and type checkers see
each key with its type, and jsonargparse (LightningCLI) turns each into an option of its own,
``--trainer.strategy.overlap_comm=true`` or a YAML ``init_args`` entry. ``config.resolve_knobs`` maps them into the
DeepSpeed config and DeepSpeed's schema validates their values, so a wrong value gets the same error whichever way it
was given. Any other key of DeepSpeed's ``zero_optimization`` section is still accepted at run time (the long tail:
LightningCLI cannot see it; set it in ``config=`` there).
"""

from __future__ import annotations

import sys
from typing import Any, TypedDict

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

__all__ = ["ACTIVATION_CHECKPOINTING_KEYS", "AIO_KEYS", "BF16_KEYS", "OFFLOAD_KEYS", "AioKeywords", "Unpack",
           "ZenFlowKeywords", "ZeroKeywords"]


class AioKeywords(TypedDict, total=False):
    """DeepSpeed 0.19's ``aio`` section (NVMe offload's asynchronous I/O).

    Attributes:
        block_size: bytes per I/O request (DeepSpeed's default 1048576).
        queue_depth: I/O requests in flight (default 8).
        intra_op_parallelism: I/O threads per request (formerly ``thread_count``; default 1).
        single_submit: submit requests one at a time.
        overlap_events: overlap request submission and completion.
        use_gds: NVIDIA GPUDirect Storage.
    """

    block_size: int
    queue_depth: int
    intra_op_parallelism: int
    single_submit: bool
    overlap_events: bool
    use_gds: bool


class ZenFlowKeywords(TypedDict, total=False):
    """DeepSpeed 0.19's ``zero_optimization.zenflow`` section (stall-free optimizer offload, stages 1-2).

    ZenFlow runs under DeepSpeed's managed accumulation, one ZenFlow iteration per optimizer step:
    ``Trainer(accumulate_grad_batches=1)``, ``select_strategy="step"``, an integer ``update_interval`` and an
    integer ``select_interval >= update_interval`` are required, ``overlap_step`` needs a GPU, the optimizer must be
    the config's ``optimizer`` block, and trainable parameters 1-D or 2-D with at least two rows
    (``config.check_zero_features`` and ``offload.check_zenflow_parameters`` say why for each).

    Attributes:
        topk_ratio: share of gradient columns (the largest) updated on the GPU every step (0 < r < 1, default 0.1).
        select_strategy: ``"step"`` (``"auto"``/``"epoch"`` need DeepSpeed's own dataloader).
        select_interval: optimizer steps between two re-selections of the important columns.
        update_interval: CPU Adam steps the other columns once every this many optimizer steps, with their summed
            gradients (4: 1.31x stage-2 ZeRO-Offload on one H200; 1: every step, slower than plain offload).
        overlap_step: run the CPU optimizer step of the other columns while the next forward/backward runs.
        offload: keep the selective optimizer's states on the CPU too (needs ``overlap_comm=True``).
        auto_ratio: threshold of DeepSpeed's adaptive update interval (unused: ``"auto"`` is refused).
        full_warm_up_rounds: first steps that update every column.
        pt_reserved_cores_perc: share of the CPU cores left to PyTorch; the rest run the CPU optimizer.
    """

    topk_ratio: float
    select_strategy: str
    select_interval: int
    update_interval: int
    overlap_step: bool
    offload: bool
    auto_ratio: float
    full_warm_up_rounds: int
    pt_reserved_cores_perc: float


class ZeroKeywords(TypedDict, total=False):
    """ZeroStrategy's DeepSpeed keywords: each goes to the DeepSpeed config key named in its description.

    Attributes:
        optimizer_buffer_count: ``zero_optimization.offload_optimizer.buffer_count`` (needs ``offload_optimizer``).
        params_buffer_count: ``zero_optimization.offload_param.buffer_count`` (needs ``offload_parameters``).
        params_buffer_size: ``zero_optimization.offload_param.buffer_size`` (needs ``offload_parameters``).
        max_in_cpu: ``zero_optimization.offload_param.max_in_cpu`` (needs ``offload_parameters``).
        offload_optimizer_ratio: ``zero_optimization.offload_optimizer.ratio``: the share of the optimizer states
            stepped by CPU Adam, the rest stays on the GPU (stage 3, ``offload_optimizer="cpu"``, Adam/AdamW).
        bf16_master_weights_and_grads: ``bf16.bf16_master_weights_and_grads``: bf16 master weights and gradients
            instead of fp32 (stages 1-3, bf16 precision; needs ``offload_optimizer`` unless
            ``bf16_optimizer_states``).
        bf16_optimizer_states: ``bf16.bf16_optimizer_states``: bf16 Adam moments too (needs
            ``bf16_master_weights_and_grads``).
        zenflow: ``zero_optimization.zenflow``, ZenFlow's section (:class:`ZenFlowKeywords`; stage 1 or 2,
            ``offload_optimizer="cpu"``).
        aio: the ``aio`` section for NVMe offload, e.g. ``{"block_size": 1048576, "queue_depth": 8}``.
        partition_activations: ``activation_checkpointing.partition_activations``.
        cpu_checkpointing: ``activation_checkpointing.cpu_checkpointing``.
        contiguous_memory_optimization: ``activation_checkpointing.contiguous_memory_optimization``.
        synchronize_checkpoint_boundary: ``activation_checkpointing.synchronize_checkpoint_boundary``.
        overlap_comm: ``zero_optimization.overlap_comm``: overlap gradient reduction with the backward.
        contiguous_gradients: ``zero_optimization.contiguous_gradients``: copy gradients into one buffer.
        reduce_scatter: ``zero_optimization.reduce_scatter``: reduce gradients with reduce-scatter (stages 1-2).
        reduce_bucket_size: ``zero_optimization.reduce_bucket_size``: elements reduced at once.
        allgather_partitions: ``zero_optimization.allgather_partitions`` (stages 1-2).
        allgather_bucket_size: ``zero_optimization.allgather_bucket_size``: elements gathered at once (stages 1-2).
        round_robin_gradients: ``zero_optimization.round_robin_gradients`` (stages 1-2 with optimizer offload).
        sub_group_size: ``zero_optimization.sub_group_size``: parameters per optimizer step group (stage 3).
        stage3_prefetch_bucket_size: ``zero_optimization.stage3_prefetch_bucket_size`` (elements prefetched).
        stage3_param_persistence_threshold: ``zero_optimization.stage3_param_persistence_threshold``: parameters
            smaller than this stay unpartitioned.
        stage3_max_live_parameters: ``zero_optimization.stage3_max_live_parameters``.
        stage3_max_reuse_distance: ``zero_optimization.stage3_max_reuse_distance``.
        stage3_module_granularity_threshold: ``zero_optimization.stage3_module_granularity_threshold`` (``0``:
            DeepSpeed's per-module fetching instead of ZeroStrategy's per-block units).
        compute_grad_norm: ``zero_optimization.compute_grad_norm`` (stages 1-2).
        zero_hpz_partition_size: ZeRO++ hierarchical partitioning (stage 3; divides the devices per node).
        zero_quantized_weights: ZeRO++ quantized weight all-gather (stage 3, CUDA only).
        zero_quantized_nontrainable_weights: ZeRO++ quantized frozen weights (stage 3, CUDA only).
        zero_quantized_gradients: ZeRO++ quantized gradient reduce-scatter (stage 3, CUDA only).
    """

    # offload buffers (the offload keywords themselves are ZeroStrategy's own parameters)
    optimizer_buffer_count: int
    params_buffer_count: int
    params_buffer_size: int | float
    max_in_cpu: int | float
    offload_optimizer_ratio: float
    aio: AioKeywords | dict[str, Any]
    # low-precision master weights / optimizer states (the bf16 section) and ZenFlow
    bf16_master_weights_and_grads: bool
    bf16_optimizer_states: bool
    zenflow: ZenFlowKeywords | dict[str, Any]
    # activation checkpointing
    partition_activations: bool
    cpu_checkpointing: bool
    contiguous_memory_optimization: bool
    synchronize_checkpoint_boundary: bool
    # zero_optimization; sizes are element counts, int or float (``5e8``) as DeepSpeed accepts them
    overlap_comm: bool
    contiguous_gradients: bool
    reduce_scatter: bool
    reduce_bucket_size: int | float
    allgather_partitions: bool
    allgather_bucket_size: int | float
    round_robin_gradients: bool
    sub_group_size: int | float
    stage3_prefetch_bucket_size: int | float
    stage3_param_persistence_threshold: int | float
    stage3_max_live_parameters: int | float
    stage3_max_reuse_distance: int | float
    stage3_module_granularity_threshold: int | float
    compute_grad_norm: bool
    zero_hpz_partition_size: int
    zero_quantized_weights: bool
    zero_quantized_nontrainable_weights: bool
    zero_quantized_gradients: bool


OFFLOAD_KEYS = ("optimizer_buffer_count", "params_buffer_count", "params_buffer_size", "max_in_cpu",
                "offload_optimizer_ratio")
BF16_KEYS = ("bf16_master_weights_and_grads", "bf16_optimizer_states")
AIO_KEYS = ("aio",)
ACTIVATION_CHECKPOINTING_KEYS = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                                 "synchronize_checkpoint_boundary")
