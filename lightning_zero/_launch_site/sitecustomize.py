"""Run at start-up by every Python process that ``lightning-zero launch`` starts (its folder is put first on
``PYTHONPATH``): rank 0, which the launcher becomes, and every rank Lightning's popen launcher, torchrun or SLURM
starts by re-running the script. It imports nothing heavy: it waits for ``lightning.pytorch``'s Trainer module to be
imported by the script, then wraps ``Trainer.__init__`` so that the Trainer gets ZeroStrategy
(``lightning_zero.launch.apply_launch``). Any other ``sitecustomize`` on the path still runs, after this one.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys

_SETTINGS_VAR = "LIGHTNING_ZERO_LAUNCH"
_TRAINER_MODULES = ("lightning.pytorch.trainer.trainer", "pytorch_lightning.trainer.trainer")
_HERE = os.path.dirname(os.path.abspath(__file__))
_built: list[str] = []  # Trainer classes built in this process (for the "no Trainer" warning)


def _wrap_trainer(module: object) -> None:
    trainer_cls = module.Trainer  # type: ignore[attr-defined]
    if getattr(trainer_cls.__init__, "_lightning_zero_launch", False):
        return
    original = trainer_cls.__init__

    @functools.wraps(original)  # keeps the signature LightningCLI/jsonargparse read (inspect follows __wrapped__)
    def __init__(self, *args, **kwargs):  # noqa: N807
        from lightning_zero.launch import apply_launch  # the first Trainer imports lightning_zero, not start-up

        _built.append(type(self).__name__)
        kwargs = apply_launch(module.__name__, kwargs)  # type: ignore[attr-defined]
        original(self, *args, **kwargs)

    __init__._lightning_zero_launch = True  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__


class _Loader:
    """Delegates to the real loader, then wraps the Trainer once its module has run."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)  # type: ignore[attr-defined]

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        _wrap_trainer(module)


class _TrainerFinder:
    """A meta-path finder that only answers for the Trainer modules, with the spec the other finders give."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in _TRAINER_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def _warn_if_no_trainer() -> None:
    if not _built:
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "the script"
        print(f"lightning-zero launch: {script} built no lightning.pytorch Trainer, so nothing ran with ZeroStrategy.",
              file=sys.stderr)


def _run_next_sitecustomize() -> None:
    """The ``sitecustomize`` this file shadows (a distribution's or the user's), if any."""
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get(_SETTINGS_VAR):
    sys.meta_path.insert(0, _TrainerFinder())
    if str(os.getpid()) == os.environ.get(_SETTINGS_VAR + "_PID"):  # the launched script itself (rank 0)
        import atexit

        atexit.register(_warn_if_no_trainer)
_run_next_sitecustomize()
