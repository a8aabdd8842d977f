"""What ZeroStrategy needs from the versions of torch, DeepSpeed, Lightning and transformers it runs with.

``versions``: the proven version ranges and the check run when a ZeroStrategy is built. ``lightning``, ``deepspeed``,
``transformers``: every private name, attribute or behaviour of those libraries that the package uses, each in one
function (or class alias) whose docstring says why and the versions it was verified on (Lightning 2.5.0 and 2.6.6,
DeepSpeed 0.19.8, transformers 5.17 and 5.24). A missing internal raises a ``RuntimeError`` naming the symbol, the
installed version and the fix when it is used (never at ``import lightning_zero``), or disables a cosmetic feature
with a warning (the model summary). Contract tests, against the installed versions: ``tests/unit/test_compat.py``
(versions, Lightning, and a walk over the package that fails on a private reach-in outside this folder),
``tests/unit/test_compat_deepspeed.py`` (real one-rank engines), ``tests/unit/test_compat_hf.py``.

Reach-ins that remain, and why each cannot go (issue 16's closing list):

Patches and overrides (each in this layer):

* ``torch.Tensor.backward``, swapped during a multi-engine backward (``deepspeed.backward_reaches_only``):
  ``DeepSpeedEngine.backward`` scales the loss into a new tensor and calls ``.backward()`` on it without ``inputs``
  (engine.py 0.19.8 l.3415-3428) and takes no ``inputs`` argument; calling autograd ourselves would skip its loss
  scaling and backward prologue/epilogue.
* Lightning's private launchers ``_SubprocessScriptLauncher`` / ``_MultiProcessingLauncher`` are subclassed and their
  ``_wrapping_function`` / ``_collect_rank_zero_results`` overridden (``lightning.check_overrides`` checks the
  signatures when a launcher is built); the results hook takes the weights from ``lightning_module.state_dict()``,
  replaced for that call (``state_dict_for_results``). Lightning has no public launcher API, and a stage-3 spawn run
  must hand the gathered weights back and exit without the gloo/DeepSpeed destructors.
* ``_checkpoint_connector._get_lightning_module_state_dict`` (``route_checkpoint_state_dict``): the only place the
  checkpoint's ``state_dict`` entry comes from; without it every stage-3 save gathers the model onto rank 0.
* The loops' ``inference_mode`` (``evaluate_under_no_grad``): Lightning reads ``Trainer(inference_mode=)`` only when
  the Trainer is built; stage 3 needs ``no_grad``.
* The ``ModelSummary`` callback's ``_summary``/``_max_depth`` (``route_model_summary``), and ``ZeroSummary``
  subclassing ``ModelSummary`` (it reads ``_model``, ``_max_depth``, ``_forward_example_input``,
  ``LayerSummary._module``): Lightning picks its DeepSpeed-aware summary only for its own DeepSpeedStrategy.
* ``LightningOptimizer.zero_grad`` wrapped per instance (``guard_zero_grad``): refuses to drop gradients DeepSpeed took.
* ``module.compile`` redirected for one call (``deepspeed.redirect_module_compile``): ``DeepSpeedEngine.compile`` calls
  ``self.module.compile``, and the LightningModule itself must not be compiled.
* The ZeRO-3 optimizer's ``_get_norm_groups``/``unscale_and_clip_grads`` wrapped per instance
  (``deepspeed.skip_unused_grad_norm``): its step computes and reads back the global norm and unscales by 1 even when
  nothing clips, and DeepSpeed's ``compute_grad_norm=false`` refuses stage 3 (12 ms of a 156 ms step on an H200).
* The ZeRO-3 optimizer's ``step`` wrapped per instance (``deepspeed.keep_whole_parameters_through_step``): with one
  process and every parameter whole its release and re-gather of every parameter only swap ``param.data`` out and in.
* The ZeRO-1/2 optimizer's ``process_gradients``, ``reduce_ready_partitions_and_remove_grads``,
  ``independent_gradient_partition_epilogue`` and ``finalize_gradient_accumulation_boundary`` replaced per instance
  (``deepspeed.write_gradients_into_partition``): with one process its reduce buckets only copy the gradients around.
* The ZenFlow stage-1/2 optimizer's ``_update_model_bit16_weights`` replaced per instance
  (``deepspeed.fix_zenflow_parameter_views``): DeepSpeed 0.19.8 views ZenFlow's transposed flat buffer untransposed,
  which scrambles every 2-D weight at ``deepspeed.initialize`` and after each step.
* ZenFlow's selective AdamW's ``clear_selected_mv`` wrapped per instance (``deepspeed.restart_zenflow_selective_steps``):
  DeepSpeed 0.19.8 zeroes the moments at each top-k re-selection but keeps the step count, so AdamW's bias
  correction scales the next updates wrongly for the rest of the run.
* ``PreTrainedModel._initialize_weights`` wrapped (``transformers.initialize_weights_through``): post_init's writes
  must land in the gathered ZeRO-3 parameters.

Reads and calls (no public equivalent in the verified versions):

* Lightning: the ``_AcceleratorConnector.__init__`` frame's ``precision`` (``trainer_precision_argument``: Lightning
  rewrites "16-mixed" to "bf16-mixed" on CPU and keeps only the rewritten value), ``fit_loop._data_source`` (the batch
  size at setup), ``_init_optimizers_and_lr_schedulers``/``_MockOptimizer``, ``_sync_ddp_if_available``,
  ``_get_default_process_group_backend_for_device``, ``_collect_rng_states``/``_set_rng_states``,
  ``_convert_precision_to_unified_args``, ``_tensor_has_shape``, ``_launch_process_observer``, ``_compiler_ctx``: kept
  so that ZeroStrategy behaves as Lightning's own strategies do. Strategy's own ``_lightning_module`` (overridden as a
  property, so a compiled module is refused before Lightning's DDP/FSDP-only message), ``_configure_launcher``,
  ``_launcher`` and ``_lightning_optimizers`` (what ``LightningModule.optimizers()`` returns) are the base class's, used
  as a subclass (``test_the_strategy_registry_and_strategy_internals_zero_strategy_uses``).
  Gone: ``_distributed_is_initialized``, ``_convert_fp_tensor``, ``_DtypeContextManager`` (own copies, tested against
  Lightning's), ``LightningOptimizer._optimizer`` (its public ``optimizer``), ``group`` (torch's).
* DeepSpeed: ``engine._config.gradient_clipping`` and the wrappers' ``clip_grad``/``compute_grad_norm`` (read at step
  time; no setter), ``_config.load_universal_checkpoint`` (read at load time), ``clear_backward_seen_flag`` (what
  ``engine.forward`` does; several engines' submodules are called directly), the ZeRO-3 counters
  ``applied_pre_backward_ref_cnt``/``ds_grads_remaining`` (one backward per engine over one graph),
  ``_leaf_module_hooks`` (gated per engine), the engine's forward-hook handles (``destroy()`` leaves them),
  ``ds_z3_leaf_module`` tags, ``comm.cdb`` (no public teardown), DeepCompile's ``remaining_schedule`` (no resume
  support), ``ds_to_universal.main(Namespace)`` (a script only), ``real_accelerator.ds_accelerator``/``_name``; the
  ZeRO-3 parameter attributes ``ds_id``/``ds_numel``/``ds_tensor``/``ds_status``/``ds_shape`` are DeepSpeed's documented
  ZeRO-3 surface, contract-tested. The universal checkpoint's file layout, which ``checkpoint._serve_every_stage``
  completes (DeepSpeed 0.19 converts for the saving stage only), stays in checkpoint/universal.py, proven by the
  resume tests.
* transformers: ``integrations.deepspeed._hf_deepspeed_config_weak_ref`` (no getter for the object; restored after a
  stage-3 run), ``PreTrainedModel._auto_class`` (custom code to copy on export).

Out of the issue's scope: torch's own privates (``Module._save_to_state_dict``/``_load_from_state_dict``/``_modules``,
``torch._C._current_graph_task_id``, ``torch.utils._pytree``, ``Optimizer._opt_called``, ``_compiled_call_impl``) and
torchmetrics' ``Metric._defaults``/``_dtype``. Also relied on, through public API: ``deepspeed.zero.Init`` on CPU
turning a model dtype into bfloat16 (``Init._set_dtype``; ``offload.partition_for_nvme`` avoids it) and DeepSpeed 0.19.8
releasing a fetch unit's parameters from a hook on its inputs that require grad (``tuning.track_unit_inputs``); both
proven by the distributed tests.
"""

from lightning_zero._compat.versions import SUPPORTED, check_versions

__all__ = ["SUPPORTED", "check_versions"]
