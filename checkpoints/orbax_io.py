"""shardlm checkpoints: a folder holding the parameters (Orbax, sharded), the config and the tokenizer.

    DST/params/          Orbax StandardCheckpointer save of {"layers.0.attn.q": array, ...}
    DST/tokenizer.json   (+ tokenizer_config.json, generation_config.json, ... where the source had them)
    DST/shardlm.json     format, config, dtype and every parameter's shape and dtype; written last

Whatever nnx.State the model holds is saved (any dtypes, extra parameters such as quantization
scales); restore takes its structure, dtypes and shardings from an abstract model, so a checkpoint
restores onto any mesh, layout and device count. A save is written to `DST.partial` and renamed into
place only when complete, so a folder with shardlm.json is always a whole checkpoint and an
interrupted save leaves the previous one untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from shardlm.checkpoints.gguf import CheckpointError
from shardlm.models.config import ModelConfig, RopeScaling

FORMAT_FILE = "shardlm.json"
PARAMS_DIR = "params"
FORMAT = "shardlm-orbax"
VERSION = 1
RESTORE_GROUP_BYTES = 64 * 2**20


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, FORMAT_FILE))


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
    return ModelConfig(**d)


def read_metadata(path: str) -> dict:
    file = os.path.join(path, FORMAT_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        meta["config"] = config_from_dict(meta["config"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read shardlm checkpoint metadata {file}: {e}") from None


def save_tokenizer(tokenizer, folder: str) -> None:
    """A Tokenizer (e.g. built from GGUF metadata) as tokenizer.json + tokenizer_config.json."""
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    text = tokenizer.token_text
    config = {"bos_token": text(tokenizer.bos_token_id), "eos_token": text(tokenizer.eos_token_id),
              "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=1)


def _save_checkpointer(largest_nbytes: int):
    """A synchronous Orbax checkpointer that keeps few bytes in flight while writing (its default is
    96 GB). Orbax refuses an array at least as large as the limit, hence twice the largest parameter."""
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=max(0.25, 2 * largest_nbytes / 1e9)))


def can_create_files_in(folder: str) -> bool:
    """Whether a file can be created in `folder`, tried with a temporary file (removed at once):
    permission bits alone miss read-only mounts and the root user's view of them."""
    try:
        fd, path = tempfile.mkstemp(dir=folder, prefix=".shardlm-write-check-")
    except OSError:
        return False
    os.close(fd)
    os.remove(path)
    return True


def check_destination(dst: str, force: bool) -> str:
    """The absolute DST; raises before anything is written if it exists and `force` is off."""
    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.lexists(dst) and not force:
        raise CheckpointError(f"destination already exists: {dst} (use --force to replace it)")
    folder = os.path.dirname(dst)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.lexists(folder) else "does not exist"
        raise CheckpointError(f"cannot create the destination {dst}: {folder} {what}")
    if not can_create_files_in(folder):
        raise CheckpointError(f"cannot create the destination {dst}: the folder {folder} is not writable")
    return dst


def save(dst: str, model: nnx.Module, config: ModelConfig, *, tokenizer=None, tokenizer_files: list[str] = (),
         force: bool = False, extra: dict | None = None) -> str:
    """Save `model` with its config and tokenizer as a complete shardlm checkpoint at `dst`.

    tokenizer_files are copied as they are (an HF folder's tokenizer.json, ...); otherwise
    `tokenizer` is written out. With force, an existing `dst` is replaced only once the new
    checkpoint is complete.
    """
    dst = check_destination(dst, force)
    if jax.process_count() > 1:  # the .partial/rename protocol below is written for one process
        raise CheckpointError("saving a checkpoint from a multi-process job is not supported; convert in one process")
    import orbax.checkpoint as ocp

    partial = dst + ".partial"
    if os.path.lexists(partial):  # left by an interrupted save
        shutil.rmtree(partial)
    flat = [(_name(path), var) for path, var in nnx.to_flat_state(nnx.state(model))]
    try:
        os.makedirs(partial)
        with _save_checkpointer(max(v.size * v.dtype.itemsize for _, v in flat)) as ckptr:
            ckptr.save(os.path.join(partial, PARAMS_DIR), args=ocp.args.StandardSave({n: v[...] for n, v in flat}))
        for file in tokenizer_files:
            shutil.copy(file, partial)
        if not tokenizer_files and tokenizer is not None:
            save_tokenizer(tokenizer, partial)
        meta = {"format": FORMAT, "version": VERSION, "config": config_to_dict(config),
                "dtype": str(np.dtype(flat[0][1].dtype)),
                "params": {name: {"shape": list(var.shape), "dtype": str(np.dtype(var.dtype))} for name, var in flat}}
        meta.update(extra or {})
        with open(os.path.join(partial, FORMAT_FILE), "w") as f:  # last: marks the folder complete
            json.dump(meta, f, indent=1)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.lexists(dst):  # --force: swap the complete new checkpoint in, then drop the old one
        old = dst + ".old"
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(dst, old)
        os.rename(partial, dst)
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(partial, dst)
    return dst


def restore(path: str, abstract: nnx.Module, placement, progress=None) -> nnx.Module:
    """The checkpoint's parameters in the structure and dtypes of `abstract`, on `placement`.

    Each array is read by Orbax straight into its shards (`placement.param_sharding(axes, shape,
    path)`, a sharding.placement.Placement); dtypes that differ from the saved ones are cast on restore.
    """
    saved = read_metadata(path)["params"]
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    targets = {}
    for p, var in flat:
        name = _name(p)
        if name not in saved:
            raise CheckpointError(f"{path}: parameter {name!r} is missing from the checkpoint")
        if tuple(saved[name]["shape"]) != tuple(var.shape):
            raise CheckpointError(f"{path}: parameter {name!r} has shape {saved[name]['shape']}, "
                                  f"the model expects {list(var.shape)}")
        sharding = placement.param_sharding(var.get_metadata().get("axes"), var.shape, p)
        targets[name] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)
    # A few parameters at a time (partial restores of ~64 MB): one restore of everything held its
    # buffers until the end, +40-60% of the model on top of the arrays (benchmarks/load_memory.py).
    import orbax.checkpoint as ocp

    arrays, group, group_bytes = {}, {}, 0
    params = os.path.join(os.path.abspath(path), PARAMS_DIR)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        for i, (name, target) in enumerate(targets.items()):
            group[name] = target
            group_bytes += math.prod(target.shape) * target.dtype.itemsize
            if group_bytes < RESTORE_GROUP_BYTES and i + 1 < len(targets):
                continue
            restore_args = {n: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape)
                            for n, t in group.items()}
            try:
                arrays.update(ckptr.restore(params, args=ocp.args.PyTreeRestore(
                    item=group, restore_args=restore_args, partial_restore=True)))
            except Exception as e:  # Orbax/tensorstore errors on missing or damaged files
                raise CheckpointError(f"cannot restore {params} ({', '.join(group)}): {e}") from None
            if progress is not None:
                progress(len(group))
            group, group_bytes = {}, 0
    return nnx.merge(graphdef, nnx.from_flat_state([(p, var.replace(arrays[_name(p)])) for p, var in flat]))
