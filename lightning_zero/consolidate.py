"""Export a sharded ZeroStrategy checkpoint as one Lightning ``.ckpt`` or as safetensors weights.

    from lightning_zero import consolidate_checkpoint
    consolidate_checkpoint("ckpts/last.ckpt", "model.ckpt")                       # LightningModule.load_from_checkpoint
    consolidate_checkpoint("ckpts/last.ckpt", "export/", format="safetensors", dtype="bf16", max_shard_size="2GB")

or ``lightning-zero consolidate ckpts/last.ckpt model.ckpt [--format safetensors] [--dtype bf16]``.

Each engine's full fp32 weights are rebuilt from its shards by DeepSpeed's ``zero_to_fp32`` (its lazy mode at stage 3:
one tensor materialised at a time), renamed to the LightningModule's keys, and written. Neither output needs DeepSpeed
to load. The safetensors export holds one shard in memory at a time; the ``.ckpt`` holds the whole state dict (one
``torch.save``). Reading the checkpoint unpickles DeepSpeed's shards: consolidate only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_zero import checkpoint as ckpt

__all__ = ["add_parser", "consolidate_checkpoint", "consolidated_state_dict"]

log = logging.getLogger(__name__)

Format = Literal["ckpt", "safetensors", "hf", "peft"]
_FORMATS = ("ckpt", "safetensors", "hf", "peft")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}
# What a consolidated .ckpt keeps of Lightning's state besides the weights (load_from_checkpoint needs these).
_LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "hparams_name",
                   "hparams_type", "datamodule_hyper_parameters", "datamodule_hparams_name", "datamodule_hparams_type")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def consolidate_checkpoint(checkpoint_dir: str | Path, out: str | Path, *, format: Format | None = None,
                           dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB",
                           allow_missing: bool = False, progress: bool = True, model: str | None = None
                           ) -> list[Path]:
    """Turn a sharded checkpoint folder into a Lightning ``.ckpt`` file, safetensors weights, a Hugging Face model
    folder or a PEFT adapter folder.

    Args:
        checkpoint_dir: a checkpoint folder written by ``trainer.save_checkpoint`` / ``ModelCheckpoint``.
        out: the ``.ckpt`` file to write, or the folder for the safetensors files.
        format: ``"ckpt"`` (loads with ``LightningModule.load_from_checkpoint``) or ``"safetensors"`` (one
            ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``
            like Hugging Face's). Default: ``"ckpt"`` when ``out`` ends in ``.ckpt``/``.pt``/``.pth``, else safetensors.
            ``"hf"``: the LightningModule's ``transformers`` model as ``save_pretrained`` writes it (config.json,
            generation_config.json, safetensors shards with its own key names, tied copies left out), for
            ``AutoModelForCausalLM.from_pretrained(out)``. ``"peft"``: its PEFT adapter(s) as
            ``PeftModel.save_pretrained`` writes them (adapter_config.json, adapter_model.safetensors; adapters other
            than ``"default"`` in subfolders), for ``PeftModel.from_pretrained(base, out)``; frozen weights left out
            of the checkpoint are not needed. Both use what the checkpoint recorded of the model when it was saved.
        dtype: floating-point dtype of the output: ``None``/``"fp32"`` (DeepSpeed's fp32 master weights), ``"bf16"``,
            ``"fp16"``. Integer buffers keep their dtype.
        max_shard_size: safetensors and hf: the largest shard, in bytes or as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (a
            PEFT adapter is one file, as PEFT writes it).
        allow_missing: write what the checkpoint holds even when weights the model needs are absent (frozen
            parameters left out with ``exclude_frozen_parameters=True``, e.g. the base of a LoRA model).
        progress: show a progress bar (tqdm, on stderr).
        model: ``"hf"``/``"peft"`` only: the attribute path of the model in the LightningModule (e.g. ``"model"``),
            needed only when it holds several.

    Returns the files written. Raises ``ValueError`` for a bad argument, a path that is not a checkpoint folder, or
    missing weights.
    """
    target = Path(out)
    fmt = _resolve_format(format, target)
    out_dtype = _resolve_dtype(dtype)
    shard_bytes = _parse_size(max_shard_size)
    _check_output(fmt, target)
    if model is not None and fmt not in ("hf", "peft"):
        raise ValueError(f"model={model!r} picks the model of a format='hf' or 'peft' export; format={fmt!r} exports"
                         " the whole LightningModule. Leave model out, or pass format='hf'/'peft'.")
    meta = _read_checkpoint(checkpoint_dir)
    if fmt in ("hf", "peft"):
        return _export_hf(Path(checkpoint_dir), target, meta, fmt, model, out_dtype, shard_bytes, progress)
    keys = _expected_keys(meta, Path(checkpoint_dir), allow_missing)
    tensors = _iter_tensors(Path(checkpoint_dir), meta, keys, out_dtype, progress)
    if fmt == "ckpt":
        return [_write_ckpt(Path(checkpoint_dir), target, dict(tensors))]
    return _write_safetensors(target, tensors, _plan_shards(keys, out_dtype, shard_bytes))


def consolidated_state_dict(checkpoint_dir: str | Path, dtype: str | torch.dtype | None = None,
                            allow_missing: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded checkpoint, with the LightningModule's keys (tied weights share a tensor)."""
    meta = _read_checkpoint(checkpoint_dir)
    keys = _expected_keys(meta, Path(checkpoint_dir), allow_missing)
    return dict(_iter_tensors(Path(checkpoint_dir), meta, keys, _resolve_dtype(dtype), progress))


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_format(format: str | None, out: Path) -> Format:
    if format is None:
        return "ckpt" if out.suffix in (".ckpt", ".pt", ".pth") else "safetensors"
    if format not in _FORMATS:
        raise ValueError(f"format={format!r} is not supported. Use 'ckpt', 'safetensors', 'hf' (a transformers model"
                         " folder) or 'peft' (a PEFT adapter folder).")
    if format == "safetensors" and out.suffix == ".safetensors":
        raise ValueError(f"format='safetensors' writes a folder (one or more .safetensors files and an index); got"
                         f" the file name {str(out)!r}. Pass a folder, e.g. {str(out.with_suffix(''))!r}.")
    return format  # type: ignore[return-value]


def _check_output(fmt: str, out: Path) -> None:
    """The output path can take the format: a .ckpt is one file, safetensors go into a folder."""
    if fmt == "ckpt" and out.is_dir():
        raise ValueError(f"{str(out)!r} is an existing folder, but format='ckpt' writes one file. Pass a file path,"
                         f" e.g. {str(out / 'model.ckpt')!r}, or format='safetensors' (--format safetensors) to write"
                         " into the folder.")
    if fmt != "ckpt" and out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is an existing file, but format={fmt!r} writes a folder. Pass the path of a"
                         " new or existing folder, or remove the file.")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r} is not supported. Use one of {sorted(set(_DTYPES) - {'half'})} (or None for"
                     " fp32).")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if match and match.group(2).upper() in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    raise ValueError(f"max_shard_size={size!r} is not a size. Use a number of bytes or e.g. '5GB', '500MB', '2GiB'.")


def _read_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    meta = ckpt.validate_path(str(checkpoint_dir))
    if not meta:
        raise ValueError(f"{str(checkpoint_dir)!r} is already a single weights file (or a folder of safetensors), not"
                         " a sharded ZeroStrategy checkpoint folder: there is nothing to consolidate.")
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# Reading: engine shards -> LightningModule keys
# ----------------------------------------------------------------------------------------------------------------------


def _expected_keys(meta: Mapping[str, Any], root: Path, allow_missing: bool) -> dict[str, list[Any]]:
    """LightningModule key -> [shape, dtype] of every weight the checkpoint holds; missing ones are an error."""
    available: dict[str, list[Any]] = {}
    missing: list[str] = []
    for info in meta["engines"].values():
        excluded = set(info["excluded"])
        for key, spec in info["keys"].items():
            if key in excluded:
                missing.append(key)
            else:
                available[key] = spec
    if missing and not allow_missing:
        raise ValueError(
            f"{str(root)!r} does not hold {len(missing)} weight(s) the model needs: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}. They are frozen parameters the checkpoint left out"
            " (ZeroStrategy(exclude_frozen_parameters=True)); the model rebuilds them from its own code. Pass"
            " allow_missing=True (--allow-missing) to export the weights it holds, e.g. a LoRA adapter."
        )
    return available


def _iter_tensors(root: Path, meta: Mapping[str, Any], keys: Mapping[str, Any], dtype: torch.dtype,
                  progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(LightningModule key, tensor) in the order of ``keys``; tied keys yield the same tensor object."""
    from tqdm.auto import tqdm

    with tqdm(total=len(keys), desc="Consolidating", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        for name, info in meta["engines"].items():
            wanted = [k for k in info["keys"] if k in keys]
            if not wanted:
                continue
            # zero_to_fp32 maps the engine's shards (memory-mapped; lazy tensors at stage 3)
            state = {ckpt.model_key(k, info["modules"]): v for k, v in ckpt.engine_weights(root / name, info).items()}
            absent = [k for k in wanted if k not in state]
            if absent:
                raise ValueError(f"Engine {name!r} of {str(root)!r} lacks {len(absent)} weight(s) its metadata lists:"
                                 f" {', '.join(absent[:6])}. The checkpoint is damaged; use another one.")
            # Tied parameters share one value object: materialize it once and keep it until its last key. Nothing else
            # is kept, so memory grows one tensor at a time (stage 3's lazy tensors).
            remaining = Counter(id(state[k]) for k in wanted)
            tied: dict[int, torch.Tensor] = {}
            for key in wanted:
                value = state[key]
                tensor = tied.get(id(value))
                if tensor is None:
                    tensor = value.contiguous()
                    tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
                remaining[id(value)] -= 1
                if remaining[id(value)]:
                    tied[id(value)] = tensor
                else:
                    tied.pop(id(value), None)
                yield key, tensor
                bar.update(1)
            del state


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def _write_ckpt(root: Path, out: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    # Lightning's hyperparameters and version, so `load_from_checkpoint` rebuilds the module. lightning.pt is a pickle
    # the checkpoint's author wrote, read with weights_only=False like the DeepSpeed shards above.
    lightning_state = torch.load(root / ckpt.LIGHTNING_STATE, map_location="cpu", weights_only=False)
    out_state = {k: lightning_state[k] for k in _LIGHTNING_KEYS if k in lightning_state}
    out_state["state_dict"] = state_dict
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ckpt.PARTIAL_SUFFIX)
    try:
        torch.save(out_state, partial)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written file left behind
        raise
    return out


def _plan_shards(keys: Mapping[str, list[Any]], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Greedy split in the model's order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, (shape, stored) in keys.items():
        stored_dtype = getattr(torch, stored)
        itemsize = (dtype if stored_dtype.is_floating_point else stored_dtype).itemsize
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_safetensors(folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], plan: list[list[str]]
                       ) -> list[Path]:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("format='safetensors' needs the safetensors package: `pip install safetensors`.") from None
    folder.mkdir(parents=True, exist_ok=True)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    shard_of = {key: i for i, keys in enumerate(plan) for key in keys}
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    total = 0
    index = 0

    def flush() -> None:
        # safetensors refuses tensors that share memory: a tied weight is stored once per key (a copy).
        seen: set[int] = set()
        shard = {}
        for k, t in current.items():
            shard[k] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        path = folder / names[index]
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append(path)
        current.clear()

    for key, tensor in tensors:
        if shard_of[key] != index:
            flush()
            index = shard_of[key]
        current[key] = tensor
        weight_map[key] = names[index]
        total += tensor.numel() * tensor.element_size()
    flush()
    if len(plan) > 1:
        index_file = folder / SAFETENSORS_INDEX
        index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        written.append(index_file)
    return written


def _export_hf(root: Path, out: Path, meta: Mapping[str, Any], fmt: str, model: str | None, dtype: torch.dtype,
               shard_bytes: int, progress: bool) -> list[Path]:
    """format='hf': the transformers model's folder; format='peft': each adapter's folder (lightning_zero.export)."""
    from lightning_zero import export

    prefix, record = export.pick(export.read_records(root, str(root)), model,
                                 "transformers" if fmt == "hf" else "peft", str(root))
    keys = _expected_keys(meta, root, allow_missing=True)
    if fmt == "hf":
        names = export.hf_keys(prefix, record, {**keys, **_excluded_keys(meta)})
        _require(keys, names.values(), root, f"the {record['class']} at {prefix!r}")
        written = export.write_config(root, record, out, dtype)
        renamed = {key: name for name, key in names.items()}
        # the same order as _iter_tensors yields them (the checkpoint's), so each shard is written once
        plan = _plan_shards({name: keys[key] for name, key in names.items()}, dtype, shard_bytes)
        tensors = _iter_tensors(root, meta, {key: keys[key] for key in names.values()}, dtype, progress)
        return written + _write_safetensors(out, ((renamed[key], tensor) for key, tensor in tensors), plan)
    written = []
    for name, adapter in record["adapters"].items():
        names = adapter["keys"]  # PEFT's key -> LightningModule key
        _require(keys, names.values(), root, f"adapter {name!r} of {prefix!r}")
        renamed = {key: file_key for file_key, key in names.items()}
        tensors = _iter_tensors(root, meta, {key: keys[key] for key in names.values()}, dtype, progress)
        folder = out if name == "default" else out / name
        written += export.write_adapter(root, adapter, record, folder,
                                        ((renamed[key], tensor) for key, tensor in tensors))
    return written


def _excluded_keys(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: info["keys"][k] for info in meta["engines"].values() for k in info["excluded"]}


def _require(keys: Mapping[str, Any], needed: Any, root: Path, what: str) -> None:
    absent = [k for k in needed if k not in keys]
    if absent:
        raise ValueError(
            f"{str(root)!r} does not hold {len(absent)} weight(s) of {what}: {', '.join(absent[:6])}"
            f"{' ...' if len(absent) > 6 else ''}. They are frozen parameters the checkpoint left out"
            " (ZeroStrategy(exclude_frozen_parameters=True)). Export the trained adapter with format='peft', or save"
            " checkpoints with exclude_frozen_parameters=False to export the whole model.")


# ----------------------------------------------------------------------------------------------------------------------
# Console command: lightning-zero consolidate CKPT_DIR OUT
# ----------------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "consolidate", help="turn a sharded checkpoint folder into one .ckpt or safetensors weights",
        description="Rebuild the full weights of a sharded ZeroStrategy checkpoint folder (no GPU needed) and write"
                    " them as a Lightning .ckpt (LightningModule.load_from_checkpoint) or as safetensors files.")
    parser.add_argument("checkpoint_dir", metavar="CKPT_DIR", help="a checkpoint folder (e.g. checkpoints/last.ckpt)")
    parser.add_argument("out", metavar="OUT", help="the .ckpt file, or the folder for the safetensors files")
    parser.add_argument("--format", choices=_FORMATS, default=None,
                        help="default: ckpt when OUT ends in .ckpt/.pt/.pth, else safetensors; hf: a transformers"
                             " model folder (from_pretrained); peft: a PEFT adapter folder (PeftModel.from_pretrained)")
    parser.add_argument("--model", default=None,
                        help="hf/peft: the attribute path of the model in the LightningModule, when it holds several")
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="export even when frozen weights were left out of the checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        written = consolidate_checkpoint(args.checkpoint_dir, args.out, format=args.format, dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, allow_missing=args.allow_missing,
                                         progress=not args.no_progress, model=args.model)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"lightning-zero consolidate: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
