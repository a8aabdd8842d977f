"""What ZeroStrategy needs from the versions of torch, DeepSpeed and Lightning it runs with.

``versions``: the proven version ranges and the check run when a ZeroStrategy is built. ``lightning``: the Lightning
internals ZeroStrategy relies on, each failing loudly when Lightning changes it. ``tests/unit/test_compat.py`` and
``tests/unit/test_compat_deepspeed.py`` exercise them (and the DeepSpeed internals) against the installed versions.
"""

from lightning_zero._compat.versions import SUPPORTED, check_versions

__all__ = ["SUPPORTED", "check_versions"]
