"""Compiled step programs kept on disk, so a restarted run loads them instead of tracing them again.

JAX's persistent compilation cache (`--compile-cache`) skips XLA's compile, but every start still
traces and lowers each step before it can ask that cache (the embedded model: ~1 s a program on
CPU, most of a warm start's time to its first token). With a directory set (`set_directory`; the
CLI sets the compile cache's), the paged engine keeps each step's compiled executable
(jax.experimental.serialize_executable) under `<dir>/shardlm-programs/`, keyed by everything the
program depends on: shardlm's source, JAX's version and flags, the devices, the step's static
`Step`, and the shapes, dtypes and shardings of its arguments. Another key is a miss (traced and
compiled, then stored; not through JAX's cache: an executable XLA:CPU reads back from it serializes
without its code); an entry that cannot be read is a miss too.
One process only: the processes of a multi-host job rely on JAX's cache alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import pickle
import time
import warnings

import jax
import jaxlib

from shardlm.sharding import compat

_SUBPACKAGES = ("models", "sharding", "engine", "checkpoints")
_directory: str | None = None
LOAD_EVENT = "/shardlm/programs/load_duration"  # a jax.monitoring duration event, like JAX's compile events


class ProgramStoreWarning(UserWarning):
    """A stored program not read back or not written: the run goes on, compiling it."""


def set_directory(path: str | None) -> None:
    """Keep step programs under `path` (a directory JAX's cache also takes, e.g. gs://...), or none."""
    global _directory
    _directory = path


def store() -> ProgramStore | None:
    """The store set by `set_directory`, if any (and this is a single-process run)."""
    if _directory is None or jax.process_count() > 1:
        return None
    return ProgramStore(_directory)


@functools.cache
def source_digest() -> str:
    """sha256 of shardlm's Python source: a program traced by other code is another program."""
    h = hashlib.sha256()
    for name in _SUBPACKAGES:
        folder = importlib.import_module(f"shardlm.{name}").__path__[0]
        for file in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
            with open(os.path.join(folder, file), "rb") as f:
                h.update(f"{name}/{file}\0".encode() + f.read())
    return h.hexdigest()


def _describe(leaf) -> str:
    # An array and its ShapeDtypeStruct (a pool still being zeroed) describe alike.
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return f"{leaf.shape}{leaf.dtype}{leaf.weak_type}{leaf.sharding}"
    return f"{type(leaf).__name__}{getattr(leaf, 'shape', ())}{getattr(leaf, 'dtype', '')}"


def program_key(name: str, static, args) -> str:
    """The key of step `name` traced with static argument `static` on arguments `args`."""
    leaves, tree = jax.tree.flatten(args)
    devices = jax.devices()
    parts = [name, source_digest(), jax.__version__, jaxlib.__version__, devices[0].client.platform_version, repr([(d.id, d.device_kind) for d in devices]),
             os.environ.get("XLA_FLAGS", ""), repr([(f, getattr(jax.config, f)) for f in (
                 "jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable")]),
             repr(static), str(tree), *map(_describe, leaves)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _device_ids(program: jax.stages.Compiled) -> list[int]:
    """The devices the program runs on, in its device assignment's order (it is loaded onto the
    same ones: a one-device program in a process of 8 devices runs on its one)."""
    sharding = jax.tree.leaves(program.input_shardings)[0]
    return [d.id for d in sharding._device_assignment]


class ProgramStore:
    """Compiled programs under `<root>/shardlm-programs/<key>`."""

    def __init__(self, root: str):
        from etils import epath

        self.folder = epath.Path(root) / "shardlm-programs"

    def compiled(self, name: str, jitted, static, *args) -> jax.stages.Compiled:
        """`jitted(static, *args)`'s program: read back if stored, else compiled and stored."""
        from jax.experimental import serialize_executable

        path = self.folder / program_key(name, static, args)
        try:
            t0 = time.perf_counter()
            blob, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
            by_id = {d.id: d for d in jax.devices()}
            program = serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                                execution_devices=[by_id[i] for i in device_ids])
            jax.monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - t0)
            return program
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a stale or torn entry is a miss, compiled again below
            warnings.warn(f"stored program {path} not loaded ({type(e).__name__}: {e}); compiling it",
                          ProgramStoreWarning, stacklevel=2)
        with compat.without_compilation_cache():  # its program would be stored without its code
            program = jitted.lower(static, *args).compile()
        partial = path.parent / f"{path.name}.{os.getpid()}.partial"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(pickle.dumps((*serialize_executable.serialize(program), _device_ids(program))))
            partial.replace(path)  # whole or absent: a reader never sees half an entry
        except Exception as e:  # noqa: BLE001 - not storing costs the next start a compile, nothing else
            warnings.warn(f"step program not stored under {self.folder} ({type(e).__name__}: {e})",
                          ProgramStoreWarning, stacklevel=2)
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
        return program
