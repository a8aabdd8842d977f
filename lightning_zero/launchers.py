"""ZeroStrategy's launchers: Lightning's script and spawn launchers, with the config precheck before any process
starts; the spawn launcher hands the full weights back to the main process and exits its workers early."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_zero._compat.lightning import (MultiProcessingLauncher, SubprocessScriptLauncher, check_overrides,
                                              start_children, state_dict_for_results)

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_zero.strategy import ZeroStrategy

__all__ = ["_Launcher", "_ScriptLauncher"]  # private to the package: ZeroStrategy picks one in _configure_launcher


class _Precheck:
    """Resolves the config against the Trainer's flags in the main process, before any process is started, so a
    conflict is one error here rather than one traceback per rank."""

    _strategy: ZeroStrategy

    def launch(self, function: Any, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            self._strategy.precheck(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]


class _ScriptLauncher(_Precheck, SubprocessScriptLauncher):
    def __init__(self, strategy: ZeroStrategy, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    def start_processes(self) -> None:
        """Start the other ranks now (for ``trainer.init_module()`` at stage 3); ``launch`` then finds them started:
        starting sets ``LOCAL_RANK``, after which the cluster environment reports the processes as created."""
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        start_children(self)


class _Launcher(_Precheck, MultiProcessingLauncher):
    """Spawn launcher that hands the *full* (gathered) weights back to the main process, at every stage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_overrides(MultiProcessingLauncher)  # the two private methods below must still be Lightning's hooks
        super().__init__(*args, **kwargs)

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        # The worker's results are in the queue. Exit now: letting the interpreter finalise runs the C++ destructors
        # of gloo/DeepSpeed threads, which abort the worker ("terminate called without an active exception") and
        # turn a finished run into a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    @override
    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> Any:
        strategy = self._strategy
        lightning_module = trainer.lightning_module
        full = strategy.lightning_module_state_dict()  # collective at stage 3: every rank takes part
        with state_dict_for_results(lightning_module, full):
            return super()._collect_rank_zero_results(trainer, results)
