"""DeepSpeed features that differ between the proven releases (``versions.SUPPORTED``), detected from DeepSpeed.

Each function names the release that added the feature and what ZeroStrategy does without it.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["zero_config_accepts"]


@lru_cache(maxsize=None)
def zero_config_accepts(key: str) -> bool:
    """Whether DeepSpeed's ``zero_optimization`` schema has ``key``.

    Used for ``compute_grad_norm`` (added in DeepSpeed 0.19.7): a speed default (``tuning.apply_speed_defaults``)
    that older releases would reject as an unknown key; without it DeepSpeed computes the gradient norm every step,
    which costs time, not correctness.
    """
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = getattr(DeepSpeedZeroConfig, "model_fields", None)
    if fields is None:  # pragma: no cover - pydantic v1 schemas, not in the proven range
        raise RuntimeError("DeepSpeedZeroConfig has no pydantic v2 `model_fields`; this DeepSpeed is outside the"
                           " range lightning_zero supports (see lightning_zero/_compat/versions.py).")
    aliases = {f.alias for f in fields.values() if getattr(f, "alias", None)}
    return key in fields or key in aliases
