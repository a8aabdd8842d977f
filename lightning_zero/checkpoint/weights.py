"""Full (unsharded) weights in and out of modules that may be ZeRO-3 partitioned, one module at a time:
``gather_full_state_dict``, ``load_full_state_dict`` from a state dict, a torch/Lightning file or safetensors (tied
parameters need only one of their keys), and ``read_weights_file``, whose errors say what a wrong file is."""

from __future__ import annotations

import codecs
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_zero.checkpoint.files import META, _first_line


def _ds_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]


def gather_full_state_dict(root: nn.Module, rank_zero_only: bool, is_rank_zero: bool) -> dict[str, Any]:
    """The state dict of a ZeRO-3 partitioned module, gathered one module at a time into CPU memory.

    Collective: every rank must call it. Never more than one module's parameters are gathered at once. Tied
    parameters (one Parameter under several names, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``)
    share one tensor, as in ``state_dict()`` of the unpartitioned module.
    """
    import deepspeed

    keep = is_rank_zero or not rank_zero_only
    out: dict[str, Any] = {}
    copies: dict[int, torch.Tensor] = {}  # id(parameter or buffer) -> its CPU copy
    for prefix, module in root.named_modules():
        prefix = f"{prefix}." if prefix else ""
        with deepspeed.zero.GatheredParameters(_ds_params(module), modifier_rank=None):
            if keep:
                part: dict[str, Any] = {}
                module._save_to_state_dict(part, prefix, keep_vars=True)
                for k, v in part.items():
                    if isinstance(v, torch.Tensor):
                        if id(v) not in copies:
                            copies[id(v)] = v.detach().cpu().clone()
                        v = copies[id(v)]
                    out[k] = v
    return out


def load_full_state_dict(root: nn.Module, source: Mapping[str, Any] | str | os.PathLike, strict: bool = True, *,
                         prefix: str = "") -> tuple[list[str], list[str]]:
    """Load full (unsharded) weights into ``root``, which may be ZeRO-3 partitioned, one module at a time.

    Args:
        root: the module to load into: the LightningModule, or a submodule (e.g. inside ``configure_model``, right
            after building it: the usual ``from_pretrained`` step).
        source: a state dict, or the path to a Lightning ``.ckpt`` (its ``"state_dict"`` is used), a file written by
            ``torch.save`` (read with ``weights_only=True``, memory-mapped), a ``.safetensors`` file or a folder of
            ``.safetensors`` shards (read lazily, one module's tensors at a time; needs ``pip install safetensors``).
        strict: with ``True``, any missing or unexpected key raises ``ValueError`` listing them, before anything is
            loaded; with ``False`` the keys present are loaded and the lists are returned.
        prefix: use only the source keys that start with it, without it (``prefix="net."`` loads the ``net.*``
            weights of a LightningModule checkpoint into ``self.net``).

    Tied parameters (one Parameter under several names, as ``tie_weights`` leaves GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``) need only one of their keys in the weights: ``save_pretrained`` leaves the tied copy
    out, and loading one name sets the other. Two keys of one tie with different values raise ``ValueError``.

    Returns ``(missing_keys, unexpected_keys)``. A shape mismatch always raises ``ValueError`` before loading. At
    stage 3 this is collective: every rank calls it with the same source (in ``configure_model`` they all do). At most
    one module's parameters are gathered at a time, and rank 0's values are the ones every rank keeps.
    """
    with _open_weights(source, prefix) as weights, _outside_zero_init():
        targets = root.state_dict(keep_vars=True)  # the parameter objects, not copies: cheap, partitioned or not
        available = set(weights.keys())
        ties = _tie_groups(targets)
        # A tied copy left out of the weights (save_pretrained leaves out lm_head.weight) is loaded through its tie.
        missing = sorted(k for k in targets if k not in available and not available.intersection(ties.get(k, ())))
        unexpected = sorted(available - set(targets))
        if strict and (missing or unexpected):
            raise ValueError(_key_report(missing, unexpected) + " Fix the keys (see `prefix=`) or pass strict=False.")
        _check_shapes(targets, weights, available)
        _check_tied_values(ties, weights, available)
        owned: dict[str, list[str]] = {}  # module prefix -> its own keys found in the source
        for key in targets:
            if key in available:
                head, _, _ = key.rpartition(".")
                owned.setdefault(f"{head}." if head else "", []).append(key)
        errors: list[str] = []
        for module_prefix, module in _walk(root):
            keys = owned.get(module_prefix)
            if not keys:
                continue
            local = {k: weights[k] for k in keys}
            with _gathered_for_write(_ds_params(module)):
                module._load_from_state_dict(local, module_prefix, {}, False, [], [], errors)
            del local
    if errors:
        raise ValueError("Loading the weights failed:\n  " + "\n  ".join(errors))
    return missing, unexpected


def _tie_groups(targets: Mapping[str, Any]) -> dict[str, list[str]]:
    """Key -> every key naming the same Parameter (or buffer) object, for tied keys only. Identity is what ties
    weights in PyTorch (transformers' ``tie_weights`` assigns one Parameter to both modules), partitioned or not."""
    names: dict[int, list[str]] = {}
    for key, value in targets.items():
        if isinstance(value, torch.Tensor):
            names.setdefault(id(value), []).append(key)
    return {key: group for group in names.values() if len(group) > 1 for key in group}


def _check_tied_values(ties: Mapping[str, list[str]], weights: _Weights, available: set[str]) -> None:
    """Where the weights hold several keys of one tied parameter, they must agree: one value is all the model keeps."""
    for group in {tuple(g) for g in ties.values()}:
        present = [k for k in group if k in available]
        if len(present) > 1:
            first = weights[present[0]]
            differ = [k for k in present[1:] if not torch.equal(first, weights[k])]
            if differ:
                raise ValueError(
                    f"The weights hold different values for {present[0]!r} and {differ[0]!r}, which are one tied"
                    " parameter in the model (the same Parameter object under both names). Untie them in the model"
                    " (give the module its own nn.Parameter) or drop one of the two keys from the weights.")


def _walk(module: nn.Module, prefix: str = "") -> Any:
    """(prefix, module) like ``state_dict`` visits them: a module reachable by two paths is visited under both."""
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _gathered_for_write(params: list[nn.Parameter]) -> Any:
    """Gather one module's partitioned parameters; on exit rank 0's values are broadcast and re-partitioned."""
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def _outside_zero_init() -> Iterator[None]:
    """Inside ``configure_model`` at stage 3, zero.Init converts every new floating tensor to the compute dtype and
    device; lift that while reading weights (DeepSpeed does the same around engine creation)."""
    zero_init = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero_init is not None and zero_init.zero_init_context > 0 and zero_init.top_level_context is not None
    if not active:
        yield
        return
    zero_init.shutdown_init_context()
    try:
        yield
    finally:
        zero_init.restore_init_context()


def _check_shapes(targets: Mapping[str, Any], weights: _Weights, available: set[str]) -> None:
    wrong = []
    for key, target in targets.items():
        if key in available and isinstance(target, torch.Tensor):
            want = tuple(getattr(target, "ds_shape", target.shape))
            got = weights.shape(key)
            if got is not None and got != want:
                wrong.append(f"{key}: the weights have {list(got)}, the model {list(want)}")
    if wrong:
        raise ValueError(f"{len(wrong)} shape mismatch(es) between the weights and the model:\n  " + "\n  ".join(wrong))


class _Weights:
    """Read access to a source of weights, by key, with ``prefix`` removed from the source's keys."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def keys(self) -> list[str]:
        return [k[len(self.prefix):] for k in self._raw_keys() if k.startswith(self.prefix)]

    def __getitem__(self, key: str) -> Any:
        return self._get(self.prefix + key)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self._shape(self.prefix + key)

    def _raw_keys(self) -> list[str]:
        raise NotImplementedError

    def _get(self, key: str) -> Any:
        raise NotImplementedError

    def _shape(self, key: str) -> tuple[int, ...] | None:
        raise NotImplementedError


class _DictWeights(_Weights):
    def __init__(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        super().__init__(prefix)
        self.state_dict = state_dict

    def _raw_keys(self) -> list[str]:
        return list(self.state_dict)

    def _get(self, key: str) -> Any:
        return self.state_dict[key]

    def _shape(self, key: str) -> tuple[int, ...] | None:
        value = self.state_dict[key]
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _SafetensorsWeights(_Weights):
    """One or several ``.safetensors`` files, opened lazily: a tensor is read when a module asks for it."""

    def __init__(self, handles: list[Any], files: list[Path], prefix: str) -> None:
        super().__init__(prefix)
        self.where: dict[str, Any] = {}
        for handle, file in zip(handles, files):
            for key in handle.keys():
                if key in self.where:
                    raise ValueError(f"Key {key!r} is in two of the safetensors files in {str(file.parent)!r}.")
                self.where[key] = handle

    def _raw_keys(self) -> list[str]:
        return list(self.where)

    def _get(self, key: str) -> Any:
        return self.where[key].get_tensor(key)

    def _shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self.where[key].get_slice(key).get_shape())


@contextmanager
def _open_weights(source: Mapping[str, Any] | str | os.PathLike, prefix: str) -> Iterator[_Weights]:
    if isinstance(source, Mapping):
        yield _DictWeights(_unwrap_lightning(source, "the state dict"), prefix)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_full_state_dict(source=...) takes a state dict or a path; got an object of type"
                        f" {type(source).__name__}.")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Weights file {str(source)!r} does not exist.")
    if path.is_dir():
        if (path / META).is_file():
            raise ValueError(f"{str(source)!r} is a sharded ZeroStrategy checkpoint folder. Resume from it with"
                             " `trainer.fit(model, ckpt_path=...)`, or consolidate it into one weights file first"
                             " (`lightning-zero consolidate`) and pass that file.")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{str(source)!r} is a folder without .safetensors files. Pass a weights file (.ckpt,"
                             " .pt/.bin, .safetensors) or a folder of .safetensors shards.")
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        yield _DictWeights(_unwrap_lightning(_torch_load(path), repr(str(source))), prefix)
        return
    safe_open = _require_safetensors()
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        yield _SafetensorsWeights(handles, files, prefix)


def _require_safetensors() -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("Reading .safetensors weights needs the safetensors package:"
                          " `pip install safetensors`.") from None
    return safe_open


def _load_mapped(path: str | Path, weights_only: bool) -> Any:
    """``torch.load`` onto the CPU, memory-mapped when the file format allows it (an old, non-zip file cannot be)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the file format allows it."""
    _refuse_non_torch_file(path)
    try:
        return _load_mapped(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"torch.load({str(path)!r}, weights_only=True) refused the file: {str(err).splitlines()[0]} It holds"
            " objects other than tensors. If you trust it, load it yourself"
            f" (`torch.load(path, weights_only=False)['state_dict']`) and pass the dict."
        ) from None


def _unwrap_lightning(obj: Any, what: str) -> Mapping[str, Any]:
    """A Lightning checkpoint's ``"state_dict"``, or the state dict itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors).")
    return obj


def _key_report(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10
                                                                                     else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}"
                     + (" ..." if len(unexpected) > 10 else ""))
    return "The checkpoint does not match the model: " + "; ".join(parts) + "."


def read_weights_file(path: str, trusted: bool = False) -> Any:
    """``torch.load`` a single-file checkpoint, with ``weights_only=True`` unless ``trusted``, memory-mapped when the
    file allows it; a file torch cannot read, or one holding objects it refuses, is a ``ValueError`` naming the fix."""
    _refuse_non_torch_file(path)
    try:
        return _load_mapped(path, weights_only=not trusted)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on a file that is not a checkpoint
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise ValueError(f"{path!r} holds objects other than tensors, which `weights_only=True` loading refuses."
                             " If you trust the file, pass `trainer.fit(..., weights_only=False)`.") from None
        raise ValueError(_not_a_checkpoint(path, err)) from None


def _refuse_non_torch_file(path: str | Path) -> None:
    what = _not_torch_file(path)
    if what:  # torch.load would call a text file "objects other than tensors" and suggest weights_only=False
        raise ValueError(f"{str(path)!r} is not a checkpoint: it is {what}. Pass a checkpoint folder written by"
                         " ZeroStrategy, a Lightning/torch checkpoint file (.ckpt/.pt), or .safetensors weights.")


def _not_torch_file(path: str | Path) -> str | None:
    """What the file is when it is neither of torch.save's formats (a zip archive, or a legacy pickle), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    if head[8:10] == b'{"':  # safetensors: an 8-byte header length, then the JSON header
        return "safetensors weights without the .safetensors suffix (rename it to end in .safetensors)"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except UnicodeDecodeError:
        return f"binary data of another format (it starts with {head[:8]!r})"
    first = (text.strip().splitlines() or [""])[0][:60]
    kind = "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"
    return f"{kind} (it starts with {first!r})"


def _not_a_checkpoint(path: str, err: Exception) -> str:
    return (f"{path!r} is not a checkpoint: torch.load cannot read it ({_first_line(err)}). Pass a checkpoint folder"
            " written by ZeroStrategy, a Lightning/torch checkpoint file, or .safetensors weights.")
