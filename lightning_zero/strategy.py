"""ZeroStrategy: Lightning hooks only; config resolution lives in the config package, engines in engines.py, the
launchers in launchers.py and the hooks' checks and helpers in _strategy_checks.py."""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.distributed import group as _group
from torch.nn import Module
from typing_extensions import override

from lightning_zero import checkpoint as ckpt
from lightning_zero import config as cfg
from lightning_zero._compat.lightning import (StrategyRegistry, configured_optimizers, evaluate_under_no_grad,
                                              route_checkpoint_state_dict, sync_ddp_if_available, unwrap_optimizer)
from lightning_zero._compat.deepspeed import memoize_cpu_info
from lightning_zero._compat.lightning import (
    default_process_group_backend as _get_default_process_group_backend_for_device)
from lightning_zero._compat.lightning import distributed_is_initialized as _distributed_is_initialized
from lightning_zero._imports import require_deepspeed, use_cpu_accelerator
from lightning_zero.env import warn_stale_build_locks
from lightning_zero import offload
from lightning_zero.keywords import Unpack, ZeroKeywords
from lightning_zero.engines import EngineRegistry, _ModelGroup
from lightning_zero.compiling import (check_deepcompile, check_deepcompile_runtime, compile_models, deepcompile_engine,
                                      evaluating_eagerly, refuse_compiled_lightning_module, resolve_compile,
                                      resume_deepcompile_schedule)
from lightning_zero.precision import ZeroPrecision, check_cpu_precision, requested_precision
from lightning_zero.plan import build_engines, plan_engines, resolve_model_config
from lightning_zero import hf
from lightning_zero.summary import install_summary
from lightning_zero.launchers import _Launcher, _ScriptLauncher
from lightning_zero._strategy_checks import (_SHAPE_ERROR, _check_device_indices, _destroy_process_group,
                                             _match_partitioned_dtype, _train_micro_batch_size,
                                             _warn_eager_stage3_evaluation, _warn_unpartitioned)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["ZeroStrategy"]

_warning_cache = WarningCache()

log = logging.getLogger(__name__)


class ZeroStrategy(ParallelStrategy):
    """DeepSpeed ZeRO for Lightning, with one DeepSpeed engine per model.

    Args:
        stage: ZeRO stage ``0``, ``1``, ``2`` (default) or ``3``; or ``"auto"``: at setup, the fastest stage and
            offload whose model states fit the free GPU memory and host memory (and NVMe space when ``nvme_path`` is
            given), counted from the model (``configure_model`` is run once on the meta device to count) and logged.
        config: a DeepSpeed config dict or the path to a JSON file (default: ``$LIGHTNING_ZERO_CONFIG``). Trainer
            flags fill the keys left out or set to ``"auto"``; conflicting values are an error.
        offload_optimizer: ``False``, ``"cpu"`` (stages 1-3) or ``"nvme"`` (stage 3): where the optimizer state lives
            and steps. A torch ``Adam``/``AdamW`` is then stepped by DeepSpeed's ``DeepSpeedCPUAdam`` with the same
            hyperparameters; other optimizers need ``"zero_force_ds_cpu_optimizer": false`` in the config.
        offload_parameters: ``False``, ``"cpu"`` or ``"nvme"``: where the parameters live (stage 3).
        nvme_path: the folder used for NVMe offload (must exist, be writable and have room; needs ``libaio-dev``).
        pin_memory: pin the CPU memory used for offload.
        optimizer_buffer_count, params_buffer_count, params_buffer_size, max_in_cpu: the offload sections' buffer
            settings (DeepSpeed's ``buffer_count``, ``buffer_size``, ``max_in_cpu``).
        aio: DeepSpeed's ``aio`` section for NVMe offload, e.g. ``{"block_size": 1048576, "queue_depth": 8,
            "intra_op_parallelism": 1, "single_submit": False, "overlap_events": True}``.
        zero_hpz_partition_size, zero_quantized_weights, zero_quantized_gradients: ZeRO++ (stage 3): hierarchical
            partitioning (a divisor of the devices per node) and quantized all-gather / reduce-scatter (CUDA only).
        partition_activations, cpu_checkpointing, contiguous_memory_optimization, synchronize_checkpoint_boundary:
            DeepSpeed's ``activation_checkpointing`` section, used where the model calls
            ``deepspeed.checkpointing.checkpoint``.
        remote_device: where ``zero.Init`` puts parameters created in ``configure_model`` at stage 3: ``None`` (the
            parameter offload device, else the GPU), ``"cpu"`` or ``"nvme"`` (needs ``offload_parameters="nvme"``).
        start_method: ``"popen"`` (re-run the script per process, default), ``"spawn"`` or ``"fork"``.
        logging_level: DeepSpeed's log level, a ``logging`` constant or its name (``"INFO"``); default
            ``logging.WARNING``: no per-step prints.
        exclude_frozen_parameters: leave parameters with ``requires_grad=False`` out of checkpoints.
        compile: ``True`` or a dict of ``torch.compile`` keyword arguments: compile the networks the engines train
            (each engine's model, or the LightningModule's children that hold parameters). Pass the plain
            LightningModule to the Trainer; Lightning refuses a compiled one for this strategy. ``"deepcompile"``
            (or ``"compile": {"deepcompile": true}`` in the config): compile them with DeepSpeed's DeepCompile,
            which turns ZeRO's gathers and reductions into graph operations (stages 1-3, CUDA, one trained model;
            its options live in the config's ``compile`` section).
        timeout: process group timeout, a ``datetime.timedelta`` (default 30 minutes; ``None`` means the default).
        **zero_optimization: keys of DeepSpeed's ``zero_optimization`` section, typed in
            :class:`lightning_zero.keywords.ZeroKeywords` (so LightningCLI, YAML configs, ``--help`` and IDEs see
            them): ``overlap_comm``, ``contiguous_gradients``, ``reduce_scatter``, ``reduce_bucket_size``,
            ``allgather_partitions``, ``allgather_bucket_size``, ``round_robin_gradients``, ``sub_group_size``,
            ``stage3_prefetch_bucket_size``, ``stage3_param_persistence_threshold``, ``stage3_max_live_parameters``,
            ``stage3_max_reuse_distance``, ``stage3_module_granularity_threshold``, ``compute_grad_norm``,
            ``zero_quantized_nontrainable_weights``, plus the offload, ``aio``, ZeRO++ and activation checkpointing
            keywords above and the offload modes: ``offload_optimizer_ratio`` (partial optimizer offload),
            ``bf16_master_weights_and_grads``, ``bf16_optimizer_states`` (the ``bf16`` section) and ``zenflow``.
            Any other key of that section is accepted too, in Python only (LightningCLI cannot see
            it: put it in ``config=``).
    """

    strategy_name = "zero"

    # Lightning's Trainer assigns the model it was given here right before it refuses a torch.compile-d one for any
    # strategy but DDP/FSDP; refuse it first, with ZeroStrategy's way to compile (contract: tests/unit/test_compat.py).
    @property
    def _lightning_module(self) -> pl.LightningModule | None:
        return self.__dict__.get("_zero_lightning_module")

    @_lightning_module.setter
    def _lightning_module(self, model: pl.LightningModule | None) -> None:
        refuse_compiled_lightning_module(model)
        self.__dict__["_zero_lightning_module"] = model

    def __init__(
        self,
        stage: Literal[0, 1, 2, 3, "auto"] | None = None,
        config: Mapping[str, Any] | str | os.PathLike | None = None,
        *,
        offload_optimizer: bool | Literal["cpu", "nvme"] | None = None,
        offload_parameters: bool | Literal["cpu", "nvme"] | None = None,
        nvme_path: str | None = None,
        pin_memory: bool | None = None,
        remote_device: str | None = None,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
        logging_level: int | str = logging.WARNING,
        exclude_frozen_parameters: bool = False,
        compile: bool | str | Mapping[str, Any] = False,
        timeout: timedelta | None = default_pg_timeout,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        **zero_optimization: Unpack[ZeroKeywords],
    ) -> None:
        require_deepspeed()
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, precision_plugin=precision_plugin)
        # Validate everything that does not need the Trainer now, before any process starts.
        args = cfg.resolve_strategy_args(
            stage, config, start_method=start_method, offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters, nvme_path=nvme_path, pin_memory=pin_memory,
            remote_device=remote_device, logging_level=logging_level, timeout=timeout,
            zero_optimization=zero_optimization)
        self.user_config, self.knobs, self.stage = args.user_config, args.knobs, args.stage
        # stage="auto" is decided at setup from the model and the hardware (see _plan_auto_stage)
        self._auto, self._auto_nvme_path = args.auto, args.auto_nvme_path
        self.remote_device = args.remote_device
        self.exclude_frozen_parameters = exclude_frozen_parameters
        self.compile_kwargs, self.deepcompile = resolve_compile(compile, args.merged)
        if self.deepcompile:
            check_deepcompile(None if self._auto else self.stage, self.compile_kwargs, args.merged)
        self.ds_config: dict[str, Any] | None = None  # resolved at setup, with the Trainer's flags
        self.engines = EngineRegistry()
        self._engines_owner: int | None = None
        self._warned_eager_gather = False
        self._hf = hf.HfZero3Link()  # transformers' view of ZeRO-3, from zero.Init or setup to teardown
        self._start_method = start_method
        self._process_group_backend = process_group_backend
        self._timeout = args.timeout
        self._num_nodes = 1
        import deepspeed

        deepspeed.utils.logging.logger.setLevel(args.logging_level)

    # ----------------------------------------------------------------------------------------------------------------
    # Topology and launch (as Lightning's DDPStrategy)
    # ----------------------------------------------------------------------------------------------------------------

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def is_distributed(self) -> bool:
        return True

    @property  # type: ignore[override]
    @override
    def precision_plugin(self) -> ZeroPrecision:
        if not isinstance(self._precision_plugin, ZeroPrecision):
            self._precision_plugin = ZeroPrecision("32-true")
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # The Trainer hands every strategy a generic plugin for its `precision` flag; keep the flag, use ours.
        if plugin is None or isinstance(plugin, ZeroPrecision):
            self._precision_plugin = plugin
            return
        if type(plugin).__name__ not in ("Precision", "MixedPrecision", "HalfPrecision", "DoublePrecision"):
            raise ValueError(f"ZeroStrategy does not support the {type(plugin).__name__} plugin: DeepSpeed handles"
                             " precision itself. Remove it and set Trainer(precision=...) instead.")
        self._precision_plugin = ZeroPrecision(requested_precision(plugin))  # "16-mixed" stays fp16 on CPU

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:
            self._launcher = None
        elif self._start_method == "popen":
            self._launcher = _ScriptLauncher(self, self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _Launcher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        # DeepSpeed's internals call torch collectives that torch deprecates; the user cannot act on that warning.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        memoize_cpu_info()  # DeepSpeed asks py-cpuinfo (a subprocess each time) at every op load
        if self.root_device.type == "cpu":
            use_cpu_accelerator()
            check_cpu_precision(self.precision_plugin.precision)  # torchrun/SLURM ranks have no precheck
        super().setup_environment()
        self._init_distributed()

    def _init_distributed(self) -> None:
        import deepspeed

        _check_device_indices(self.parallel_devices)
        reset_seed()
        self.set_world_ranks()
        assert self.cluster_environment is not None
        # DeepSpeed reads the rendezvous from the environment (torchrun-style variables).
        os.environ.update(MASTER_ADDR=self.cluster_environment.main_address,
                          MASTER_PORT=str(self.cluster_environment.main_port), RANK=str(self.global_rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank))
        if self.local_rank == 0:  # one warning per machine, before DeepSpeed loads its first op
            warn_stale_build_locks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        deepspeed.init_distributed(backend, distributed_port=self.cluster_environment.main_port,
                                   timeout=self._timeout)
        # Destroy the group before the interpreter exits: otherwise gloo's threads abort the process at exit
        # ("terminate called without an active exception") and the exit code is lost.
        # (once per process, however many Trainer calls initialise it)
        atexit.unregister(_destroy_process_group)
        atexit.register(_destroy_process_group)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        # rank_zero_only decorators read the global rank
        from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    # ----------------------------------------------------------------------------------------------------------------
    # Config, model creation, engines
    # ----------------------------------------------------------------------------------------------------------------

    def trainer_flags(self, trainer: pl.Trainer, with_batch: bool = True) -> cfg.TrainerFlags:
        """The Trainer's settings DeepSpeed cares about; ``with_batch=False`` skips the DataLoader (pre-launch)."""
        return cfg.TrainerFlags(
            precision=self.precision_plugin.precision,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=trainer.gradient_clip_algorithm if trainer.gradient_clip_val else None,
            micro_batch_size=_train_micro_batch_size(trainer) if with_batch else None,
            world_size=self.num_nodes * self.num_processes,
            devices_per_node=self.num_processes,
            device_type=self.parallel_devices[0].type if self.parallel_devices else None,
        )

    def precheck(self, trainer: pl.Trainer) -> None:
        """Check the config against the Trainer's static flags (precision, accumulation, clipping), the topology
        (ZeRO++) and the NVMe folder."""
        config = cfg.resolve_ds_config(self.user_config, self.knobs, self.trainer_flags(trainer, with_batch=False))
        offload.check_nvme(config)
        if self.parallel_devices and self.parallel_devices[0].type == "cpu":
            check_cpu_precision(self.precision_plugin.precision)
        if self.deepcompile and trainer.state.fn == TrainerFn.FITTING:
            check_deepcompile(None if self._auto else self.stage, self.compile_kwargs, config)
            if self.parallel_devices:
                check_deepcompile_runtime(self.parallel_devices[0])

    def _plan_auto_stage(self) -> None:
        """``stage="auto"``: choose the stage and offload once, before the model is created (rank 0 decides)."""
        if not self._auto or self.lightning_module is None or not _distributed_is_initialized():
            return
        from lightning_zero import estimate

        # partial offload is rounded to the sub-groups of the config's sub_group_size (a keyword or a config key)
        sub_group_size = cfg.merge_knobs(self.user_config, self.knobs)["zero_optimization"].get("sub_group_size")
        try:
            choice: Any = estimate.plan_auto(
                self.lightning_module, num_nodes=self.num_nodes, devices_per_node=self.num_processes,
                device=self.root_device, precision=self.precision_plugin.precision, nvme_path=self._auto_nvme_path,
                sub_group_size=sub_group_size if isinstance(sub_group_size, (int, float)) else None)
        except (ValueError, RuntimeError) as err:  # rank 0's refusal reaches every rank (none waits in broadcast)
            choice = err
        choice = self.broadcast(choice)
        if isinstance(choice, Exception):
            raise choice
        self.stage, optimizer, parameters, modes, message = choice
        rank_zero_info(message)
        nvme_path = self._auto_nvme_path if "nvme" in (optimizer, parameters) else None
        # the offload-mode keywords (offload_optimizer_ratio, bf16_*) go through resolve_knobs like the user's own
        self.knobs = cfg.merge_knobs(self.knobs, cfg.resolve_knobs(
            self.stage, optimizer if optimizer != "none" else None, parameters if parameters != "none" else None,
            nvme_path, **modes))
        self._auto = False

    def resolve_config(self, trainer: pl.Trainer | None) -> dict[str, Any]:
        flags = self.trainer_flags(trainer) if trainer is not None else cfg.TrainerFlags(
            precision=self.precision_plugin.precision, world_size=self.world_size)
        config = resolve_model_config(self.user_config, self.knobs, flags, deepcompile=self.deepcompile)
        # in every process, before zero.Init creates <nvme_path>/zero_stage_3 (torchrun/SLURM have no precheck)
        offload.check_nvme(config)
        return config

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Where ``configure_model`` and ``with trainer.init_module():`` create the model.

        Stage 3: inside ``deepspeed.zero.Init``, so every parameter is partitioned as it is created. Stages 0-2: on the
        root device, in the target dtype for the "-true" precisions (Lightning's default).
        """
        # Lightning enters this context around configure_model (with model_sharded_context, which we leave alone: its
        # override would make `trainer.init_module()` warn that it is unsupported) and alone in trainer.init_module().
        self._plan_auto_stage()
        if self.stage != 3:
            with super().tensor_init_context(empty_init=empty_init):
                yield
            return
        if not self._distributed_ready_for_init():
            with self.precision_plugin.tensor_init_context():
                yield
            return
        import deepspeed

        # In configure_model the Trainer is known: resolve (and keep) the full config. Under trainer.init_module() the
        # config is resolved again at setup with the Trainer's flags; zero.Init only needs the dtype and ZeRO keys.
        config = self._ensure_config() if self.lightning_module is not None else self.resolve_config(None)
        # dtype comes from the config's fp16/bf16 sections (DeepSpeed 0.19 ignores an explicit dtype on CPU).
        # hf.init_context: writes to partitioned parameters take effect, and transformers knows ZeRO-3 is on
        with hf.init_context(self._hf, config, deepspeed.zero.Init(config_dict_or_path=config,
                                                                    remote_device=self._remote_device(config))):
            yield

    def _distributed_ready_for_init(self) -> bool:
        """Whether zero.Init can run now; starts the processes early for ``trainer.init_module()`` when it can.

        zero.Init needs every rank: in configure_model they exist. Under init_module (before fit) they exist when an
        external launcher started them (torchrun, SLURM, the children of the "popen" launcher); the popen launcher's
        main process starts its children here, as ``fit`` would, and they re-run the script up to this point.
        """
        if _distributed_is_initialized():
            return True
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            if not isinstance(self._launcher, _ScriptLauncher):
                rank_zero_warn(
                    f"`trainer.init_module()` cannot partition the model with ZeroStrategy(stage=3,"
                    f" start_method={self._start_method!r}): the processes only start inside `trainer.fit`. The model"
                    " is created whole and partitioned at setup. Create the layers in `LightningModule.configure_model`"
                    " instead (or use the default start_method='popen')."
                )
                return False
            self._launcher.start_processes()
        self.setup_environment()
        return True

    def _ensure_config(self) -> dict[str, Any]:
        """Resolve the config once per Trainer call (configure_model runs before setup and needs it already)."""
        if self.ds_config is None:
            trainer = self.lightning_module.trainer if self.lightning_module is not None else None
            self.ds_config = self.resolve_config(trainer)
        return self.ds_config

    def _remote_device(self, config: Mapping[str, Any]) -> str | None:
        if self.remote_device is not None:
            return self.remote_device
        return config.get("zero_optimization", {}).get("offload_param", {}).get("device")

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        route_checkpoint_state_dict(trainer, self._checkpoint_state_dict)  # stage 3: no full gather at each save
        self._plan_auto_stage()
        self._ensure_config()
        if self.stage == 3:
            self._link_stage3(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting and self._engines_owner == id(self.lightning_module) and len(self.engines):
            # validate/test/predict after a fit or an evaluation of the same module: keep its engines (and partitioning)
            self.model = self._wrapped_model()
            return
        # Every fit builds its engines anew, as any Lightning strategy creates its optimizers at each fit:
        # configure_optimizers runs, the optimizer state starts fresh (a ckpt_path restores it after setup) and the
        # engines take the parameters trainable now. The previous call's engines (an evaluation's have no optimizer,
        # a fit's the old one) are destroyed first, so their ZeRO hooks leave the module.
        self._release_engines()
        self._prepare_module(fitting)
        self._build_engines(fitting)
        self._compile_engines(trainer, fitting)
        self.model = self._wrapped_model()

    def _link_stage3(self, trainer: pl.Trainer) -> None:
        """Stage 3: what the Trainer and transformers must know of partitioned parameters, before any engine."""
        evaluate_under_no_grad(trainer)  # DeepSpeed's gathers would leave inference tensors behind
        self._hf.activate(self.ds_config)  # from_pretrained, generate and resizing see ZeRO-3 (hf.py)
        install_summary(trainer)  # true parameter counts in the summary printed at fit start

    def _prepare_module(self, fitting: bool) -> None:
        """The module in its precision, and the model-wide checks and settings, once before the engines."""
        assert self.lightning_module is not None and self.ds_config is not None
        if self.stage == 3:
            _warn_unpartitioned(self.lightning_module)
            _match_partitioned_dtype(self.lightning_module)
            hf.warn_lost_data_assignments(self.lightning_module)
        self.model = self.precision_plugin.convert_module(self.lightning_module)
        if self.deepcompile and fitting:
            check_deepcompile(self.stage, self.compile_kwargs, self.ds_config)  # stage="auto" is known now
            check_deepcompile_runtime(self.root_device)
        # Model-wide, once before the engines: the NVMe drive has room for this node's share of the model (every
        # engine's config offloads a subset of these sections), and deepspeed.checkpointing is set up.
        config = self.ds_config if fitting else cfg.inference_config(self.ds_config)
        offload.check_nvme(config, offload.count_parameters(self.lightning_module), self.num_processes,
                           self.world_size)
        offload.configure_activation_checkpointing(self.ds_config)

    def _build_engines(self, fitting: bool) -> None:
        """A fit's engines with their optimizers, or an evaluation's without; then this module owns them."""
        assert self.lightning_module is not None and self.ds_config is not None
        if fitting:
            self._setup_training_engines()
        else:
            self.optimizers, self.lr_scheduler_configs = [], []
            plans = plan_engines(self.ds_config, self.lightning_module, [], fitting=False)
            build_engines(plans, self.engines, self.root_device)
        self.precision_plugin.engines = self.engines
        self._engines_owner = id(self.lightning_module)

    def _compile_engines(self, trainer: pl.Trainer, fitting: bool) -> None:
        """``compile=``: DeepCompile on a fit's trained engine, else torch.compile of the engines' networks."""
        if self.deepcompile and fitting:
            slot = self.engines.trained[0]
            deepcompile_engine(slot.engine, slot.module, self.compile_kwargs)
            self.engines.deepcompile = True
        elif self.compile_kwargs is not None:
            if self.deepcompile:
                rank_zero_info("ZeroStrategy(compile='deepcompile'): DeepCompile compiles a trained engine; this"
                               f" {trainer.state.fn.value} run uses torch.compile.")
            compile_models(((slot.module, slot.module is self.lightning_module or isinstance(slot.module, _ModelGroup))
                            for slot in self.engines), self.compile_kwargs)

    def _setup_training_engines(self) -> None:
        assert self.lightning_module is not None and self.ds_config is not None
        optimizers, schedulers = configured_optimizers(self.lightning_module)
        plans = plan_engines(self.ds_config, self.lightning_module, optimizers, deepcompile=self.deepcompile)
        slots = build_engines(plans, self.engines, self.root_device)
        if not optimizers:  # the DeepSpeed config's optimizer (and scheduler) steps the one engine
            engine = slots[0].engine
            self.optimizers, self.lr_scheduler_configs = [slots[0].face], []
            if engine.lr_scheduler is not None:  # Lightning steps it, once per optimizer step
                self.lr_scheduler_configs = [LRSchedulerConfig(engine.lr_scheduler, interval="step")]
                engine.lr_scheduler = None
            return
        self.optimizers, self.lr_scheduler_configs = optimizers, schedulers
        for lightning_optimizer in self._lightning_optimizers:
            self.engines.guard_zero_grad(lightning_optimizer)

    def _release_engines(self) -> None:
        """Destroy the engines of the previous Trainer call, and those another Trainer of this process left on this
        module (engines.EngineRegistry.release, .claim)."""
        assert self.lightning_module is not None
        self.engines.release()
        self.engines.claim(self.lightning_module)
        self._engines_owner = None

    def _wrapped_model(self) -> Module:
        """The engine when one engine wraps the whole LightningModule (steps run through its forward)."""
        slots = list(self.engines)
        if len(slots) == 1 and slots[0].module is self.lightning_module:
            return slots[0].engine
        assert self.lightning_module is not None
        return self.lightning_module

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        # Optimizers are created with the engines in setup(); see _setup_training_engines.
        pass

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        # DeepSpeed's unmanaged accumulation already reduces once per step (stages 0-1) or per micro-batch into the
        # partition (stages 2-3); its no_sync() is not needed and would refuse stages 2-3.
        yield None

    @override
    def model_to_device(self) -> None:
        if self.stage < 3 and self.lightning_module is not None:
            self.lightning_module.to(self.root_device)

    # ----------------------------------------------------------------------------------------------------------------
    # Collectives (torch.distributed, as DeepSpeed uses the same default group)
    # ----------------------------------------------------------------------------------------------------------------

    @override
    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            torch.distributed.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        objects = [obj]
        torch.distributed.broadcast_object_list(objects, src, group=_group.WORLD)
        return objects[0]

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
               ) -> Tensor | Any:
        if isinstance(tensor, Tensor):
            return sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def _evaluation(self) -> Any:
        """Evaluation with the engines of a DeepCompile fit (validation during fit, or validate/test/predict after it
        on the same Trainer) runs the compiled networks eagerly: see compiling.evaluating_eagerly."""
        if self.engines.deepcompile and self.stage == 3 and not self._warned_eager_gather:
            self._warned_eager_gather = True
            assert self.lightning_module is not None
            _warn_eager_stage3_evaluation(self.lightning_module)
        return evaluating_eagerly(self.engines.deepcompile)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._evaluation():
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._evaluation():
            return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._evaluation():
            return super().predict_step(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.engines.reset_unit_calls()  # a new batch: earlier forwards without a backward do not count
        try:
            return super().training_step(*args, **kwargs)
        except RuntimeError as error:
            # Measured with DeepSpeed 0.19.8: a layer that runs eagerly (no compiled graph covers it) finds no ZeRO-3
            # gather hooks under DeepCompile and fails on its partitioned (1-D, empty) weight ("mat2 must be a matrix,
            # got 1-D tensor"). Name the cause and the fix for such shape errors, keeping DeepSpeed's error as the
            # cause; anything else (out of memory, other setups) passes unchanged.
            if not (self.engines.deepcompile and self.stage == 3) or isinstance(error, torch.OutOfMemoryError) \
                    or not _SHAPE_ERROR.search(str(error)):
                raise
            raise ValueError(
                f"ZeroStrategy(stage=3, compile='deepcompile'): the forward failed ({error}). With DeepCompile, ZeRO-3"
                " gathers parameters only inside compiled graphs; a layer that runs eagerly sees its parameters"
                " partitioned. Keep every parameter inside the networks ZeroStrategy compiles (the LightningModule's"
                " children), avoid graph breaks at those layers (torch._dynamo.explain), or use compile=True"
                " (torch.compile).") from error

    # ----------------------------------------------------------------------------------------------------------------
    # Weights and checkpoints
    # ----------------------------------------------------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full, unsharded state dict with the LightningModule's own keys (on global rank 0; ``{}`` elsewhere
        at stage 3, where every rank must call this because gathering is collective)."""
        assert self.lightning_module is not None
        if self.stage < 3:
            return self.lightning_module.state_dict()
        return ckpt.gather_full_state_dict(self.lightning_module, rank_zero_only=True, is_rank_zero=self.is_global_zero)

    def _checkpoint_state_dict(self) -> dict[str, Any]:
        """The ``state_dict`` entry of a checkpoint Lightning dumps (``_compat.lightning.route_checkpoint_state_dict``):
        at stage 3 the weights go into the engines' shards and the entry is dropped from the checkpoint, so it is not
        gathered onto rank 0 at every save."""
        return {} if self.stage == 3 else self.lightning_module_state_dict()

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write a sharded checkpoint folder at ``filepath`` (collective: every rank writes its shards)."""
        if storage_options is not None:
            raise TypeError("ZeroStrategy writes sharded checkpoint folders itself; `storage_options` is not"
                            " supported. Remove it from `trainer.save_checkpoint(...)`.")
        if not len(self.engines):
            raise RuntimeError(
                f"trainer.save_checkpoint({str(filepath)!r}) found no DeepSpeed engine in this process. With"
                f" ZeroStrategy(start_method={self._start_method!r}) the engines live in the worker processes during"
                " `trainer.fit` only: save during fit (ModelCheckpoint, or `trainer.save_checkpoint` in a callback such"
                " as `on_train_end`), or launch with start_method='popen' (the default) or torchrun."
            )
        filepath = self.broadcast(str(filepath))
        if self.world_size > 1 and any(slot.engine is not None and slot.engine.zero_optimization_stage() == 3
                                        for slot in self.engines):
            _warning_cache.warn(
                f"When saving the DeepSpeed Stage 3 checkpoint, each worker will save a shard of the checkpoint within"
                f" a directory: {filepath!r} is a folder. For a single file run `lightning-zero consolidate"
                f" {filepath} model.ckpt` (or `consolidate_checkpoint`); resume and load from the folder as it is.")
        ckpt.save(self, checkpoint, filepath)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint folder into the engines (any number of processes, see checkpoint/), or a plain weights
        file (weights only: fine-tuning starts at step 0)."""
        checkpoint_path = self.broadcast(str(checkpoint_path))
        assert self.lightning_module is not None
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        checkpoint = ckpt.load(self, checkpoint_path, fitting=fitting, weights_only=weights_only)
        if self.engines.deepcompile and fitting:
            resume_deepcompile_schedule(self.engines.trained[0].engine.global_steps)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # The engines loaded the weights in load_checkpoint().
        pass

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What ``lightning.pt`` keeps of an optimizer: its hyperparameters (lr, betas, ... as schedulers set them).
        Its state (Adam's moments, partitioned) is in the engine's shards."""
        optimizer = unwrap_optimizer(optimizer)
        return {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]}

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint["optimizer_states"]
        if saved and len(saved) != len(self.optimizers):
            raise ValueError(f"The checkpoint holds {len(saved)} optimizer(s) but `configure_optimizers` returned"
                             f" {len(self.optimizers)}. Resume with the optimizers the checkpoint was written with.")
        for optimizer, state in zip(self.optimizers, saved):
            groups = state["param_groups"]
            if len(groups) != len(optimizer.param_groups):
                raise ValueError(f"The checkpoint's {type(optimizer).__name__} has {len(groups)} parameter group(s),"
                                 f" this one {len(optimizer.param_groups)}. Resume with the same parameter groups.")
            for group, saved_group in zip(optimizer.param_groups, groups):
                group.update({k: v for k, v in saved_group.items() if k != "params"})

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        # ModelCheckpoint calls this only after the checkpoint that replaces `filepath` is committed (checkpoint/).
        if self.is_global_zero:
            ckpt.remove(filepath)
        # every rank calls this (ModelCheckpoint runs everywhere): none returns, nor leaves fit, before it is gone
        self.barrier("remove_checkpoint")

    # ----------------------------------------------------------------------------------------------------------------
    # Teardown and registry
    # ----------------------------------------------------------------------------------------------------------------

    @override
    def teardown(self) -> None:
        assert self.accelerator is not None
        # The module stays on its device: the engines are kept for validate/test/predict on the same module (setup),
        # and at stages 0-2 DeepSpeed's parameters are views of its flat buffers. Lightning's `.cpu()` here made the
        # next `trainer.predict` on a GPU fail with CPU weights and CUDA inputs, and would have cut the parameters
        # off from the optimizer's buffers.
        self.model = self.lightning_module
        self.ds_config = None  # the next Trainer call resolves it again with its own flags
        self._hf.deactivate()  # transformers forgets ZeRO-3 (a later stage-2 run in this process must not see it)
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        register = strategy_registry.register
        register("zero", cls, description="DeepSpeed ZeRO (stage 2) with one engine per model")
        register("zero_stage_1", cls, description="DeepSpeed ZeRO stage 1", stage=1)
        register("zero_stage_2", cls, description="DeepSpeed ZeRO stage 2", stage=2)
        register("zero_stage_2_offload", cls, description="ZeRO stage 2, optimizer offloaded to CPU", stage=2,
                 offload_optimizer="cpu")
        register("zero_stage_3", cls, description="DeepSpeed ZeRO stage 3", stage=3)
        register("zero_stage_3_offload", cls, description="ZeRO stage 3, optimizer and parameters offloaded to CPU",
                 stage=3, offload_optimizer="cpu", offload_parameters="cpu")
        register("zero_stage_3_offload_nvme", cls, description="ZeRO stage 3, optimizer and parameters on NVMe"
                 " (set $LIGHTNING_ZERO_NVME_PATH)", stage=3, offload_optimizer="nvme", offload_parameters="nvme",
                 nvme_path=cfg.NVME_PATH_FROM_ENV)  # read when the strategy is built
