"""Contract tests: the transformers internals lightning_zero/_compat/transformers.py reaches into, against the installed
transformers (a tiny model built here). They fail, naming the symbol, when a release changes one."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # HfDeepSpeedConfig needs it

from lightning_zero._compat import transformers as compat  # noqa: E402


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32, max_position_embeddings=16)
    return LlamaForCausalLM(config)


def test_the_hf_deepspeed_config_transformers_sees():
    from transformers.integrations import HfDeepSpeedConfig, deepspeed as hf_ds

    assert compat.current_hf_deepspeed_config() is None
    config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert compat.current_hf_deepspeed_config() is config  # registered itself through the weak reference
        assert hf_ds.is_deepspeed_zero3_enabled()
    finally:
        hf_ds.unset_hf_deepspeed_config()
    assert compat.current_hf_deepspeed_config() is None


def test_post_init_goes_through_initialize_weights():
    from transformers.modeling_utils import PreTrainedModel

    assert callable(PreTrainedModel.__dict__.get("_initialize_weights")), "PreTrainedModel._initialize_weights"
    original, seen = PreTrainedModel.__dict__["_initialize_weights"], []

    def counting(initialize):
        def wrapped(self, module, *args, **kwargs):
            seen.append(type(module).__name__)
            return initialize(self, module, *args, **kwargs)

        return wrapped

    with compat.initialize_weights_through(PreTrainedModel, counting):
        _tiny_llama()
    assert PreTrainedModel.__dict__["_initialize_weights"] is original
    assert {"Embedding", "Linear", "LlamaRMSNorm"} <= set(seen), seen  # one call per module, from post_init

    class Renamed:
        pass

    with pytest.raises(RuntimeError, match=r"Renamed._initialize_weights.*_compat/transformers.py"):
        with compat.initialize_weights_through(Renamed, counting):
            pass


def test_custom_code_models_are_told_by_auto_class():
    from transformers import LlamaForCausalLM
    from transformers.modeling_utils import PreTrainedModel

    assert "_auto_class" in vars(PreTrainedModel), "PreTrainedModel._auto_class (what save_pretrained reads)"
    model = _tiny_llama()
    assert not compat.registered_for_auto_class(model)

    class Custom(LlamaForCausalLM):
        pass

    Custom.register_for_auto_class("AutoModelForCausalLM")
    assert compat.registered_for_auto_class(Custom(model.config))
