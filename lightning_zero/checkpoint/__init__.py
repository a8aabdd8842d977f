"""On-disk layout, crash-safe sharded save/load, resume on another number of processes, and full state dicts.

A ZeroStrategy checkpoint is a folder::

    epoch=3-step=400.ckpt/                 <- the path you pass to `ckpt_path=` / `save_checkpoint`
        meta.json                           written last: format, world size, stage, engines, and the size of every
                                            file below (a folder whose files do not match is refused)
        lightning.pt                        Lightning's state: loops, callbacks, schedulers, optimizer hyperparameters
        rng/rank_00000.pt ...               each rank's RNG states (torch, CUDA, numpy, Python)
        <engine name>/                      one folder per DeepSpeed engine ("model", or e.g. "generator")
            latest                          DeepSpeed's tag file
            checkpoint/                     DeepSpeed's shards: *_model_states.pt, *_optim_states.pt
            checkpoint_universal/           added on the first resume with another number of processes or another
                                            ZeRO stage: DeepSpeed's universal format, cached for the next resume
        <frozen engine name>/weights.pt     a model without optimizer: its full weights (plain tensors)
        latest, zero_to_fp32.py, ...        for DeepSpeed's and Lightning's converters: the one engine's tag folder
                                            ("model/checkpoint"), or why they cannot convert this folder (see LATEST)
        hf/                                 only with transformers/peft models inside: their configs, tied keys and
                                            adapter weight names, for `consolidate --format hf/peft` (export.py)

Every rank writes into ``<path>.partial`` first; after all ranks finished, rank 0 writes ``meta.json`` and renames the
folder to ``<path>``. Overwriting an existing ``<path>`` (``last.ckpt``) swaps the two folders atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux), so ``<path>`` is never missing or half-written. A crash at any point leaves
the previous checkpoint loadable; a ``.partial`` folder is never loaded.

Trusted files: ``lightning.pt`` and ``rng/*`` are read with ``weights_only=True`` (``trainer.fit(...,
weights_only=False)`` lifts that for unusual callback state); ``weights.pt`` with ``weights_only=True``. DeepSpeed's
shards are pickles that DeepSpeed reads with ``weights_only=False``: only load or convert checkpoints you trust, and
share weights as safetensors (``lightning-zero consolidate``).

The package: ``files`` (the folder's file names, commit, removal, ``validate_path``, the error of a failed save),
``weights`` (full weights in and out of partitioned modules, weights files), ``universal`` (resuming on another
number of processes or stage), ``folder`` (``save`` and ``load``). Their names used elsewhere are imported here.
"""

from lightning_zero.checkpoint.files import (FORMAT, LIGHTNING_STATE, META, PARTIAL_SUFFIX, REMOVING_SUFFIX, RNG_DIR,
                                             TAG, UNIVERSAL_TAG, WEIGHTS, _commit, _exchange, _raise_if_save_failed,
                                             remove, validate_path)
from lightning_zero.checkpoint.folder import (LATEST, SAVE_DELAY_ENV, _check_model, _module_prefixes, _state_keys,
                                              engine_weights, load, model_key, save)
from lightning_zero.checkpoint.universal import _serve_every_stage, resume_method
from lightning_zero.checkpoint.weights import gather_full_state_dict, load_full_state_dict, read_weights_file

__all__ = ["FORMAT", "engine_weights", "gather_full_state_dict", "load", "load_full_state_dict", "model_key",
           "read_weights_file", "remove", "resume_method", "save", "validate_path"]
