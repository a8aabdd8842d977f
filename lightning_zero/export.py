"""Hugging Face exports of a ZeroStrategy checkpoint: a full ``transformers`` model folder, or a PEFT adapter folder.

    lightning-zero consolidate ckpts/last.ckpt out/ --format hf      # config.json + safetensors: from_pretrained(out)
    lightning-zero consolidate ckpts/last.ckpt adapter/ --format peft  # PeftModel.from_pretrained(base, "adapter/")

What the export needs besides the weights is taken from the live model when the checkpoint is saved (rank 0, a few
kB): for every outermost ``transformers.PreTrainedModel`` or ``peft.PeftModel`` inside the LightningModule,

    <checkpoint>/hf/models.json             attribute path -> kind, class, tied keys, adapters and their weight names
    <checkpoint>/hf/<i>/config.json ...     the model's config (``config.save_pretrained``), generation_config.json
    <checkpoint>/hf/<i>/adapters/<name>/    each adapter's adapter_config.json, as ``PeftModel.save_pretrained``
                                            writes it (``inference_mode=True``, ``base_model_name_or_path`` filled in)

The adapter's weight names are PEFT's own (``get_peft_model_state_dict``), so the export holds exactly what
``PeftModel.save_pretrained`` would write. Nothing is recorded (and nothing of transformers/peft imported) when the
LightningModule holds no such model.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

__all__ = ["RECORDS", "hf_keys", "pick", "read_records", "record_models", "write_adapter", "write_config"]

RECORDS = "hf"  # the checkpoint's subfolder
INDEX = "models.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------------------------------------------------
# Save time: what the export needs from the live model
# ----------------------------------------------------------------------------------------------------------------------


def record_models(root: nn.Module, folder: Path) -> None:
    """Rank 0, while a checkpoint is written: store what a ``--format hf/peft`` export needs (see the module doc).

    A model that cannot be recorded does not fail the save: a warning says which export will not be available.
    """
    found = _hf_models(root)
    if not found:
        return
    index: dict[str, Any] = {}
    for i, (prefix, model) in enumerate(found):
        where = folder / RECORDS / str(i)
        try:
            index[prefix] = _record(model, where, prefix)
            index[prefix]["dir"] = str(i)
        except Exception as err:  # noqa: BLE001 - a library's save_pretrained can fail in many ways
            shutil.rmtree(where, ignore_errors=True)
            rank_zero_warn(f"ZeroStrategy could not record the Hugging Face model at {prefix!r} in the checkpoint"
                           f" ({type(err).__name__}: {err}); `lightning-zero consolidate --format hf/peft` will not"
                           " be available for it. The weights are saved as usual (--format safetensors works).")
    if index:
        (folder / RECORDS).mkdir(parents=True, exist_ok=True)
        (folder / RECORDS / INDEX).write_text(json.dumps(index, indent=1))


def _hf_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(attribute path, model) of every outermost PeftModel or PreTrainedModel, without importing either library."""
    candidates = (_class("peft.peft_model", "PeftModel"), _class("transformers.modeling_utils", "PreTrainedModel"))
    classes = tuple(cls for cls in candidates if cls is not None)
    if not classes:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if isinstance(module, classes) and not any(name.startswith(f"{p}.") for p, _ in found):
            found.append((name, module))
    return found


def _class(module_name: str, name: str) -> type | None:
    # the defining module, only if loaded already: a model of that class exists only then. (transformers' package
    # is lazy: asking it for PreTrainedModel would import its modeling code.)
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def _record(model: nn.Module, where: Path, prefix: str) -> dict[str, Any]:
    peft_model = _class("peft.peft_model", "PeftModel")
    if peft_model is not None and isinstance(model, peft_model):
        return _record_peft(model, where, prefix)
    _save_config(model, where)
    return {"kind": "transformers", "class": type(model).__name__, "tied": _tied_copies(model)}


def _save_config(model: nn.Module, where: Path) -> None:
    """The files ``save_pretrained`` writes besides the weights: config.json (with ``architectures``, on a copy),
    generation_config.json, and the modeling code of a custom (``trust_remote_code``) model."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).split(".")[1]  # the training dtype; an export writes the one it exports
    from lightning_zero._compat.transformers import registered_for_auto_class

    if registered_for_auto_class(model):
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, str(where), config=config)
    config.save_pretrained(str(where))
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(where))


def _tied_copies(model: nn.Module) -> dict[str, str]:
    """Tied copy -> the key kept, as ``save_pretrained`` leaves them out: in each group of keys naming one Parameter,
    transformers' tie targets (``all_tied_weights_keys``, e.g. ``lm_head.weight``) go, the source stays."""
    targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    groups: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(key)
    copies = {}
    for group in groups.values():
        if len(group) > 1:
            keep = next((k for k in group if k not in targets), group[0])
            copies.update({k: keep for k in group if k != keep})
    return copies


def _record_peft(model: nn.Module, where: Path, prefix: str) -> dict[str, Any]:
    from peft.utils import get_peft_model_state_dict

    state = model.state_dict(keep_vars=True)  # the Parameter objects: PEFT's selection keeps them, so we map back
    name_of: dict[int, str] = {}
    for key, value in state.items():
        name_of.setdefault(id(value), key)
    adapters = {}
    for name, config in model.peft_config.items():
        selected = get_peft_model_state_dict(model, state_dict=state, adapter_name=name)
        unknown = [k for k, v in selected.items() if id(v) not in name_of]
        if unknown:
            raise ValueError(f"PEFT computed the adapter weight(s) {unknown[:3]} of adapter {name!r} instead of"
                             f" selecting them; a {config.peft_type} adapter cannot be exported from the shards")
        sub = f"adapters/{name}"
        _save_adapter_config(model, config, where / sub)
        adapters[name] = {"dir": sub, "keys": {k: _join(prefix, name_of[id(v)]) for k, v in selected.items()}}
    base = model.get_base_model()
    record: dict[str, Any] = {"kind": "peft", "class": type(model).__name__, "base_class": type(base).__name__,
                              "adapters": adapters}
    return record


def _save_adapter_config(model: nn.Module, config: Any, where: Path) -> None:
    """The adapter_config.json ``PeftModel.save_pretrained`` writes (on a copy: the live config is not changed)."""
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        base = model.base_model if config.is_prompt_learning else model.base_model.model
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        base_class = type(model.get_base_model())
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    config.save_pretrained(str(where), auto_mapping_dict=auto_mapping)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ----------------------------------------------------------------------------------------------------------------------
# Export time
# ----------------------------------------------------------------------------------------------------------------------


def read_records(root: Path, path: str) -> dict[str, Any]:
    index = root / RECORDS / INDEX
    if not index.is_file():
        raise ValueError(
            f"{path!r} holds no Hugging Face model record: its LightningModule held no transformers PreTrainedModel"
            " or peft PeftModel when it was saved (or an older lightning_zero saved it). Export the weights with"
            " --format safetensors or ckpt, or save the checkpoint again with this version.")
    return json.loads(index.read_text())


def pick(records: Mapping[str, Any], model: str | None, kind: str, path: str) -> tuple[str, dict[str, Any]]:
    """The record to export: ``model`` (an attribute path of the LightningModule), else the only one of ``kind``."""
    described = ", ".join(f"{p!r} ({r['class']})" for p, r in records.items())
    if model is not None:
        if model not in records:
            raise ValueError(f"model={model!r} is not a Hugging Face model of {path!r}; it holds {described}. Pass one"
                             " of those attribute paths (--model).")
        chosen = records[model]
        if chosen["kind"] != kind:
            raise ValueError(_wrong_kind(model, chosen, kind))
        return model, chosen
    matching = [p for p, r in records.items() if r["kind"] == kind]
    if len(matching) == 1:
        return matching[0], records[matching[0]]
    if matching:
        raise ValueError(f"{path!r} holds several {_KINDS[kind]}: {described}. Pick one with model=... (--model"
                         f" {matching[0]}).")
    only = next(iter(records))
    raise ValueError(_wrong_kind(only, records[only], kind) if len(records) == 1 else
                     f"{path!r} holds no {_KINDS[kind][:-1]}; it holds {described}.")


_KINDS = {"transformers": "transformers models", "peft": "PEFT models"}


def _wrong_kind(prefix: str, record: Mapping[str, Any], kind: str) -> str:
    if kind == "transformers":
        return (f"The model at {prefix!r} is a PEFT model ({record['class']}): export its adapter with format='peft'"
                " (--format peft) and load it with PeftModel.from_pretrained(base, folder). For one merged model,"
                " load the adapter, call merge_and_unload() and save_pretrained() the result.")
    return (f"The model at {prefix!r} is a transformers {record['class']} without a PEFT adapter: export it with"
            " format='hf' (--format hf).")


def hf_keys(prefix: str, record: Mapping[str, Any], keys: Mapping[str, Any]) -> dict[str, str]:
    """Hugging Face key -> LightningModule key of the model at ``prefix``, tied copies left out like save_pretrained."""
    head = f"{prefix}."
    tied = record["tied"]
    return {k[len(head):]: k for k in keys if k.startswith(head) and k[len(head):] not in tied}


def write_config(root: Path, record: Mapping[str, Any], out: Path, dtype: torch.dtype) -> list[Path]:
    """The recorded config.json, with ``dtype`` set to the exported one, and the other recorded files
    (generation_config.json, a custom model's code) into ``out``."""
    source = root / RECORDS / record["dir"]
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", 4.x "torch_dtype"
        if key in config or key == "dtype":
            config[key] = _DTYPE_NAMES[dtype]
    written = [out / "config.json"]
    written[0].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name != "config.json":
            shutil.copy(file, out / file.name)
            written.append(out / file.name)
    return written


def write_adapter(root: Path, adapter: Mapping[str, Any], record: Mapping[str, Any], out: Path,
                  tensors: Iterator[tuple[str, torch.Tensor]]) -> list[Path]:
    """One adapter folder: its adapter_config.json and adapter_model.safetensors (PEFT's names, ``format: pt``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors:  # safetensors refuses shared memory: a second key of one tensor gets a copy
        state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copy(root / RECORDS / record["dir"] / adapter["dir"] / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    return [out / ADAPTER_CONFIG, out / ADAPTER_WEIGHTS]
