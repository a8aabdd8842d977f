"""transformers internals ZeroStrategy relies on (imported only when transformers is installed and used), each with
the reason and a contract test (``tests/unit/test_compat_hf.py``). Verified on transformers 5.17 and 5.24."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["current_hf_deepspeed_config", "initialize_weights_through", "registered_for_auto_class"]


def _missing(symbol: str, used_for: str) -> RuntimeError:
    import transformers

    return RuntimeError(f"transformers {transformers.__version__} has no `{symbol}`, which lightning_zero uses"
                        f" {used_for} (see lightning_zero/_compat/transformers.py). Install a transformers release"
                        " lightning_zero was verified on (5.17 to 5.24, e.g. `pip install 'transformers==5.24.0'`).")


def current_hf_deepspeed_config() -> Any | None:
    """The ``HfDeepSpeedConfig`` transformers sees now (a user's own, or None).

    Why: transformers keeps only a weak reference to it (``integrations.deepspeed._hf_deepspeed_config_weak_ref``) and
    has no getter for the object; ZeroStrategy restores it when its own stage-3 link ends. Verified: transformers 5.17,
    5.24."""
    from transformers.integrations import deepspeed as hf_ds

    if "_hf_deepspeed_config_weak_ref" not in vars(hf_ds):
        raise _missing("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref",
                       "to restore your HfDeepSpeedConfig after a stage-3 run")
    ref = hf_ds._hf_deepspeed_config_weak_ref
    return ref() if ref is not None else None


@contextmanager
def initialize_weights_through(pretrained_cls: type, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
                               ) -> Iterator[None]:
    """Inside, ``pretrained_cls._initialize_weights`` is ``wrap(original)``.

    Why: ``post_init`` initialises each module through ``PreTrainedModel._initialize_weights(module)``; under
    ZeroStrategy's zero.Init the module's parameters must be gathered around it (one gather per module, as
    transformers' own ``initialize_weights_zero3`` does). Verified: transformers 5.17, 5.24."""
    original = pretrained_cls.__dict__.get("_initialize_weights")
    if not callable(original):
        raise _missing(f"{pretrained_cls.__name__}._initialize_weights",
                       "to initialise Hugging Face models inside ZeRO-3's zero.Init")
    pretrained_cls._initialize_weights = wrap(original)
    try:
        yield
    finally:
        pretrained_cls._initialize_weights = original


def registered_for_auto_class(model: Any) -> bool:
    """Whether ``model``'s class is custom (``trust_remote_code``) code registered for an auto class, whose modeling
    files an export must copy. Why: ``save_pretrained`` decides it from ``PreTrainedModel._auto_class``.
    Verified: transformers 5.17, 5.24."""
    return getattr(model, "_auto_class", None) is not None
