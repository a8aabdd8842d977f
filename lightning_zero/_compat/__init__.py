"""What ZeroStrategy needs from the versions of torch, DeepSpeed and Lightning it runs with.

``versions``: the proven version ranges and the check run when a ZeroStrategy is built. ``deepspeed``: features that
differ between the proven DeepSpeed releases, detected from DeepSpeed itself rather than from version numbers.
``tests/unit/test_compat.py`` exercises each entry against the installed versions.
"""

from lightning_zero._compat.versions import SUPPORTED, check_versions

__all__ = ["SUPPORTED", "check_versions"]
